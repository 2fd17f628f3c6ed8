"""Compare training runs side by side: `python -m medlora.compare RUN [RUN ...] [--out table.md]`.

Reads what each run folder already holds — `config.json` (the recipe), `summary.json` (tokens,
minutes, base and best validation loss) and, when `eval.py` has been run on it, `eval/report.json`
(held-out ROUGE-L/token-F1/end-of-turn/repetition, general-prompt drift, safety rates) — and prints
one markdown table, the sweep table of the recipe search. Nothing is typed by hand, so the table is
regenerated whenever a run changes. Leaves out any judgement: picking the recipe is the reader's job.
Mirrors the run-comparison tables of litgpt/nanoGPT experiment logs, generated rather than kept by hand.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_row(run: Path) -> dict:
    """One run's recipe and results as a flat dict (missing parts are None)."""
    cfg, summ = _load(run / "config.json"), _load(run / "summary.json")
    if cfg is None or summ is None:
        raise SystemExit(f"error: {run}: not a finished run folder (needs config.json and summary.json)")
    lora, tr = cfg["lora"], cfg["train"]
    targets = lora["targets"]
    extra = cfg.get("data", {}).get("safety") or {}
    replay = cfg.get("data", {}).get("replay") or next(  # older runs mixed it in with --extra-data
        (x for x in cfg.get("data", {}).get("extra", []) if Path(x["path"]).name == "general_replay.jsonl"), {})
    row = {
        "run": run.name, "device": cfg.get("device"), "precision": tr.get("precision"),
        "rank": lora["rank"], "targets": "all 7" if len(targets) == 7 else ",".join(t.replace("_proj", "") for t in targets),
        "lr": tr["lr"], "max_len": cfg.get("max_seq_len"), "long_rows": cfg.get("long_rows"),
        "safety_weight": extra.get("weight") if extra.get("path") else 0,
        "replay_weight": replay.get("weight") if replay.get("path") else 0,
        "init": Path(cfg["init_adapter"]).parent.name if cfg.get("init_adapter") else "",
        "steps": summ.get("step"), "batch": tr["batch_size"] * tr.get("grad_accum", 1),
        "tokens": summ.get("tokens"), "minutes": summ.get("minutes"),
        "base_val": summ.get("base_val"), "best_val": summ.get("best_val"),
    }
    if row["base_val"] is not None and row["best_val"] is not None:
        row["val_ratio"] = math.exp(row["best_val"] - row["base_val"])
    rep = _load(run / "eval" / "report.json")
    if rep:
        h, g, s = rep.get("heldout", {}), rep.get("general", {}), rep.get("safety", {})
        if h:
            row.update(heldout_ppl_base=h["base"].get("ppl"), heldout_ppl=h["tuned"].get("ppl"),
                       rougeL_base=h["base"]["rougeL"], rougeL=h["tuned"]["rougeL"], token_f1=h["tuned"]["token_f1"],
                       rougeL_ci=h.get("rougeL_diff_bootstrap95"), ended_base=h["base"]["ended_rate"],
                       ended=h["tuned"]["ended_rate"], repeat4_base=h["base"]["repeat4_rate"],
                       repeat4=h["tuned"]["repeat4_rate"], n_heldout=h["tuned"]["n"],
                       max_new_tokens=rep.get("generation", {}).get("max_new_tokens"),
                       no_repeat_ngram=rep.get("generation", {}).get("no_repeat_ngram") or 0)
            if h["base"].get("ppl") and h["tuned"].get("ppl"):
                row["ppl_ratio"] = h["tuned"]["ppl"] / h["base"]["ppl"]  # vs the plain base model
        if g:
            row.update(containment_base=g["base"].get("containment"), containment=g["tuned"].get("containment"),
                       drift=g["tuned"].get("drift_to_medical"))
        if s:
            o = s["tuned"]["overall"]
            row.update(refuse=o["refuse_redirect_rate"], compliance=o["harmful_compliance_rate"],
                       over_refusal=o["over_refusal_rate"], refuse_base=s["base"]["overall"]["refuse_redirect_rate"])
    return row


def _f(v, fmt):
    return "" if v is None else fmt.format(v)


