"""Int8 weight-only quantisation for fast CPU decoding (optional; serving and evaluation only).

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth, not
arithmetic: fp32 weights move 540 MB per token. Storing each linear layer as int8 with one bf16
scale per output row moves a quarter of that, and PyTorch's `_weight_int8pack_mm` kernel (the one
gpt-fast uses) multiplies bf16 activations by int8 weights directly. The embedding table stays as
it is (a lookup reads one row); the tied LM head gets its own int8 copy.

What it costs: the answers are no longer bit-identical to fp32 (per-row int8 rounding), so it is
never used for training, the validation loss or parity tests; `tests/test_fastpath.py` measures
how close its logits and greedy tokens stay. LoRA adapters are merged before quantising.
Mirrors gpt-fast's `WeightOnlyInt8Linear`.
Left out: int4, activation quantisation, and quantised training (QLoRA).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .lora import LoRALinear, merge_lora
from .model import Llama, RMSNorm


class Int8Linear(nn.Module):
    """y = (x @ int8(W)^T) * scale, per output row; x runs in bf16."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight, self.scale)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def int8_supported() -> bool:
    """The int8 kernel exists for CPU (and CUDA) in recent PyTorch; check instead of assuming."""
    try:
        torch._weight_int8pack_mm(torch.ones(1, 8, dtype=torch.bfloat16), torch.ones(8, 8, dtype=torch.int8),
                                  torch.ones(8, dtype=torch.bfloat16))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@torch.no_grad()
def quantize_int8(model: Llama) -> Llama:
    """Replace every linear layer (LoRA merged first) and the LM head by `Int8Linear`, in place.
    Activations run in bf16 afterwards; norms still compute in fp32."""
    if not int8_supported():
        raise RuntimeError("this PyTorch build has no int8 weight-only kernel (torch._weight_int8pack_mm)")
    merge_lora(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, LoRALinear)) and child is not model.lm_head:
                setattr(parent, name, Int8Linear(child.weight))
    model.lm_head = Int8Linear(model.lm_head.weight)  # unties: the embedding keeps its own table
    model.model.embed_tokens.to(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.to(torch.bfloat16)
    model.quantized = "int8"
    return model
