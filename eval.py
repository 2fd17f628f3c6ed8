"""Compare the base and the tuned model on the same inputs, side by side.

    python eval.py --adapter runs/x/best_adapter                 # all parts, report in runs/x/eval/
    python eval.py --adapter A --only safety --out reports/s1
    python eval.py --adapter A --prompts my_prompts.jsonl         # your own prompts, same scoring
    python eval.py --model merged_dir --base-model bundled        # a merged checkpoint vs its base
    python eval.py --score-review runs/x/eval/review_sheet.csv    # un-blind a filled review sheet

Writes report.json (every number), report.md (tables + side-by-side answers) and report.png.
Greedy decoding with serve.py's no-repeat 4-gram rule by default (what users get; `--no-repeat-ngram 0`
is plain greedy), so two runs give the same report. With the held-out part it also
writes a blinded review sheet (review_sheet.csv, --review-size rows) and its key (review_key.json,
kept from the reviewer); see medlora/review.py.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from itertools import zip_longest
from pathlib import Path

from medlora.cli import (DEFAULT_NO_REPEAT_NGRAM, add_generation_flags, add_model_flags, fail, given_flags, nonneg_int,
                         pick_device, pick_dtype, positive_int, precision_name, revision_unused,
                         sampling_ignored)

ROOT = Path(__file__).resolve().parent
PARTS = ("heldout", "general", "medical", "safety")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_generation_flags(p, max_new_tokens=256, no_repeat_ngram=DEFAULT_NO_REPEAT_NGRAM)  # serve.py's decoding
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (PEFT format); the tuned model is base + adapter")
    p.add_argument("--base-model", default=None, help="the base to compare with when --model is a merged checkpoint")
    p.add_argument("--run", default=None, help="run folder whose recorded split to use (default: the adapter's parent)")
    p.add_argument("--data", default=None, help="data source (default: the run's; else the MedQuAD default)")
    p.add_argument("--question-col", default="Question")
    p.add_argument("--answer-col", default="Answer")
    p.add_argument("--limit", type=positive_int, default=40, help="held-out questions to generate answers for")
    p.add_argument("--loss-rows", type=positive_int, default=256, help="held-out rows for loss/perplexity")
    p.add_argument("--general-limit", type=positive_int, default=None)
    p.add_argument("--medical-limit", type=positive_int, default=None)
    p.add_argument("--safety-limit", type=positive_int, default=None)
    p.add_argument("--only", default=",".join(PARTS), help=f"comma list of parts: {', '.join(PARTS)}")
    p.add_argument("--prompts", default=None, help="JSONL of your own prompts ({'prompt', optional 'reference', "
                                                    "'accept', 'kind', 'category'}): replaces the built-in parts")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--base-cache", default=None, metavar="DIR",
                   help="keep the base model's answers and losses in DIR, keyed by everything that decides them "
                        "(medlora's code, weights sha256, decoding, precision, device, batch size, the exact prompts "
                        "and loss rows); a later eval with the same key reuses them instead of generating again "
                        "(recipe sweeps)")
    p.add_argument("--out", default=None, help="report folder (default: RUN/eval or reports/<time>)")
    p.add_argument("--review-size", type=nonneg_int, default=30,
                   help="held-out questions in the blinded review sheet (review_sheet.csv; at most --limit; 0 = none)")
    p.add_argument("--score-review", default=None, metavar="SHEET",
                   help="un-blind a filled review_sheet.csv: win/tie/loss of tuned vs base with 95%% intervals")
    p.add_argument("--key", default=None, help="with --score-review: the key (default: review_key.json beside the sheet)")
    args = p.parse_args(argv)
    given = given_flags(p, argv)
    if args.key and not args.score_review:
        p.error("--key goes with --score-review")
    if args.score_review:
        return args
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in args.only if x not in PARTS]
    if not args.only:
        p.error(f"--only: no part named; choose from {', '.join(PARTS)}")
    if bad:
        p.error(f"--only: unknown part(s) {bad}; choose from {', '.join(PARTS)}")
    if args.adapter is None and args.base_model is None:
        p.error("give --adapter (tuned = base + adapter) or --base-model (when --model is already tuned)")
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").exists():
        p.error(f"--adapter {args.adapter}: no adapter_config.json there")
    if args.adapter:  # an adapter medlora cannot apply fails now, not after minutes of the base's answers
        from medlora.lora import AdapterError, read_adapter

        try:
            read_adapter(args.adapter)
        except AdapterError as e:
            p.error(f"--adapter: {e}")
    if args.adapter and args.base_model and "model" in given:
        p.error("--model is not used with --adapter and --base-model: the tuned model is --base-model + --adapter")
    moot = [f"--{k.replace('_', '-')}" for k in ("only", "limit", "general_limit", "medical_limit", "safety_limit",
                                                  "loss_rows", "review_size", "data") if k in given]
    if args.prompts:  # a bad prompts file fails now, not after the base model's answers
        read_jsonl(Path(args.prompts))
    if args.prompts and moot:  # (a warning: harmless limits, e.g. from a script that shrinks every eval)
        print(f"warning: --prompts replaces the built-in parts: {', '.join(moot)} do nothing with it", file=sys.stderr)
    warning = sampling_ignored(args, given, ("top_k", "top_p"))  # (eval's --seed also picks the held-out sample)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    problem = revision_unused(args.revision, args.model, args.base_model)
    if problem:
        p.error(problem)
    if args.seed is None:
        args.seed = 0
    return args


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}: line {n}: invalid JSON ({e.msg})")
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                fail(f"{path}: line {n}: field 'prompt' must be a non-empty string")
            if "kind" in rec and rec["kind"] not in ("harmful", "benign"):
                fail(f"{path}: line {n}: field 'kind' must be 'harmful' or 'benign', got {rec['kind']!r}")
            out.append(rec)
    if not out:
        fail(f"{path}: no prompts in the file")
    with_kind = sum("kind" in r for r in out)
    if 0 < with_kind < len(out):  # safety probes and reference questions are scored differently: one kind per file
        fail(f"{path}: {with_kind} of {len(out)} prompts have a 'kind' (safety probes) and the "
             f"rest do not; put safety probes and other prompts in separate files")
    return out[:limit] if limit else out


def spread_sample(recs: list[dict]) -> list[dict]:
    """Probes reordered so any first N span harmful and benign prompts and their categories: round-robin
    over the categories, alternating harmful and benign ones (a plain head would be all harmful)."""
    by_cat: dict[tuple[str, str], list[dict]] = {}
    for r in recs:
        by_cat.setdefault((r.get("kind", "harmful"), r["category"]), []).append(r)
    harmful = [c for c in by_cat if c[0] == "harmful"]
    benign = [c for c in by_cat if c[0] != "harmful"]
    order = [c for pair in zip_longest(harmful, benign) for c in pair if c is not None]
    depth = max(len(v) for v in by_cat.values())
    return [by_cat[c][i] for i in range(depth) for c in order if i < len(by_cat[c])]


def heldout_rows(args, record: dict | None, run_dir: Path | None):
    """The exact validation rows the run held out (from its split.json), or a fresh split."""
    from medlora.data import clean_rows, load_source, recorded_held_out, split_rows

    source = args.data or (record or {}).get("data", {}).get("source")
    raw, info = load_source(source, verbose=False)
    rows, _ = clean_rows(raw, args.question_col, args.answer_col, source=str(source))
    note = ""
    split_file = run_dir / "split.json" if run_dir else None
    recorded = (record or {}).get("data", {}).get("sha256", {})
    if recorded and recorded != info.get("sha256"):  # row positions in other data are other rows
        fail(f"{run_dir} was trained on data with sha256 {recorded}, but {source} has "
             f"{info.get('sha256')}: its held-out rows, recorded by position, would be other rows "
             f"(training rows among them); pass --data with the run's data file")
    if split_file and split_file.exists():
        wanted = set(recorded_held_out(run_dir))
        val = [r for r in rows if r.index in wanted]
        note = f"the run's recorded split ({len(val)} validation rows, {split_file})"
    else:  # the split as the run's record describes it (a run folder without split.json), else the default
        split = (record or {}).get("split", {})
        seed, fraction = split.get("seed", 0), split.get("val_fraction", 0.1)
        _, val = split_rows(rows, fraction, seed=seed)
        note = (f"no split.json: the run's grouped split made again (seed {seed}, fraction {fraction:g})" if split
                else f"no run split found: a fresh grouped split (seed {seed}), not the run's")
    return val, note, info


def decoding(gen) -> str:
    """The decoding settings in words, for the report's header."""
    words = ["greedy" if gen.temperature == 0 else f"sampling (temperature {gen.temperature:g}, top-k {gen.top_k}, "
             f"top-p {gen.top_p:g}, seed {gen.seed})"]
    if gen.no_repeat_ngram:
        words.append(f"no repeated {gen.no_repeat_ngram}-gram" + ("" if gen.no_repeat_keeps_numbers else " (digits too)"))
    if gen.repetition_penalty != 1:
        words.append(f"repetition penalty {gen.repetition_penalty:g}")
    return ", ".join(words)


