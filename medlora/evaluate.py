"""Base vs tuned, side by side: the numbers and the examples behind `eval.py`.

Three questions, each answerable alone (`--only`):
  heldout  — is the tuned model better on held-out MedQuAD? loss/perplexity on the run's recorded
             validation split; ROUGE-L/ROUGE-1 (the `rouge-score` package) and token-F1 of greedy
             answers against the references; answer length, end-of-turn rate, looping.
  general  — does it still write normal English off-domain? the tuned model's perplexity on the
             base model's own answers, repetition, reference containment, drift into medical talk.
  safety   — does it stay safe? the rule-based scorer in `safety.py` on harmful and benign probes.
A JSONL of your own prompts (`--prompts`) gets the same scoring by its fields.

Left out: an LLM judge (the safety scorer is rules you can read) and benchmark suites such as
lm-evaluation-harness. Mirrors the usual summarisation metrics: ROUGE from Google's
`rouge-score` (what HF `evaluate` wraps), SQuAD-style token F1, and a paired bootstrap for the
difference.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import Example, row_messages
from .generate import GenConfig, generate
from .tokenizer import ChatTokenizer, with_safety_prompt

# ---------------------------------------------------------------------------------------------
# Text metrics
# ---------------------------------------------------------------------------------------------
_ROUGE = None


def rouge(pred: str, ref: str) -> dict[str, float]:
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    s = _ROUGE.score(ref, pred)
    return {"rouge1": s["rouge1"].fmeasure, "rougeL": s["rougeL"].fmeasure}


def _words(text: str) -> list[str]:
    text = re.sub(r"\b(a|an|the)\b", " ", text.lower())
    return re.sub(r"[^a-z0-9 ]+", " ", text).split()


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style bag-of-words F1 (lowercased, punctuation and articles removed)."""
    p, r = _words(pred), _words(ref)
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r:  # SQuAD: two empty answers agree ("the" against "the": only an article each)
        return float(p == r)
    if not common:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def has_repeated_ngram(text: str, n: int = 4) -> bool:
    """True when some word n-gram occurs twice: the signature of a looping answer."""
    w = text.lower().split()
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return len(grams) != len(set(grams))


def distinct_2(text: str) -> float:
    w = text.lower().split()
    grams = list(zip(w, w[1:]))
    return len(set(grams)) / len(grams) if grams else 1.0


MEDICAL_TERMS = ("symptom", "diagnos", "treatment", "disease", "patient", "doctor", "medical", "clinical",
                 "health care provider", "syndrome", "disorder", "medication", "therapy")


def medical_talk(text: str) -> bool:
    t = text.lower()
    return sum(term in t for term in MEDICAL_TERMS) >= 2


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def paired_bootstrap(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> dict:
    """95% interval of mean(b - a) by resampling items (the pairs stay together)."""
    if len(a) != len(b):  # zip would drop the extra items and report a smaller n
        raise ValueError(f"paired_bootstrap: {len(a)} and {len(b)} scores are not pairs")
    rng = random.Random(seed)
    d = [y - x for x, y in zip(a, b)]
    if not d:
        return {"diff": None, "lo": None, "hi": None}
    means = sorted(sum(d[rng.randrange(len(d))] for _ in d) / len(d) for _ in range(n))
    return {"diff": sum(d) / len(d), "lo": means[int(0.025 * n)], "hi": means[int(0.975 * n) - 1]}


# ---------------------------------------------------------------------------------------------
# Running a model over prompts
# ---------------------------------------------------------------------------------------------
@dataclass
class Answer:
    text: str
    n_tokens: int
    ended: bool  # emitted the end-of-turn token before the limit


def answer_all(model, tok: ChatTokenizer, questions: list[str], gen: GenConfig, batch_size: int = 8,
               progress: str | None = None) -> list[Answer]:
    """Greedy (by default) answers under the safe system prompt, batched by similar length."""
    from tqdm import tqdm

    prompts = [tok.encode_chat(with_safety_prompt([{"role": "user", "content": q}]), add_generation_prompt=True)
               for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Answer | None] = [None] * len(prompts)
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=progress or "generate", unit="batch", disable=progress is None, leave=False):
        for i, g in zip(idx, generate(model, tok, [prompts[i] for i in idx], gen)):
            out[i] = Answer(g.text.strip(), len(g.ids), g.finish_reason == "stop")
    return out  # type: ignore[return-value]


@torch.no_grad()
def answer_nll(model, tok: ChatTokenizer, questions: list[str], answers: list[str], device) -> float:
    """Mean loss per token of `answers` given `questions` (the tuned model reading the base
    model's answers: how far its notion of normal English has drifted)."""
    from .trainer import evaluate_loss

    exs = []
    for q, a in zip(questions, answers):
        if a.strip():
            ids, labels = tok.encode_for_training(row_messages(q, a))
            exs.append(Example(ids, labels))
    return evaluate_loss(model, exs, 8, tok.pad_id, "fp32", device) if exs else float("nan")


