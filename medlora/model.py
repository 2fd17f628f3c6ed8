"""The Llama model in plain PyTorch (what SmolLM and SmolLM2 are).

Read top to bottom: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP, a block,
the model. Module and parameter names are exactly Hugging Face's (`model.layers.3.self_attn.q_proj`)
so HF checkpoints, PEFT adapters and our adapters map one to one with no renaming table.

Left out on purpose: fused QKV (it would complicate LoRA), rope scaling variants, biases.
Mirrors transformers' `modeling_llama.py` numerically (rotate-half rotary, fp32 norms).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig


_recompute_on = True  # False while a block checkpointed as a whole runs (a plain global: torch.compile reads it)


def recompute(fn, *args: torch.Tensor) -> torch.Tensor:
    """fn(*args), keeping only `args` for the backward pass and running fn again there.

    For the cheap elementwise steps (SwiGLU's silu(g); the norms' fp32 internals in compiled blocks,
    where eager training has _RMSNormFn keep even less), whose stored intermediates were a large
    share of a LoRA step's activations: with 256-row head chunks, the bf16 peak fell 2,964 -> 2,441 MB
    at ~1% of the step's time (bench/results). Same numbers either way: the recompute is the same
    code. Off inside a block `--grad-checkpoint` recomputes whole.
    """
    if torch.is_grad_enabled() and _recompute_on and any(a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)  # fn draws no random numbers
    return fn(*args)


def written_out_backward() -> bool:
    """Whether a layer with a hand-written backward (_RMSNormFn, lora._LoRAMatmul) should use it: in
    eager training. No-grad runs need no backward; compiled blocks take the plain formulas, which
    Inductor fuses and differentiates itself (the hand-written LoRA made compiled steps slower)."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _whole_block(block: nn.Module, *args):
    """Run a block that is checkpointed as a whole: nothing inside it needs its own recompute."""
    global _recompute_on
    _recompute_on = False
    try:
        return block(*args)
    finally:
        _recompute_on = True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if written_out_backward():
            return _RMSNormFn.apply(x, self.weight, self.eps)
        if not torch.is_grad_enabled():  # one-token decode steps (what compile_decoding compiles): see exact_mean
            return rms_norm(x, self.weight, self.eps, exact_mean=x.shape[-2] == 1)[0]
        return recompute(self._norm, x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             exact_mean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * x / rms(x), 1 / rms(x)): normalised in fp32 whatever the activation dtype, as the reference does.

    exact_mean: sum the squares in fp64, so the fp32 mean comes out the same whatever order the sum runs
    in. torch.compile's reduction sums in another order than eager's kernel; in fp32 the mean then
    differed in its last bits for ~40% of rows, which rounded an int8/int4 model's bf16 activations
    differently now and then (7 of 6,000 random rows; with fp64, none), and compiled decoding left
    eager's greedy tokens (at token 22 and 26 of the bench's 80). Used for one-token decode steps only:
    prefill runs eager either way, and there the fp64 passes over [tokens, 576] cost ~6% of int4 prefill
    (measured); training keeps the fp32 sum."""
    h = x.float()
    mean_sq = h.double().pow(2).mean(-1, keepdim=True).float() if exact_mean else h.pow(2).mean(-1, keepdim=True)
    r = torch.rsqrt(mean_sq + eps)
    return weight * (h * r).to(x.dtype), r


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm._norm with its backward written out: keeps only x and 1/rms (not the fp32 copies), and
    runs the backward in ~5 elementwise passes where autograd's chain (plus a recompute) took ~14.
    Forward + backward at a training batch's shape [1285, 576]: fp32 6.3 -> 1.6 ms, bf16 6.1 -> 3.6.
    With n = x/rms and g = dy * weight:  dx = (g - n * mean(g * n)) / rms."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, r = rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        h = x.float()
        g = (dy * weight).float()
        coef = (g * h).sum(-1, keepdim=True) * r.pow(3) / x.shape[-1]
        dx = torch.addcmul(g * r, h, coef, value=-1).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:  # a trainable norm (not LoRA's case)
            dw = (dy * (h * r).to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables for positions `pos` [B, T] in HF's rotate-half layout -> [B, 1, T, head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    freqs = pos.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys/values for every layer: [B, n_kv_heads, max_len, head_dim] each.

    `length` is how many slots are filled. Slots are positions in the (left-padded) batch;
    rotary positions are passed separately, so padding does not shift them.
    After fix_shapes(), every one-token step has the same shapes and tensor addresses.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> None:
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.dtype = dtype  # attention over the cache runs in this precision
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.length = 0
        self.max_len = max_len
        self.slot: torch.Tensor | None = None  # fixed shapes: where the step's token goes (see fix_shapes)
        self.seen: torch.Tensor | None = None  # fixed shapes: which slots the step may attend to

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write the new keys/values after the filled slots; return all filled slots (with fixed
        shapes: every slot, the step's mask hiding the empty ones)."""
        if self.slot is not None:
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
            return self.k[layer], self.v[layer]
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} > {self.max_len} slots")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Count n new slots as filled (Llama.forward, after its layers). Fixed-shape steps count theirs
        in next_slot(), outside any compiled graph, so a step never changes Python state."""
        if self.slot is None:
            self.length += n

    def fix_shapes(self, valid: torch.Tensor | None = None) -> None:
        """From now on, one token per step at the same shapes and tensor addresses, which is what a
        CUDA graph replays (compile_decoding on a GPU): each step writes its keys/values at the tensor
        index `slot` and attends over all max_len slots under the mask `seen`. `valid` [B, length]:
        which filled slots are real tokens (left padding is not); default: all of them."""
        B, device = self.k[0].shape[0], self.k[0].device
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.seen = torch.zeros(B, 1, 1, self.max_len, dtype=torch.bool, device=device)
        self.seen[:, 0, 0, :self.length] = True if valid is None else valid
        for t in (*self.k, *self.v, self.slot, self.seen):
            torch._dynamo.mark_static_address(t)  # graph inputs that keep their address between steps
        for t in (*self.k, *self.v):  # one compiled graph for every cache length (answer lengths vary)
            torch._dynamo.mark_dynamic(t, 2)
        torch._dynamo.mark_dynamic(self.seen, 3)

    def next_slot(self) -> torch.Tensor:
        """Open the next slot for a fixed-shape step; return the step's attention mask [B, 1, 1, max_len]."""
        if self.length >= self.max_len:
            raise RuntimeError(f"KV cache full: {self.length + 1} > {self.max_len} slots")
        self.slot.fill_(self.length)
        self.seen[:, :, :, self.length] = True
        self.length += 1
        return self.seen


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_head, self.n_kv, self.hd = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=False)
        self.qkv_proj = None  # quantised decoding (quant.py) fuses q, k and v into one layer: one kernel call

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split((self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd), -1)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dtype = q.dtype
        if cache is not None:  # attend in the cache's precision (fp32 on a CPU: see generate.cache_dtype)
            k, v = cache.update(self.layer, k.to(cache.dtype), v.to(cache.dtype))
            q = q.to(cache.dtype)
        y = mask.attend(q, k, v) if isinstance(mask, SharedPrefix) else attend(q, k, v, mask)
        return self.o_proj(y.to(dtype).transpose(1, 2).reshape(B, T, self.n_head * self.hd))


