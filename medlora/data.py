"""MedQuAD (or any question/answer table) -> cleaned rows -> leak-free split -> chat examples -> batches.

Every dropped row is counted by reason. The validation split is made by *group*, not by row:
MedQuAD repeats answers and asks the same question about the same condition in several sources
(GARD and GHR cover the same diseases), so rows sharing a normalised answer or a question topic
are joined (union-find) and whole groups go to one side. Batches are length-bucketed and
right-padded: causal attention means real tokens never see the padding after them, so no
attention mask is needed and padding stays at a few percent.

Left out: packing several examples into one row (litgpt's and torchtune's packed datasets; here
each row is one conversation, so no attention mask between examples is needed), multi-turn
MedQuAD (one question, one answer), and data sets larger than memory. Mirrors torchtune's chat
SFT datasets: messages in, labels -100 outside the assistant's turns.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .tokenizer import IGNORE, MEDICAL_SYSTEM_PROMPT, ChatFormatError, ChatTokenizer, validate_messages

DEFAULT_DATA = "keivalya/MedQuad-MedicalQnADataset"
SHIPPED_DATA = Path(__file__).resolve().parents[1] / "data" / "medquad" / "medquad.parquet"
# The synthetic "refuse + safe guidance" examples (python -m medlora.safety_data) that train.py mixes
# into MedQuAD by default (--safety-data / --safety-weight / --no-safety-data).
SAFETY_DATA = Path(__file__).resolve().parents[1] / "data" / "safety_sft.jsonl"
# The base model's own answers to everyday prompts (python -m medlora.general_data), mixed in by
# default so the adapter does not forget general chat (--replay-data / --replay-weight / --no-replay-data).
REPLAY_DATA = Path(__file__).resolve().parents[1] / "data" / "general_replay.jsonl"
MAKERS = {"safety": "python -m medlora.safety_data", "replay": "python -m medlora.general_data"}


class DataError(ValueError):
    """Bad data: the message names the file, row and field."""


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
def _read_table(path: Path, line_numbers: list[int] | None = None) -> list[dict]:
    """The file's records. For JSON lines, `line_numbers` (if given) receives each record's line in the
    file: blank lines are skipped, so a record's count is not its line."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path).to_pylist()
        if suffix == ".csv":
            return pacsv.read_csv(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read {suffix[1:]} ({str(e).splitlines()[0][:200]})") from None
    if suffix in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8", errors="strict") as f:
            try:
                if suffix == ".json":
                    data = json.load(f)
                    return data if isinstance(data, list) else data.get("data", [])
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                            if line_numbers is not None:
                                line_numbers.append(n)
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: invalid UTF-8 near byte {e.start}") from None
        return rows
    raise DataError(f"{path}: unsupported file type {suffix!r} (use parquet, csv, jsonl or a MedQuAD XML folder)")


def _read_medquad_xml(folder: Path) -> list[dict]:
    """The original abachaa/MedQuAD layout: folders of XML documents with <QAPair>s."""
    import xml.etree.ElementTree as ET

    rows = []
    files = sorted(folder.rglob("*.xml"))
    if not files:
        raise DataError(f"{folder}: no .xml files (expected the MedQuAD XML layout)")
    for f in files:
        try:
            root = ET.parse(f).getroot()
        except ET.ParseError as e:
            raise DataError(f"{f}: invalid XML ({e})") from None
        for qa in root.iter("QAPair"):
            q, a = qa.find("Question"), qa.find("Answer")
            rows.append({"qtype": q.get("qtype") if q is not None else None,
                         "Question": (q.text or "") if q is not None else None,
                         "Answer": "".join(a.itertext()) if a is not None else None})
    return rows


def _hub_files(repo_id: str, revision: str | None) -> tuple[list[Path], str | None]:
    """The data set's table files from the hub (or its cache), and the commit they come from."""
    from huggingface_hub import snapshot_download

    from .weights import snapshot_commit

    folder = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                    allow_patterns=["*.csv", "*.parquet", "*.jsonl"]))
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".csv", ".parquet", ".jsonl"))
    if not files:
        raise DataError(f"hub data set {repo_id}: no csv/parquet/jsonl file in the repository")
    return files, snapshot_commit(folder)


