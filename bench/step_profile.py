"""`python -m bench.step_profile`: where a training step's time goes, medlora and transformers + PEFT side
by side, on the bench's own batches (the same rows, weights, LoRA and precision as `python -m bench`).

The bench says how fast each side is; this says why. On the H100 (bench/results/cuda.md) a step took
0.2-0.5 s for ~5 ms of matmul work, which points at the host launching small kernels: the report gives,
per side, the wall time per step, the aten calls (nested ones included) and GPU kernels per step, the
GPU's busy time (sum of kernel times) against the wall time, and the top operators by host (self CPU)
and device time. Runs in one process, a few steps each; writes `OUT/profile-DEVICE.md`. The profiler
slows the host, so as many batches again run unprofiled: the GPU's busy share is also given against them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def profile_side(spec: dict, batches: list, warmup: int, steps: int, top: int) -> tuple[dict, str]:
    """Run `warmup` steps, then `steps` under torch.profiler: a summary and the top-operator tables."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.workers import TRAIN_SETUP, sync

    step, _, _ = TRAIN_SETUP[spec["impl"]](spec)
    for ids, labels, lengths in batches[:warmup]:
        step(ids, labels, lengths)
    cuda = spec["device"] == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    timed = batches[warmup: warmup + steps]
    sync(spec)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for ids, labels, lengths in timed:
            step(ids, labels, lengths)
        sync(spec)
    wall = (time.perf_counter() - t) / len(timed)
    # The profiler slows the host (more for the side with more calls: on the H200 a profiled step took 1.75x
    # (medlora) and 2.6x (HF) the bench's). So the next batches run unprofiled too, at new shapes as the
    # profiled ones were, and the GPU's busy share is given per token against that time as well.
    plain = batches[warmup + steps: warmup + 2 * steps]
    sync(spec)
    t = time.perf_counter()
    for ids, labels, lengths in plain:
        step(ids, labels, lengths)
    sync(spec)
    plain_s_per_token = (time.perf_counter() - t) / max(1, sum(sum(b[2]) for b in plain))
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.key.startswith("aten::"))
    tokens = sum(sum(b[2]) for b in timed) / len(timed)
    unprofiled = plain_s_per_token * tokens  # seconds an unprofiled step takes at the profiled steps' size
    summary = {"wall_s_per_step": wall, "aten_calls_per_step": ops / len(timed),  # nested calls counted too
               "tokens_per_step": tokens, "unprofiled_s_per_step_at_these_tokens": unprofiled}
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        summary["kernels_per_step"] = len(kernels) / len(timed)
        summary["gpu_busy_s_per_step"] = sum(e.device_time_total for e in kernels) / 1e6 / len(timed)
        summary["gpu_busy_share"] = summary["gpu_busy_s_per_step"] / wall  # of the profiled step
        summary["gpu_busy_share_unprofiled"] = summary["gpu_busy_s_per_step"] / unprofiled
    tables = events.table(sort_by="self_cpu_time_total", row_limit=top)
    if cuda:
        tables += "\n" + events.table(sort_by="self_device_time_total", row_limit=top)
    return summary, tables


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step_profile", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--impls", default="medlora,hf", help="comma list of medlora,hf")
    p.add_argument("--share-prefix", action=argparse.BooleanOptionalAction, default=None,
                   help="medlora's layout (default: train.py's default for the device)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25, help="rows of each operator table")
    p.add_argument("--quick", action="store_true", help="tiny batches (the bench's --quick inputs): a smoke run")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--work", default=str(ROOT / "bench" / ".work"))
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.run import BenchConfig, cuda_config, prepare_inputs, quick_config

    cfg = cuda_config(BenchConfig()) if a.device == "cuda" else BenchConfig()
    if a.quick:  # the bench's tiny batches, with rows long enough for a few of them
        cfg = quick_config(cfg)
        cfg.max_len = 256
    cfg.warmup, cfg.steps = a.warmup, 2 * a.steps  # the profiled steps, then as many unprofiled
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    inputs = prepare_inputs(cfg, work)
    batches = torch.load(work / "inputs.pt")["batches"]
    lines = [f"# profile of a training step, {a.device}, {a.precision}", "",
             f"Batches of {cfg.batch_size} rows up to {cfg.max_len} tokens (the bench's), {a.steps} profiled steps "
             f"after {a.warmup} warm-up, LoRA r={cfg.rank} on all 7 projections.", ""]
    for impl in a.impls.split(","):
        spec = {"impl": impl, "folder": inputs["folder"], "pad_id": inputs["pad_id"], "rank": cfg.rank,
                "dropout": cfg.dropout, "precision": a.precision, "device": a.device}
        if impl == "medlora" and a.share_prefix is not None:
            spec["share_prefix"] = a.share_prefix
        summary, tables = profile_side(spec, batches, a.warmup, a.steps, a.top)
        print(f"[profile] {impl}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()), file=sys.stderr)
        lines += [f"## {impl}", "", *(f"- {k}: {v:.4g}" for k, v in summary.items()), "", "```", tables, "```", ""]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile-{a.device}{'-quick' if a.quick else ''}.md"
    path.write_text("\n".join(lines))
    print(f"[profile] wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
