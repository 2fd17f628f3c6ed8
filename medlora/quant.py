"""Int8 and int4 weight-only quantisation for fast CPU decoding (optional; serving only).

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth, not
arithmetic: fp32 weights move 540 MB per token. Storing each linear layer as int8 with one bf16
scale per output row moves a quarter of that, and PyTorch's `_weight_int8pack_mm` kernel (the one
gpt-fast uses) multiplies bf16 activations by int8 weights directly. The embedding table stays as
it is (a lookup reads one row); the tied LM head gets its own int8 copy.

What it costs: the answers are no longer bit-identical to fp32 (per-row int8 rounding), so it is
never used for training, the validation loss or parity tests; `tests/test_fastpath.py` measures
how close its logits and greedy tokens stay. LoRA adapters are merged before quantising.

Int4 halves the bytes again: groups of 32 input weights share a bf16 scale and offset (the layout of
llama.cpp's Q4_1, so the bundled Q4_1 GGUF's body weights map back onto the same 16 levels up to
the bf16 rounding of scale and offset), multiplied by PyTorch's `_weight_int4pack_mm_for_cpu`. At
batch 1 the int8 matmuls were ~70% of a compiled decode step; reading 30 layers' distinct weights
took 12-15 ms per token in int8 and 5-6.5 ms in int4 (cold caches, measured). CPU only.

q, k and v, which read the same input, become one layer of their stacked rows (`Attention.qkv_proj`), as do
gate and up (`MLP.gate_up_proj`): 4 kernel calls a block instead of 7. Each row and group is quantised as
before, so the codes are the same; at batch 1 a call has a fixed cost beside its bytes (int4 kernels alone,
30 blocks: q, k, v 1.12 -> 0.65 ms a token, gate and up 1.80 -> 1.58 ms, on 2 Xeon cores).
Mirrors gpt-fast's `WeightOnlyInt8Linear` and its int4 groupwise path.
Left out: activation quantisation and quantised training (QLoRA).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .lora import LoRALinear, merge_lora
from .model import Llama, RMSNorm

# From this many rows of input on (a prompt's prefill, batches of 8+), a layer multiplies by its weight
# dequantised once to bf16 instead. The int8/int4 kernels cost ~20 us per row at these shapes (they read
# the codes again for each row), a bf16 matmul about the same for 1 row as for 32 (measured on 2 Xeon
# cores, [1536, 576]: int4 kernel 35 / 90 / 324 us at 1 / 8 / 32 rows, bf16 73 / 71 / 84 us). The bench's
# int4 prefill of a 618-token prompt went 657 -> 2,413 tokens/s, batch-16 decoding 187 -> 310. The price:
# the bf16 copy (2 bytes a weight beside the codes), and outputs ~0.26% (relative norm) off the kernel's:
# the copy rounds the kernel's weight to bf16, a rounding of the same size as the bf16 output's own.
DENSE_ROWS = 8


def _matmul(x: torch.Tensor, out_features: int, dense: torch.Tensor, kernel) -> torch.Tensor:
    """x [..., in] @ W^T in bf16, by `kernel(x2)` for a few rows, else by the dequantised bf16 `dense`."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    y = x2 @ dense.t() if x2.shape[0] >= DENSE_ROWS else kernel(x2)
    return y.reshape(*shape[:-1], out_features).to(x.dtype)


