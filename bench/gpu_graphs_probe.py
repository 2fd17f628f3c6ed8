"""`python -m bench.gpu_graphs_probe STAGE [SIZE]`: one training configuration on random weights of
SmolLM's shape (SIZE `full`) or the tests' tiny model (`tiny`), a few steps, timed; no GGUF needed.
STAGE: eager | compile | graphs (compile_blocks(cuda_graphs=True)). Run each stage in its own process
(faulthandler on): a crash in one says where it happened and spares the others. Needs no GGUF, so a
device call can run it without the two-call weight transfer. Session 18's H200 run:
bench/results/cuda-graphs-probe-h200-s18.md."""
from __future__ import annotations

import faulthandler
import signal
import sys
import time

import torch

from medlora.config import ALL_TARGETS, LoRAConfig, ModelConfig
from medlora.lora import inject_lora
from medlora.model import Llama, init_weights
from medlora.trainer import IGNORE, accumulate_gradients, compile_blocks, make_optimizer, pad_to_multiple


def main(stage: str, size: str = "full") -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    cfg = ModelConfig(**(tiny if size == "tiny" else {}))
    model = init_weights(Llama(cfg), seed=0).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    inject_lora(model, LoRAConfig(rank=8, alpha=16, targets=ALL_TARGETS))
    model.to(device).train()
    if stage != "eager":
        compile_blocks(model, cuda_graphs=stage == "graphs")
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-4, 0.01)
    g = torch.Generator().manual_seed(0)
    rows, lengths = (16, [300, 350, 410]) if size == "full" else (3, [37, 50])
    batches = []
    for n in lengths:
        ids = torch.randint(3, cfg.vocab_size, (rows, n), generator=g)
        labels = ids.clone()
        labels[:, : n // 3] = IGNORE
        batches.append(pad_to_multiple(ids, labels, 2, 64))
    precision = "bf16" if device.type == "cuda" else "fp32"
    for k, (ids, labels) in enumerate(batches * 4):
        t = time.perf_counter()
        if stage == "graphs":
            torch.compiler.cudagraph_mark_step_begin()
        loss, _ = accumulate_gradients(model, [(ids, labels)], precision, device)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"[probe] {stage} {size} step {k} len {ids.shape[1]} loss {float(loss):.4f} "
              f"{time.perf_counter() - t:.3f} s", flush=True)


if __name__ == "__main__":
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=False)  # `timeout -s USR1`: where a hang sits
    main(*sys.argv[1:])