def load_source(spec: str | None = None, revision: str | None = None, verbose: bool = True) -> tuple[list[dict], dict]:
    """Raw rows plus a record of where they came from (path(s) and sha256)."""
    from .weights import sha256_file

    spec = spec or DEFAULT_DATA
    path = Path(spec)
    note, commit = "", None
    if path.is_dir():
        files = sorted(path.rglob("*.xml"))
        return _read_medquad_xml(path), {"source": spec, "kind": "medquad-xml", "files": len(files)}
    if path.exists():
        files, kind = [path], "file"
    elif spec.count("/") == 1 and not spec.startswith((".", "/")) and not path.suffix:
        try:
            (files, commit), kind = _hub_files(spec, revision), "hub"
        except DataError:
            raise
        except Exception as e:
            if spec != DEFAULT_DATA or not SHIPPED_DATA.exists():
                raise DataError(f"--data {spec}: cannot reach the hub ({type(e).__name__}) and it is not a local file") from None
            note = f"{spec} unreachable ({type(e).__name__}); using the shipped copy {SHIPPED_DATA}"
            if verbose:
                print(f"[medlora] {note}", file=sys.stderr)
            files, kind = [SHIPPED_DATA], "shipped"
    else:
        raise DataError(f"--data {spec}: no such file or folder")
    rows = [r for f in files for r in _read_table(f)]
    info = {"source": spec, "kind": kind, "files": [str(f) for f in files],
            "sha256": {f.name: sha256_file(f) for f in files}, "rows": len(rows)}
    if kind == "hub":
        info.update(revision=revision, commit=commit)
    if note:
        info["note"] = note
    return rows, info


# ---------------------------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------------------------
_WS = re.compile(r"\s+")


def collapse_ws(text: str) -> str:
    """Collapse whitespace runs; keep paragraph breaks (a blank line) as one newline pair."""
    paras = [_WS.sub(" ", p).strip() for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paras if p)


@dataclass
class Row:
    question: str
    answer: str
    qtype: str | None
    index: int  # position in the source (stable row identity for the recorded split)


def clean_rows(raw: list[dict], question_col: str = "Question", answer_col: str = "Answer",
               source: str = "data") -> tuple[list[Row], Counter]:
    """Drop unusable rows (each counted by reason), collapse whitespace, drop exact duplicates."""
    for col, flag in ((question_col, "--question-col"), (answer_col, "--answer-col")):
        if raw and not any(isinstance(r, dict) and col in r for r in raw[:1000]):
            cols = sorted({k for r in raw[:100] if isinstance(r, dict) for k in r})
            raise DataError(f"{source}: no column {col!r} (columns: {cols}); set {flag}")
    counts: Counter = Counter()
    seen: set[tuple[str, str]] = set()
    rows = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict):
            counts["not a record"] += 1
            continue
        q, a = r.get(question_col), r.get(answer_col)
        if q is None or a is None:
            counts["missing question/answer"] += 1
            continue
        if not isinstance(q, str) or not isinstance(a, str):
            counts["non-string question/answer"] += 1
            continue
        q, a = collapse_ws(q), collapse_ws(a)
        if not q or not a:
            counts["empty question/answer"] += 1
            continue
        if (q, a) in seen:
            counts["exact duplicate"] += 1
            continue
        seen.add((q, a))
        qtype = r.get("qtype")
        rows.append(Row(q, a, qtype if isinstance(qtype, str) else None, i))
    counts["kept"] = len(rows)
    return rows, counts


# ---------------------------------------------------------------------------------------------
# Leak-free split
# ---------------------------------------------------------------------------------------------
_TOPIC_PATTERNS = [re.compile(p, re.I) for p in [
    r"^what (?:is|are) (?:the )?(?:symptoms|signs|causes|treatments?|outlook|complications|stages|genetic changes related to|"
    r"considerations for|research|diagnosis)(?: \(or [^)]*\))?(?: of| for| about| to)? (.+)$",
    r"^what (?:is|are) \(?(?:are|is)?\)? ?(.+)$",
    r"^(?:how to|how can i|how do i|how do you) (?:diagnose|prevent|treat|manage) (.+)$",
    r"^how many people are affected by (.+)$",
    r"^(?:who is|who are) at risk (?:for|of) (.+)$",
    r"^is (.+?) inherited$",
    r"^what causes (.+)$",
    r"^do you have information about (.+)$",
    r"^what to do for (.+)$",
    r"^what research \(or clinical trials\) is being done for (.+)$",
    r"^where to find support for people with (.+)$",
    r"^how (?:can|is|are|do|does) (.+?) (?:be )?(?:treated|prevented|diagnosed|spread|transmitted|controlled|managed)$",
]]
_ROMAN = {"i": "1", "ii": "2", "iii": "3", "iv": "4", "v": "5", "vi": "6", "vii": "7", "viii": "8"}


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def question_topic(question: str) -> str:
    """The condition a templated MedQuAD question is about ('What causes X ?' -> 'x')."""
    q = question.strip().rstrip("?. ").strip()
    for pat in _TOPIC_PATTERNS:
        m = pat.match(q)
        if m:
            return _norm(m.group(1))
    return _norm(q)