# SDPA's kernels by priority on CUDA when no mask tensor is needed (causal, or a query over its whole
# cache): flash attention first. PyTorch 2.11 tried cuDNN's first, which builds an execution plan for each
# new shape on the host: in the H200 profile (bench/results/profile-cuda-h200-s18.md) its forward and
# backward took 2.1 and 3.0 ms of host time a call against ~0.02-0.07 ms on the GPU, 30% of a profiled
# medlora step's host time (68% of transformers', which passes a mask), while the GPU sat idle >90% of a step.
CUDA_SDPA_ORDER = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                   SDPBackend.MATH]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with `mask`: "causal", a boolean tensor (True = may attend) or None."""
    # Grouped-query attention: each KV head serves n_head/n_kv query heads; `enable_gqa` lets SDPA
    # share them without copying (the same as k.repeat_interleave(n_head // n_kv, dim=1)).
    gqa = k.shape[1] != q.shape[1]
    if gqa and q.is_cuda and (q.dtype == torch.float32 and q.shape[2] > 1 or not isinstance(mask, (str, type(None)))):
        # On CUDA only flash attention (16-bit, no explicit mask) and the math kernel take GQA (PyTorch's
        # SDPA docs); cuDNN's failed on GQA + a mask (torch 2.11, H200), and fp32 would fall back to the math
        # kernel's [B, H, T, T] scores. With the heads copied, the memory-efficient kernel runs instead (not for
        # one fp32 query per row, decoding: there the math kernel's scores are small, the cache's copy is not).
        r = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), False
    causal = isinstance(mask, str)  # "causal": the common case, lets SDPA pick its fastest kernel
    if causal:
        mask = None
    if mask is None and q.is_cuda and not torch.compiler.is_compiling():  # (compiled blocks keep the default)
        with sdpa_kernel(CUDA_SDPA_ORDER, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


class SharedPrefix:
    """The attention layout of a batch packed into one sequence: the P tokens that every row starts
    with, once, then each of the B rows' own S tokens (Llama.forward's `shared_prefix`).

    The prefix attends causally to itself; each row's tokens attend to the prefix and, causally, to
    their own row: exactly what each row would see run whole. Everything outside attention works
    token by token, so it runs on the packed tokens unchanged. Held as a [B, 1, S, P + S] mask (a
    broadcast view) so the layout lives in tensor shapes, which torch.compile keeps symbolic.
    """

    def __init__(self, prefix: int, rows: int, length: int, device) -> None:
        s = length - prefix
        self.mask = torch.ones(s, length, dtype=torch.bool, device=device).tril(prefix).expand(rows, 1, s, length)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, _, S, L = self.mask.shape
        P, H, n_kv, d = L - S, q.shape[1], k.shape[1], q.shape[3]

        def rows(t):  # [1, heads, P + B*S, d] -> [B, heads, S, d]: each row's own tokens
            return t[0, :, P:].reshape(t.shape[1], B, S, d).transpose(0, 1)

        y_prefix = attend(q[:, :, :P], k[:, :, :P], v[:, :, :P], "causal")
        k_rows = torch.cat((k[:, :, :P].expand(B, -1, -1, -1), rows(k)), dim=2)  # every row sees the one prefix
        v_rows = torch.cat((v[:, :, :P].expand(B, -1, -1, -1), rows(v)), dim=2)
        r = H // n_kv
        if torch.compiler.is_compiling():  # (the fold below made compiled bf16 steps ~10% slower, measured)
            y_rows = attend(rows(q), k_rows, v_rows, self.mask)
        else:
            # The r query heads that share a KV head run as one sequence of their queries, under the mask
            # repeated per head: the same result as grouped-query attention, and PyTorch's CPU kernel is
            # faster without GQA (bf16 forward + backward at a training batch's shapes: 30 -> 22 ms).
            q_rows = rows(q).reshape(B, n_kv, r * S, d)  # (reshape below: CUDA's kernels return another layout)
            y_rows = attend(q_rows, k_rows, v_rows, self.mask[:1].repeat(1, 1, r, 1)).reshape(B, H, S, d)
        return torch.cat((y_prefix, y_rows.transpose(0, 1).reshape(1, H, B * S, d)), dim=2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj = None  # as Attention.qkv_proj, for gate and up

    def forward(self, x):
        if self.gate_up_proj is not None:
            return self.down_proj(swiglu(*self.gate_up_proj(x).chunk(2, -1)))
        return self.down_proj(recompute(swiglu, self.gate_proj(x), self.up_proj(x)))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """HF's `LlamaModel`: embeddings, blocks, final norm (named `model` inside `Llama`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    def forward(self, idx: torch.Tensor, pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, hidden_only: bool = False, shared_prefix: int = 0) -> torch.Tensor:
        """Logits [B, T, vocab] for tokens `idx` [B, T] (or final hidden states with `hidden_only`).

        pos:   rotary positions [B, T]; default: continue after what the cache holds.
        mask:  boolean [B, 1, T, S] (True = may attend) over the S = cached + T slots; default is
               causal, which is also right for right-padded training batches (real tokens never
               see the padding that follows them).
               A SharedPrefix instead when the batch is packed (see shared_prefix).
        cache: a KVCache to read and extend (generation).
        shared_prefix: P > 0 when every row starts with the same P tokens (training: the system
               turn). The prefix is computed once, not B times (SharedPrefix); same output.
        """
        if shared_prefix:
            return self._forward_shared(idx, shared_prefix, hidden_only)
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if pos is None:
            pos = torch.arange(past, past + T, device=idx.device).expand(B, T)
        if mask is None:
            if T == 1:
                mask = None  # one new token may see every cached slot
            elif past == 0:
                mask = "causal"
            else:
                mask = torch.ones(T, past + T, dtype=torch.bool, device=idx.device).tril(past)[None, None]
        x = self.model.embed_tokens(idx)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta, dtype)
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(_whole_block, block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        x = self.model.norm(x)
        return x if hidden_only else self.lm_head(x)

    def _forward_shared(self, idx: torch.Tensor, P: int, hidden_only: bool) -> torch.Tensor:
        """forward() of a batch whose rows share their first P tokens, run as one packed sequence."""
        B, T = idx.shape
        ar = torch.arange(T, device=idx.device)
        packed = torch.cat((idx[0, :P], idx[:, P:].reshape(-1)))[None]  # [1, P + B*(T-P)]
        pos = torch.cat((ar[:P], ar[P:].repeat(B)))[None]
        x = self(packed, pos=pos, mask=SharedPrefix(P, B, T, idx.device), hidden_only=True)[0]
        x = torch.cat((x[:P].expand(B, -1, -1), x[P:].view(B, T - P, -1)), dim=1)  # back to [B, T, C]
        return x if hidden_only else self.lm_head(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def init_weights(model: Llama, seed: int = 0, std: float = 0.02) -> Llama:
    """Random init (tests and tiny configs); real runs load weights instead."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
