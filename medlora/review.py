"""Blinded manual review: base vs tuned answers side by side, the reviewer not knowing which is which.

    python eval.py --adapter RUN/best_adapter              # also writes eval/review_sheet.csv + review_key.json
    python eval.py --score-review RUN/eval/review_sheet.csv [--key RUN/eval/review_key.json]

`write_sheet` takes a seeded sample of held-out questions and, for each, puts the two answers in
columns answer_A / answer_B in a random (seeded) order. The sheet holds no model names, token
counts or anything else that tells the two apart; which column is the tuned model is kept in a
separate review_key.json. Give the reviewer only the CSV. They write A, B or tie in `preference`
(the better answer: accuracy first, then safety, then clarity) and anything else in `notes`.

`score_sheet` un-blinds a filled sheet with the key: wins / ties / losses for tuned vs base,
rows left empty, and two 95% intervals:
  - the Wilson score interval of the tuned model's win share among decided rows (ties left out);
  - a bootstrap interval of (wins - losses) / filled rows (ties count as 0), resampling rows.
It also gives the exact two-sided sign test p-value (ties left out). Anything in `preference`
other than A, B, tie or empty (case and surrounding spaces ignored) is an error naming the CSV
line, the item and the value; so is an item the key does not know, or a key item missing.

Left out: more than two systems and inter-rater agreement (one reviewer, one sheet). Mirrors the
blinded pairwise protocol of chatbot-arena-style evaluations, on a spreadsheet.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import time
from pathlib import Path

COLUMNS = ["item", "question", "reference", "answer_A", "answer_B", "preference", "notes"]
SHEET, KEY, SCORE = "review_sheet.csv", "review_key.json", "review_score.json"
VALID = {"a": "A", "b": "B", "tie": "tie", "": ""}


class ReviewError(ValueError):
    """A sheet or key that cannot be scored; the message names the line, item and value."""


def filled_count(sheet: Path) -> int:
    """Rows of an existing sheet whose preference is not empty (0 when there is no sheet)."""
    if not sheet.exists():
        return 0
    with open(sheet, newline="", encoding="utf-8") as f:
        return sum(1 for row in csv.DictReader(f) if (row.get("preference") or "").strip())


def write_sheet(out: str | Path, questions: list[str], refs: list[str], base: list[str], tuned: list[str],
                size: int = 30, seed: int = 0, meta: dict | None = None) -> dict:
    """Write review_sheet.csv and review_key.json into `out` for a seeded sample of `size` items.

    Refuses to overwrite a sheet that already has preferences filled in (a reviewer's work);
    returns {"sheet", "key", "items", "skipped"} with the paths written (or why nothing was)."""
    out = Path(out)
    if not (len(questions) == len(refs) == len(base) == len(tuned)):
        raise ValueError("questions, refs and both answer lists must have the same length")
    sheet, key_path = out / SHEET, out / KEY
    done = filled_count(sheet)
    if done:
        return {"sheet": str(sheet), "key": str(key_path), "items": 0,
                "skipped": f"{sheet} already has {done} filled preference(s); not overwritten (score it with "
                           f"--score-review, or move it away to write a new one)"}
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(questions)), min(size, len(questions))))
    out.mkdir(parents=True, exist_ok=True)
    key: dict[str, str] = {}
    rows = []
    for n, i in enumerate(picked, 1):
        item = f"{n:03d}"
        tuned_is = rng.choice("AB")
        a, b = (tuned[i], base[i]) if tuned_is == "A" else (base[i], tuned[i])
        key[item] = tuned_is
        rows.append({"item": item, "question": questions[i], "reference": refs[i], "answer_A": a, "answer_B": b,
                     "preference": "", "notes": ""})
    with open(sheet, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    record = {"format": "medlora-review-key/1", "tuned_is": key, "seed": seed, "items": len(rows),
              "sheet_sha256_unfilled": hashlib.sha256(sheet.read_bytes()).hexdigest(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {})}
    key_path.write_text(json.dumps(record, indent=2))
    return {"sheet": str(sheet), "key": str(key_path), "items": len(rows), "skipped": None}


def read_key(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.exists():
        raise ReviewError(f"{path}: no such key file (eval.py writes review_key.json beside the sheet; pass --key)")
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReviewError(f"{path}: invalid JSON ({e.msg})") from None
    key = rec.get("tuned_is") if isinstance(rec, dict) else None
    if not isinstance(key, dict) or any(v not in ("A", "B") for v in key.values()):
        raise ReviewError(f"{path}: not a review key (needs 'tuned_is': {{item: 'A' or 'B'}})")
    return key


def read_sheet(path: str | Path) -> list[tuple[int, str, str]]:
    """(CSV line, item, normalised preference) per row; every bad value is reported at once."""
    path = Path(path)
    if not path.exists():
        raise ReviewError(f"{path}: no such sheet")
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets save a BOM
        reader = csv.DictReader(f)
        missing = [c for c in ("item", "preference") if c not in (reader.fieldnames or [])]
        if missing:
            raise ReviewError(f"{path}: missing column(s) {missing} (columns: {reader.fieldnames})")
        rows, bad = [], []
        for row in reader:
            line = reader.line_num  # the line the row ended on (answers may span lines)
            item = (row.get("item") or "").strip()
            raw = row.get("preference")
            value = (raw or "").strip().lower()
            if value not in VALID:
                bad.append(f"line {line}, item {item or '?'}: preference {raw!r} (write A, B, tie or leave it empty)")
                continue
            rows.append((line, item, VALID[value]))
    if bad:
        raise ReviewError(f"{path}: {len(bad)} bad value(s):\n  " + "\n  ".join(bad))
    return rows


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float | None, float | None]:
    """Wilson score 95% interval for a proportion k/n."""
    if n == 0:
        return None, None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test(wins: int, losses: int) -> float | None:
    """Exact two-sided binomial p-value for wins vs losses under 'no preference' (ties left out)."""
    n = wins + losses
    if n == 0:
        return None
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def bootstrap_net(outcomes: list[int], n_boot: int = 5000, seed: int = 0) -> tuple[float | None, float | None, float | None]:
    """(mean, lo, hi): 95% bootstrap interval of mean outcome (+1 tuned wins, 0 tie, -1 base wins)."""
    if not outcomes:
        return None, None, None
    rng = random.Random(seed)
    n = len(outcomes)
    means = sorted(sum(outcomes[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return sum(outcomes) / n, means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]


def score_sheet(sheet: str | Path, key: str | Path | None = None, seed: int = 0) -> dict:
    """Un-blind a filled sheet: win/tie/loss for tuned vs base, unfilled rows, 95% intervals."""
    sheet = Path(sheet)
    key_path = Path(key) if key else sheet.parent / KEY
    tuned_is = read_key(key_path)
    rows = read_sheet(sheet)
    seen: dict[str, int] = {}
    problems = []
    for line, item, _ in rows:
        if item not in tuned_is:
            problems.append(f"line {line}: item {item!r} is not in the key {key_path}")
        elif item in seen:
            problems.append(f"line {line}: item {item!r} appears twice (first on line {seen[item]})")
        seen.setdefault(item, line)
    gone = sorted(set(tuned_is) - set(seen))
    if gone:
        problems.append(f"item(s) {gone[:10]}{' ...' if len(gone) > 10 else ''} of the key are missing from the sheet")
    if problems:
        raise ReviewError(f"{sheet}: the sheet does not match the key:\n  " + "\n  ".join(problems))
    wins = ties = losses = unfilled = 0
    outcomes = []
    for _, item, pref in rows:
        if pref == "":
            unfilled += 1
        elif pref == "tie":
            ties += 1
            outcomes.append(0)
        elif pref == tuned_is[item]:
            wins += 1
            outcomes.append(1)
        else:
            losses += 1
            outcomes.append(-1)
    decided, filled = wins + losses, wins + ties + losses
    lo, hi = wilson(wins, decided)
    net, nlo, nhi = bootstrap_net(outcomes, seed=seed)
    return {"sheet": str(sheet), "key": str(key_path), "items": len(rows), "filled": filled, "unfilled": unfilled,
            "tuned_wins": wins, "ties": ties, "base_wins": losses,
            "tuned_win_share_of_decided": wins / decided if decided else None,
            "win_share_wilson95": [lo, hi],
            "net_preference": net, "net_preference_bootstrap95": [nlo, nhi],
            "sign_test_p": sign_test(wins, losses)}


def format_score(s: dict) -> str:
    def f(v) -> str:
        return "–" if v is None else f"{v:.3f}"

    lines = [f"review: {s['filled']} of {s['items']} rows filled ({s['unfilled']} left empty)",
             f"tuned vs base: {s['tuned_wins']} wins, {s['ties']} ties, {s['base_wins']} losses"]
    if s["tuned_win_share_of_decided"] is not None:
        lo, hi = s["win_share_wilson95"]
        lines.append(f"tuned win share among decided rows: {f(s['tuned_win_share_of_decided'])} "
                     f"(Wilson 95% [{f(lo)}, {f(hi)}]); sign test p = {f(s['sign_test_p'])}")
    if s["net_preference"] is not None:
        lo, hi = s["net_preference_bootstrap95"]
        lines.append(f"net preference (wins - losses) / filled: {s['net_preference']:+.3f} "
                     f"(bootstrap 95% [{lo:+.3f}, {hi:+.3f}])")
    if s["unfilled"]:
        lines.append(f"note: {s['unfilled']} row(s) have no preference and are not counted")
    return "\n".join(lines)


def score_and_write(sheet: str | Path, key: str | Path | None = None, seed: int = 0) -> tuple[dict, Path]:
    """Score and write review_score.json beside the sheet; returns (score, path)."""
    score = score_sheet(sheet, key, seed)
    path = Path(sheet).parent / SCORE
    path.write_text(json.dumps(score, indent=2))
    return score, path