def row_keys(r: Row) -> tuple[str, str]:
    """What split_rows groups a row by: its normalised answer and its question topic."""
    return "a:" + _norm(r.answer), "t:" + topic_key(r.question)


def held_out_keys(rows: list[Row]) -> set[str]:
    """The keys split_rows groups by, for checking other data against the held-out rows."""
    return {key for r in rows for key in row_keys(r)}


def overlaps(messages: list[dict], keys: set[str]) -> bool:
    """Does a chat share a question topic or an answer with the rows behind `keys`?"""
    return any(("t:" + topic_key(m["content"]) if m["role"] == "user" else "a:" + _norm(m["content"])) in keys
               for m in messages if m["role"] in ("user", "assistant"))


def topic_key(question: str) -> str:
    """question_topic with spelling variants folded together, so one condition is one key: "What I need
    to know about" wrappers, possessives and plurals ("Whipple's Disease", "dystonias"), roman numerals
    ("type IV" = "type 4") and spacing ("brain stem" = "brainstem")."""
    topic = re.sub(r"^what i need to know about ", "", question_topic(re.sub(r"['’]s\b", "", question)))
    words = [_ROMAN.get(w, w) for w in topic.split()]
    return "".join(w[:-1] if w.endswith("s") and len(w) > 3 else w for w in words)


