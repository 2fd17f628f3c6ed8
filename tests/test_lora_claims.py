"""The claims of docs/lora.md that no other test proves, each checked here on small tensors.

Each test is cited by name in docs/lora.md; the rest of that page cites tests/test_lora.py,
tests/test_inspect.py and tests/test_export.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers import randomize_lora, tiny_model

from medlora.config import ConfigError, LoRAConfig, ModelConfig
from medlora.lora import LoRALinear, inject_lora, lora_modules, merge_lora, parameter_report, unmerge_lora
from medlora.model import Llama

IDX = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(7))


def lora_linear(d_in=16, d_out=12, rank=4, alpha=8.0, rslora=False, seed=0, b_std=0.1) -> LoRALinear:
    torch.manual_seed(seed)
    lin = LoRALinear(torch.nn.Linear(d_in, d_out, bias=False), rank=rank, alpha=alpha, use_rslora=rslora)
    with torch.no_grad():
        lin.lora_B.weight.normal_(0, b_std)
    return lin


def test_forward_is_w_x_plus_scaled_b_a_x():
    """y = W x + (alpha / r) · B (A x), written out by hand."""
    lin = lora_linear()
    x = torch.randn(5, 16)
    W, A, B = lin.weight, lin.lora_A.weight, lin.lora_B.weight
    want = x @ W.T + (8.0 / 4) * (x @ A.T) @ B.T
    torch.testing.assert_close(lin(x), want, rtol=1e-6, atol=1e-6)


def test_gradients_are_the_closed_form():
    """For a batch of rows X [n, in] and G = dL/dY [n, out]: dL/dB = s · Gᵀ (X Aᵀ) and
    dL/dA = s · (G B)ᵀ X (docs/lora.md writes the same for one column x); nothing reaches W."""
    lin = lora_linear()
    x = torch.randn(5, 16)
    g = torch.randn(5, 12)
    (lin(x) * g).sum().backward()
    s, A, B = lin.scaling, lin.lora_A.weight.detach(), lin.lora_B.weight.detach()
    torch.testing.assert_close(lin.lora_B.weight.grad, s * g.T @ (x @ A.T), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lin.lora_A.weight.grad, s * (g @ B).T @ x, rtol=1e-5, atol=1e-6)
    assert lin.weight.grad is None and not lin.weight.requires_grad


def test_first_step_only_b_moves_and_zero_a_would_never_learn():
    """B = 0 at the start: A's gradient is exactly zero, B's is not (A is random), so B moves
    first and the update grows from zero. Had A started at zero too, both gradients would be zero
    forever."""
    lin = LoRALinear(torch.nn.Linear(16, 12, bias=False), rank=4, alpha=8.0)
    x, g = torch.randn(5, 16), torch.randn(5, 12)
    (lin(x) * g).sum().backward()
    assert torch.count_nonzero(lin.lora_A.weight.grad) == 0
    assert lin.lora_B.weight.grad.abs().sum() > 0

    dead = LoRALinear(torch.nn.Linear(16, 12, bias=False), rank=4, alpha=8.0)
    with torch.no_grad():
        dead.lora_A.weight.zero_()
    (dead(x) * g).sum().backward()
    assert torch.count_nonzero(dead.lora_A.weight.grad) == 0 and torch.count_nonzero(dead.lora_B.weight.grad) == 0


def test_default_alpha_is_twice_the_rank():
    """train.py's default alpha = 2 x rank, so the scaling alpha/r is 2 at every rank."""
    import train

    for rank in (4, 8, 64):
        args = train.parse_args(["--rank", str(rank)])
        assert args.alpha == 2 * rank and LoRAConfig(rank=rank, alpha=args.alpha).scaling == 2.0
    assert LoRAConfig(rank=8, alpha=16, use_rslora=True).scaling == pytest.approx(16 / math.sqrt(8))


def test_rslora_keeps_the_update_size_as_rank_grows():
    """With the same B·A entries' scale, the update alpha/r · B A shrinks like 1/sqrt(r) as r grows
    (a sum of r terms grows like sqrt(r), divided by r); alpha/sqrt(r) keeps it flat."""
    def update_rms(rank: int, rslora: bool) -> float:
        g = torch.Generator().manual_seed(rank)
        A, B = torch.randn(rank, 256, generator=g), torch.randn(256, rank, generator=g)
        s = LoRAConfig(rank=rank, alpha=16, use_rslora=rslora).scaling
        return (s * B @ A).pow(2).mean().sqrt().item()

    plain = [update_rms(r, False) for r in (4, 64)]
    rs = [update_rms(r, True) for r in (4, 64)]
    assert plain[1] / plain[0] == pytest.approx(1 / 4, rel=0.15)  # sqrt(4/64)
    assert rs[1] / rs[0] == pytest.approx(1.0, rel=0.15)


SMOLLM_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
                   tie_word_embeddings=True)


