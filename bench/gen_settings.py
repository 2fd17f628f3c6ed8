"""What each generation setting buys: the tuned model's answers to the same held-out questions
under greedy decoding, repetition penalties and no-repeat n-grams, scored like eval.py.

    python bench/gen_settings.py --adapter adapters/medlora-r8 --run docs/runs/gpu-trim-replay \
        --limit 32 --out docs/recipe/gen_settings

Loads the model once and answers the questions under each setting (the base model is eval.py's
business); reports ROUGE-L against the references, end-of-turn within the limit, answers with a
repeated 4-gram, mean length and seconds, and writes OUT.json + OUT.md. Greedy decoding is
prefix-stable, so "ends within 256" is read off the 512-token greedy answers without a rerun.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {  # name -> GenConfig overrides
    "greedy": {},
    "repetition penalty 1.1": {"repetition_penalty": 1.1},
    "repetition penalty 1.2": {"repetition_penalty": 1.2},
    "no-repeat 4-gram": {"no_repeat_ngram": 4},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", default=str(ROOT / "adapters" / "medlora-r8"))
    p.add_argument("--model", default="bundled")
    p.add_argument("--run", required=True, help="run folder whose held-out split to sample")
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/recipe/gen_settings")
    a = p.parse_args(argv)
    import torch

    from medlora import evaluate as ev
    from medlora.data import clean_rows, load_source
    from medlora.generate import GenConfig
    from medlora.lora import load_adapter
    from medlora.weights import load_pretrained

    split = json.loads((Path(a.run) / "split.json").read_text())
    cfg = json.loads((Path(a.run) / "config.json").read_text())
    source = cfg["data"]["source"]  # what eval.py's held-out part reads too
    raw, _ = load_source(source, None, False)
    rows, _ = clean_rows(raw, "Question", "Answer", source=str(source))
    val_ids = set(split["val_index"])
    val = [r for r in rows if r.index in val_ids]
    sample = random.Random(a.seed).sample(val, min(a.limit, len(val)))
    qs, refs = [r.question for r in sample], [r.answer for r in sample]
    model, tok, _ = load_pretrained(a.model, verbose=False)
    load_adapter(model, a.adapter, merge=True)
    model.eval()
    results = {}
    for name, over in SETTINGS.items():
        t0 = time.time()
        with torch.no_grad():
            ans = ev.answer_all(model, tok, qs, GenConfig(max_new_tokens=a.max_new_tokens, **over), a.batch_size,
                                progress=name)
        s = ev.score_reference_answers(ans, refs)
        s.pop("per_item_rougeL")
        s["seconds"] = time.time() - t0
        if name == "greedy":
            s["ended_within_256"] = sum(x.ended and x.n_tokens <= 256 for x in ans) / len(ans)
        results[name] = s
        print(f"{name:24s} ROUGE-L {s['rougeL']:.3f}  ends {s['ended_rate']:.2f}  repeat-4 {s['repeat4_rate']:.2f}  "
              f"tokens {s['mean_tokens']:.0f}  {s['seconds']:.0f}s", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"adapter": a.adapter, "run": a.run, "questions": len(qs), "max_new_tokens": a.max_new_tokens,
            "seed": a.seed, "device": "cpu", "precision": "fp32", "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "settings": results}, indent=2))
    lines = [f"Tuned model `{a.adapter}` on {len(qs)} held-out questions of `{a.run}` (seed {a.seed}), "
             f"{a.max_new_tokens} new tokens, CPU fp32 (`python bench/gen_settings.py`).\n",
             "| setting | ROUGE-L | token F1 | ends its turn | repeated 4-gram | mean tokens | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in results.items():
        lines.append(f"| {name} | {s['rougeL']:.3f} | {s['token_f1']:.3f} | {s['ended_rate']:.2f} | "
                     f"{s['repeat4_rate']:.2f} | {s['mean_tokens']:.0f} | {s['seconds']:.0f} |")
    g = results["greedy"]
    lines.append(f"\nGreedy answers that end within 256 new tokens: {g['ended_within_256']:.2f} "
                 f"(within {a.max_new_tokens}: {g['ended_rate']:.2f}).")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
