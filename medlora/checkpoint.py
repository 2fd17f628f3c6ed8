"""Checkpoints that a crash cannot corrupt, and that resume a run exactly.

A checkpoint is one file written to a temporary name, flushed to disk, then renamed over the
old one: `os.replace` is atomic, so at every instant the path holds either the previous good
checkpoint or the new complete one. It holds only tensors and plain values and is read with
`torch.load(weights_only=True)`, so loading never executes pickled code.

A write that fails (disk full, I/O error) removes its temporary file and raises
`CheckpointError`; the previous checkpoint stays as it was. A process killed mid-write can leave
`checkpoint.pt.tmp` behind, which the next save overwrites; it is never read.

Left out: sharded or per-rank checkpoints (rank 0 writes one file; the LoRA state is a few MB)
and a history of checkpoints (only the latest, plus `best_adapter/` kept by the trainer).
Mirrors nanoGPT's `ckpt.pt` (model, optimizer, iteration, best validation loss), made atomic,
pickle-free, and complete enough (scheduler, RNG, data position) to resume bit-exactly.
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written (not enough space, a failed write) or read (damaged, or
    holding pickled code)."""


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # also KeyboardInterrupt: never leave a half-written .tmp behind
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"{path}: cannot write checkpoint ({e.strerror or e}); the previous "
                                  f"checkpoint, if any, is unchanged") from e
        raise
    fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def estimate_bytes(params: list[torch.Tensor]) -> int:
    """A checkpoint's size: the trainable weights plus AdamW's two moments (3 copies), plus a
    little for the pickled structure, scheduler, RNG state and counters."""
    return 3 * sum(p.numel() * p.element_size() for p in params) + (1 << 20)


def check_free_space(folder: str | os.PathLike, checkpoint_bytes: int, adapter_bytes: int) -> str | None:
    """Fail before training, not at the first save. A save needs room for a second checkpoint
    (the .tmp sits beside the old one until the rename), plus adapter/ and best_adapter/ and a
    few MB of metrics and plots. Returns a warning when space is tight, raises when too small."""
    need = 2 * checkpoint_bytes + 2 * adapter_bytes + (8 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise CheckpointError(f"{folder}: only {free / 2**20:.1f} MiB free, a checkpoint and adapters need about "
                              f"{need / 2**20:.1f} MiB; free some space or choose another --out")
    if free < 4 * need:
        return f"{folder}: little free space ({free / 2**20:.1f} MiB; checkpoints need about {need / 2**20:.1f} MiB)"
    return None


def load(path: str | os.PathLike) -> dict:
    """Read a checkpoint; anything beyond tensors and plain values (pickled code) is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise CheckpointError(f"{path}: refused: it holds pickled Python objects, not only tensors and plain "
                              f"values{f' ({why.group(1)})' if why else ''}; checkpoints are read with "
                              f"weights_only=True and never run pickled code") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