def split_rows(rows: list[Row], val_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Group rows that share a normalised answer or question topic; send whole groups to validation."""
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, r in enumerate(rows):
        for key in row_keys(r):
            j = first.setdefault(key, i)
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(rows)):
        groups.setdefault(find(i), []).append(i)
    order = sorted(groups.values(), key=lambda g: rows[g[0]].index)
    random.Random(seed).shuffle(order)
    target = round(val_fraction * len(rows))
    val_idx: set[int] = set()
    for g in order:
        if len(val_idx) >= target:
            break
        if len(g) > max(50, target // 4):  # never let one huge group swing the split
            continue
        val_idx.update(g)
    train = [r for i, r in enumerate(rows) if i not in val_idx]
    val = [r for i, r in enumerate(rows) if i in val_idx]
    return train, val


def recorded_held_out(run: str | os.PathLike) -> list[int]:
    """The held-out row indices a run folder recorded in its split.json (DataError saying what is wrong)."""
    f = Path(run) / "split.json"
    if not f.is_file():
        raise DataError("no split.json there (a run folder made by train.py holds one)" if Path(run).is_dir()
                        else "no such folder")
    try:
        index = json.loads(f.read_text())["val_index"]
    except (ValueError, KeyError, TypeError):
        index = None
    if not (isinstance(index, list) and index and all(isinstance(i, int) for i in index)):
        raise DataError(f"{f} has no list of held-out rows (val_index)")
    return index


def adapter_run_split(adapter: str | os.PathLike) -> tuple[Path, set[int]] | None:
    """The run folder an adapter was saved in and the held-out rows that run recorded, or None for an
    adapter outside a run folder (a release, a bare adapter): there is no split of its own to compare."""
    run = Path(adapter).parent
    try:
        return run, set(recorded_held_out(run))
    except DataError:
        return None


def recorded_split_rows(rows: list[Row], held_out_index: list[int], counts: Counter) -> tuple[list[Row], list[Row]]:
    """The split another run recorded (its held-out source rows): those rows are validation; the training
    side is every other row except those sharing an answer or question topic with one of them (a split
    from an older grouping may have such rows; they are counted, not trained on)."""
    wanted = set(held_out_index)
    val = [r for r in rows if r.index in wanted]
    if len(val) < len(wanted):
        raise DataError(f"the recorded split holds out {len(wanted)} rows but only {len(val)} of them are among "
                        "this data's cleaned rows: it was made from other data (or another cleaning)")
    keys = held_out_keys(val)
    train = [r for r in rows if r.index not in wanted
             and not keys.intersection(row_keys(r))]
    left_out = len(rows) - len(val) - len(train)
    if left_out:
        counts["shares an answer or topic with a recorded held-out row"] += left_out
    return train, val


# ---------------------------------------------------------------------------------------------
# Chat examples
# ---------------------------------------------------------------------------------------------
@dataclass
class Example:
    ids: list[int]
    labels: list[int]
    source: str = "medquad"

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def row_messages(question: str, answer: str | None = None, system_prompt: str = MEDICAL_SYSTEM_PROMPT) -> list[dict]:
    msgs = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    return msgs + ([{"role": "assistant", "content": answer}] if answer is not None else [])


# How examples are made from rows; a run resumes only with the version it started with (train.py).
# 2: truncated answers end at a sentence, line or word boundary (1 cut mid-word when no sentence ended
# in the answer's second half), rows holding a chat control token are left out, and the split groups
# question topics by topic_key (1 let ~3% of held-out rows share a condition with training rows).
# 3: --limit-rows takes a seeded random sample of the training and held-out rows (2 took the head of each:
# 360 of the README's 400 rows were cancer pages), and periodic validation uses a seeded sample of --val-rows.
PREP_VERSION = 3


def _truncate_answers(tok: ChatTokenizer, rows: list[Row], max_len: int) -> list[str | None]:
    """Shorten each row's answer to fit `max_len` tokens, cut at a boundary (_cut_at_boundary); None
    where the system prompt and question leave under 16 tokens. Batched: over-long rows are ~40% of MedQuAD
    at 320 tokens, and tokenising them one at a time was half of data preparation."""
    overheads = tok.encode_many([tok.render(row_messages(r.question, "")) for r in rows])
    answers = tok.encode_many([r.answer for r in rows])
    out = []
    for over, ids in zip(overheads, answers):
        budget = max_len - (len(over) + 1)
        if budget < 16:
            out.append(None)
            continue
        text = tok.decode(ids[:budget]).rstrip("\ufffd")  # a cut inside a character decodes to U+FFFD
        out.append(_cut_at_boundary(text))
    return out


def _cut_at_boundary(text: str) -> str:
    """The longest start of `text` that ends a sentence or a line (a list item), if one is in its second
    half; else one that ends a word: a truncated answer never ends mid-word before <|im_end|>."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)|\n", text)]
    if ends and ends[-1] > len(text) // 2:
        return text[:ends[-1]].rstrip()
    words = text.rstrip().rsplit(None, 1)
    return words[0].rstrip() if len(words) == 2 and len(words[0]) > len(text) // 2 else text.rstrip()


def _has_control_token(tok: ChatTokenizer, row: Row, counts: Counter) -> bool:
    """A row whose text holds a chat control token (<|im_end|>...) is left out and counted: it would
    be read as the token itself and break the turn structure the model learns."""
    found = any(tok.control_token_in(text) for text in (row.question, row.answer))
    if found:
        counts["contains a chat control token"] += 1
    return found


def build_examples(rows: list[Row], tok: ChatTokenizer, max_len: int, long_rows: str = "drop",
                   counts: Counter | None = None) -> list[Example]:
    """Render each row as system + user + assistant and tokenise; handle over-long rows by policy."""
    counts = counts if counts is not None else Counter()
    out = []
    for k in range(0, len(rows), 512):  # 512 rows at a time: tokenised in parallel, memory bounded
        chunk = [r for r in rows[k:k + 512] if not _has_control_token(tok, r, counts)]
        encoded = tok.encode_many_for_training([row_messages(r.question, r.answer) for r in chunk])
        long = [i for i, (ids, _) in enumerate(encoded) if len(ids) > max_len]
        redone = {}
        if long and long_rows == "drop":
            counts[f"longer than {max_len} tokens"] += len(long)
        elif long:
            short = _truncate_answers(tok, [chunk[i] for i in long], max_len)
            kept = [(i, text) for i, text in zip(long, short) if text is not None]
            redone = dict(zip([i for i, _ in kept], tok.encode_many_for_training(
                [row_messages(chunk[i].question, text) for i, text in kept])))
            for reason, n in ((f"system prompt + question leave under 16 of {max_len} tokens for the answer",
                               len(long) - len(kept)),
                              ("answer truncated", len(kept))):
                if n:
                    counts[reason] += n
        dropped = set(long) - set(redone)
        out += [Example(*redone.get(i, enc)) for i, enc in enumerate(encoded) if i not in dropped]
    return out