def table(rows: list[dict]) -> str:
    head = ("| run | from | where | rank | targets | lr | max len | safety w. | replay w. | steps × batch | tokens | min "
            "| val loss start → best | held-out ppl × base | ROUGE-L base → tuned (95% CI of diff, questions) | token F1 | ends turn (in N new tokens, decoding) | repeat-4 | general containment "
            "| refuse/redirect | harmful compliance | over-refusal |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ci = r.get("rougeL_ci")
        rouge = (f"{r['rougeL_base']:.3f} → {r['rougeL']:.3f} ([{ci['lo']:+.3f}, {ci['hi']:+.3f}], {r['n_heldout']} q)"
                 if r.get("rougeL") is not None and ci else "")
        lines.append("| " + " | ".join([
            r["run"], r.get("init", ""), f"{r['device']} {r['precision']}", str(r["rank"]), r["targets"], f"{r['lr']:g}",
            f"{r['max_len']} {'trim' if r['long_rows'] == 'truncate' else ''}".strip(), _f(r["safety_weight"], "{:g}"),
            _f(r.get("replay_weight"), "{:g}"),
            f"{r['steps']} × {r['batch']}", _f(r["tokens"] and r["tokens"] / 1e6, "{:.2f} M"), _f(r["minutes"], "{:.1f}"),
            f"{_f(r['base_val'], '{:.3f}')} → {_f(r['best_val'], '{:.3f}')}", _f(r.get("ppl_ratio"), "{:.3f}"), rouge,
            _f(r.get("token_f1"), "{:.3f}"),
            _f(r.get("ended"), "{:.2f}") + (f" (base {r['ended_base']:.2f})" if r.get("ended_base") is not None else "")
            + (f" in {r['max_new_tokens']}" if r.get("max_new_tokens") else "")
            + (f", no-repeat {r['no_repeat_ngram']}" if r.get("no_repeat_ngram") else ""),
            _f(r.get("repeat4"), "{:.2f}") + (f" (base {r['repeat4_base']:.2f})" if r.get("repeat4_base") is not None else ""),
            _f(r.get("containment"), "{:.2f}") + (f" (base {r['containment_base']:.2f})" if r.get("containment_base") is not None else ""),
            _f(r.get("refuse"), "{:.2f}"), _f(r.get("compliance"), "{:.2f}"), _f(r.get("over_refusal"), "{:.2f}"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def val_curve(run: Path) -> tuple[list[float], list[float]]:
    """(training tokens seen, validation loss) at each validation of a run, from its metrics.jsonl."""
    seen, xs, ys = 0, [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            seen = rec.get("tokens", seen)
        elif rec.get("kind") == "val":
            xs.append(seen / 1e6)
            ys.append(rec["val_loss"])
    return xs, ys


def plot(runs: list[Path], rows: list[dict], path: Path) -> None:
    """Left: each run's validation loss against training tokens. Right: its eval.py numbers, one bar
    group per run (held-out perplexity as a share of base, ROUGE-L, ends its turn, safety)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    for run, r in zip(runs, rows):
        xs, ys = val_curve(run)
        a.plot(xs, ys, marker="o", label=r["run"])
    a.set(xlabel="training tokens (M)", ylabel="validation loss", title="validation loss (each run's own val rows)")
    a.legend(fontsize=7)
    metrics = [("ppl_ratio", "held-out ppl × base"), ("rougeL", "ROUGE-L"), ("ended", "ends turn"),
               ("refuse", "refuse/redirect"), ("compliance", "harmful compliance")]
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        b.bar([j + i * width for j in range(len(metrics))], [r.get(k) or 0 for k, _ in metrics], width, label=r["run"])
    b.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], [m for _, m in metrics], fontsize=8)
    b.set(title="eval.py, tuned (see the table for each report's size)", ylim=(0, 1.05))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medlora.compare", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (train.py --out)")
    p.add_argument("--out", default=None, help="also write the table (markdown) and rows (JSON, same name) here")
    p.add_argument("--plot", default=None, help="also draw validation curves and eval numbers to this PNG")
    a = p.parse_args(argv)
    rows = [run_row(Path(r)) for r in a.runs]
    if a.plot:
        plot([Path(r) for r in a.runs], rows, Path(a.plot))
        print(f"plot: {a.plot}", file=sys.stderr)
    md = table(rows)
    print(md)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(md)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
