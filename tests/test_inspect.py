"""The inspect commands, checked against independent counts (transformers, pyarrow)."""
from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
from conftest import ROOT

from medlora.inspect import data_card, main, model_card, read_rows
from medlora.weights import load_pretrained


def test_model_card_matches_transformers(hf_model, gguf_path):
    model, tok, info = load_pretrained(gguf_path, verbose=False)
    card = model_card(model, tok, info)
    assert card["parameters"] == hf_model.num_parameters()
    c = hf_model.config
    assert (card["layers"], card["hidden"], card["heads"], card["kv_heads"], card["vocab"]) == \
        (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size)
    assert card["tied_head"] and card["license"] == "apache-2.0" and card["default_system_prompt_injected"]
    assert "<|im_start|>assistant\nA low red blood cell count.<|im_end|>" in card["rendered_example"]


def test_data_card_counts_match_pyarrow(ours, medquad_path, tmp_path):
    _, tok = ours
    card = data_card(tok, read_rows(str(medquad_path)), 1024, 0.1, 0, str(tmp_path / "h.png"))
    table = pq.read_table(medquad_path)
    assert card["rows"] == table.num_rows and card["columns"] == sorted(table.column_names)
    q, a = table.column("Question").to_pylist(), table.column("Answer").to_pylist()
    assert card["cleaning"]["kept"] + card["cleaning"]["exact duplicate"] == table.num_rows
    assert card["cleaning"]["exact duplicate"] == table.num_rows - len(set(zip(q, a)))
    assert card["split"]["train_rows"] + card["split"]["val_rows"] == card["cleaning"]["kept"]
    assert 0.8 < card["share_fitting"]["<= 512"] < 0.95 and (tmp_path / "h.png").stat().st_size > 1000


def test_inspect_example_cli():
    r = subprocess.run([sys.executable, "-m", "medlora.inspect", "example", "3", "--color", "never"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    view = r.stdout.split("\n\n")[0]
    assert view.count("[[") == 1 and view.rstrip().endswith("<|im_end|>]]")
    assert "supervised" in r.stdout


def inspect_error(argv: list[str], capsys) -> str:
    """Run inspect in-process; it must fail with exit status 2 and one error line, no traceback."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's p.error
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, (argv, err)
    return err.strip().splitlines()[-1]


def test_inspect_bad_input_is_an_error_line_not_a_traceback(capsys, tmp_path):
    """Bad files and impossible or unused flags are one `error:` line and status 2, all found before
    the model loads (a bad --data even when the model is bad too)."""
    qa = tmp_path / "qa.csv"
    qa.write_text("q,a\nWhat is anemia?,A low red blood cell count.\n")
    cases = {
        ("model", "--model", "/nonexistent/x.gguf"): "error: --model '/nonexistent/x.gguf': no such file",
        ("model", "--model", str(ROOT / "adapters" / "medlora-r8")): "it is a LoRA adapter folder",
        ("model", "--model", "bundled", "--revision", "main"): "only a hub id has revisions",
        ("data", "--data", "/nonexistent.csv", "--model", "/nonexistent/x.gguf"): "error: --data /nonexistent.csv:",
        ("data", "--data", str(ROOT / "README.md")): "unsupported file type '.md'",
        ("data", "--data", str(qa)): "no column 'Question' (columns: ['a', 'q']); set --question-col",
        ("data", "--plot", "/nonexistent/dir/x.png"): "--plot /nonexistent/dir/x.png: no folder /nonexistent/dir",
        ("data", "--plot", str(tmp_path / "x.xyz")): "matplotlib cannot write that format; end the name in one of",
        ("data", "--val-fraction", "3"): "--val-fraction: must be in [0, 1), got 3",
        ("model", "7", "--plot", "x.png", "--data", "ok.csv"): "--data, N, --plot: not used by `model`",
        ("example", "2", "--json"): "--json: not used by `example`",
        ("example",): "example needs N",
        ("example", "5", "--data", str(qa), "--question-col", "q", "--answer-col", "a"): "example 5 out of range",
    }
    for argv, message in cases.items():
        assert message in inspect_error(list(argv), capsys), argv


def test_inspect_reads_other_column_names(ours, monkeypatch, capsys, tmp_path):
    """--question-col / --answer-col, as train.py: the error for other column names tells the user to set them."""
    import json

    model, tok = ours
    monkeypatch.setattr("medlora.weights.load_pretrained", lambda *a, **k: (model, tok, {}))
    qa = tmp_path / "qa.csv"
    qa.write_text("q,a\nWhat is anemia?,A low red blood cell count.\nWhat is flu?,A viral infection.\n")
    cols = ["--data", str(qa), "--question-col", "q", "--answer-col", "a"]
    assert main(["data", *cols, "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["columns"] == ["a", "q"] and card["cleaning"] == {"kept": 2}
    assert main(["example", "1", *cols, "--color", "never"]) == 0
    assert "[[A viral infection.<|im_end|>]]" in capsys.readouterr().out


def test_trainable_count_matches_peft():
    from helpers import tiny_model
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from medlora.config import ALL_TARGETS, LoRAConfig
    from medlora.lora import inject_lora, parameter_report

    for targets in (list(ALL_TARGETS), ["q_proj", "v_proj"]):
        ours = tiny_model(tie_word_embeddings=False)
        inject_lora(ours, LoRAConfig(rank=8, targets=targets))
        mine = parameter_report(ours)
        hf = LlamaForCausalLM(LlamaConfig(**ours.config.to_hf()))
        trainable, total = get_peft_model(hf, LoraConfig(r=8, target_modules=targets)).get_nb_trainable_parameters()
        assert (mine["trainable"], mine["total"]) == (trainable, total)


def test_dry_run_cli(gguf_path):
    import math
    import re

    r = subprocess.run([sys.executable, "train.py", "--rank", "8", "--dry-run", "--limit-rows", "100",
                        "--batch-size", "4", "--grad-accum", "3", "--model", gguf_path, "--out", "/nonexistent/never"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "nothing is trained" in out and "2,442,240 of 136,957,248" in out
    n_train = int(re.search(r"data\s+([\d,]+) train", out).group(1).replace(",", ""))
    micro = int(re.search(r"\(([\d,]+) micro-batches", out).group(1).replace(",", ""))
    steps = int(re.search(r"steps\s+([\d,]+) optimizer steps", out).group(1).replace(",", ""))
    assert micro == math.ceil(n_train / 4)  # fewer rows than one bucket window: plain ceil
    assert steps == math.ceil(micro / 3)
    assert "memory      ~" in out
