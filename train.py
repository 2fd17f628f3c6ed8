"""LoRA fine-tuning of SmolLM on MedQuAD.

    python train.py --rank 8                      # the main job: MedQuAD + safety examples + general replay
    python train.py --rank 8 --no-safety-data --no-replay-data   # MedQuAD only
    python train.py --sanity                      # ~200 rows, overfit quickly, pass/fail verdict
    python train.py --rank 8 --out runs/x --resume
    python train.py --init-adapter runs/x/best_adapter --split-from runs/x --limit-rows 1000   # a second stage
    torchrun --nproc-per-node 4 train.py --rank 8     # data parallel: --batch-size is per process

Writes a run folder: config.json (the run record), split.json, metrics.jsonl, loss.png,
checkpoint.pt, adapter/ (latest) and best_adapter/ (best validation loss), summary.json.

Exit status: 0 done; 1 sanity check failed; 2 bad flags, data or --resume; 3 non-finite loss
(stopped, the last good checkpoint is kept); 4 checkpoint trouble (too little free space, a failed
write, which keeps the previous checkpoint, or an unreadable checkpoint on --resume); 130
interrupted by SIGINT or SIGTERM (checkpoint saved, the resume command printed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from medlora.cli import (add_model_flags, fraction, given_flags, nonneg_float, nonneg_int, pick_device, positive_float,
                         positive_int, revision_unused, training_precision)

ROOT = Path(__file__).resolve().parent
INTERRUPTED = 130  # 128 + SIGINT, for SIGTERM too: "stopped early, resumable"


def seed_int(s: str) -> int:
    v = int(s)
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {s}")
    return v


# --sanity: what it sets unless the command line gives the flag (no validation split, no early stop)
SANITY = dict(limit_rows=200, max_seq_len=160, long_rows="truncate", lr=1e-3, batch_size=4, warmup_steps=5,
              max_steps=120, val_fraction=0.0, eval_every=10**9, patience=0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=positive_int, default=8)
    g.add_argument("--alpha", type=positive_float, default=None, help="default: 2 x rank")
    g.add_argument("--dropout", type=fraction, default=0.0,
                   help="LoRA dropout on the input of A; layers reading one tensor (q/k/v, gate/up) share a mask")
    g.add_argument("--targets", default="all-linear", help="all-linear | attention | mlp | comma list of q_proj,...")
    g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    g.add_argument("--init-adapter", default=None,
                   help="start from this adapter (PEFT format) instead of zeros: its rank, alpha, targets and "
                        "rsLoRA come with it (flags that disagree are an error); --dropout is this run's")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="hub data set id, parquet/csv/jsonl file or MedQuAD XML folder "
                                                "(default: keivalya/MedQuad-MedicalQnADataset, shipped copy offline)")
    g.add_argument("--question-col", default="Question")
    g.add_argument("--answer-col", default="Answer")
    g.add_argument("--max-seq-len", type=positive_int, default=320,
                   help="tokens per training row (default 320: with --long-rows truncate, answers are cut at a "
                        "sentence end to fit, which teaches answers that end; docs/recipe)")
    g.add_argument("--long-rows", choices=["drop", "truncate"], default="truncate",
                   help="what to do with MedQuAD rows over --max-seq-len (default truncate: shorten the answer); "
                        "chat examples over it (--extra-data, safety, replay) are left out and counted")
    g.add_argument("--val-fraction", type=fraction, default=0.1)
    g.add_argument("--limit-rows", type=positive_int, default=None, help="use only this many rows (split first)")
    g.add_argument("--split-from", default=None, metavar="RUN",
                   help="hold out exactly the MedQuAD rows run folder RUN held out (its split.json), instead of "
                        "making the split: for a run that continues RUN's adapter (--init-adapter) and is "
                        "evaluated on RUN's held-out rows (eval.py --run RUN); training rows that share an answer "
                        "or question topic with them are left out and counted")
    g.add_argument("--extra-data", action="append", default=[], help="extra chat JSONL ({'messages': [...]}), repeatable")
    g.add_argument("--extra-weight", type=positive_float, default=1.0, help="how many times each extra example is used")
    g.add_argument("--safety-data", default=None, metavar="PATH",
                   help="synthetic safety SFT JSONL mixed into training by default (default: data/safety_sft.jsonl, "
                        "made by python -m medlora.safety_data; --sanity leaves it out unless given)")
    g.add_argument("--safety-weight", type=positive_float, default=2.0,
                   help="how many times each safety example is used (default 2 = twice; 0.5 = a random half)")
    g.add_argument("--no-safety-data", action="store_true", help="train without the safety examples")
    g.add_argument("--replay-data", default=None, metavar="PATH",
                   help="general-chat replay JSONL mixed in by default against forgetting (default: "
                        "data/general_replay.jsonl, the base model's own answers, made by python -m medlora.general_data)")
    g.add_argument("--replay-weight", type=positive_float, default=3.0,
                   help="how many times each replay example is used (default 3)")
    g.add_argument("--no-replay-data", action="store_true", help="train without the general replay examples")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=positive_float, default=2e-4)
    g.add_argument("--epochs", type=positive_float, default=1.0)
    g.add_argument("--max-steps", type=positive_int, default=None)
    g.add_argument("--batch-size", type=positive_int, default=8)
    g.add_argument("--grad-accum", type=positive_int, default=1)
    g.add_argument("--warmup-steps", type=nonneg_int, default=20)
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--weight-decay", type=nonneg_float, default=0.0)
    g.add_argument("--clip", type=positive_float, default=1.0)
    g.add_argument("--grad-checkpoint", action="store_true", help="recompute block activations (less memory)")
    g.add_argument("--compile", action="store_true", help="torch.compile each block (~30 s at the start): a lower "
                                                          "memory peak, steps about as fast as eager (bench/results)")
    g.add_argument("--share-prefix", action=argparse.BooleanOptionalAction, default=None,
                   help="compute the rows' common prefix (the system turn) once per batch; --no-share-prefix runs "
                        "every row whole. Same losses. Default: on for a CPU (1.5-1.6x faster), off for CUDA "
                        "(1.8x slower there; bench/results)")
    g.add_argument("--on-nan", choices=["stop", "skip"], default="stop")
    g.add_argument("--seed", type=seed_int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=positive_int, default=100)
    g.add_argument("--val-rows", type=positive_int, default=256, help="validation rows used by periodic evaluation")
    g.add_argument("--save-every", type=positive_int, default=100)
    g.add_argument("--patience", type=nonneg_int, default=5, help="evaluations without improvement; 0 = off")
    g.add_argument("--out", default=None, help="run folder (default: runs/<time>-r<rank>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one (its "
                                                            "checkpoint, metrics and adapters are deleted first)")
    g.add_argument("--sanity", action="store_true", help="overfit ~200 rows quickly and check the basics (its "
                   "settings fill in the flags not given: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SANITY.items()) + ")")
    g.add_argument("--dry-run", action="store_true", help="print trainable parameters, memory estimate, tokens "
                                                          "and steps, then exit without training")
    args = p.parse_args(argv)
    args.given = given_flags(p, argv)
    problem = revision_unused(args.revision, args.model)
    if problem:
        p.error(problem)
    if args.sanity:  # small, short, fast: about 10 minutes on a 2-core CPU; flags given explicitly win
        for k, v in SANITY.items():
            if k not in args.given and not (k == "max_steps" and "epochs" in args.given):
                setattr(args, k, v)
    if args.alpha is None:  # (with --init-adapter, init_adapter_config takes the adapter's)
        args.alpha = 2.0 * args.rank
    for kind, maker in (("safety", "medlora.safety_data"), ("replay", "medlora.general_data")):
        if getattr(args, f"no_{kind}_data") and getattr(args, f"{kind}_data"):
            p.error(f"--no-{kind}-data and --{kind}-data contradict each other")
        path, off = resolve_default_source(args, kind)
        setattr(args, kind, path), setattr(args, f"{kind}_off", off)
        if path and not Path(path).is_file():
            p.error(f"--{kind}-data {path}: no such file (make it with `python -m {maker} --out {path}`, or train "
                    f"without it: --no-{kind}-data)")
    if args.split_from:
        from medlora.data import DataError, recorded_held_out

        try:
            args.split_index = recorded_held_out(args.split_from)
        except DataError as e:
            p.error(f"--split-from {args.split_from}: {e}")
        if "val_fraction" in args.given:
            p.error("--split-from takes the held-out rows from the run; --val-fraction cannot also set them")
    else:
        args.split_index = None
    if args.resume and not args.out:
        p.error("--resume needs --out (the run folder to continue)")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out and --overwrite deletes it: choose one")
    missing = [x for x in args.extra_data if not Path(x).is_file()]
    if missing:
        p.error(f"--extra-data {missing[0]}: no such file")
    if args.dtype == "float16":
        p.error("--dtype float16 is not supported for training (no loss scaling); use bfloat16")
    return args


def split_change_warning(args: argparse.Namespace, val_index: list[int]) -> str | None:
    """Continuing an adapter whose run held out other rows: some of this run's validation rows were
    that run's training rows (its loss reads low), and rows it held out may be trained on here, so
    evaluating on its split (eval.py --run) would score trained-on rows. --split-from avoids both."""
    from medlora.data import adapter_run_split

    own = None if args.split_from else adapter_run_split(args.init_adapter)
    if own is None:
        return None
    run, theirs = own
    outside = len(set(val_index) - theirs)
    if not outside:
        return None
    return (f"{outside} of this run's {len(val_index)} validation rows were not held out by {run} (the run behind "
            f"--init-adapter): its adapter may have trained on them, and rows it held out may be trained on here "
            f"(its split was made differently). To keep its held-out rows out of training: --split-from {run}")


def init_adapter_config(args: argparse.Namespace):
    """The LoRAConfig of a run that continues --init-adapter. Its rank, alpha, targets and rsLoRA are the
    adapter's (its weights fix them); a flag given for one of them that disagrees is an error, not silently
    dropped. Dropout is a setting of this run's training, so it is --dropout, whatever the adapter's was."""
    from dataclasses import replace

    from medlora.config import ConfigError, parse_targets
    from medlora.lora import AdapterError, read_adapter

    try:
        cfg, _, _ = read_adapter(args.init_adapter)
    except AdapterError as e:
        raise ConfigError(f"--init-adapter: {e}") from None
    given = {k: getattr(args, k) for k in ("rank", "alpha", "targets", "rslora") if k in args.given}
    have = {"rank": cfg.rank, "alpha": cfg.alpha, "targets": ",".join(sorted(cfg.targets)), "rslora": cfg.use_rslora}
    want = dict(given)
    if "targets" in given:
        want["targets"] = ",".join(sorted(parse_targets(given["targets"])))
    clash = [f"--{k} {given[k] if k != 'rslora' else ''}".strip() + f" (the adapter has {have[k]})"
             for k in want if want[k] != have[k]]
    if clash:
        raise ConfigError(f"--init-adapter {args.init_adapter}: {'; '.join(clash)}. Its structure comes with its "
                          f"weights: leave these flags out")
    return replace(cfg, dropout=args.dropout)


# What a resumed run must keep: (flag, path into the run record). The data order's settings (batch size,
# accumulation, seed, processes) are checked against the checkpoint by the trainer; --max-steps, --epochs
# and the run settings (evaluation, saving, patience, precision, --compile...) may change on a resume.
RESUME_FIXED = [("--model", ("model", "sha256")), ("--data", ("data", "sha256")),
                ("--extra-data/--extra-weight", ("data", "extra")), ("--max-seq-len", ("max_seq_len",)),
                ("--long-rows", ("long_rows",)),
                ("--rank", ("lora", "rank")), ("--alpha", ("lora", "alpha")), ("--dropout", ("lora", "dropout")),
                ("--targets", ("lora", "targets")), ("--rslora", ("lora", "use_rslora")), ("--lr", ("train", "lr")),
                ("--weight-decay", ("train", "weight_decay")), ("--warmup-steps", ("train", "warmup_steps")),
                ("--schedule", ("train", "schedule")), ("--clip", ("train", "clip")),
                ("--val-rows", ("train", "val_rows")),  # (best-so-far is compared on the same rows)
                ("the training examples (--limit-rows, --question-col, --answer-col: their token count)",
                 ("data", "train", "tokens"))]


# What a run writes into its folder; --overwrite deletes exactly these (nothing else the user keeps there).
RUN_FILES = ("checkpoint.pt", "config.json", "metrics.jsonl", "split.json", "summary.json", "loss.png", "git.diff",
             "adapter", "best_adapter")


def clear_run(run_dir: Path) -> None:
    import shutil

    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def resume_changes(was: dict, now: dict) -> list[str]:
    """'--flag OLD (now NEW)' for each RESUME_FIXED setting that differs between the run record `was` and
    this command's `now` (a setting the old record lacks is not compared: runs from older versions)."""
    missing = object()

    def dig(rec, path):
        for key in path:
            rec = rec.get(key, missing) if isinstance(rec, dict) else missing
        return rec

    def show(v) -> str:
        if v is missing or v is None:
            return "none"
        if isinstance(v, dict):  # {file: sha256}
            return ", ".join(f"{k} {str(x)[:12]}..." for k, x in v.items()) or "none"
        if isinstance(v, list):
            return ",".join(x.get("path", "?") if isinstance(x, dict) else str(x) for x in v) or "none"
        return f"{v[:12]}..." if isinstance(v, str) and len(v) == 64 else str(v)

    out = []
    for flag, path in RESUME_FIXED:
        old, new = dig(was, path), dig(now, path)
        if path == ("data", "extra"):  # a list of files: compared by content and weight
            old, new = ([] if v is missing else v or [] for v in (old, new))
            if [(x.get("sha256"), x.get("weight")) for x in old] != [(x.get("sha256"), x.get("weight")) for x in new]:
                out.append(f"{flag} {show(old)} (now {show(new)})")
            continue
        if path == ("lora", "targets") and isinstance(old, list) and isinstance(new, list):
            old, new = sorted(old), sorted(new)  # q_proj,v_proj = v_proj,q_proj
        if old is not missing and old != new:
            out.append(f"{flag} {show(old)} (now {show(new)})")
    return out