def test_smollm_135m_rank8_count_by_hand():
    """The numbers worked out in docs/lora.md, on SmolLM-135M's shapes (meta tensors: no memory)."""
    with torch.device("meta"):
        model = Llama(ModelConfig(**SMOLLM_135M))
    base = sum(p.numel() for p in model.parameters())
    d, f, kv, L, V, r = 576, 1536, 3 * 64, 30, 49152, 8
    per_layer = d * d + d * kv + d * kv + d * d + 3 * d * f + 2 * d  # q k v o, gate up down, 2 norms
    assert base == V * d + L * per_layer + d == 134_515_008  # embedding (tied head: once), layers, final norm
    inject_lora(model, LoRAConfig(rank=r))
    rep = parameter_report(model)
    assert rep["per_target"] == {"q_proj": L * r * (d + d), "k_proj": L * r * (d + kv), "v_proj": L * r * (d + kv),
                                 "o_proj": L * r * (d + d), "gate_proj": L * r * (d + f), "up_proj": L * r * (d + f),
                                 "down_proj": L * r * (f + d)}
    assert rep["trainable"] == 2_442_240 and rep["total"] == 136_957_248
    assert round(100 * rep["trainable"] / base, 2) == 1.82  # of the frozen base (1.78% of base + LoRA)


def test_bf16_merge_loses_small_updates():
    """Merging into bf16 weights rounds W + ΔW to 8 bits of mantissa: an update smaller than half
    a bf16 step of W vanishes, while the unmerged model (or an fp32 merge) keeps it."""
    lin = LoRALinear(torch.nn.Linear(4, 4, bias=False), rank=1, alpha=1.0)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.lora_A.weight.fill_(1.0)
        lin.lora_B.weight.fill_(1e-3)  # ΔW = 1e-3 everywhere; bf16 spacing at 1.0 is 2**-7 = 0.0078
    x = torch.ones(1, 4)
    fp32_out = lin(x)
    bf = LoRALinear(torch.nn.Linear(4, 4, bias=False), rank=1, alpha=1.0)
    with torch.no_grad():
        bf.weight.data = torch.ones(4, 4, dtype=torch.bfloat16)
        bf.lora_A.weight.fill_(1.0)
        bf.lora_B.weight.fill_(1e-3)
        bf.merge()
    assert torch.equal(bf.weight, torch.ones(4, 4, dtype=torch.bfloat16))  # the update is gone
    lin.merge()
    torch.testing.assert_close(lin(x), fp32_out)  # fp32: exact to rounding
    assert torch.allclose(fp32_out, torch.full((1, 4), 4 * 1.001))


def test_merge_twice_is_a_no_op_and_unmerge_restores():
    m = tiny_model()
    inject_lora(m, LoRAConfig(rank=4, alpha=8))
    randomize_lora(m)
    w0 = {n: lm.weight.detach().clone() for n, lm in lora_modules(m).items()}
    with torch.no_grad():
        ref = m(IDX)
        merge_lora(m)
        once = {n: lm.weight.detach().clone() for n, lm in lora_modules(m).items()}
        merge_lora(m)  # a second merge must not add B·A again
        assert all(torch.equal(lm.weight, once[n]) for n, lm in lora_modules(m).items())
        assert (m(IDX) - ref).abs().max() <= 1e-5
        unmerge_lora(m)
        assert all((lm.weight - w0[n]).abs().max() <= 1e-6 for n, lm in lora_modules(m).items())


def test_tied_head_is_never_a_target_and_stays_tied_through_merge():
    """LoRA goes on the 7 projections only. The embedding and the LM head are one tensor in
    SmolLM (tied); an adapter on either would change both, and a merged export would have to
    untie them. So they cannot be targets, and merging leaves the shared tensor untouched."""
    for bad in ("lm_head", "embed_tokens"):
        with pytest.raises(ConfigError, match="unknown module"):
            LoRAConfig(targets=bad)
    m = tiny_model()
    emb = m.model.embed_tokens.weight.detach().clone()
    inject_lora(m, LoRAConfig(rank=4))
    randomize_lora(m)
    merge_lora(m)
    assert m.lm_head.weight is m.model.embed_tokens.weight and torch.equal(m.model.embed_tokens.weight, emb)


def test_base_is_frozen_and_optimizer_state_is_lora_only():
    """Only A and B have requires_grad; AdamW therefore keeps its two moments for them alone."""
    from medlora.lora import lora_parameters

    m = tiny_model().train()
    inject_lora(m, LoRAConfig(rank=4))
    randomize_lora(m)
    opt = torch.optim.AdamW(lora_parameters(m), lr=1e-3)
    m(IDX).float().logsumexp(-1).mean().backward()
    opt.step()
    n_state = sum(t.numel() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert n_state == 2 * parameter_report(m)["trainable"]
    assert all(p.grad is None for n, p in m.named_parameters() if "lora_" not in n)
