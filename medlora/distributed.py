"""Data-parallel training over processes started by `torchrun`: what each rank does differently.

Every rank holds the whole frozen model and the same LoRA weights. All ranks walk the same global
batch stream (batches of `batch_size x world_size` rows, in the order `(seed, epoch)` fixes); rank r
takes rows r, r + world_size, ... of every global batch. So the union of the ranks' micro-batches in
a step is exactly the batch a single process with `batch_size x world_size` would use, and the data
position (epoch, batch) is the same number on every rank, which is what a checkpoint stores.

After the local backward passes the LoRA gradients are summed over ranks in one all-reduce per
optimizer step. Each rank divided its summed loss by the step's supervised-token count over *all*
ranks, so the sum is exactly the single-process gradient and every rank takes the same step.
Only rank 0 writes files or prints.

Why a hand-written all-reduce rather than `DistributedDataParallel`: with LoRA the trainable
gradients are a few MB, so DDP's overlap of communication with backward buys nothing, while its
machinery costs clarity here: it averages gradients (the token normalisation would then need a
`x world_size` correction), it needs `no_sync()` on every micro-batch but the last, it must be
unwrapped for the head loss and adapter saving, and its parameter broadcast at construction walks
the frozen base weights too. One explicit `all_reduce` after accumulation is the whole story.

Left out: FSDP, tensor or pipeline parallelism (a 135M model fits on any one device), and
overlapping communication with backward. Mirrors what `torch.nn.parallel.DistributedDataParallel`
does for the gradients, written out as one `all_reduce` (see above), under `torchrun`'s
environment variables as nanoGPT's `train.py` uses them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job. The default is a plain single process: every
    collective is then a no-op, so the training loop has one code path."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None = no process group (plain `python train.py`)

    @property
    def active(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: list[int]) -> list[int]:
        """This rank's rows of a global batch (strided: the rows are sorted by length, so
        striding gives every rank a similar amount of work)."""
        return rows[self.rank::self.world_size]

    def sum_ints(self, *values: int) -> list[int]:
        """Integers summed over ranks (one small all-reduce)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return [int(round(v)) for v in t.tolist()]

    def sum_floats(self, *values: float) -> list[float]:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (e.g. "a signal arrived here")."""
        return self.sum_ints(int(flag))[0] > 0

    def sum_gradients(self, params: list[torch.nn.Parameter], loss_sum: float) -> float:
        """Sum the gradients of `params` over ranks in place, in one all-reduce; the step's
        summed loss rides along in the same buffer. Returns the loss summed over ranks."""
        if not self.active:
            return loss_sum
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads]
                         + [torch.tensor([loss_sum], dtype=torch.float32, device=grads[0].device)])
        tdist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        return float(flat[-1])

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Copy rank 0's values into every rank's tensors (in place)."""
        if self.active:
            for t in tensors:
                tdist.broadcast(t.data, src=0)

    def broadcast(self, obj):
        """Rank 0's Python object, on every rank (pickled between our own processes only)."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's object, as a list on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        tdist.gather_object(obj, out, dst=0)
        return out

    def on_main(self, fn):
        """Run `fn` on rank 0 only (file writes) and return its result on every rank. If it
        raises, every rank raises the same error: otherwise the other ranks would wait for
        rank 0 at the next collective until the job timed out."""
        if not self.active:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - handed to every rank, then raised
                error = e
        result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()


SINGLE = Dist()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def device_problem(device: torch.device) -> str | None:
    """Under torchrun each process takes cuda:LOCAL_RANK, so a GPU number in --device would be
    silently ignored: say so instead (GPUs are chosen with CUDA_VISIBLE_DEVICES)."""
    if launched_by_torchrun() and device.type == "cuda" and device.index is not None:
        return (f"--device {device}: under torchrun every process uses cuda:LOCAL_RANK; pass --device cuda "
                f"and choose the GPUs with CUDA_VISIBLE_DEVICES")
    return None


def setup(device: torch.device) -> Dist:
    """Join the process group torchrun describes in the environment (MASTER_ADDR, MASTER_PORT,
    RANK, WORLD_SIZE, LOCAL_RANK). CUDA: one GPU per process, cuda:LOCAL_RANK, NCCL. CPU: gloo.
    Without torchrun this is the plain single process."""
    if not launched_by_torchrun():
        return Dist(device=device)
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        tdist.init_process_group("nccl", device_id=device)
    else:
        tdist.init_process_group("gloo")
    return Dist(rank=rank, world_size=world, local_rank=local, device=device, backend=tdist.get_backend())


def shutdown(dist: Dist, wait: bool = True) -> None:
    """Leave the process group. `wait`: every rank arrives first (gloo aborts on a peer's early exit);
    a rank leaving by an exception of its own does not wait, since the others may never arrive."""
    if dist.active and tdist.is_initialized():
        if wait:
            try:
                tdist.barrier()
            except RuntimeError:
                pass
        tdist.destroy_process_group()