def resolve_default_source(args: argparse.Namespace, kind: str) -> tuple[str | None, str | None]:
    """(file of the default mix's `kind` source to mix in, or None; why not) for kind "safety" or
    "replay". The default mix has both; --no-KIND-data drops one; --sanity drops the defaults (its
    overfit check is about MedQuAD rows; most safety examples are longer than its 160-token rows
    anyway); a file already given with --extra-data is not added twice."""
    from medlora.data import REPLAY_DATA, SAFETY_DATA

    given = getattr(args, f"{kind}_data")
    if getattr(args, f"no_{kind}_data"):
        return None, f"--no-{kind}-data"
    if args.sanity and not given:
        return None, f"--sanity (overfit check on MedQuAD rows only; pass --{kind}-data to include it)"
    path = Path(given) if given else {"safety": SAFETY_DATA, "replay": REPLAY_DATA}[kind]
    if any(Path(x).resolve() == path.resolve() for x in args.extra_data):
        return None, f"{path} is already mixed in by --extra-data (weight {args.extra_weight:g})"
    return str(path), None


def git_commit(diff_to: Path | None = None) -> dict:
    """The checkout's commit; when it has uncommitted changes to tracked files, they are written to
    `diff_to` (git diff HEAD) with their sha256, so a run from a dirty tree can still be made again
    (`git apply RUN/git.diff` on that commit). Untracked files are not in the diff; their names are listed."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        sha = r.stdout.strip()
        if r.returncode != 0 or len(sha) != 40:  # not a git checkout (e.g. a copied tree)
            return {"commit": None, "dirty": None}
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        out = {"commit": sha, "dirty": dirty}
        if diff_to is None:
            return out
        diff_to.unlink(missing_ok=True)  # a clean tree's run leaves no stale diff of an earlier run here
        if dirty:  # a patch `git apply` takes whatever the user's git config says
            diff = subprocess.run(["git", "-c", "diff.noprefix=false", "diff", "--no-color", "--no-ext-diff",
                                   "--no-textconv", "--src-prefix=a/", "--dst-prefix=b/", "--binary", "HEAD"],
                                  cwd=ROOT, capture_output=True, timeout=60).stdout
            diff_to.write_bytes(diff)
            out.update(diff=diff_to.name, diff_sha256=hashlib.sha256(diff).hexdigest())
        # Not in the diff: named, so a reader knows the diff may not be the whole story.
        untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=30).stdout.split()
        out["untracked"] = untracked[:50] + ([f"... {len(untracked) - 50} more"] if len(untracked) > 50 else [])
        return out
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "tokenizers", "safetensors", "huggingface_hub", "gguf", "pyarrow", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def sanity_checks(model, tok, ds, metrics_path: Path, device) -> dict:
    """After overfitting a few hundred rows: did the loss fall, does the model reproduce training
    answers, and does a non-medical question still get plain English?"""
    from medlora.generate import GenConfig, generate
    from medlora.tokenizer import with_safety_prompt

    losses = [r["loss"] for r in map(json.loads, metrics_path.read_text().splitlines())
              if r["kind"] == "train" and r.get("loss") is not None]  # (a batch skipped by --on-nan skip has none)
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    model.eval()
    samples = ds.train[:5]
    prompts, refs = [], []
    for e in samples:
        cut = next(i for i, lab in enumerate(e.labels) if lab != -100)
        prompts.append(e.ids[:cut])
        refs.append([x for x in e.labels[cut:] if x != -100 and x != tok.eos_id][:40])
    outs = generate(model, tok, prompts, GenConfig(max_new_tokens=40))
    overlap = [sum(a == b for a, b in zip(o.ids, r)) / max(len(r), 1) for o, r in zip(outs, refs)]
    general = generate(model, tok, [tok.encode_chat(with_safety_prompt([{"role": "user", "content": q}]), True)
                                    for q in ("What is the capital of France?", "Name three primary colors.")],
                       GenConfig(max_new_tokens=48))
    texts = [g.text for g in general]
    letters = sum(c.isascii() and (c.isalpha() or c.isspace()) for t in texts for c in t) / max(1, sum(len(t) for t in texts))
    checks = {
        "loss_fell": {"first": first, "last": last, "pass": last < 0.7 * first},
        "reproduces_training_answers": {"token_match": overlap, "mean": sum(overlap) / len(overlap),
                                        "pass": sum(overlap) / len(overlap) >= 0.5},
        "general_english": {"answers": texts, "ascii_letter_share": letters,
                            "pass": "paris" in texts[0].lower() and letters > 0.85},
    }
    checks["verdict"] = "PASS" if all(c["pass"] for c in checks.values() if isinstance(c, dict)) else "FAIL"
    return checks


def resume_command(script: str, argv: list[str], run_dir: Path, world_size: int) -> str:
    """The command that continues this run: the same flags, the run folder pinned (a default
    --out is a fresh timestamp each time) and --resume; under torchrun the same launcher."""
    flags = [a for a in argv if a != "--resume"]
    if not any(a == "--out" or a.startswith("--out=") for a in flags):
        flags += ["--out", str(run_dir)]
    cmd = shlex.join([script, *flags, "--resume"])
    if world_size == 1 and "LOCAL_WORLD_SIZE" not in os.environ:
        return f"python {cmd}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if per_node == world_size:
        return f"torchrun --nproc-per-node {per_node} {cmd}"
    return (f"torchrun --nnodes {world_size // per_node} --nproc-per-node {per_node} --node-rank <this node's rank> "
            f"--rdzv-endpoint <host:port> {cmd}   (on every node, as before)")


def no_examples_problem(info: dict, tok, max_len: int) -> str:
    """Why nothing is left to train on: the cleaning counts, and the flag to change when the chat
    frame alone (system prompt + turn markers) leaves no room at this --max-seq-len."""
    from medlora.data import row_messages

    why = ", ".join(f"{n} {reason}" for reason, n in info["cleaning"].items() if reason != "kept")
    msg = "no training examples left after cleaning" + (f" ({why})" if why else "")
    frame = len(tok.encode_many_for_training([row_messages("", "")])[0][0])
    if frame + 16 > max_len:
        msg += (f"; the safe system prompt and chat markers alone take {frame} tokens, so --max-seq-len "
                f"{max_len} leaves no room for a question and answer (use at least {frame + 64}, default 320)")
    return msg


def main(argv=None) -> int:
    args = parse_args(argv)
    from medlora.config import ConfigError, LoRAConfig
    from medlora.trainer import TrainConfig, share_prefix_default

    device = pick_device(args.device)
    precision = training_precision(args.dtype, device)
    try:  # every flag is checked before the model or data is touched (identically on every rank)
        if args.init_adapter:
            lora_cfg = init_adapter_config(args)
        else:
            lora_cfg = LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=args.targets,
                                  use_rslora=args.rslora)
        tcfg = TrainConfig(lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                           grad_accum=args.grad_accum, warmup_steps=args.warmup_steps, schedule=args.schedule,
                           weight_decay=args.weight_decay, clip=args.clip, eval_every=args.eval_every,
                           val_rows=args.val_rows, save_every=args.save_every, patience=args.patience,
                           seed=args.seed, precision=precision, nan_policy=args.on_nan,
                           gradient_checkpointing=args.grad_checkpoint, compile=args.compile,
                           share_prefix=share_prefix_default(device) if args.share_prefix is None else args.share_prefix)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from medlora import distributed

    if problem := distributed.device_problem(device):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    dist = distributed.setup(device)  # under torchrun: joins the job; CUDA becomes cuda:LOCAL_RANK
    try:
        code = run(args, argv, lora_cfg, tcfg, dist)
    except BaseException:  # this rank failed alone: leave without waiting for the others at a barrier
        distributed.shutdown(dist, wait=False)
        raise
    distributed.shutdown(dist)
    return code


def run(args: argparse.Namespace, argv, lora_cfg, tcfg, dist) -> int:
    """Everything after flag checks. Under torchrun every rank runs this; rank 0 alone writes
    the run folder and prints, and every rank returns the same exit status."""
    import torch

    from medlora.checkpoint import CheckpointError
    from medlora.config import ConfigError
    from medlora.data import DataError, prepare
    from medlora.tokenizer import ChatFormatError
    from medlora.lora import adapter_base_mismatch, inject_lora, load_adapter, parameter_report
    from medlora.trainer import train
    from medlora.weights import WeightsError, load_pretrained, sha256_file

    device, main_rank = dist.device, dist.is_main
    say = print if main_rank else (lambda *a, **k: None)
    run_dir = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-r{lora_cfg.rank}")
    run_dir = Path(dist.broadcast(str(run_dir)))  # the timestamp of rank 0, on every rank

    def check_run_dir() -> str | None:
        if args.resume and not (run_dir / "checkpoint.pt").exists():
            return f"--resume: no checkpoint at {run_dir / 'checkpoint.pt'}"
        held = [name for name in RUN_FILES if (run_dir / name).exists()]
        if held and not args.resume and not args.overwrite:  # a re-run must never silently replace a run
            return (f"--out {run_dir} already holds a run ({', '.join(held)}): continue it with --resume, "
                    f"start over with --overwrite, or choose another --out")
        try:
            if args.overwrite:
                clear_run(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            return f"--out {run_dir}: not writable ({e.strerror})"
        return None

    problem = None if args.dry_run else dist.on_main(check_run_dir)
    if problem:
        say(f"error: {problem}", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    try:
        model, tok, model_info = load_pretrained(args.model, args.revision, device=device, verbose=main_rank)
    except WeightsError as e:
        say(f"error: {e}", file=sys.stderr)
        return 2
    if tcfg.precision == "bf16":
        # The frozen base is stored in bf16: autocast would otherwise re-cast every weight on every
        # forward (frozen tensors are not in its cast cache), and it halves the weights' memory.
        # LoRA weights are created afterwards in fp32: they are the trained masters.
        model.to(torch.bfloat16)
    try:
        ds = prepare(tok, args.data, args.question_col, args.answer_col, args.max_seq_len, args.long_rows,
                     args.val_fraction, args.seed, args.limit_rows, args.extra_data, args.extra_weight,
                     held_out_index=args.split_index,
                     verbose=main_rank, safety=args.safety, safety_weight=args.safety_weight,
                     replay=args.replay, replay_weight=args.replay_weight)
    except DataError as e:
        say(f"error: {e}", file=sys.stderr)
        return 2
    except ChatFormatError as e:  # the model's own template cannot make the system/user/assistant chats
        say(f"error: --model {model_info['path']}: its chat template cannot render a training chat ({e})",
            file=sys.stderr)
        return 2
    if not ds.train:
        say(f"error: {no_examples_problem(ds.info, tok, args.max_seq_len)}", file=sys.stderr)
        return 2
    for kind in ("safety", "replay"):
        if getattr(args, kind) is None:
            ds.info[kind] = {"path": None, "off": getattr(args, f"{kind}_off")}
        src = ds.info[kind]
        say(f"[medlora] {kind} data: {src['used']} examples (weight {src['weight']:g}) from {src['path']}"
            if src["path"] else f"[medlora] {kind} data: off ({src['off']})")

    def resume_problem() -> str | None:  # a resumed run must train on the same data in the same way
        rec = run_dir / "config.json"
        if not args.resume or not rec.exists():
            return None
        was = json.loads(rec.read_text())
        for kind in ("safety", "replay"):
            src = ds.info[kind]
            old = was.get("data", {}).get(kind) or {}
            if kind == "replay" and not old and not src.get("path"):
                continue  # a run from before the replay source existed
            if (old.get("sha256"), old.get("weight")) != (src.get("sha256"), src.get("weight")):
                if old.get("path"):
                    return (f"--resume: this run was trained with the {kind} data {old['path']} (sha256 "
                            f"{old.get('sha256', '')[:12]}..., weight {old.get('weight')}), not the current mix; "
                            f"resume it with --{kind}-data {old['path']} --{kind}-weight {old.get('weight')}")
                return f"--resume: this run was trained without {kind} data; resume it with --no-{kind}-data"
        now = {"model": model_info, "data": ds.info, "lora": asdict(lora_cfg), "train": asdict(tcfg),
               "max_seq_len": args.max_seq_len, "long_rows": args.long_rows}  # (the checkpoint replaces --init-adapter's weights)
        changed = resume_changes(was, now)
        made = (was.get("data") or {}).get("prep_version", 1)  # runs before the field: version 1
        if made != ds.info.get("prep_version"):
            changed.append(f"the examples were made by data preparation version {made} (this medlora makes "
                           f"version {ds.info.get('prep_version')}: truncated answers end elsewhere, see "
                           f"medlora/data.py PREP_VERSION); resume with the medlora commit the run recorded")
        split_file = run_dir / "split.json"
        if split_file.exists() and json.loads(split_file.read_text()).get("val_index") != ds.info["split"]["val_index"]:
            changed.append("the held-out split (--val-fraction, --limit-rows, --data or --seed: validation rows "
                           "would leak into training)")
        if changed:
            return (f"--resume: {run_dir} was started with other settings: {'; '.join(changed)}. Resume with the "
                    f"values it started with (its config.json), or start a new run from its adapter with "
                    f"--init-adapter {run_dir / 'adapter'}")
        return None

    problem = dist.on_main(resume_problem)
    if problem:
        say(f"error: {problem}", file=sys.stderr)
        return 2
    init_sha = None
    inject_lora(model, lora_cfg)  # from --init-adapter: the adapter's structure with this run's dropout
    if args.init_adapter:
        problem = adapter_base_mismatch(args.init_adapter, model_info)
        if problem:
            say(f"error: --init-adapter: {problem}", file=sys.stderr)
            return 2
        load_adapter(model, args.init_adapter, trainable=True)  # checks every tensor's name and shape
        init_sha = sha256_file(Path(args.init_adapter) / "adapter_model.safetensors")  # which weights it started from
        warning = split_change_warning(args, ds.info["split"]["val_index"])
        if warning:
            say(f"warning: {warning}", file=sys.stderr)
    model.to(device)
    report = parameter_report(model)
    if args.dry_run:
        from medlora.inspect import dry_run_report, print_dry_run

        if main_rank:
            print_dry_run(dry_run_report(model, report, ds, args.batch_size, args.grad_accum, args.epochs,
                                         args.max_steps, args.max_seq_len, tcfg.precision, dist.world_size))
        return 0
    split = ds.info.pop("split") | ({"from": args.split_from} if args.split_from else {})

    def write_records() -> None:  # rank 0 only
        fresh = not args.resume or not (run_dir / "config.json").exists()  # a resume keeps the run's record
        record = {
            "command": (" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None
                        else "train.py " + " ".join(argv)),
            "model": model_info, "data": ds.info,
            "split": {k: v for k, v in split.items() if k != "val_index"} | {"file": "split.json"},
            "lora": asdict(lora_cfg), "train": asdict(tcfg), "max_seq_len": args.max_seq_len,
            "long_rows": args.long_rows,
            "init_adapter": args.init_adapter, "init_adapter_sha256": init_sha, "parameters": report,
            "git": git_commit(run_dir / "git.diff" if fresh else None), "versions": versions(),
            "device": str(device), "sanity": args.sanity,
            "distributed": {"world_size": dist.world_size, "backend": dist.backend,
                            "rows_per_step": tcfg.batch_size * tcfg.grad_accum * dist.world_size},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (run_dir / "split.json").write_text(json.dumps(split))
        if fresh:
            (run_dir / "config.json").write_text(json.dumps(record, indent=2))
        else:  # the record keeps how the run started, plus each resume: when, how, and what it changed
            was = json.loads((run_dir / "config.json").read_text())
            before = was.get("train", {})
            changed = {k: [before.get(k), v] for k, v in record["train"].items() if before.get(k) != v}
            was.setdefault("resumes", []).append({"started": record["started"], "command": record["command"],
                                                  "git": record["git"], "changed": changed})
            tmp = run_dir / "config.json.tmp"
            tmp.write_text(json.dumps(was, indent=2))
            os.replace(tmp, run_dir / "config.json")

    dist.on_main(write_records)
    say(f"[medlora] LoRA r={lora_cfg.rank} alpha={lora_cfg.alpha:g} on {','.join(lora_cfg.targets)}: "
        f"{report['trainable']:,} trainable of {report['total']:,} ({100 * report['share']:.2f}%)")
    say(f"[medlora] data: {len(ds.train)} train / {len(ds.val)} val examples; cleaning {ds.info['cleaning']}")
    if dist.active:
        say(f"[medlora] data parallel: {dist.world_size} processes ({dist.backend}), {tcfg.batch_size} rows each "
            f"per micro-batch, {tcfg.batch_size * tcfg.grad_accum * dist.world_size} rows per optimizer step")
    # The adapter names the weights it was trained on: their sha256 (a GGUF file's, or each safetensors
    # file's), and for PEFT a base it can load (the hub id of the bundled GGUF's model, not the id that
    # was asked for and was unreachable), at the revision used (the snapshot's commit when none was pinned).
    from medlora.hub import base_identity

    extra = {"base_sha256": model_info.get("sha256"), "base_id": model_info["id"],
             "base_revision": model_info.get("revision") or model_info.get("commit")}
    peft_base = base_identity(model_info).get("hub_id") or model_info.get("path") or model_info["id"]
    try:
        summary = train(model, ds, tcfg, lora_cfg, run_dir, tok.pad_id, peft_base,
                        extra, resume=args.resume, device=device, dist=dist)
    except ConfigError as e:  # e.g. --resume with another number of processes
        say(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        say(f"error: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:
        say(f"error: {e}", file=sys.stderr)
        return 4
    summary.update(run_dir=str(run_dir), adapter=str(run_dir / "adapter"),
                   best_adapter=str(run_dir / "best_adapter") if (run_dir / "best_adapter").exists() else None,
                   loss_plot=str(run_dir / "loss.png"), tokens_per_s=summary["tokens"] / max(summary["elapsed"], 1e-9))
    code = 0
    if main_rank:
        if args.sanity and not summary["interrupted"]:
            summary["sanity"] = sanity_checks(model, tok, ds, run_dir / "metrics.jsonl", device)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        code = print_summary(summary, args, run_dir, argv, dist.world_size)
    dist.barrier()  # rank 0's files are complete before any rank exits
    return dist.broadcast(code)


def print_summary(summary: dict, args: argparse.Namespace, run_dir: Path, argv, world_size: int) -> int:
    """The closing report on stdout; returns the exit status."""
    print("\n== summary ==")
    print(f"steps {summary['step']}/{summary['total_steps']}  tokens {summary['tokens']:,} "
          f"(supervised {summary['supervised']:,})  time {summary['minutes']:.1f} min  "
          f"{summary['tokens_per_s']:.0f} tok/s")
    if "base_val" in summary:
        print(f"base model val loss {summary['base_val']:.4f} (ppl {math.exp(summary['base_val']):.2f})")
    if math.isfinite(summary["best_val"]):
        print(f"best val loss {summary['best_val']:.4f} (ppl {math.exp(summary['best_val']):.2f}) at step "
              f"{summary['best_step']}{'  [stopped early]' if summary['stopped_early'] else ''}")
        if summary["best_val"] >= summary.get("base_val", math.inf):
            start = "the adapter it started from (--init-adapter)" if args.init_adapter else "no adapter"
            print(f"warning: no evaluation beat step 0 (val loss {summary['base_val']:.4f}): best_adapter/ is worse "
                  f"on these validation rows than {start}; lower --lr, or check the data" +
                  ("; a stage trained mostly on other data (safety, replay) may trade this loss away on "
                   "purpose: judge it with eval.py" if args.init_adapter else ""))
    print(f"run folder {run_dir}: adapter/, {'best_adapter/, ' if summary['best_adapter'] else ''}loss.png, "
          f"metrics.jsonl, config.json, checkpoint.pt")
    if summary["interrupted"]:
        script, flags = (sys.argv[0], sys.argv[1:]) if argv is None else ("train.py", list(argv))
        print(f"\ninterrupted at step {summary['step']} of {summary['total_steps']}; checkpoint saved. Resume with:\n"
              f"  {resume_command(script, flags, run_dir, world_size)}")
        return INTERRUPTED
    if "sanity" in summary:
        s = summary["sanity"]
        print(f"sanity: loss {s['loss_fell']['first']:.3f} -> {s['loss_fell']['last']:.3f} "
              f"[{'ok' if s['loss_fell']['pass'] else 'FAIL'}]; training answers reproduced "
              f"{s['reproduces_training_answers']['mean']:.2f} [{'ok' if s['reproduces_training_answers']['pass'] else 'FAIL'}]; "
              f"general English {s['general_english']['answers'][0][:60]!r} [{'ok' if s['general_english']['pass'] else 'FAIL'}]")
        print(f"SANITY {s['verdict']}")
        return 0 if s["verdict"] == "PASS" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