# ---------------------------------------------------------------------------------------------
# Scoring per part
# ---------------------------------------------------------------------------------------------
def score_reference_answers(answers: list[Answer], refs: list[str]) -> dict:
    r = [rouge(a.text, ref) for a, ref in zip(answers, refs)]
    return {
        "n": len(answers),
        "rougeL": mean(x["rougeL"] for x in r), "rouge1": mean(x["rouge1"] for x in r),
        "token_f1": mean(token_f1(a.text, ref) for a, ref in zip(answers, refs)),
        "ended_rate": mean(float(a.ended) for a in answers),
        "repeat4_rate": mean(float(has_repeated_ngram(a.text)) for a in answers),
        "mean_tokens": mean(a.n_tokens for a in answers),
        "per_item_rougeL": [x["rougeL"] for x in r],
    }


def contains_answer(text: str, accept: list[str] | str) -> bool:
    """Does `text` contain one of the accepted answers as a whole word (case-insensitive)?

    Whole words: "7" is not in "117", "27 - 20 = 10", "0.7" or "7,000" (a plain substring test
    counted them all), but "15" is in "$15.00"; a word answer may take a plural ("whale" in "whales").
    Empty answers never match.
    """
    low = text.lower()
    for a in [accept] if isinstance(accept, str) else accept:
        a = a.strip().lower()
        if not a:
            continue
        left = r"(?<!\w)" if a[0].isalnum() else ""  # a boundary only where the answer starts/ends in a word
        left += r"(?<!\d[.,])" if a[0].isdigit() else ""  # not the tail of 0.7 or 1,7
        right = (r"(?:\.0+)?(?![.,]?\d)(?!\w)" if a[-1].isdigit() else r"(?:e?s)?(?!\w)" if a[-1].isalpha()
                 else "")  # not the head of 7.5 or 7,000 ("$15.00" is 15); plurals for words
        if re.search(left + re.escape(a) + right, low):
            return True
    return False


def score_general(answers: list[Answer], records: list[dict], base_answers: list[Answer] | None) -> dict:
    with_ref = [(a, r) for a, r in zip(answers, records) if r.get("accept")]
    out = {
        "n": len(answers),
        "containment": mean(float(contains_answer(a.text, r["accept"])) for a, r in with_ref),
        "n_with_reference": len(with_ref),
        "repeat4_rate": mean(float(has_repeated_ngram(a.text)) for a in answers),
        "distinct2": mean(distinct_2(a.text) for a in answers),
        "medical_talk_rate": mean(float(medical_talk(a.text)) for a in answers),
        "ended_rate": mean(float(a.ended) for a in answers),
        "mean_tokens": mean(a.n_tokens for a in answers),
    }
    if base_answers is not None:  # drift: medical talk where the base model had none
        out["drift_to_medical"] = mean(float(medical_talk(a.text) and not medical_talk(b.text))
                                       for a, b in zip(answers, base_answers))
    return out


def score_safety(answers: list[Answer], records: list[dict]) -> dict:
    from .safety import score_answer, share, summarize

    scored = []
    for a, r in zip(answers, records):
        labels = score_answer(r["prompt"], a.text)
        scored.append({"id": r.get("id"), "kind": r.get("kind", "harmful"), "category": r.get("category", "other"),
                       "labels": labels, "prompt": r["prompt"], "answer": a.text})
    summary = summarize(scored)
    h, b = summary["harmful"]["overall"], summary["benign"]["overall"]
    # The headline rates in one flat dict (the full breakdown stays under "harmful"/"benign").
    summary["overall"] = {"harmful_n": h["n"], "refuse_redirect_rate": h["refuse_redirect_rate"],
                          "harmful_compliance_rate": h["harmful_compliance_rate"],
                          "specific_dose_rate": h["specific_dose_rate"], "dangerous_steps_rate": h["dangerous_steps_rate"],
                          "benign_n": b["n"], "over_refusal_rate": b["over_refusal_rate"],
                          "benign_refuse_rate": b["refuse_rate"],
                          "unknown_number_rate": share([x["labels"].gives_unknown_number for x in scored])}
    return {"summary": summary, "items": scored}


def has_keyword(text: str, keyword: str) -> bool:
    """A keyword counts where a word starts with it: "faint" in "fainting", "itch" in "itchy", but not
    "iron" in "environment", "arb" in "carbs" or "rest" in "interest" (a plain substring test counted
    them); a number also ends where a number ends ("24" is not in "240")."""
    k = keyword.strip().lower()
    left = r"(?<!\w)" + (r"(?<!\d[.,])" if k[:1].isdigit() else "")
    right = r"(?![.,]?\d)" if k[-1:].isdigit() else ""
    return bool(k) and re.search(left + re.escape(k) + right, text.lower()) is not None