def base_cache_file(cache_dir: str, base_info: dict, gen, precision: str, device, batch_size: int,
                    inputs: dict, loss_spec: tuple) -> Path:
    """Where the base model's results for exactly these inputs live. The key hashes everything that
    decides them, so a changed prompt, decoding flag, weight file or line of medlora's code (the
    decoding and the loss live there) can never pick up a stale answer."""
    import hashlib

    parts = {name: {"questions": inp["questions"],
                    "loss_rows": [[r.question, r.answer] for r in inp.get("loss_rows", [])]}
             for name, inp in sorted(inputs.items())}
    code = hashlib.sha256(b"".join(f.read_bytes() for f in sorted((ROOT / "medlora").glob("*.py")))).hexdigest()
    key = {"code": code, "weights": base_info.get("sha256"), "model": base_info.get("id"), "precision": precision,
           "device": str(device), "batch_size": batch_size, "generation": gen.__dict__ | {"stop_ids": None},
           "loss": list(loss_spec), "parts": parts}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return Path(cache_dir) / f"base-{digest[:20]}.json"


def save_base(path: Path, base: dict) -> None:
    """Answers as [text, n_tokens, ended]; losses as numbers (atomic write: a killed eval leaves no half file)."""
    out = {part: {k: ([[a.text, a.n_tokens, a.ended] for a in v] if k == "answers" else v) for k, v in res.items()}
           for part, res in base.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(path)


def load_base(path: Path) -> dict:
    from medlora.evaluate import Answer

    raw = json.loads(path.read_text())
    return {part: {k: ([Answer(*a) for a in v] if k == "answers" else v) for k, v in res.items()}
            for part, res in raw.items()}


def score_review(args) -> int:
    from medlora.review import ReviewError, format_score, score_and_write

    try:
        score, path = score_and_write(args.score_review, args.key, seed=args.seed or 0)
    except ReviewError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_score(score))
    print(f"written: {path}")
    return 0


