"""LoRA math, gradient flow, merging, and parity with PEFT (same weights, same forward and gradients)."""
from __future__ import annotations

import json
import re
from pathlib import Path
import math

import pytest
import torch
from helpers import DEVICES, randomize_lora, tiny_model

from medlora.config import ConfigError, LoRAConfig
from medlora.lora import (AdapterError, LoRALinear, inject_lora, load_adapter, read_adapter, lora_modules, lora_parameters,
                          merge_lora, parameter_report, save_adapter, unmerge_lora)
from medlora.lora import dropout_mask

IDX = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(5))


def test_fresh_adapter_is_identity():
    base = tiny_model()
    with torch.no_grad():
        ref = base(IDX)
    inject_lora(base, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        assert torch.equal(base(IDX), ref)  # B = 0 exactly


def test_merge_equals_unmerged_and_unmerge_restores():
    m = tiny_model()
    w0 = m.model.layers[0].self_attn.q_proj.weight.detach().clone()
    inject_lora(m, LoRAConfig(rank=4, alpha=8))
    randomize_lora(m)
    with torch.no_grad():
        unmerged = m(IDX)
        merge_lora(m)
        merged = m(IDX)
        assert (merged - unmerged).abs().max() <= 1e-5
        assert not torch.equal(m.model.layers[0].self_attn.q_proj.weight, w0)
        unmerge_lora(m)
        assert (m.model.layers[0].self_attn.q_proj.weight - w0).abs().max() <= 1e-6
        assert (m(IDX) - unmerged).abs().max() <= 1e-5


def test_merge_refuses_nan():
    m = tiny_model()
    inject_lora(m, LoRAConfig(rank=2, alpha=4, targets="q_proj"))
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.lora_B.weight.fill_(float("nan"))
    with pytest.raises(AdapterError, match="NaN"):
        merge_lora(m)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_only_lora_params_train_and_all_get_gradients(checkpointing):
    m = tiny_model().train()
    m.gradient_checkpointing = checkpointing
    inject_lora(m, LoRAConfig(rank=4, alpha=8))
    randomize_lora(m)
    m(IDX).float().logsumexp(-1).mean().backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
    for p in lora_parameters(m):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert m.model.embed_tokens.weight.grad is None and m.lm_head.weight is m.model.embed_tokens.weight


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_written_out_backward_matches_autograd_on_the_formula(dropout, autocast, device):
    """Training runs LoRALinear through _LoRAMatmul (its backward written out for speed); it must
    give what autograd gives on y = x W^T + scaling * dropout(x) A^T B^T, input gradient included."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=False)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=dropout).train().to(device)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)
    dy = torch.randn(3, 5, 40, device=device)

    def run(fn):
        x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
        torch.manual_seed(1)  # the same dropout mask for both
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            y = fn(x)
        y.float().backward(dy)
        return [y.float(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]

    def formula(x):
        x_a = x * dropout_mask(x, dropout) if dropout else x  # the mask LoRALinear draws
        h = x_a @ layer.lora_A.weight.t()
        return x @ layer.weight.t() + h @ (layer.lora_B.weight * layer.scaling).t()

    ours, ref = run(layer), run(formula)
    tol = 2e-2 if autocast else 1e-5  # bf16 rounds each product; fp32 differs only in summation order
    for a, b in zip(ours, ref):
        assert ((a - b).norm() / b.norm()).item() <= tol
    if dropout == 0:
        with torch.no_grad():  # inference takes the formula itself
            assert torch.allclose(layer(x), formula(x), atol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_cpu_dropout_drops_each_element_with_probability_p(p):
    """lora.dropout_mask draws 16-bit lanes from 64-bit random integers: every lane (and so every element)
    must be dropped with probability p (rounded to 2^-16), independently, and the kept ones scaled so
    the mean is unchanged. A lane whose bits were not uniform (e.g. a sign bit never set) fails here."""
    torch.manual_seed(0)
    x = torch.ones(512, 1024)
    y = x * dropout_mask(x, p)
    kept = y != 0
    p_eff = round(p * 65536) / 65536
    n = x.numel() // 4  # elements per lane
    sd = (p_eff * (1 - p_eff) / n) ** 0.5
    for lane in range(4):
        dropped = 1 - kept.flatten()[lane::4].float().mean().item()
        assert abs(dropped - p_eff) < 5 * sd, (lane, dropped)
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p_eff)))
    assert abs(y.mean().item() - 1) < 5 * sd / (1 - p_eff)
    both = (~kept[:, :-1] & ~kept[:, 1:]).float().mean().item()  # neighbours (lanes of one draw) independent
    assert abs(both - p_eff ** 2) < 5 * (p_eff ** 2 / x.numel()) ** 0.5 + 1e-3
    assert not torch.equal(kept, dropout_mask(x, p) != 0)  # a new mask each call
    assert dropout_mask(x.bfloat16(), p).dtype == torch.bfloat16
    odd = dropout_mask(torch.ones(3, 5, 7), p)  # a size that is no multiple of the 4 lanes per draw
    assert odd.shape == (3, 5, 7) and torch.allclose(odd[odd != 0], torch.tensor(1 / (1 - p_eff)))


def test_dropout_mask_keeps_extreme_p_meaningful():
    """p is rounded to 2^-16 steps but never to 0 (silently no dropout) or 1 (a division by zero)."""
    torch.manual_seed(0)
    x = torch.ones(1024, 1024)
    assert (dropout_mask(x, 0.999995) == 0).float().mean().item() > 0.9999
    tiny = (dropout_mask(x, 1e-7) == 0).sum().item()  # p -> 2^-16: ~16 of 2^20 dropped
    assert 1 <= tiny <= 60


def test_layers_reading_one_input_share_its_dropout_mask():
    """inject_lora gives a model's LoRA layers one SharedDropout: q, k and v (which read the same normed
    hidden state) get one masked copy; o, reading another tensor, a new one; a layer reading the same
    tensor twice gets a new mask; a new tensor never gets a dead one's mask; each layer's own training
    flag decides; eval mode and dropout 0 pass the input through; nothing keeps a forward's graph alive."""
    import copy
    import gc
    import weakref

    m = tiny_model()
    inject_lora(m, LoRAConfig(rank=4, alpha=8, dropout=0.5, targets=("q_proj", "k_proj", "v_proj", "o_proj")))
    attn, attn1 = m.model.layers[0].self_attn, m.model.layers[1].self_attn
    assert attn.q_proj.dropout is attn.k_proj.dropout is attn1.o_proj.dropout
    share = attn.q_proj.dropout
    m.train()
    x, y = torch.randn(2, 5, m.config.hidden_size), torch.randn(2, 5, m.config.hidden_size)
    xq = share(x, attn.q_proj)
    assert share(x, attn.k_proj) is xq and share(x, attn.v_proj) is xq
    assert share(x, attn.q_proj) is not xq  # q again: a fresh mask
    assert not torch.equal(share(y, attn.o_proj) != 0, (xq != 0))
    for _ in range(20):  # a new input (perhaps at a dead one's address) gets a new mask
        a = torch.ones(64, m.config.hidden_size)
        before = share(a, attn.q_proj) != 0
        del a
        assert not torch.equal(share(torch.ones(64, m.config.hidden_size), attn.k_proj) != 0, before)
    w = torch.randn(2, 5, m.config.hidden_size, requires_grad=True)
    held = weakref.ref(share(w * 2, attn.q_proj))  # a training forward with no backward
    gc.collect()
    assert held() is None  # its masked copy (and the graph behind it) is not kept
    copy.deepcopy(m)
    m.model.layers[0].eval()  # one block in eval: it passes through, the others still drop
    assert share(x, attn.q_proj) is x and share(x, attn1.q_proj) is not x
    m.eval()
    assert share._last is None and share(x, attn1.q_proj) is x
    assert LoRALinear(torch.nn.Linear(4, 4), rank=2, alpha=4).train().dropout(x, None) is x  # dropout 0