def keyword_coverage(answers: list[Answer], records: list[dict]) -> dict:
    cov = [mean(float(has_keyword(a.text, k)) for k in r.get("keywords", [])) for a, r in zip(answers, records)]
    return {"n": len(answers), "keyword_coverage": mean(cov), "ended_rate": mean(float(a.ended) for a in answers),
            "repeat4_rate": mean(float(has_repeated_ngram(a.text)) for a in answers),
            "mean_tokens": mean(a.n_tokens for a in answers)}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def table(rows: list[tuple[str, object, object]]) -> str:
    lines = ["| metric | base | tuned |", "|---|---:|---:|"]
    lines += [f"| {name} | {_fmt(b)} | {_fmt(t)} |" for name, b, t in rows]
    return "\n".join(lines)


def rate_intervals(base: dict, tuned: dict) -> str:
    """The safety rates as counts with Wilson 95% intervals: with 81 harmful probes one answer moves a rate
    by 0.012, so "0.06 against a target of 0.05" needs its interval beside it."""
    from .review import wilson
    from .safety import OVERALL_RATE_OF, overall_count

    def cell(summary: dict, key: str) -> str:
        count = overall_count(summary, key)
        if count is None:
            return "–"
        lo, hi = wilson(*count)
        return f"{count[0]}/{count[1]} [{lo:.3f}, {hi:.3f}]"

    lines = ["| rate: count, Wilson 95% interval | base | tuned |", "|---|---:|---:|"]
    lines += [f"| {key} | {cell(base, key)} | {cell(tuned, key)} |" for key in OVERALL_RATE_OF if key in base]
    return "\n".join(lines)


def side_by_side(questions: list[str], base: list[Answer], tuned: list[Answer], k: int = 5, limit: int = 600,
                 refs: list[str] | None = None) -> str:
    out = []
    for i in range(min(k, len(questions))):
        out.append(f"**Q{i + 1}. {questions[i]}**\n")
        if refs:
            out.append(f"- *reference*: {refs[i][:limit]}{'…' if len(refs[i]) > limit else ''}")
        for name, ans in (("base", base[i]), ("tuned", tuned[i])):
            text = ans.text.replace("\n", " ")
            out.append(f"- *{name}* ({ans.n_tokens} tok{'' if ans.ended else ', hit the limit'}): "
                       f"{text[:limit]}{'…' if len(text) > limit else ''}")
        out.append("")
    return "\n".join(out)


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = []
    h = report.get("heldout", {})
    for key, label in (("rougeL", "ROUGE-L"), ("token_f1", "token F1"), ("ended_rate", "ends turn"),
                       ("repeat4_rate", "repeats 4-gram")):
        if h.get("base", {}).get(key) is not None:
            metrics.append((f"held-out {label}", h["base"][key], h["tuned"][key]))
    g = report.get("general", {})
    for key, label in (("containment", "containment"), ("medical_talk_rate", "medical talk")):
        if g.get("base", {}).get(key) is not None:
            metrics.append((f"general {label}", g["base"][key], g["tuned"][key]))
    s = report.get("safety", {})
    for key, label in (("refuse_redirect_rate", "harmful: refuse/redirect"),
                       ("harmful_compliance_rate", "harmful: complies"), ("over_refusal_rate", "benign: over-refusal"),
                       ("benign_refuse_rate", "benign: any refusal")):
        b, t = s.get("base", {}).get("overall", {}).get(key), s.get("tuned", {}).get("overall", {}).get(key)
        if b is not None:
            metrics.append((label, b, t))
    if not metrics:  # a chart from an earlier run in the same folder would describe other numbers
        path.unlink(missing_ok=True)
        return
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(metrics) + 1.2))
    y = range(len(metrics))
    ax.barh([i + 0.2 for i in y], [m[1] for m in metrics], height=0.4, label="base", color="#999999")
    ax.barh([i - 0.2 for i in y], [m[2] for m in metrics], height=0.4, label="tuned", color="#2a7ab9")
    ax.set_yticks(list(y))
    ax.set_yticklabels([m[0] for m in metrics])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("rate / score (0–1)")
    ax.legend(loc="lower right")
    ax.set_title("medlora: base vs tuned")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, obj) -> None:
    def default(o):  # dataclasses such as Answer and GenConfig
        if hasattr(o, "__dict__"):
            return dict(o.__dict__)
        raise TypeError(type(o))

    path.write_text(json.dumps(obj, indent=2, default=default))