def load_chat_jsonl(path: str | os.PathLike, tok: ChatTokenizer, max_len: int, source: str | None = None,
                    skipped: Counter | None = None, held_out: set[str] | None = None) -> list[Example]:
    """Extra SFT data: one {"messages": [...]} per line; the safe system prompt is put first. Rows left
    out are counted in `skipped` by reason (the caller says so: nothing is dropped silently), among them
    rows that share a question topic or an answer with the held-out rows (`held_out`, held_out_keys):
    served feedback on a held-out question would otherwise train on the test set."""
    skipped = Counter() if skipped is None else skipped
    from .tokenizer import with_safety_prompt

    out = []
    lines: list[int] = []
    rows = _read_table(Path(path), lines)
    # how an error names a record: its line in a JSON-lines file, its row elsewhere
    where = [f"line {i}" for i in lines] if lines else [f"row {i}" for i in range(1, len(rows) + 1)]
    for n, rec in enumerate(rows, 1):
        msgs = rec.get("messages") if isinstance(rec, dict) else None
        if isinstance(rec, dict) and rec.get("rating") == "bad" and not rec.get("correction"):
            skipped["bad answers without a correction"] += 1
            continue  # served feedback: a bad answer nobody corrected must not become a training target
        try:
            validate_messages(msgs)
            if msgs[-1]["role"] != "assistant":
                raise ChatFormatError("the last message must be the assistant's answer")
        except ChatFormatError as e:
            raise DataError(f"{path}: {where[n - 1]}: field 'messages': {e}") from None
        if any(tok.control_token_in(m["content"]) for m in msgs):  # as MedQuAD rows holding one (build_examples)
            skipped["contains a chat control token"] += 1
            continue
        if not msgs[-1]["content"].strip():  # its only target would be <|im_end|>: "answer nothing"
            skipped["empty assistant answer"] += 1
            continue
        if any(m["role"] == "user" and not m["content"].strip() for m in msgs):  # an answer to nothing
            skipped["empty user message"] += 1
            continue
        if held_out and overlaps(msgs, held_out):
            skipped["shares a question topic or answer with a held-out row"] += 1
            continue
        ids, labels = tok.encode_for_training(with_safety_prompt(msgs))
        if len(ids) <= max_len:
            out.append(Example(ids, labels, source or Path(path).stem))
        else:
            skipped[f"longer than {max_len} tokens"] += 1
    return out


def say_skipped(what: str, skipped: Counter, rows: int) -> None:
    if skipped:
        print(f"[medlora] {what}: {sum(skipped.values())} of {rows} rows left out ("
              + ", ".join(f"{n} {why}" for why, n in skipped.items()) + ")", file=sys.stderr)


def mix(base: list[Example], extra: list[Example], weight: float, seed: int) -> list[Example]:
    """Add `extra` examples `weight` times over (fractions sampled), e.g. 2.5 = twice + half."""
    rng = random.Random(seed)
    whole, frac = int(weight), weight - int(weight)
    picked = extra * whole + rng.sample(extra, round(frac * len(extra)))
    return base + picked


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------
def bucketed_batches(lengths: list[int], batch_size: int, seed: int, bucket: int = 64) -> list[list[int]]:
    """Shuffle, sort by length inside windows of `bucket` batches, then shuffle the batches:
    rows of similar length share a batch (little padding) while the order stays random."""
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * bucket
    batches = []
    for s in range(0, len(idx), window):
        chunk = sorted(idx[s:s + window], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row of the batch: (input_ids [B, T], labels [B, T])."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return ids, labels


def length_stats(examples: list[Example]) -> dict:
    lens = sorted(len(e.ids) for e in examples)
    if not lens:
        return {}
    pct = lambda p: lens[min(len(lens) - 1, math.floor(p / 100 * len(lens)))]  # noqa: E731
    return {"n": len(lens), "tokens": sum(lens), "supervised": sum(e.n_supervised for e in examples),
            "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": lens[-1]}


@dataclass
class Dataset:
    train: list[Example]
    val: list[Example]
    info: dict = field(default_factory=dict)


def _mix_in(kind: str, path: str | os.PathLike, weight: float, train: list[Example], info: dict, tok: ChatTokenizer,
            max_len: int, seed: int, verbose: bool, held_out: set[str] | None = None) -> list[Example]:
    """Mix one default source (safety or replay) into `train`; record what was used in info[kind]."""
    from .weights import sha256_file

    if not Path(path).is_file():
        raise DataError(f"{kind} data {path}: no such file (make it with `{MAKERS[kind]} --out {path}`, or train "
                        f"without it: --no-{kind}-data)")
    skipped: Counter = Counter()
    ex = load_chat_jsonl(path, tok, max_len, source=kind, skipped=skipped, held_out=held_out)
    before = len(train)
    train = mix(train, ex, weight, seed)
    rows = len(ex) + sum(skipped.values())  # every row is an example or counted as skipped
    info[kind] = {"path": str(path), "sha256": sha256_file(path), "rows": rows, "examples": len(ex),
                  "weight": weight, "used": len(train) - before}
    if verbose:
        say_skipped(f"{kind} data", skipped, rows)
    return train


def sample_rows(rows: list, k: int, seed: int) -> list:
    """k of `rows`, drawn at random (seeded) and kept in their order. MedQuAD's file is sorted by source
    and topic, so its first rows are one kind (cancer and GARD pages): a head would be a biased sample."""
    if k >= len(rows):
        return list(rows)
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), k))]