def test_a_model_forward_draws_one_mask_per_input_not_per_layer(monkeypatch):
    """In a real forward of a model with LoRA on all 7 projections, dropout draws 4 masks per block (the
    input of q/k/v, of o, of gate/up, of down), not 7; with the rows' shared prefix packed, the same."""
    import medlora.lora as lora_mod

    calls = []
    real = lora_mod.dropout_mask
    monkeypatch.setattr(lora_mod, "dropout_mask", lambda x, p: calls.append(x.shape) or real(x, p))
    m = tiny_model()
    inject_lora(m, LoRAConfig(rank=4, alpha=8, dropout=0.1))
    m.train()
    ids = torch.randint(3, 97, (2, 12))
    m(ids).sum().backward()
    assert len(calls) == 4 * m.config.num_hidden_layers
    calls.clear()
    ids[1, :6] = ids[0, :6]
    m(ids, shared_prefix=6).sum().backward()
    assert len(calls) == 4 * m.config.num_hidden_layers


def test_shared_dropout_masks_replay_under_grad_checkpointing():
    """--grad-checkpoint recomputes each block in the backward pass: its dropout masks must be the ones
    the forward drew (the gradients equal those of the same step without checkpointing)."""
    def grads(checkpointing):
        torch.manual_seed(0)
        m = tiny_model()
        inject_lora(m, LoRAConfig(rank=4, alpha=8, dropout=0.3))
        randomize_lora(m)
        m.train()
        m.gradient_checkpointing = checkpointing
        ids = torch.randint(0, m.config.vocab_size, (2, 12))
        torch.manual_seed(1)
        m(ids).float().square().mean().backward()
        return [p.grad.clone() for p in lora_parameters(m)]

    for a, b in zip(grads(False), grads(True)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_an_unfrozen_base_weight_still_gets_its_gradient():
    """_LoRAMatmul treats W as frozen; a LoRALinear whose base someone unfroze must not lose W's gradient."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(24, 40, bias=False), rank=4, alpha=8).train()
    layer.weight.requires_grad_(True)
    x = torch.randn(3, 5, 24)
    layer(x).square().sum().backward()
    expected = torch.func.grad(lambda w: (x @ w.t() + x @ layer.lora_A.weight.t() @ (layer.lora_B.weight * layer.scaling).t())
                               .square().sum())(layer.weight.detach())
    assert layer.weight.grad is not None and torch.allclose(layer.weight.grad, expected, atol=1e-5)


def test_scaling_and_rslora():
    lin = torch.nn.Linear(8, 8, bias=False)
    assert LoRALinear(lin, rank=4, alpha=8).scaling == 2.0
    assert LoRALinear(torch.nn.Linear(8, 8, bias=False), rank=4, alpha=8, use_rslora=True).scaling == 8 / math.sqrt(4)
    assert LoRAConfig(rank=16, alpha=16, use_rslora=True).scaling == 4.0


def test_bad_lora_config():
    with pytest.raises(ConfigError, match="--rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="unknown module"):
        LoRAConfig(targets="q_proj,qkv_proj")
    assert LoRAConfig(targets="attention").targets == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_parameter_count_matches_formula():
    m = tiny_model()
    inject_lora(m, LoRAConfig(rank=4))
    r = parameter_report(m)
    d, f, kv = 32, 48, 2 * 8
    per_layer = 4 * ((d + d) + (d + kv) * 2 + (d + d)) + 4 * ((d + f) * 2 + (f + d))
    assert r["trainable"] == 2 * per_layer
    assert r["per_target"]["q_proj"] == 2 * 4 * (d + d)


# --------------------------------------------------------------------------------------------- PEFT
@pytest.fixture()
def hf_tiny(tmp_path, ours):
    """The same tiny base as an HF folder, for PEFT."""
    from medlora.weights import save_folder

    _, tok = ours
    base = tiny_model(seed=1, vocab_size=49152)
    save_folder(base, tok, tmp_path / "base")
    return base, tmp_path / "base"


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_our_adapter_same_logits_and_gradients(tmp_path, hf_tiny, rslora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, folder = hf_tiny
    cfg = LoRAConfig(rank=4, alpha=16, use_rslora=rslora, targets="q_proj,v_proj,down_proj,gate_proj")
    inject_lora(base, cfg)
    randomize_lora(base, seed=3)
    with torch.no_grad():  # also make A distinct per module
        for m in lora_modules(base).values():
            m.lora_A.weight.mul_(1.5)
    save_adapter(base, tmp_path / "adapter", cfg, str(folder))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
    idx = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(2))
    base.train()
    peft.train()
    ours_logits, their_logits = base(idx), peft(input_ids=idx).logits
    assert (ours_logits - their_logits).abs().max() <= 1e-5
    ours_logits.float().pow(2).mean().backward()
    their_logits.float().pow(2).mean().backward()
    theirs = {n.replace(".default", ""): p for n, p in peft.named_parameters() if "lora_" in n}
    for name, m in lora_modules(base).items():
        for ab in "AB":
            g_ours = getattr(m, f"lora_{ab}").weight.grad
            g_theirs = theirs[f"base_model.model.{name}.lora_{ab}.weight"].grad
            assert (g_ours - g_theirs).abs().max() <= 1e-5 * max(1.0, g_theirs.abs().max().item())


def test_we_load_an_adapter_peft_wrote(tmp_path, hf_tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, folder = hf_tiny
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft = get_peft_model(hf, LoraConfig(r=8, lora_alpha=32, target_modules=["k_proj", "o_proj", "up_proj"],
                                         init_lora_weights=False))  # random A and B
    peft.save_pretrained(tmp_path / "peft_adapter")
    idx = torch.randint(0, 49152, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = peft(input_ids=idx).logits
        cfg = load_adapter(base, tmp_path / "peft_adapter")
        assert cfg.rank == 8 and sorted(cfg.targets) == ["k_proj", "o_proj", "up_proj"]
        assert (base(idx) - ref).abs().max() <= 1e-5


def test_adapter_for_another_base_is_refused(tmp_path):
    small = tiny_model()
    inject_lora(small, LoRAConfig(rank=2))
    save_adapter(small, tmp_path / "a", LoRAConfig(rank=2), "tiny")
    other = tiny_model(hidden_size=64, num_attention_heads=8, num_key_value_heads=4)
    with pytest.raises(AdapterError, match="shape"):
        load_adapter(other, tmp_path / "a")
    deeper = tiny_model(num_hidden_layers=3)
    with pytest.raises(AdapterError, match="does not fit"):
        load_adapter(deeper, tmp_path / "a")
    edited = json.loads((tmp_path / "a" / "adapter_config.json").read_text())  # config and tensors disagree on r:
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**edited, "r": 4}))  # found before any model
    with pytest.raises(AdapterError, match=r"lora_A.weight has shape \(2, \d+\), but adapter_config.json says r=4"):
        read_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(edited))
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(AdapterError, match="cannot read safetensors"):
        load_adapter(tiny_model(), tmp_path / "a")
    with pytest.raises(AdapterError, match="PEFT format"):
        load_adapter(tiny_model(), tmp_path / "missing")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2


def test_adapter_on_other_weights_is_refused_for_folders_too():
    """The base check compared only GGUF hashes (strings): an adapter applied to an HF folder, such as a
    merged release that already holds it, ran without a word. Folders are recorded as {file: sha256}."""
    from medlora.lora import adapter_base_mismatch

    def adapter(tmp, sha):
        folder = Path(tmp) / "a"
        model = tiny_model(0)
        inject_lora(model, LoRAConfig(rank=2))
        save_adapter(model, folder, LoRAConfig(rank=2), "base", {"base_sha256": sha})
        return folder

    import tempfile

    gguf, folder = "ab" * 32, {"model.safetensors": "cd" * 32}
    with tempfile.TemporaryDirectory() as tmp:
        a = adapter(tmp, gguf)
        assert adapter_base_mismatch(a, {"id": "merged", "sha256": folder}) is not None  # GGUF-trained, folder loaded
        assert adapter_base_mismatch(a, {"id": "bundled", "sha256": gguf}) is None
    with tempfile.TemporaryDirectory() as tmp:
        a = adapter(tmp, folder)
        assert adapter_base_mismatch(a, {"id": "same", "sha256": dict(folder)}) is None
        problem = adapter_base_mismatch(a, {"id": "other", "sha256": {"model.safetensors": "ef" * 32}})
        assert "model.safetensors: cdcdcdcdcdcd" in problem and "efefefefefef" in problem


@pytest.mark.parametrize("change,error", [
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4' is not supported"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora' is not supported"),
    ({"layers_to_transform": [0, 1]}, "layers_to_transform is not supported"),
    ({"exclude_modules": ["down_proj"]}, "exclude_modules is not supported"),
    ({"target_modules": r".*\.layers\.\d+\.self_attn\.q_proj"}, "target_modules '.*"),
    ({"target_modules": ["lm_head"]}, "entry 'lm_head' names none of medlora's LoRA modules"),
    ({"r": "eight"}, "not a LoRA config medlora can use"),
])
def test_peft_configs_medlora_cannot_apply_are_refused(tmp_path, change, error):
    """PiSSA/OLoRA/LoftQ rewrite the base weights (the file does not carry them: logits off by 38 in the
    audit), partial-layer adapters and regex targets would be applied wrongly: each is a clear error."""
    from medlora.lora import AdapterError, read_adapter

    model = tiny_model(0)
    inject_lora(model, LoRAConfig(rank=2))
    save_adapter(model, tmp_path, LoRAConfig(rank=2), "base")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(AdapterError, match=re.escape(error)):
        read_adapter(tmp_path)


def test_peft_target_suffixes_are_read_as_module_names(tmp_path):
    """PEFT matches target_modules by path suffix: "self_attn.q_proj" and "mlp.down_proj" are valid."""
    from medlora.lora import read_adapter

    model = tiny_model(0)
    inject_lora(model, LoRAConfig(rank=2, targets=["q_proj", "down_proj"]))
    save_adapter(model, tmp_path, LoRAConfig(rank=2, targets=["q_proj", "down_proj"]), "base")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["self_attn.q_proj", "mlp.down_proj"]}))
    assert read_adapter(tmp_path)[0].targets == ["q_proj", "down_proj"]
    fresh = tiny_model(0)
    load_adapter(fresh, tmp_path)  # and the tensors fit the modules they name


def test_load_adapter_into_a_model_with_other_lora_layers_is_refused(tmp_path):
    """Copying tensors into existing LoRA layers would keep their scale (alpha, rsLoRA): another
    adapter's weights under the wrong scale, silently."""
    m = tiny_model()
    cfg = LoRAConfig(rank=4, alpha=32.0)
    inject_lora(m, cfg)
    randomize_lora(m, seed=1)
    save_adapter(m, tmp_path / "a", cfg, "tiny")
    for other, says in ((LoRAConfig(rank=4, alpha=8.0), "scale [2.0]"), (LoRAConfig(rank=2, alpha=32.0), "rank [2]"),
                        (LoRAConfig(rank=4, alpha=32.0, targets=["q_proj", "v_proj"]), "targets q_proj,v_proj")):
        t = tiny_model()
        inject_lora(t, other)
        with pytest.raises(AdapterError, match=re.escape(says)):
            load_adapter(t, tmp_path / "a")


def test_injecting_twice_is_refused_and_leaves_the_first_lora_trainable():
    m = tiny_model()
    inject_lora(m, LoRAConfig(rank=4))
    with pytest.raises(AdapterError, match="already has LoRA layers"):
        inject_lora(m, LoRAConfig(rank=4))
    assert all(p.requires_grad for p in lora_parameters(m))


def test_load_adapter_into_a_merged_model_replaces_the_merged_update(tmp_path):
    x = torch.randint(0, 97, (1, 10))
    refs = {}
    for name, seed in (("a", 1), ("b", 2)):
        m = tiny_model()
        inject_lora(m, LoRAConfig(rank=4, alpha=8.0))
        randomize_lora(m, seed=seed)
        save_adapter(m, tmp_path / name, LoRAConfig(rank=4, alpha=8.0), "tiny")
        with torch.no_grad():
            refs[name] = m(x)
    with torch.no_grad():
        base = tiny_model()(x)
    t = tiny_model()
    load_adapter(t, tmp_path / "a", merge=True)
    load_adapter(t, tmp_path / "b", merge=True)  # used to leave a's update in the weights
    with torch.no_grad():
        assert torch.allclose(t(x), refs["b"], atol=1e-5)
    load_adapter(t, tmp_path / "a")  # unmerged this time
    unmerge_lora(t)
    for m in lora_modules(t).values():
        m.lora_B.weight.data.zero_()
    with torch.no_grad():
        assert torch.allclose(t(x), base, atol=1e-5)  # the base weights came back intact
