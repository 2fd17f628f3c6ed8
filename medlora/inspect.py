"""Look before you train: what the model card and the data card would tell you, read from the
files medlora actually loads.

    python -m medlora.inspect model [--model M]          # architecture, sizes, template, license
    python -m medlora.inspect data [--data D] [--question-col Q --answer-col A] [--plot lengths.png]
    python -m medlora.inspect example N [--data D]       # one training example, supervised tokens marked

`model` prints the facts of a model card, read from the loaded files (`model_card`); `data` the
facts of a data card (`data_card`: columns, cleaning counts, token lengths, repeats, the split);
`example` one training example through the mask view (`tokenizer.show_mask`). `train.py
--dry-run` uses `dry_run_report` for the trainable parameters, memory and steps. Left out:
anything not in the files themselves (benchmarks, intended use: read the real model card).
A flag the subcommand does not use is an error (it would change nothing); bad input is one
`error:` line and exit status 2, checked before the slow model load where it can be.
Mirrors the checklists of Hugging Face model cards and of "Datasheets for Datasets".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .cli import add_model_flags, fraction, given_flags, nonneg_int, positive_int, revision_unused


def model_card(model, tok, info: dict) -> dict:
    """The facts a user should confirm before fine-tuning, from the loaded files."""
    cfg = model.config
    license_ = None
    if info["kind"] == "gguf":
        from .gguf_file import read_gguf_file

        license_ = read_gguf_file(info["path"])[0].get("general.license")
    else:
        card = Path(info["path"]) / "README.md"
        if card.exists():
            for line in card.read_text(errors="replace").splitlines()[:30]:
                if line.strip().startswith("license:"):
                    license_ = line.split(":", 1)[1].strip()
    example = [{"role": "system", "content": "You are a careful assistant."},
               {"role": "user", "content": "What is anemia?"},
               {"role": "assistant", "content": "A low red blood cell count."}]
    return {
        "source": info, "architecture": "llama", "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
        "mlp": cfg.intermediate_size, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "vocab": cfg.vocab_size, "context_length": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps, "tied_head": cfg.tie_word_embeddings,
        "parameters": model.num_parameters(), "license": license_, "eos_token": tok.eos_token,
        "pad_token": tok.pad_token, "chat_template": tok.chat_template,
        "rendered_example": tok.render(example), "default_system_prompt_injected":
            "You are a helpful AI assistant named SmolLM" in tok.render(example[1:]),
    }


@dataclass
class Rows:
    """A data source read and cleaned (before the model loads, so a bad --data fails fast)."""
    raw: list[dict]
    info: dict
    rows: list  # medlora.data.Row
    counts: Counter


def read_rows(data: str | None, question_col: str = "Question", answer_col: str = "Answer") -> Rows:
    from .data import DataError, clean_rows, load_source

    raw, info = load_source(data, verbose=False)
    rows, counts = clean_rows(raw, question_col, answer_col, source=info["source"])
    if not rows:
        raise DataError(f"{info['source']}: no usable rows ({dict(counts) or 'the source is empty'})")
    return Rows(raw, info, rows, counts)


def data_card(tok, data: Rows, max_len: int, val_fraction: float, seed: int, plot: str | None) -> dict:
    from .data import build_examples, question_topic, split_rows

    raw, rows = data.raw, data.rows
    columns = sorted({k for r in raw[:1000] if isinstance(r, dict) for k in r})
    exs = build_examples(rows, tok, 10**9)  # no length cap: measure every row
    lens = sorted(len(e.ids) for e in exs)
    pct = {f"p{p}": lens[min(len(lens) - 1, int(p / 100 * len(lens)))] for p in (50, 90, 95, 99)}
    fits = {f"<= {n}": sum(x <= n for x in lens) / len(lens) for n in (256, 512, 1024, 2048)}
    q_dupes = sum(c - 1 for c in Counter(r.question for r in rows).values() if c > 1)
    a_dupes = sum(c - 1 for c in Counter(r.answer for r in rows).values() if c > 1)
    topics = Counter(question_topic(r.question) for r in rows)
    train, val = split_rows(rows, val_fraction, seed)
    over = sum(x > max_len for x in lens)
    if plot:
        save_histogram(lens, max_len, plot)
    return {"source": dict(data.info), "columns": columns, "rows": len(raw),
            "cleaning": dict(data.counts), "qtype": dict(Counter(r.qtype for r in rows).most_common()),
            "token_lengths": pct | {"max": lens[-1]}, "share_fitting": fits,
            f"longer_than_{max_len}": over, "repeated_questions": q_dupes, "repeated_answers": a_dupes,
            "distinct_topics": len(topics), "split": {"train_rows": len(train), "val_rows": len(val), "seed": seed,
                                                      "val_fraction": val_fraction}, "histogram": plot}


def save_histogram(lens: list[int], max_len: int, plot: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist([min(x, 2048) for x in lens], bins=64, color="#2a7ab9")
    ax.axvline(max_len, color="crimson", ls="--", label=f"--max-seq-len {max_len}")
    ax.set_xlabel("tokens per chat example (system + question + answer; clipped at 2048)")
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    plt.close(fig)


def plot_problem(path: str) -> str | None:
    """Why the histogram could not be written to `path`, found before the slow work rather than after it."""
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    p = Path(path).absolute()
    if p.suffix[1:].lower() not in kinds:
        return f"matplotlib cannot write that format; end the name in one of {', '.join(sorted(kinds))}"
    if p.is_dir():
        return "is a folder"
    if not p.parent.is_dir():
        return f"no folder {p.parent}"
    return None if os.access(p.parent, os.W_OK) else f"{p.parent} is not writable"


# The flags each subcommand uses; another one given is an error, not silently ignored.
USES = {"model": {"model", "revision", "json"},
        "data": {"model", "revision", "data", "question_col", "answer_col", "max_seq_len", "val_fraction", "seed",
                 "plot", "json"},
        "example": {"model", "revision", "data", "question_col", "answer_col", "n", "color"}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medlora.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["model", "data", "example"])
    p.add_argument("n", nargs="?", type=nonneg_int, default=None, metavar="N", help="example index (`example` only)")
    add_model_flags(p, placement=False)
    p.add_argument("--data", default=None, help="as train.py --data (data, example)")
    p.add_argument("--question-col", default="Question", help="as train.py (data, example)")
    p.add_argument("--answer-col", default="Answer", help="as train.py (data, example)")
    p.add_argument("--max-seq-len", type=positive_int, default=1024, help="rows longer are counted (data)")
    p.add_argument("--val-fraction", type=fraction, default=0.1, help="the split shown (data)")
    p.add_argument("--seed", type=int, default=0, help="the split's seed (data)")
    p.add_argument("--plot", default=None, help="write the token-length histogram here (data)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text (model, data)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto", help="(example)")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, argv) -> None:
    """Refuse what would change nothing or fail late: a flag the subcommand does not use, `example`
    without N, --revision on a local model, a --plot that cannot be written."""
    unused = sorted((given_flags(p, argv) | ({"n"} if args.n is not None else set())) - USES[args.what])
    if unused:
        names = ", ".join("N" if d == "n" else f"--{d.replace('_', '-')}" for d in unused)
        p.error(f"{names}: not used by `{args.what}` (it would change nothing)")
    if args.what == "example" and args.n is None:
        p.error("example needs N, the row to show (e.g. `example 3`)")
    problem = revision_unused(args.revision, args.model)
    if problem:
        p.error(problem)
    problem = args.plot and plot_problem(args.plot)
    if problem:
        p.error(f"--plot {args.plot}: {problem}")


def load_model(spec: str, revision: str | None):
    from .weights import WeightsError, load_pretrained

    try:
        return load_pretrained(spec, revision, verbose=False)
    except WeightsError as e:
        if (Path(spec) / "adapter_config.json").exists():
            raise WeightsError(f"{e}; it is a LoRA adapter folder, and --model takes base weights") from None
        raise


def main(argv=None) -> int:
    from .data import DataError
    from .weights import WeightsError

    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args, argv)
    try:
        data = read_rows(args.data, args.question_col, args.answer_col) if args.what != "model" else None
        if args.what == "example" and args.n >= len(data.rows):
            raise DataError(f"example {args.n} out of range (0..{len(data.rows) - 1})")
        model, tok, info = load_model(args.model, args.revision)
    except (DataError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.what == "model":
        return print_model(model_card(model, tok, info), info, args.json)
    if args.what == "data":
        return print_data(data_card(tok, data, args.max_seq_len, args.val_fraction, args.seed, args.plot), args)
    return print_example(tok, data.rows, args.n, args.color)


def print_model(card: dict, info: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(card, indent=2, default=str))
        return 0
    print(f"weights     {info['id']} ({info['kind']}: {info['path']})")
    if info.get("note"):
        print(f"            {info['note']}")
    print(f"sha256      {info['sha256'] if isinstance(info['sha256'], str) else json.dumps(info['sha256'])}")
    print(f"shape       {card['layers']} layers, hidden {card['hidden']}, MLP {card['mlp']}, {card['heads']} heads "
          f"/ {card['kv_heads']} KV heads (head dim {card['head_dim']}), vocab {card['vocab']:,}")
    print(f"parameters  {card['parameters']:,}  (tied head: {card['tied_head']})")
    print(f"context     {card['context_length']:,} tokens, rope theta {card['rope_theta']:g}, RMS eps {card['rms_norm_eps']:g}")
    print(f"license     {card['license'] or 'not stated in the files: check the model card'}")
    print(f"tokens      eos/end-of-turn {card['eos_token']!r}, pad {card['pad_token']!r}"
          f"{'  (pad = eos: never mask labels by comparing with pad)' if card['eos_token'] == card['pad_token'] else ''}")
    print(f"template    injects a default system prompt when none is given: {card['default_system_prompt_injected']}")
    print("---- chat template ----\n" + card["chat_template"])
    print("---- one conversation rendered ----\n" + card["rendered_example"])
    return 0


def print_data(card: dict, args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(card, indent=2, default=str))
        return 0
    print(f"source      {card['source'].get('source')} -> {card['source'].get('files')}")
    print(f"sha256      {card['source'].get('sha256')}")
    print(f"columns     {', '.join(card['columns'])};  rows {card['rows']:,}")
    print(f"cleaning    {card['cleaning']}")
    print(f"qtype       {card['qtype']}")
    print(f"tokens      {card['token_lengths']} per chat example; fits: "
          + ", ".join(f"{k} {v:.1%}" for k, v in card["share_fitting"].items()))
    print(f"too long    {card[f'longer_than_{args.max_seq_len}']:,} rows over --max-seq-len {args.max_seq_len}")
    print(f"repeats     {card['repeated_questions']:,} repeated questions, {card['repeated_answers']:,} repeated answers, "
          f"{card['distinct_topics']:,} distinct question topics")
    print(f"split       {card['split']['train_rows']:,} train / {card['split']['val_rows']:,} validation rows "
          f"(grouped by answer and topic, seed {args.seed})")
    if args.plot:
        print(f"histogram   {args.plot}")
    return 0


def print_example(tok, rows: list, n: int, color: str) -> int:
    from .data import build_examples
    from .tokenizer import IGNORE, show_mask

    ex = build_examples([rows[n]], tok, 10**9)[0]
    shown = {"always": True, "never": False}.get(color)
    print(show_mask(tok, ex.ids, ex.labels, color=shown))
    sup = sum(lab != IGNORE for lab in ex.labels)
    print(f"\n{len(ex.ids)} tokens, {sup} supervised (the answer and its closing {tok.eos_token}), "
          f"{len(ex.ids) - sup} masked" + ("" if shown else "; supervised text is shown [[like this]]"))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def dry_run_report(model, report: dict, ds, batch_size: int, grad_accum: int, epochs: float,
                   max_steps: int | None, max_len: int, precision: str, world_size: int = 1) -> dict:
    """The numbers a reader would otherwise work out by hand before a run: what trains, how much
    memory it needs, how many tokens and steps an epoch is. Memory is an estimate (documented
    terms below), not a measurement."""
    import math

    from .data import bucketed_batches
    from .trainer import HEAD_CHUNK

    cfg = model.config
    total, trainable = report["total"], report["trainable"]
    wbytes = next(model.parameters()).element_size()
    abytes = 2 if precision == "bf16" else 4
    lengths = [len(e.ids) for e in ds.train]
    batches = bucketed_batches(lengths, batch_size * world_size, 0)
    steps_per_epoch = math.ceil(len(batches) / grad_accum)
    steps = max_steps or max(1, math.ceil(steps_per_epoch * epochs))
    longest = max(max(len(ds.train[i].ids) for i in b) for b in batches)
    # Saved activations per token and layer for the backward pass: the inputs of the 7 projections
    # and their LoRA branches (~6 d + 2 kv), the SwiGLU inputs and product (3 f; silu(g) is recomputed),
    # the norms' inputs (2 d; their fp32 internals are recomputed).
    d, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    per_token = cfg.num_hidden_layers * (8 * d + 2 * kv + 3 * f) * abytes
    act = batch_size * longest * per_token
    head_chunk = HEAD_CHUNK * cfg.vocab_size * 4 * 2  # one chunk of fp32 logits + probabilities
    mem = {"weights": total * wbytes, "lora_weights": trainable * 4, "gradients": trainable * 4,
           "adam_state": trainable * 8, "activations_longest_batch": act, "head_loss_chunk": head_chunk}
    mem["total"] = sum(mem.values())
    return {
        "trainable": trainable, "total": total, "share": report["share"], "per_target": report["per_target"],
        "train_examples": len(ds.train), "val_examples": len(ds.val),
        "tokens_per_epoch": sum(lengths), "supervised_per_epoch": sum(e.n_supervised for e in ds.train),
        "micro_batches_per_epoch": len(batches), "steps_per_epoch": steps_per_epoch, "steps": steps,
        "rows_per_step": batch_size * grad_accum * world_size, "longest_batch_tokens": longest,
        "memory_bytes": mem,
    }


def print_dry_run(r: dict) -> None:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    print("== dry run: nothing is trained ==")
    print(f"trainable   {r['trainable']:,} of {r['total']:,} parameters ({100 * r['share']:.3f}%)")
    for name, n in r["per_target"].items():
        print(f"  {name:<10} {n:>12,}")
    print(f"data        {r['train_examples']:,} train / {r['val_examples']:,} val examples; "
          f"{r['tokens_per_epoch']:,} tokens per epoch ({r['supervised_per_epoch']:,} supervised)")
    print(f"steps       {r['steps_per_epoch']:,} optimizer steps per epoch ({r['micro_batches_per_epoch']:,} micro-batches, "
          f"{r['rows_per_step']} rows per step); this run: {r['steps']:,} steps")
    m = r["memory_bytes"]
    print(f"memory      ~{gib(m['total'])}: weights {gib(m['weights'])}, LoRA {gib(m['lora_weights'])} + grads "
          f"{gib(m['gradients'])} + Adam {gib(m['adam_state'])}, activations of the longest batch "
          f"({r['longest_batch_tokens']} tokens/row) {gib(m['activations_longest_batch'])}, head chunk {gib(m['head_loss_chunk'])}")
