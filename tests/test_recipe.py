"""The recipe around the model (issue 10): safety examples in the default training mix and none of
them a copy of an evaluation probe; the blinded review sheet (write, fill, score, bad values); the
shipped default adapter (hashes, size, base identity, loads, refuses another base, served by default)."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from medlora.data import REPLAY_DATA, SAFETY_DATA, SHIPPED_DATA, prepare
from medlora.review import COLUMNS, ReviewError, read_sheet, score_sheet, wilson, write_sheet
from medlora.shipped import DEFAULT_ADAPTER, base_problem, base_spec, read_manifest, required_base, verify
from medlora.weights import bundled_gguf, sha256_file

ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def env():
    import os

    return {**os.environ, **ENV}


@pytest.fixture(scope="module")
def tok(gguf_path):
    from medlora.gguf_file import read_gguf_file
    from medlora.weights import gguf_tokenizer

    return gguf_tokenizer(read_gguf_file(gguf_path)[0], gguf_path)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from test_distributed import make_tiny_hf_folder

    return make_tiny_hf_folder(tmp_path_factory.mktemp("tiny") / "model")


# ---------------------------------------------------------------------------------------------
# Safety in the default mix
# ---------------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def user_texts(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            out += [m["content"] for m in rec["messages"] if m["role"] == "user"]
    return out


def eval_prompts() -> list[str]:
    files = [ROOT / "data" / "safety_probes.jsonl", *sorted((ROOT / "data").glob("eval_*.jsonl"))]
    assert len(files) >= 3
    return [json.loads(x)["prompt"] for f in files for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]


def test_default_safety_file_never_copies_an_evaluation_prompt():
    import train

    default = Path(train.parse_args([]).safety)
    assert default == SAFETY_DATA and default.exists()
    mine, probes = user_texts(default), eval_prompts()
    assert len(mine) >= 100 and len(probes) >= 100
    probe_norm = {" ".join(words(p)): p for p in probes}
    probe_sets = [(set(words(p)), p) for p in probes]
    for text in mine:
        norm = " ".join(words(text))
        assert norm not in probe_norm, f"safety example copies an evaluation prompt: {text!r}"
        ws = set(words(text))
        for ps, p in probe_sets:
            jac = len(ws & ps) / len(ws | ps)
            assert jac < 0.8, f"near-copy (token Jaccard {jac:.2f}): {text!r} ~ {p!r}"


def test_prepare_mixes_safety_and_extra_with_independent_weights(tok, tmp_path):
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                      {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
                             for i in range(6)))
    ds = prepare(tok, str(SHIPPED_DATA), long_rows="truncate", limit_rows=20, extra=[str(extra)], extra_weight=2.0,
                 safety=SAFETY_DATA, safety_weight=0.5, verbose=False)
    by_source = {}
    for e in ds.train:
        by_source[e.source] = by_source.get(e.source, 0) + 1
    s = ds.info["safety"]
    assert s["sha256"] == sha256_file(SAFETY_DATA) and s["weight"] == 0.5 and s["examples"] >= 300
    assert by_source["safety"] == s["used"] == round(0.5 * s["examples"])
    assert by_source["extra"] == 12 and by_source["medquad"] == 18  # 20 rows, 2 held out
    assert all(e.source == "medquad" for e in ds.val)  # validation stays pure MedQuAD
    none = prepare(tok, str(SHIPPED_DATA), limit_rows=20, verbose=False)
    assert "safety" not in none.info and {e.source for e in none.train} == {"medquad"}


def test_a_template_that_cannot_make_training_chats_is_an_error(tiny_folder, tmp_path):
    """A model whose chat template refuses a system turn (Mistral's does) cannot take the safe system
    prompt: train.py says so and exits 2 (it was a traceback)."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
                            "role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "train.py", "--model", str(folder), "--dry-run", "--limit-rows", "20",
                        "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())
    assert r.returncode == 2 and "its chat template cannot render a training chat (no system role)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_train_cli_default_mix_records_safety_and_the_flag_turns_it_off(tiny_folder, tmp_path):
    from test_distributed import TINY_ARGS

    def cli(out, *extra, steps="1"):
        return subprocess.run([sys.executable, "train.py", "--model", str(tiny_folder), *TINY_ARGS, "--max-steps", steps,
                               "--eval-every", "1000", "--val-rows", "2", "--out", str(out), *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())

    def run(*extra, name=None):
        out = tmp_path / (name or f"run{len(extra)}")
        r = cli(out, *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        return r, json.loads((out / "config.json").read_text())["data"]

    r, on = run()
    s = on["safety"]
    assert Path(s["path"]) == SAFETY_DATA and s["sha256"] == sha256_file(SAFETY_DATA) and s["weight"] == 2.0
    assert s["used"] == 2 * s["examples"] > 600 and s["rows"] == len(user_texts(SAFETY_DATA))
    assert f"safety data: {s['used']} examples" in r.stdout
    g = on["replay"]  # the general replay file is in the default mix too, 3 times over
    assert Path(g["path"]) == REPLAY_DATA and g["sha256"] == sha256_file(REPLAY_DATA) and g["weight"] == 3.0
    assert g["used"] == 3 * g["examples"] > 100 and f"replay data: {g['used']} examples" in r.stdout
    r, no_replay = run("--no-replay-data", name="noreplay")
    assert no_replay["replay"] == {"path": None, "off": "--no-replay-data"} and "replay data: off" in r.stdout
    assert on["train"]["n"] == no_replay["train"]["n"] + g["used"] and no_replay["safety"] == s
    r, off = run("--no-safety-data")
    assert off["safety"] == {"path": None, "off": "--no-safety-data"} and "safety data: off" in r.stdout
    assert on["train"]["n"] == off["train"]["n"] + s["used"]  # MedQuAD rows unchanged, validation unchanged
    assert on["val"] == off["val"]
    # resuming a run with another mix than it was trained on is refused, with the flags that match it
    r = cli(tmp_path / "run1", "--resume", steps="2")
    assert r.returncode == 2 and "trained without safety data; resume it with --no-safety-data" in r.stderr, r.stderr
    r = cli(tmp_path / "run0", "--resume", "--safety-weight", "1", steps="2")
    assert r.returncode == 2 and f"--safety-data {s['path']} --safety-weight 2.0" in r.stderr, r.stderr


def test_sanity_leaves_safety_out_and_contradictions_fail_fast():
    import train

    a = train.parse_args(["--sanity"])
    assert a.safety is None and "--sanity" in a.safety_off
    assert train.parse_args(["--sanity", "--safety-data", str(SAFETY_DATA)]).safety == str(SAFETY_DATA)
    assert train.parse_args(["--extra-data", str(SAFETY_DATA)]).safety is None  # not mixed in twice
    r = subprocess.run([sys.executable, "train.py", "--no-safety-data", "--safety-data", "x.jsonl"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "contradict" in r.stderr
    assert a.replay is None and "--sanity" in a.replay_off
    assert train.parse_args([]).replay == str(REPLAY_DATA) and train.parse_args([]).replay_weight == 3.0
    r = subprocess.run([sys.executable, "train.py", "--replay-data", "missing.jsonl"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--replay-data missing.jsonl: no such file" in r.stderr and "general_data" in r.stderr


def test_replay_data_is_decontaminated_and_every_answer_passes_its_filters():
    """data/general_replay.jsonl: prompts are neither copies nor near copies of any evaluation prompt,
    answers are ones worth rehearsing (ended in the file's own record, no repeated 4-gram, no medical
    talk, the checkable ones correct); the prompt maker really drops an evaluation prompt."""
    from medlora.general_data import keep_answer, make_prompts
    from medlora.safety_data import contamination, eval_prompts

    refs = eval_prompts()
    recs = [json.loads(x) for x in REPLAY_DATA.read_text().splitlines()]
    assert len(recs) >= 60 and len({r["category"] for r in recs}) >= 3
    prompts = {p["prompt"]: p for p in make_prompts(300, 0)[0]}  # same seed, same prompts
    for r in recs:
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert user in prompts, user
        assert contamination(user, refs) is None, user
        p = prompts[user]  # right where there is a right answer, and nothing checkably wrong around it
        assert keep_answer(answer, True, p["accept"], user, p["category"]) is None, answer
        assert r["source"].startswith("self-distilled from ")
    leaked, counts = make_prompts(5, 0, references=["Which city is the capital of Germany?"])
    assert counts["dropped_exact"] == 1 and all("Germany" not in p["prompt"] for p in leaked)
    assert keep_answer("The capital is Bonn.", True, ["berlin"]) == "wrong answer"
    assert keep_answer("The answer is 27 - 20 = 10.", True, ["7"]) == "wrong answer"  # whole words: not "27"
    assert keep_answer("Berlin is the capital.", False, ["berlin"]) == "did not end"
    assert keep_answer("It is big and it is big and it is big.", True, []) == "repeated 4-gram"
    # Answers an audit found kept though wrong: the accepted word was there, the rest was not right.
    upper = "In Python, what does 'hello'.upper() return?"
    assert keep_answer("It returns `'hello'`.", True, prompts[upper]["accept"], upper, "coding") == "wrong answer"
    assert keep_answer("It returns `'HELLO'`.", True, prompts[upper]["accept"], upper, "coding") is None
    assert keep_answer("The capital of Ireland is Dublin, which is also the capital of the United Kingdom.", True,
                       ["dublin"]) == "wrong claim"
    for prompt, answer, accept in (
            ("Calculate 5 times 7.", "Multiply 5 by itself, which is 50. So, 5 times 7 is 35.", ["35"]),
            ("Hiro buys 4 pencils at $9 each. How much do they spend in total?", "4 * 9 = 35, so $36.", ["36"]),
            ("Ben buys 3 pencils at $8 each. How much do they spend in total?", "He spends 24 cents.", ["24"]),
            ("Elif buys 6 tickets at $8 each. How much do they spend in total?", "6 * 8 = 48 tickets.", ["48"]),
            ("Elif is older than Greta, and Greta is older than Kofi. Who is the oldest of the three?",
             "Elif is the oldest of the three. Greta is the youngest.", ["elif"]),
            ("Jonas is older than Dev, and Dev is older than Femi. Who is the oldest of the three?",
             "Jonas is 22 years old, and Dev is 25 years old.", ["jonas"])):
        assert keep_answer(answer, True, accept, prompt, "reasoning") == "wrong reasoning", answer
    assert keep_answer("4 * 9 = 36, so they spend $36.", True, ["36"],
                       "Hiro buys 4 pencils at $9 each. How much do they spend in total?", "reasoning") is None
    brazil = next(p for p in prompts.values() if "Brazil" in p["prompt"] and "capital" in p["prompt"])
    assert keep_answer("The capital of Brazil is Brasília.", True, brazil["accept"]) is None
    r = subprocess.run([sys.executable, "train.py", "--safety-data", "missing.jsonl"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "missing.jsonl: no such file" in r.stderr and "[medlora] model" not in r.stderr


# ---------------------------------------------------------------------------------------------
# Blinded review sheet
# ---------------------------------------------------------------------------------------------
def fake_sheet(folder: Path, n: int = 20, size: int = 12):
    qs = [f"What is condition {i}?" for i in range(n)]
    refs = [f"Reference {i}." for i in range(n)]
    base = [f"Plain answer {i}." for i in range(n)]
    tuned = [f"Fine answer {i}." for i in range(n)]
    res = write_sheet(folder, qs, refs, base, tuned, size=size, seed=3, meta={"base": "B0", "tuned": "T0"})
    return res, dict(zip(qs, base)), dict(zip(qs, tuned))


def fill(sheet: Path, prefs: dict[str, str]) -> None:
    with open(sheet, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["preference"] = prefs.get(row["item"], row["preference"])
    with open(sheet, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def test_review_round_trip(tmp_path):
    res, base, tuned = fake_sheet(tmp_path)
    sheet, key_path = Path(res["sheet"]), Path(res["key"])
    assert res["items"] == 12 and sheet.parent == key_path.parent == tmp_path
    text = sheet.read_text(encoding="utf-8")
    with open(sheet, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == COLUMNS and len(rows) == 12
    key = json.loads(key_path.read_text())["tuned_is"]
    # Blind: nothing in the sheet names the models or the key
    for leak in ("tuned", "base", "B0", "T0"):
        assert leak not in text, leak
    assert all(r["preference"] == "" and r["notes"] == "" for r in rows)
    for r in rows:  # each row holds the two answers to its question, tuned in the column the key says
        q = r["question"]
        assert {r["answer_A"], r["answer_B"]} == {base[q], tuned[q]}
        assert r["answer_" + key[r["item"]]] == tuned[q]
    assert set(key.values()) == {"A", "B"}  # both orders occur

    items = [r["item"] for r in rows]
    other = {"A": "B", "B": "A"}
    prefs = {it: key[it] for it in items[:6]}                      # tuned better
    prefs |= {it: other[key[it]].lower() for it in items[6:9]}     # base better (lower case is fine)
    prefs |= {it: " Tie " for it in items[9:11]}                   # ties; items[11] left empty
    fill(sheet, prefs)
    s = score_sheet(sheet)
    assert (s["tuned_wins"], s["base_wins"], s["ties"], s["unfilled"], s["filled"]) == (6, 3, 2, 1, 11)
    assert s["tuned_win_share_of_decided"] == pytest.approx(6 / 9)
    lo, hi = s["win_share_wilson95"]
    assert lo == pytest.approx(0.354, abs=1e-3) and hi == pytest.approx(0.879, abs=1e-3)
    assert s["net_preference"] == pytest.approx(3 / 11)
    blo, bhi = s["net_preference_bootstrap95"]
    assert -1 <= blo < 3 / 11 < bhi <= 1
    assert 0 < s["sign_test_p"] < 1

    # the command line: prints the counts, writes review_score.json
    r = subprocess.run([sys.executable, "eval.py", "--score-review", str(sheet)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "6 wins, 2 ties, 3 losses" in r.stdout and "1 left empty" in r.stdout and "Wilson 95%" in r.stdout
    assert json.loads((tmp_path / "review_score.json").read_text())["tuned_wins"] == 6

    # a filled sheet is never overwritten by the next eval run
    again = write_sheet(tmp_path, ["q"], ["r"], ["a"], ["b"], size=1)
    assert again["skipped"] and "11 filled" in again["skipped"]
    assert score_sheet(sheet)["tuned_wins"] == 6


def test_review_bad_values_name_the_row_and_value(tmp_path):
    res, _, _ = fake_sheet(tmp_path, n=5, size=5)
    sheet = Path(res["sheet"])
    fill(sheet, {"002": "maybe", "004": "C"})
    with pytest.raises(ReviewError) as e:
        read_sheet(sheet)
    msg = str(e.value)
    assert "2 bad value(s)" in msg and "line 3, item 002: preference 'maybe'" in msg
    assert "line 5, item 004: preference 'C'" in msg and "A, B, tie" in msg
    r = subprocess.run([sys.executable, "eval.py", "--score-review", str(sheet)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "'maybe'" in r.stderr and "item 004" in r.stderr

    fill(sheet, {"002": "a", "004": "b"})
    rows = sheet.read_text(encoding="utf-8").replace("\n001,", "\n999,", 1)
    sheet.write_text(rows, encoding="utf-8")
    with pytest.raises(ReviewError, match=r"item '999' is not in the key.*\n.*\['001'\].*missing from the sheet"):
        score_sheet(sheet)
    with pytest.raises(ReviewError, match="no such key file"):
        score_sheet(sheet, tmp_path / "nokey.json")


def test_wilson_edges():
    assert wilson(0, 0) == (None, None)
    lo, hi = wilson(10, 10)
    assert hi == pytest.approx(1.0) and 0.69 < lo < 0.73


# ---------------------------------------------------------------------------------------------
# The shipped default adapter
# ---------------------------------------------------------------------------------------------
def test_shipped_adapter_files_match_their_hashes_and_are_small():
    assert DEFAULT_ADAPTER == ROOT / "adapters" / "medlora-r8"
    for name in ("adapter_config.json", "adapter_model.safetensors", "run_record.json", "README.md",
                 "eval/report.json", "eval/report.md", "SHA256SUMS"):
        assert (DEFAULT_ADAPTER / name).is_file(), name
    assert verify(DEFAULT_ADAPTER) == []
    listed = read_manifest(DEFAULT_ADAPTER)
    rec = json.loads((DEFAULT_ADAPTER / "run_record.json").read_text())
    for name, a in rec["artifacts"].items():  # the run record's own hashes agree too
        assert listed[name] == a["sha256"] == sha256_file(DEFAULT_ADAPTER / name), name
    total = sum(p.stat().st_size for p in DEFAULT_ADAPTER.rglob("*") if p.is_file())
    assert (DEFAULT_ADAPTER / "adapter_model.safetensors").stat().st_size < 15e6 and total < 15e6
    # the record says how it was made: the exact training command, data and commit fields
    assert rec["training"]["command"].startswith("train.py") and rec["training"]["data"]["sha256"]
    assert "git" in rec["training"] and rec["eval_report"]["safety"]
    card = (DEFAULT_ADAPTER / "README.md").read_text()
    assert "Not a doctor" in card and rec["base"]["sha256"] in card
    assert "- Phone numbers: in 2 of 126 answers" in card  # its report's made-up numbers, among the limitations


def test_shipped_adapter_was_made_on_the_bundled_base_and_loads(gguf_path):
    from medlora.lora import load_adapter, read_adapter
    from medlora.weights import load_pretrained

    want = required_base()["sha256"]
    _, raw, _ = read_adapter(DEFAULT_ADAPTER)
    rec = json.loads((DEFAULT_ADAPTER / "run_record.json").read_text())
    assert want == raw["medlora"]["base_sha256"] == rec["base"]["sha256"] == sha256_file(bundled_gguf())
    assert base_spec() == gguf_path or sha256_file(base_spec()) == want
    model, tok, info = load_pretrained(base_spec(), verbose=False)
    assert base_problem(DEFAULT_ADAPTER, info) is None
    ids = torch.tensor([tok.encode("Anemia is a condition in which")])
    with torch.no_grad():
        before = model(ids)
        cfg = load_adapter(model, DEFAULT_ADAPTER, merge=True)
        after = model(ids)
    assert cfg.rank == 8 and torch.isfinite(after).all() and not torch.allclose(before, after)


def test_shipped_adapter_refuses_another_base(tiny_folder):
    msg = base_problem(DEFAULT_ADAPTER, {"id": "other.gguf", "sha256": "0" * 64})
    assert msg and "SmolLM2-135M-Instruct.Q4_1.gguf" in msg and required_base()["sha256"] in msg
    assert "--base-only" in msg and "other.gguf" in msg
    assert base_problem(DEFAULT_ADAPTER, {"id": "f", "sha256": {"model.safetensors": "ab" * 32}})  # a folder: refused
    # the real command: the default adapter on a different (tiny random) base is refused before serving
    r = subprocess.run([sys.executable, "serve.py", "--model", str(tiny_folder), "--prompt", "hi"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=env())
    assert r.returncode == 2 and "error: the default adapter" in r.stderr and "--base-only" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "serve.py", "--model", str(tiny_folder), "--base-only", "--prompt", "hi",
                        "--max-new-tokens", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())
    assert r.returncode == 0 and "no adapter" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "serve.py", "--base-only", "--adapter", str(DEFAULT_ADAPTER), "--prompt", "x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "contradict" in r.stderr


def test_http_server_serves_the_default_adapter(gguf_path, tmp_path):
    """`serve.py --http` with no adapter flag answers with base + shipped adapter under serve's default
    decoding (greedy, no repeated 4-gram), token for token."""
    import httpx

    from medlora.generate import GenConfig, generate
    from medlora.lora import load_adapter
    from medlora.tokenizer import with_safety_prompt
    from medlora.weights import load_pretrained
    from test_server import running_server

    with running_server(gguf_path, tmp_path, "--max-new-tokens", "12", base_only=False) as s:
        models = httpx.get(f"{s.url}/v1/models", timeout=30).json()["data"]
        assert models[0]["adapter"] == DEFAULT_ADAPTER.name  # the folder's name, not the server's file system
        r = httpx.post(f"{s.url}/v1/chat/completions", timeout=300,
                       json={"model": "medlora", "max_tokens": 12,
                             "messages": [{"role": "user", "content": "What is anemia?"}]}).json()
        got = r["choices"][0]["message"]["content"]
    model, tok, _ = load_pretrained(gguf_path, verbose=False)
    load_adapter(model, DEFAULT_ADAPTER, merge=True)
    prompt = tok.encode_chat(with_safety_prompt([{"role": "user", "content": "What is anemia?"}]),
                             add_generation_prompt=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = generate(model, tok, [prompt], GenConfig(max_new_tokens=12, no_repeat_ngram=4))[0].text  # serve's default
    finally:
        torch.set_num_threads(threads)
    assert got == want


def test_recipe_table_is_generated_from_the_run_folders(tmp_path):
    """docs/recipe/table.md is exactly what `python -m medlora.compare` makes of the committed runs
    (nothing typed by hand), and its cells come from the runs' own JSON."""
    from medlora.compare import run_row, table

    rows_json = json.loads((ROOT / "docs" / "recipe" / "table.json").read_text())
    runs = [ROOT / "docs" / "runs" / r["run"] for r in rows_json]
    assert all(r.is_dir() for r in runs) and len(runs) >= 5
    rows = [run_row(r) for r in runs]
    assert table(rows) == (ROOT / "docs" / "recipe" / "table.md").read_text()
    for run, row in zip(runs, rows):
        rep = json.loads((run / "eval" / "report.json").read_text()) if (run / "eval" / "report.json").exists() else {}
        if "heldout" in rep:
            assert row["rougeL"] == rep["heldout"]["tuned"]["rougeL"]
            assert row["ppl_ratio"] == pytest.approx(rep["heldout"]["tuned"]["ppl"] / rep["heldout"]["base"]["ppl"])
        if "safety" in rep:
            assert row["refuse"] == rep["safety"]["tuned"]["overall"]["refuse_redirect_rate"]
    with pytest.raises(SystemExit, match="not a finished run folder"):
        run_row(tmp_path)


def test_compare_plots_validation_curves_and_eval_numbers(tmp_path):
    from medlora.compare import main, val_curve

    run = ROOT / "docs" / "runs" / "gpu-trim"
    xs, ys = val_curve(run)
    assert len(xs) == len(ys) >= 2 and xs == sorted(xs) and ys[-1] < ys[0]  # tokens grow, loss fell
    png = tmp_path / "sweep.png"
    assert main([str(run), str(ROOT / "docs" / "runs" / "cpu-stage2"), "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
