"""Our Llama against transformers' LlamaForCausalLM: tiny random configs and the real weights."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medlora.config import ConfigError, ModelConfig
from medlora.model import Llama
from medlora.weights import load_into

from helpers import DEVICES  # noqa: E402  (tests/ is on sys.path)

PROMPTS = [
    "What are the symptoms of type 2 diabetes?",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:",
    "Potassium 5.9 mmol/L — is that high? 🤔",
]


def tiny_pair(tied: bool, kv_heads: int, seed: int = 0):
    hf_cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF inits norms to 1: randomise them so the test sees them
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    ours = Llama(ModelConfig.from_hf(hf_cfg.to_dict()))
    load_into(ours, hf.state_dict(), "tiny")
    return ours.eval(), hf


@pytest.mark.parametrize("tied,kv_heads", [(True, 2), (False, 4), (True, 1)])
def test_tiny_logits_match_transformers(tied, kv_heads):
    ours, hf = tiny_pair(tied, kv_heads)
    idx = torch.randint(0, 101, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(idx), hf(idx).logits
    assert (a - b).abs().max().item() < 1e-4
    if tied:
        assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()


def test_tiny_cached_decoding_matches_full_forward():
    from medlora.model import KVCache

    ours, _ = tiny_pair(True, 2)
    idx = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(idx)
        cache = KVCache(ours.config, 2, 16, "cpu", torch.float32)
        parts = [ours(idx[:, :5], cache=cache)]  # prefill 5, then a chunk of 3, then one at a time
        parts.append(ours(idx[:, 5:8], cache=cache))
        parts += [ours(idx[:, t:t + 1], cache=cache) for t in range(8, 12)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


def test_fixed_shape_cache_steps_match_full_forward():
    """KVCache.fix_shapes (compiled decoding): after a prefill, one-token steps that write at a tensor
    index and attend over every slot under the mask give the full forward's logits, left padding
    included (a padded slot stays hidden), at unchanged tensor shapes."""
    from medlora.model import KVCache

    ours, _ = tiny_pair(True, 2)
    idx = torch.randint(1, 101, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(idx)
        padded = torch.cat((torch.zeros(1, 2, dtype=torch.long), idx[1:, :8]), 1)  # row 1 run left-padded by 2
        alone = ours(idx[1:, :8])
        for batch, valid, want in ((idx, None, full), (padded, torch.arange(10) >= 2, alone)):
            P = 6
            pos = (torch.arange(P) - (2 if valid is not None else 0)).clamp(min=0)[None]
            mask = None if valid is None else (torch.ones(P, P, dtype=torch.bool).tril() & valid[:P])[None, None] | torch.eye(P, dtype=torch.bool)
            cache = KVCache(ours.config, len(batch), 12, "cpu", torch.float32)
            ours(batch[:, :P], pos=pos.expand(len(batch), P), mask=mask, cache=cache)
            cache.fix_shapes(None if valid is None else valid[None, :P])
            steps, shapes = [], set()
            for t in range(P, batch.shape[1]):
                step_mask = cache.next_slot()
                p = torch.full((len(batch), 1), t - (2 if valid is not None else 0))
                steps.append(ours(batch[:, t:t + 1], pos=p, mask=step_mask, cache=cache))
                shapes.add((tuple(step_mask.shape), tuple(cache.k[0].shape)))
            got = torch.cat(steps, 1)
            ref = want[:, P:] if valid is None else want[:, P - 2:]
            assert (got - ref).abs().max().item() < 1e-5
            assert len(shapes) == 1 and cache.length == batch.shape[1]


@pytest.mark.parametrize("device", DEVICES)
def test_real_weights_logits_match_transformers(ours, hf_model, device):
    model, tok = ours
    if device != "cpu":
        model, hf_model = copy.deepcopy(model).to(device), copy.deepcopy(hf_model).to(device)
    worst = 0.0
    for text in PROMPTS:
        idx = torch.tensor([tok.encode(text)], device=device)
        with torch.no_grad():
            worst = max(worst, (model(idx) - hf_model(idx).logits).abs().max().item())
    assert worst <= 1e-3, worst


def test_gguf_import_equals_transformers_gguf_loader(ours, hf_model):
    model, _ = ours
    theirs = hf_model.state_dict()
    mine = model.state_dict()
    assert set(mine) == set(theirs)
    for k, v in mine.items():
        assert torch.equal(v, theirs[k]), k


def test_unknown_architecture_is_refused():
    with pytest.raises(ConfigError, match="unsupported architecture"):
        ModelConfig.from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ConfigError, match="missing required field"):
        ModelConfig.from_hf({"model_type": "llama", "num_attention_heads": 4})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", ["causal", None])
def test_attend_without_a_mask_tensor_matches_the_math_kernel(device, mask):
    """attend() with a causal or no mask: grouped-query attention as the math kernel computes it with the
    KV heads copied, forward and backward. On CUDA in bf16 it must run flash attention (CUDA_SDPA_ORDER),
    not cuDNN's kernel, whose per-shape plans cost milliseconds of host time a call (the H200 profile)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from medlora.model import attend

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 70, 64, generator=g).to(device, dtype).requires_grad_() for h in (9, 3, 3))
    y = attend(q, k, v, mask)
    (y.float() * y.float()).sum().backward()
    got = [y.detach().float(), *(t.grad.float() for t in (q, k, v))]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        y2 = torch.nn.functional.scaled_dot_product_attention(
            q2, k2.repeat_interleave(3, 1), v2.repeat_interleave(3, 1), is_causal=mask == "causal")
    (y2.float() * y2.float()).sum().backward()
    want = [y2.detach().float(), *(t.grad.float() for t in (q2, k2, v2))]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for a, b in zip(got, want):
        assert ((a - b).norm() / b.norm()).item() <= tol
    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            attend(q, k, v, mask).sum().backward()
            torch.cuda.synchronize()
        names = " ".join(e.key.lower() for e in prof.key_averages())
        assert "flash" in names and "cudnn" not in names, names[:2000]