def prepare(tok: ChatTokenizer, data: str | None = None, question_col: str = "Question", answer_col: str = "Answer",
            max_len: int = 1024, long_rows: str = "drop", val_fraction: float = 0.1, seed: int = 0,
            limit_rows: int | None = None, extra: list[str] | None = None, extra_weight: float = 1.0,
            revision: str | None = None, verbose: bool = True, safety: str | os.PathLike | None = None,
            safety_weight: float = 1.0, replay: str | os.PathLike | None = None, replay_weight: float = 1.0,
            held_out_index: list[int] | None = None) -> Dataset:
    """The whole pipeline; `info` records source, hashes, counts and the split (for the run record).

    `extra` files are mixed in `extra_weight` times over; `safety` (the synthetic safety SFT file)
    and `replay` (the base model's general-chat answers) are separate sources with their own
    weights, so each ratio is set independently. All join the training side only: validation
    stays pure held-out MedQuAD. `held_out_index` (another run's recorded split) replaces the split.
    """
    raw, info = load_source(data, revision, verbose)
    rows, counts = clean_rows(raw, question_col, answer_col, source=str(data or DEFAULT_DATA))
    if held_out_index is not None:
        train_rows, val_rows = recorded_split_rows(rows, held_out_index, counts)
        val_fraction = len(val_rows) / len(rows)
    else:
        train_rows, val_rows = split_rows(rows, val_fraction, seed)
    held_out = held_out_keys(val_rows)  # every held-out row, also those a --limit-rows run leaves unused
    if limit_rows:  # after the split, so a small run's validation rows are still held out
        n_val = max(1, round(limit_rows * val_fraction)) if val_fraction > 0 else 0
        train_rows, val_rows = sample_rows(train_rows, limit_rows - n_val, seed), sample_rows(val_rows, n_val, seed)
    train = build_examples(train_rows, tok, max_len, long_rows, counts)
    val = build_examples(val_rows, tok, max_len, long_rows, Counter())
    for path in extra or []:
        skipped: Counter = Counter()
        ex = load_chat_jsonl(path, tok, max_len, skipped=skipped, held_out=held_out)
        train = mix(train, ex, extra_weight, seed)
        from .weights import sha256_file

        rows = len(ex) + sum(skipped.values())
        if verbose:  # (--long-rows applies to MedQuAD's rows: a chat example is not shortened)
            say_skipped(f"extra data {path}", skipped, rows)
        info.setdefault("extra", []).append({"path": str(path), "sha256": sha256_file(path), "rows": rows,
                                             "examples": len(ex), "weight": extra_weight, "skipped": dict(skipped)})
    for kind, path, weight in (("safety", safety, safety_weight), ("replay", replay, replay_weight)):
        if path is not None:
            train = _mix_in(kind, path, weight, train, info, tok, max_len, seed, verbose, held_out)
    info.update(cleaning=dict(counts), split={"seed": seed, "val_fraction": val_fraction,
                                              "train_rows": len(train_rows), "val_rows": len(val_rows),
                                              "val_index": sorted(r.index for r in val_rows)},
                prep_version=PREP_VERSION,
                train=length_stats(train), val=length_stats(val))
    return Dataset(train, val, info)
