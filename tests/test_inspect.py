"""The inspect commands, checked against independent counts (transformers, pyarrow)."""
from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
from conftest import ROOT

from medlora.inspect import data_card, model_card
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
    card = data_card(tok, str(medquad_path), 1024, 0.1, 0, str(tmp_path / "h.png"))
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