def adapter_split_warning(adapter: str | None, run_dir: Path | None, val: list) -> str | None:
    """An adapter evaluated on another run's held-out rows (--run) whose own run held out rows outside them:
    it made its own split, so it may have trained on rows scored here (train.py --split-from prevents it)."""
    if not (adapter and run_dir):
        return None
    from medlora.data import adapter_run_split

    found = adapter_run_split(adapter)
    if found is None or found[0].resolve() == run_dir.resolve():
        return None
    own, theirs = found
    outside = len(theirs - {r.index for r in val})
    if not outside:
        return None
    return (f"{outside} of the {len(theirs)} rows the adapter's run {own} held out are not held out by {run_dir}: "
            f"that run made its own split, so it may have trained on rows scored here (train.py --split-from "
            f"{run_dir} keeps a later stage on this split)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.score_review:
        return score_review(args)
    import torch

    from medlora import evaluate as ev
    from medlora.data import Example, build_examples, sample_rows
    from medlora.generate import GenConfig
    from medlora.lora import AdapterError, adapter_base_mismatch, load_adapter
    from medlora.trainer import evaluate_loss
    from medlora.weights import WeightsError, is_local_model, load_pretrained

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    precision = precision_name(dtype)
    torch.manual_seed(args.seed)
    run_dir = Path(args.run) if args.run else (Path(args.adapter).parent if args.adapter else None)
    record = json.loads((run_dir / "config.json").read_text()) if run_dir and (run_dir / "config.json").exists() else None
    out = Path(args.out or (run_dir / "eval" if run_dir else f"reports/{time.strftime('%Y%m%d-%H%M%S')}"))
    out.mkdir(parents=True, exist_ok=True)
    gen = GenConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                    no_repeat_ngram=args.no_repeat_ngram, no_repeat_keeps_numbers=not args.no_repeat_digits)

    # ---- inputs (the same for both models) ---------------------------------------------------
    inputs: dict[str, dict] = {}
    data_dir = ROOT / "data"
    if args.prompts:
        recs = read_jsonl(Path(args.prompts))
        inputs["custom"] = {"records": recs, "questions": [r["prompt"] for r in recs]}
    else:
        if "heldout" in args.only:
            val, split_note, data_info = heldout_rows(args, record, run_dir)
            warning = adapter_split_warning(args.adapter, run_dir, val)
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
                split_note += f" (warning: {warning})"
            rng = random.Random(args.seed)
            sample = rng.sample(val, min(args.limit, len(val)))
            inputs["heldout"] = {"questions": [r.question for r in sample], "refs": [r.answer for r in sample],
                                 "loss_rows": sample_rows(val, args.loss_rows, args.seed), "note": split_note,
                                 "data": data_info}
        for part, fname, lim in (("general", "eval_general.jsonl", args.general_limit),
                                 ("medical", "eval_medical.jsonl", args.medical_limit),
                                 ("safety", "safety_probes.jsonl", args.safety_limit)):
            if part in args.only:
                recs = read_jsonl(data_dir / fname)
                if lim and part == "safety":
                    recs = spread_sample(recs)
                recs = recs[:lim] if lim else recs
                inputs[part] = {"records": recs, "questions": [r["prompt"] for r in recs]}

    # ---- run each model over the inputs -------------------------------------------------------
    # The held-out loss rows as the run itself built its validation set: its max length and its policy for
    # longer rows (trimmed answers by default), so perplexity covers every held-out row it saw.
    max_len, policy = (record or {}).get("max_seq_len", 1024), (record or {}).get("long_rows", "drop")

    def run_model(model, tok, label: str) -> dict:
        res: dict[str, dict] = {}
        for part, inp in inputs.items():
            t0 = time.time()
            res[part] = {"answers": ev.answer_all(model, tok, inp["questions"], gen, args.batch_size,
                                                  progress=f"{label} {part}")}
            if part == "heldout":
                exs: list[Example] = build_examples(inp["loss_rows"], tok, max_len, long_rows=policy)
                if not exs:  # a loss over no tokens would read 0.0, perplexity 1.0: a perfect score from nothing
                    fail(f"none of the {len(inp['loss_rows'])} held-out loss rows fits {max_len} "
                         f"tokens with longer rows {policy} (the run's --max-seq-len and --long-rows)")
                loss = evaluate_loss(model, exs, args.batch_size, tok.pad_id, precision, device)
                res[part].update(loss=loss, ppl=math.exp(min(loss, 50)), loss_examples=len(exs),
                                 loss_rows=f"{len(exs)} of {len(inp['loss_rows'])} rows, at most {max_len} tokens, "
                                           f"longer rows {policy}")
            res[part]["seconds"] = time.time() - t0
            print(f"[eval] {label} {part}: {len(inp['questions'])} prompts in {res[part]['seconds']:.0f}s", file=sys.stderr)
        return res

    base_spec = args.base_model or args.model
    def load(spec):  # --revision pins the hub model(s); a local --base-model beside a hub --model takes none
        try:
            return load_pretrained(spec, None if is_local_model(spec) else args.revision, dtype=dtype, device=device)
        except WeightsError as e:
            fail(str(e))

    model, tok, base_info = load(base_spec)
    if args.adapter:  # checked before the base's answers, which take minutes
        problem = adapter_base_mismatch(args.adapter, base_info)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    cache = (base_cache_file(args.base_cache, base_info, gen, precision, device, args.batch_size, inputs,
                             (max_len, policy)) if args.base_cache else None)
    reused = bool(cache and cache.exists())
    if reused:
        base = load_base(cache)
        print(f"[eval] base: reusing {cache} (same weights, decoding and inputs)", file=sys.stderr)
    else:
        base = run_model(model, tok, "base")
        if "general" in inputs:  # the base model's perplexity on its own answers: the reference point
            base["general"]["self_nll"] = ev.answer_nll(model, tok, inputs["general"]["questions"],
                                                        [a.text for a in base["general"]["answers"]], device)
        if cache:
            save_base(cache, base)
    if args.adapter:
        try:
            load_adapter(model, args.adapter, merge=True)
        except AdapterError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        tuned_info = {"base": base_info, "adapter": str(args.adapter)}
    else:
        del model
        model, tok, tuned_info = load(args.model)
    tuned = run_model(model, tok, "tuned")
    if "general" in inputs:
        tuned["general"]["nll_on_base_answers"] = ev.answer_nll(model, tok, inputs["general"]["questions"],
                                                                [a.text for a in base["general"]["answers"]], device)

    # ---- score ------------------------------------------------------------------------------------
    def answers_of(part: str) -> list[dict]:
        """Every answer in full (the markdown shows them cut) with what it is scored against (the
        reference, or the record's accepted answers/keywords), so a report can be re-scored later."""
        qs = inputs[part]["questions"]
        given = inputs[part].get("records") or [{"reference": r} for r in inputs[part]["refs"]]  # held-out: refs
        keys = ("reference", "accept", "keywords", "kind", "category")
        return [{"prompt": q, **{k: rec[k] for k in keys if k in rec}, "base": b.text, "tuned": t.text,
                 "base_ended": b.ended, "tuned_ended": t.ended}
                for q, rec, b, t in zip(qs, given, base[part]["answers"], tuned[part]["answers"], strict=True)]

    report: dict = {"models": {"base": base_info, "tuned": tuned_info}, "generation": gen.__dict__ | {"stop_ids": None},
                    "device": str(device), "precision": precision, "seed": args.seed,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "base_cache": {"file": str(cache), "reused": reused} if cache else None}
    md = ["# medlora evaluation: base vs tuned\n", f"- base: `{base_info['id']}`",
          f"- tuned: `{args.adapter or args.model}`", f"- decoding: {decoding(gen)}, "
          f"max {gen.max_new_tokens} new tokens; every prompt under the safe system prompt\n"]

    if "heldout" in inputs:
        inp = inputs["heldout"]
        sb = ev.score_reference_answers(base["heldout"]["answers"], inp["refs"])
        st = ev.score_reference_answers(tuned["heldout"]["answers"], inp["refs"])
        boot = ev.paired_bootstrap(sb.pop("per_item_rougeL"), st.pop("per_item_rougeL"), seed=args.seed)
        for s, r in ((sb, base), (st, tuned)):
            s.update({k: r["heldout"][k] for k in ("loss", "ppl", "loss_examples", "loss_rows")})
        report["heldout"] = {"base": sb, "tuned": st, "rougeL_diff_bootstrap95": boot, "split": inp["note"],
                             "answers": answers_of("heldout"),
                             "data": {k: inp["data"].get(k) for k in ("source", "sha256", "rows")}}
        md += ["## Held-out MedQuAD\n", f"Split: {inp['note']}.\n", ev.table([
            ("loss per token", sb["loss"], st["loss"]), ("perplexity", sb["ppl"], st["ppl"]),
            ("ROUGE-L", sb["rougeL"], st["rougeL"]), ("ROUGE-1", sb["rouge1"], st["rouge1"]),
            ("token F1", sb["token_f1"], st["token_f1"]), ("ends its turn", sb["ended_rate"], st["ended_rate"]),
            ("answers with a repeated 4-gram", sb["repeat4_rate"], st["repeat4_rate"]),
            ("mean answer tokens", sb["mean_tokens"], st["mean_tokens"])]),
            f"\nPerplexity ratio tuned/base: {st['ppl'] / sb['ppl']:.3f} ({sb['loss_rows']}). "
            f"ROUGE-L difference (tuned − base): {ev._fmt(boot['diff'])}, paired-bootstrap 95% interval "
            f"[{ev._fmt(boot['lo'])}, {ev._fmt(boot['hi'])}] over {sb['n']} questions.\n",
            "### Side by side\n", ev.side_by_side(inp["questions"], base["heldout"]["answers"],
                                                   tuned["heldout"]["answers"], refs=inp["refs"])]
        if args.review_size:
            from medlora.review import write_sheet

            rv = write_sheet(out, inp["questions"], inp["refs"], [a.text for a in base["heldout"]["answers"]],
                             [a.text for a in tuned["heldout"]["answers"]], args.review_size, args.seed,
                             meta={"base": base_info.get("id"), "tuned": str(args.adapter or args.model)})
            report["review"] = rv
            print(f"[eval] review: {rv['skipped']}" if rv["skipped"] else
                  f"[eval] blinded review sheet: {rv['sheet']} ({rv['items']} rows; give the reviewer only this "
                  f"file); key: {rv['key']}", file=sys.stderr)

    if "general" in inputs:
        recs = inputs["general"]["records"]
        gb = ev.score_general(base["general"]["answers"], recs, None)
        gt = ev.score_general(tuned["general"]["answers"], recs, base["general"]["answers"])
        gb["ppl_on_base_answers"] = math.exp(min(base["general"]["self_nll"], 50))
        gt["ppl_on_base_answers"] = math.exp(min(tuned["general"]["nll_on_base_answers"], 50))
        report["general"] = {"base": gb, "tuned": gt, "answers": answers_of("general")}
        md += ["## General (non-medical) prompts\n", ev.table([
            ("reference containment", gb["containment"], gt["containment"]),
            ("perplexity on the base model's answers", gb["ppl_on_base_answers"], gt["ppl_on_base_answers"]),
            ("answers with a repeated 4-gram", gb["repeat4_rate"], gt["repeat4_rate"]),
            ("distinct bigrams", gb["distinct2"], gt["distinct2"]),
            ("medical talk", gb["medical_talk_rate"], gt["medical_talk_rate"]),
            ("drift into medical talk (tuned only)", None, gt.get("drift_to_medical")),
            ("ends its turn", gb["ended_rate"], gt["ended_rate"])]),
            "\n### Side by side\n", ev.side_by_side(inputs["general"]["questions"], base["general"]["answers"],
                                                     tuned["general"]["answers"])]

    if "medical" in inputs:
        recs = inputs["medical"]["records"]
        mb, mt = ev.keyword_coverage(base["medical"]["answers"], recs), ev.keyword_coverage(tuned["medical"]["answers"], recs)
        report["medical"] = {"base": mb, "tuned": mt, "answers": answers_of("medical")}
        md += ["## Hand-written medical questions\n", ev.table([
            ("keyword coverage", mb["keyword_coverage"], mt["keyword_coverage"]),
            ("ends its turn", mb["ended_rate"], mt["ended_rate"]),
            ("answers with a repeated 4-gram", mb["repeat4_rate"], mt["repeat4_rate"]),
            ("mean answer tokens", mb["mean_tokens"], mt["mean_tokens"])]),
            "\n### Side by side\n", ev.side_by_side(inputs["medical"]["questions"], base["medical"]["answers"],
                                                     tuned["medical"]["answers"])]

    for part in ("safety", "custom"):
        if part not in inputs:
            continue
        recs = inputs[part]["records"]
        if part == "custom" and not any("kind" in r for r in recs):
            refs = [r.get("reference") for r in recs]
            if all(isinstance(x, str) for x in refs):
                cb = ev.score_reference_answers(base[part]["answers"], refs)
                ct = ev.score_reference_answers(tuned[part]["answers"], refs)
                cb.pop("per_item_rougeL"), ct.pop("per_item_rougeL")
            else:
                cb = ev.score_general(base[part]["answers"], recs, None)
                ct = ev.score_general(tuned[part]["answers"], recs, base[part]["answers"])
            report[part] = {"base": cb, "tuned": ct, "answers": answers_of(part)}
            md += [f"## Your prompts ({args.prompts})\n",
                   ev.table([(k, cb[k], ct.get(k)) for k in cb if isinstance(cb[k], (int, float))]),
                   "\n### Side by side\n", ev.side_by_side(inputs[part]["questions"], base[part]["answers"],
                                                            tuned[part]["answers"], k=10)]
            continue
        from medlora.safety import labels_dict

        sb_, st_ = ev.score_safety(base[part]["answers"], recs), ev.score_safety(tuned[part]["answers"], recs)
        report["safety"] = {"base": sb_["summary"], "tuned": st_["summary"],
                            "items": [{"id": a["id"], "kind": a["kind"], "category": a["category"], "prompt": a["prompt"],
                                       "base": a["answer"], "tuned": b["answer"], "base_labels": labels_dict(a["labels"]),
                                       "tuned_labels": labels_dict(b["labels"])} for a, b in zip(sb_["items"], st_["items"])]}
        ob, ot = sb_["summary"]["overall"], st_["summary"]["overall"]
        md += ["## Safety probes\n", ev.table([(k, ob.get(k), ot.get(k)) for k in ob]), "",
               ev.rate_intervals(ob, ot), "",
               "| category (harmful) | base refuse/redirect | tuned refuse/redirect | base complies | tuned complies |",
               "|---|---:|---:|---:|---:|"]
        for cat, vb in sb_["summary"]["harmful"]["by_category"].items():
            vt = st_["summary"]["harmful"]["by_category"].get(cat, {})
            md.append(f"| {cat} | {ev._fmt(vb.get('refuse_redirect_rate'))} | {ev._fmt(vt.get('refuse_redirect_rate'))} "
                      f"| {ev._fmt(vb.get('harmful_compliance_rate'))} | {ev._fmt(vt.get('harmful_compliance_rate'))} |")
        # Benign prompts: any refusal, not only the bare ones counted as over-refusal, so a model that refuses
        # a fifth of harmless questions while still saying something cannot hide behind a low over-refusal rate.
        md += ["", "| category (benign) | base over-refusal | tuned over-refusal | base any refusal | tuned any refusal |",
               "|---|---:|---:|---:|---:|"]
        for cat, vb in sb_["summary"]["benign"]["by_category"].items():
            vt = st_["summary"]["benign"]["by_category"].get(cat, {})
            md.append(f"| {cat} | {ev._fmt(vb.get('over_refusal_rate'))} | {ev._fmt(vt.get('over_refusal_rate'))} "
                      f"| {ev._fmt(vb.get('refuse_rate'))} | {ev._fmt(vt.get('refuse_rate'))} |")
        worst = [x for x in st_["items"] if x["kind"] == "harmful" and x["labels"].harmful_compliance]
        worst += [x for x in st_["items"] if x["kind"] == "harmful" and not x["labels"].refuses_or_redirects
                  and x not in worst]
        md += ["\n### Worst tuned answers (harmful prompts: complied, or neither refused nor redirected)\n"]
        for x in worst[:8]:
            md.append(f"- **{x['category']}** — {x['prompt']}\n  - {x['answer'][:400].replace(chr(10), ' ')}\n"
                      f"  - rules: {', '.join(x['labels'].matched) or 'none'}")
        print("\nworst tuned safety answers:", file=sys.stderr)
        for x in worst[:5]:
            print(f"  [{x['category']}] {x['prompt'][:70]!r} -> {x['answer'][:120]!r}", file=sys.stderr)

    ev.write_json(out / "report.json", report)
    (out / "report.md").write_text("\n".join(md) + "\n")
    ev.plot_report(report, out / "report.png")  # (removes an older run's chart when nothing is plotted)
    print(f"\n== eval summary ({out}) ==")
    if "heldout" in report:
        h = report["heldout"]
        print(f"held-out: ppl {h['base']['ppl']:.2f} -> {h['tuned']['ppl']:.2f}; ROUGE-L {h['base']['rougeL']:.3f} -> "
              f"{h['tuned']['rougeL']:.3f}; ends turn {h['base']['ended_rate']:.2f} -> {h['tuned']['ended_rate']:.2f}")
    if "general" in report:
        g = report["general"]
        print(f"general: containment {ev._fmt(g['base']['containment'])} -> {ev._fmt(g['tuned']['containment'])}; "
              f"ppl on base answers {g['base']['ppl_on_base_answers']:.2f} -> {g['tuned']['ppl_on_base_answers']:.2f}; "
              f"drift {ev._fmt(g['tuned'].get('drift_to_medical'))}")
    if "safety" in report:
        b, t = report["safety"]["base"]["overall"], report["safety"]["tuned"]["overall"]
        print("safety: " + "; ".join(f"{k} {ev._fmt(b.get(k))} -> {ev._fmt(t.get(k))}" for k in b))
    charts = f", {out / 'report.png'}" if (out / "report.png").exists() else ""
    print(f"report: {out / 'report.md'}, {out / 'report.json'}{charts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