class Int8Linear(nn.Module):
    """y = (x @ int8(W)^T) * scale, per output row; x runs in bf16."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("dense", (self.weight.float() * self.scale.float()[:, None]).to(torch.bfloat16),
                             persistent=False)  # for DENSE_ROWS rows and more

    def kernel(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [rows, in] bf16 @ W^T by PyTorch's int8 kernel."""
        return torch._weight_int8pack_mm(x2, self.weight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(x, self.out_features, self.dense, self.kernel)


class Int4Linear(nn.Module):
    """y = x @ W^T with W = (q - 8) * scale + offset per group of `group` inputs, q in 0..15.

    Min/max (asymmetric) rounding per group: scale = (max - min) / 15, offset = min + 8 * scale,
    both rounded to bf16 *before* q is chosen, so q is the nearest level of the grid actually used."""

    def __init__(self, weight: torch.Tensor, group: int = 32) -> None:
        super().__init__()
        n, k = weight.shape
        w = weight.detach().float().reshape(n, k // group, group)
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16).float()
        offset = (lo + 8 * scale).to(torch.bfloat16).float()
        q = torch.round((w - offset[..., None]) / scale[..., None] + 8).clamp(0, 15)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).reshape(n, k), 1))  # [n, k/2] uint8
        pairs = torch.stack([scale, offset], -1).transpose(0, 1)  # [k/group, n, 2]: the kernel's layout
        self.register_buffer("scale_offset", pairs.contiguous().to(torch.bfloat16))
        self.group, self.in_features, self.out_features = group, k, n
        # for DENSE_ROWS+ rows: W by the formula above, the kernel's own weight (the same bits as dequantized(),
        # tested; reading it back through the kernel took ~1 s of quantize_int4)
        dense = ((q - 8) * scale[..., None] + offset[..., None]).reshape(n, k).to(torch.bfloat16)
        self.register_buffer("dense", dense, persistent=False)

    def kernel(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [rows, in] bf16 @ W^T by PyTorch's int4 kernel."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group, self.scale_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(x, self.out_features, self.dense, self.kernel)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, as fp32 [out, in]: the kernel applied to the identity."""
        return self.kernel(torch.eye(self.in_features, dtype=torch.bfloat16)).float().t()


def int4_fits(weight: torch.Tensor, group: int = 32) -> bool:
    """The kernel's shape rules: out features a multiple of 16, in features of the group size."""
    return weight.shape[0] % 16 == 0 and weight.shape[1] % group == 0


def int8_supported() -> bool:
    """The int8 kernel exists for CPU (and CUDA) in recent PyTorch; check instead of assuming."""
    try:
        torch._weight_int8pack_mm(torch.ones(1, 8, dtype=torch.bfloat16), torch.ones(8, 8, dtype=torch.int8),
                                  torch.ones(8, dtype=torch.bfloat16))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def int4_supported() -> bool:
    """The int4 CPU kernels (packing and matmul) exist in this PyTorch build."""
    try:
        q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(16, 32, dtype=torch.int32), 1)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.ones(1, 32, dtype=torch.bfloat16), q, 32,
                                                    torch.ones(1, 16, 2, dtype=torch.bfloat16))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@torch.no_grad()
def quantize_int8(model: Llama) -> Llama:
    """Replace every linear layer (LoRA merged first) and the LM head by `Int8Linear`, in place.
    Activations run in bf16 afterwards; norms still compute in fp32."""
    if not int8_supported():
        raise RuntimeError("this PyTorch build has no int8 weight-only kernel (torch._weight_int8pack_mm)")
    return _quantize(model, Int8Linear, "int8")


@torch.no_grad()
def quantize_int4(model: Llama, group: int = 32) -> Llama:
    """As quantize_int8, with `Int4Linear` for the 30 layers (CPU only). The LM head stays int8, as
    llama.cpp's 4-bit files keep their output layer at 8 bits: with an int4 head, teacher-forced
    next tokens agreed with fp32 at 79% of a real answer's positions; with an int8 head at 96% (int8
    everywhere: 95%). A layer whose shape the kernel cannot take (tiny test models) stays int8."""
    if model.model.embed_tokens.weight.device.type != "cpu":
        raise RuntimeError("int4 decoding runs on the CPU only (PyTorch's _weight_int4pack_mm_for_cpu)")
    if not (int4_supported() and int8_supported()):
        raise RuntimeError("this PyTorch build has no int4 weight-only CPU kernel (_weight_int4pack_mm_for_cpu)")
    return _quantize(model, lambda w: Int4Linear(w, group) if int4_fits(w, group) else Int8Linear(w), "int4",
                     head=Int8Linear)


def _quantize(model: Llama, make, kind: str, head=None) -> Llama:
    if getattr(model, "quantized", None):  # its weights are codes now; quantising them again loses the scales
        raise RuntimeError(f"this model is already quantised ({model.quantized}); quantise a full-precision copy")
    merge_lora(model)
    for block in model.model.layers:  # one layer for the projections that read one input (module docstring)
        attn, mlp = block.self_attn, block.mlp
        attn.qkv_proj = make(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        mlp.gate_up_proj = make(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, LoRALinear)) and child is not model.lm_head:
                setattr(parent, name, make(child.weight))
    model.lm_head = (head or make)(model.lm_head.weight)  # unties: the embedding keeps its own table
    model.model.embed_tokens.to(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.to(torch.bfloat16)
    model.quantized = kind
    return model
