"""Tiny models shared by tests (random weights, real shapes of a Llama)."""
from __future__ import annotations

import pytest
import torch

from medlora.config import ModelConfig
from medlora.model import Llama, init_weights

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)


# Tests parametrized over DEVICES also run on a GPU when one is present (CI has none: skipped there);
# `pytest -k cuda` on a GPU machine runs just those (bench/gpu_bench.sh).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def tiny_model(seed: int = 0, **over) -> Llama:
    return init_weights(Llama(ModelConfig(**{**TINY, **over})), seed=seed).eval()


def randomize_lora(model, seed: int = 0, std: float = 0.05) -> None:
    """Give B non-zero values so LoRA actually changes the output."""
    from medlora.lora import lora_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


@pytest.fixture(autouse=True)
def one_thread():
    """Import into a test module to run its tests on one thread: the tiny model runs fastest so
    (as do the torchrun workers), and several threads crawl on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
