"""`python -m bench`: medlora against transformers + PEFT (and llama-cpp-python when installed),
side by side, in one run, on the same rows, weights, LoRA settings and precision.

What it measures (each job in a fresh process, see `bench/workers.py`):
- matmul: this machine's own GFLOP/s at the model's shapes (fp32, bf16): the ceiling.
- train: non-padding tokens/s, seconds per optimizer step, peak memory (RSS) for LoRA r=8 on all
  seven projections, batch 8, rows up to 256 tokens, loss on assistant tokens only; and the achieved
  FLOP/s as a share of the matmul peak.
- interleaved: medlora's and HF's training steps alternating batch by batch in one process, so
  their ratio is measured at one machine speed (separate runs drift 10-25% on a shared machine).
- gen: greedy decoding tokens/s at batch 1 and 16, and prefill tokens/s of a long prompt (512 tokens of
  text in the chat frame: 618 tokens).

Both sides load the same HF safetensors folder (written once from the bundled GGUF), train on the
same length-bucketed batches (written once to `inputs.pt`), in the same precision; the `shuffled`
rows train on the same rows in random batches padded to their longest row, as the usual stack
(HF Trainer, TRL) feeds a model by default. Results go to
`bench/results/NAME.json` and `NAME.md`; ratios are printed. `--quick` is a seconds-long smoke run
for CI (it checks that everything runs, never a speed). `--before REF` adds medlora as of a git
commit, measured in the same run, for before/after tables. `--device cuda` runs the same
comparison on a GPU (`cuda_config`: bigger batches, bf16-first extras, the GPU's own matmul peak,
GPU memory instead of RSS; no quantised decoders or llama.cpp, which are CPU paths here).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class BenchConfig:
    name: str = "cpu"
    out: str = str(ROOT / "bench" / "results")
    work: str = str(ROOT / "bench" / ".work")  # HF folder + inputs, reused between runs
    model: str = "bundled"
    precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    rank: int = 8
    dropout: float = 0.0
    batch_size: int = 8
    max_len: int = 256
    rows: int = 2000  # data rows read to build batches (the first batches of the bucketed order are used)
    warmup: int = 2
    steps: int = 6
    new_tokens: int = 80
    gen_batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    prefill_len: int = 512
    repeats: int = 2
    rounds: int = 2  # the headline training pairs (medlora / HF per precision) run this often, alternating
    matmul_tokens: int = 2048
    extras: bool = True  # extra rows: grad checkpointing, HF with bf16 weights, medlora bf16 with fp32 weights
    quantised: bool = True  # the int8/int4 decoders (CPU); the smoke run leaves them to tests/test_fastpath.py
    before: str | None = None
    threads: int | None = None
    device: str = "cpu"
    job_timeout: float | None = None  # seconds; a job past it is recorded as an error (a hung compile, say)


def quick_config(cfg: BenchConfig) -> BenchConfig:
    cfg.precisions, cfg.batch_size, cfg.max_len, cfg.rows = ["fp32"], 2, 128, 200
    cfg.warmup, cfg.steps, cfg.new_tokens, cfg.gen_batch_sizes = 0, 1, 4, [1, 2]
    cfg.prefill_len, cfg.repeats, cfg.matmul_tokens, cfg.extras, cfg.rounds = 64, 1, 128, False, 1
    cfg.quantised = False  # ~8 s of process start each, and their decoding is tested on its own
    return cfg


def cuda_config(cfg: BenchConfig) -> BenchConfig:
    """A GPU runs a 135M model's 8 x 256-token batches mostly on kernel launch overhead: batches of
    16 rows up to 512 tokens (the GPU runs in docs/runs used 16 x up to 1024), more timed steps, a
    matmul peak at a batch's token count, and batch 64 decoding (eval.py's GPU batch size). Sized for
    one 15-minute device lease: one round, a per-job timeout, the compile jobs last."""
    cfg.name, cfg.device = "cuda", "cuda"
    cfg.batch_size, cfg.max_len, cfg.rows, cfg.warmup, cfg.steps = 16, 512, 3000, 3, 20
    cfg.matmul_tokens, cfg.repeats, cfg.new_tokens, cfg.gen_batch_sizes = 8192, 3, 64, [1, 16, 64]
    cfg.job_timeout = 150
    cfg.rounds = 1  # a GPU's readings held within 4% between two runs (HF fp32 26,919 and 27,913 tokens/s)
    return cfg


# ----------------------------------------------------------------------------------------------
def prepare_inputs(cfg: BenchConfig, work: Path) -> dict:
    """The shared HF folder and the batches/prompts every job uses."""
    import torch

    from medlora.data import collate, bucketed_batches, prepare, row_messages
    from medlora.trainer import prefix_to_share
    from medlora.weights import load_pretrained, save_folder

    model, tok, info = load_pretrained(cfg.model, verbose=False)
    folder = work / "hf"
    if not (folder / "model.safetensors").exists():
        save_folder(model, tok, folder)
    ds = prepare(tok, max_len=cfg.max_len, limit_rows=cfg.rows, verbose=False)
    order = bucketed_batches([len(e.ids) for e in ds.train], cfg.batch_size, seed=0)
    order = [b for b in order if len(b) == cfg.batch_size]  # full batches only (the last one may be short)
    need = cfg.warmup + cfg.steps
    if len(order) < need:
        raise SystemExit(f"--rows {cfg.rows} gives {len(order)} batches; {need} are needed")

    def build(order):
        batches, real, padded, supervised, prefixes = [], 0, 0, [], []
        for rows in order:
            exs = [ds.train[i] for i in rows]
            ids, labels = collate(exs, tok.pad_id)
            lengths = [len(e.ids) for e in exs]
            batches.append((ids, labels, lengths))
            real, padded = real + sum(lengths), padded + ids.numel()
            supervised.append(sum(e.n_supervised for e in exs))
            prefixes.append(prefix_to_share(ids))
        return batches, 1 - real / padded, supervised, prefixes

    batches, padding_share, supervised, prefixes = build(order[:need])
    # The same rows as the usual stack batches them (HF Trainer / TRL SFTTrainer defaults: random order,
    # each batch padded to its longest row, no length grouping): the "hf+peft ... shuffled" rows.
    rows = [i for b in order[:need] for i in b]
    random.Random(0).shuffle(rows)
    shuffled, shuffled_padding, shuffled_supervised, shuffled_prefixes = build([rows[j:j + cfg.batch_size]
                                                             for j in range(0, len(rows), cfg.batch_size)])
    questions = [json.loads(line)["prompt"] for line in (ROOT / "data" / "eval_medical.jsonl").read_text().splitlines() if line.strip()]
    prompts = [tok.encode_chat(row_messages(q), add_generation_prompt=True) for q in questions]
    while len(prompts) < max(cfg.gen_batch_sizes):
        prompts += prompts
    filler = " ".join(tok.decode(e.ids) for e in ds.val[:20])
    body = tok.decode(tok.encode(filler)[: cfg.prefill_len])
    long_prompt = tok.encode_chat(row_messages("Summarise this text:\n" + body), add_generation_prompt=True)
    torch.save({"batches": batches, "shuffled_batches": shuffled, "prompts": prompts, "long_prompt": long_prompt},
               work / "inputs.pt")
    return {"folder": str(folder), "gguf": info["path"] if info["kind"] == "gguf" else None, "pad_id": tok.pad_id,
            "model": {k: info[k] for k in ("id", "kind") if k in info}, "sha256": info.get("sha256"),
            "config": model.config.to_hf(), "padding_share": padding_share,
            "train_tokens": sum(sum(b[2]) for b in batches), "supervised_per_batch": supervised,
            "row_lengths": [b[2] for b in batches], "shuffled_padding_share": shuffled_padding,
            "shuffled_supervised_per_batch": shuffled_supervised, "shuffled_row_lengths": [b[2] for b in shuffled],
            "shared_prefix_per_batch": prefixes, "shuffled_shared_prefix_per_batch": shuffled_prefixes}


def train_flops(config: dict, row_lengths: list[list[int]], supervised: int, rank: int,
                prefixes: list[int] | None = None) -> float:
    """The work any implementation must do for these batches (padding and unlabelled logits excluded):
    forward + input-gradient through the frozen projections (2 + 2 FLOPs per weight per token),
    LoRA forward + both gradients (6 per LoRA weight), causal attention scores and mixing (forward
    x3 for backward), and the LM head at supervised positions only.
    `prefixes` (one per batch): the work done when each batch's shared prefix of that many tokens
    is computed once rather than once per row (trainer.batch_hidden) -- what medlora executes."""
    C, I, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * (C // config["num_attention_heads"])
    body = L * (2 * C * C + 2 * C * kv + 3 * C * I)
    lora = L * rank * ((C + C) * 2 + (C + kv) * 2 + (C + I) * 3)
    prefixes = prefixes or [0] * len(row_lengths)
    tokens = sum(sum(b) - (len(b) - 1) * P for b, P in zip(row_lengths, prefixes))
    tri = lambda n: n * (n + 1) / 2  # noqa: E731  (query-key pairs of n causal positions)
    pairs = sum(tri(P) + sum(tri(n) - tri(P) for n in b) for b, P in zip(row_lengths, prefixes))
    return tokens * (4 * body + 6 * lora) + 3 * L * 2 * 2 * C * pairs + 4 * C * config["vocab_size"] * supervised


# ----------------------------------------------------------------------------------------------
def run_job(job: str, spec: dict, work: Path, medlora_root: Path = ROOT, timeout: float | None = None) -> dict:
    path = work / f"spec-{spec['label'].replace(' ', '_').replace('@', '-')}.json"
    path.write_text(json.dumps(spec))
    paths = [str(medlora_root), str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    # Its own process group: a job past the timeout is killed with its children (inductor's compile workers).
    # -X faulthandler: a worker that crashes in native code (a segfault) still says where.
    p = subprocess.Popen([sys.executable, "-X", "faulthandler", str(ROOT / "bench" / "workers.py"), job, "--spec", str(path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, stderr = p.communicate()
        return {"error": f"timed out after {timeout:g} s", "stderr_tail": stderr.strip().splitlines()[-20:]}
    lines = [x for x in stdout.splitlines() if x.startswith("BENCH ")]
    if p.returncode != 0 or not lines:
        rc = p.returncode
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
        last = (stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"error": f"{how}: {last}", "stderr_tail": stderr.strip().splitlines()[-20:]}
    return json.loads(lines[-1][6:])


# medlora's decoders (serve.py flags none / --int8 / --int4), each also measured compiled (--compile).
DECODERS = ("medlora", "medlora-int8", "medlora-int4")


def jobs_for(cfg: BenchConfig, base: dict, before_root: Path | None) -> list[tuple[str, str, dict, Path]]:
    """(job, label, spec, medlora root) in the order they run."""
    common = {**base, "rank": cfg.rank, "dropout": cfg.dropout, "warmup": cfg.warmup, "steps": cfg.steps,
              "threads": cfg.threads, "device": cfg.device}
    cpu = cfg.device == "cpu"
    jobs = [("matmul", "matmul", {"tokens": cfg.matmul_tokens, "repeats": max(3, cfg.repeats), "device": cfg.device}, ROOT)]
    for prec in cfg.precisions:
        jobs.append(("train", f"medlora {prec}", {**common, "impl": "medlora", "precision": prec}, ROOT))
        if before_root is not None:
            jobs.append(("train", f"medlora@{cfg.before} {prec}", {**common, "impl": "medlora", "precision": prec},
                         before_root))
        jobs.append(("train", f"hf+peft {prec}", {**common, "impl": "hf", "precision": prec}, ROOT))
        if cfg.extras and (cpu or prec == "bf16"):  # HF as usually fed (shuffled, padded batches); train.py --compile
            jobs += [("train", f"hf+peft {prec} shuffled", {**common, "impl": "hf", "precision": prec,
                                                            "batching": "shuffled"}, ROOT),
                     ("train", f"medlora {prec} compile", {**common, "impl": "medlora", "precision": prec,
                                                            "compile": True}, ROOT)]
    if cfg.extras:  # what computing the shared prefix once buys (every row run whole; on CUDA, the other way round)
        flag = "no-share-prefix" if cpu else "share-prefix"
        jobs += [("train", f"medlora {prec} {flag}", {**common, "impl": "medlora", "precision": prec,
                                                     "share_prefix": not cpu}, ROOT) for prec in cfg.precisions]
    if cfg.extras and not cpu and "bf16" in cfg.precisions:  # on a GPU the usual stack keeps bf16 weights too
        jobs.append(("train", "hf+peft bf16 bf16-weights", {**common, "impl": "hf", "precision": "bf16", "bf16_weights": True}, ROOT))
        # SDPA's kernel order, both ways on both sides: medlora with PyTorch's own (cuDNN first, as before session 18),
        # transformers with medlora's (flash first; its padding mask then takes the memory-efficient kernel)
        jobs += [("train", "medlora bf16 cudnn-first", {**common, "impl": "medlora", "precision": "bf16",
                                                         "sdpa_order": "cudnn-first"}, ROOT),
                 ("train", "hf+peft bf16 flash-first", {**common, "impl": "hf", "precision": "bf16",
                                                        "sdpa_order": "flash-first"}, ROOT)]
        # compiled blocks replayed as CUDA graphs (compile_blocks(cuda_graphs=True); lengths padded to multiples of 64)
        jobs.append(("train", "medlora bf16 compile+graphs", {**common, "impl": "medlora", "precision": "bf16",
                                                              "compile": True, "cuda_graphs": True}, ROOT))
    if cfg.extras and cpu and "bf16" in cfg.precisions:
        jobs += [("train", "medlora bf16 fp32-weights", {**common, "impl": "medlora", "precision": "bf16", "bf16_weights": False}, ROOT),
                 ("train", "medlora bf16 dropout 0.05", {**common, "impl": "medlora", "precision": "bf16", "dropout": 0.05}, ROOT),
                 ("train", "medlora bf16 shuffled", {**common, "impl": "medlora", "precision": "bf16", "batching": "shuffled"}, ROOT),
                 ("train", "medlora bf16 grad-checkpoint", {**common, "impl": "medlora", "precision": "bf16", "grad_checkpoint": True}, ROOT),
                 ("train", "hf+peft bf16 bf16-weights", {**common, "impl": "hf", "precision": "bf16", "bf16_weights": True}, ROOT)]
    # The headline pairs again, HF first this time: this machine's speed drifts over minutes (HF fp32
    # read 174 and 214 tokens/s in two runs of the same code), so each keeps its best reading (keep_best_rounds).
    for k in range(2, cfg.rounds + 1):
        for prec in cfg.precisions:
            pair = [("hf", f"hf+peft {prec} #{k}"), ("medlora", f"medlora {prec} #{k}")]
            jobs += [("train", label, {**common, "impl": impl, "precision": prec}, ROOT)
                     for impl, label in (pair if k % 2 == 0 else pair[::-1])]
    # Both sides' steps interleaved in one process, batch by batch: a ratio the machine's drift cannot move.
    jobs += [("pair", f"interleaved {prec}", {**common, "precision": prec}, ROOT) for prec in cfg.precisions]
    if cpu:  # both sides with LoRA dropout 0.05, and without in the same rotation: what dropout costs each
        prec = "bf16" if "bf16" in cfg.precisions else cfg.precisions[0]  # (the smoke run: fp32 only)
        jobs.append(("pair", f"interleaved {prec} dropout 0.05", {**common, "precision": prec, "dropout": 0.05, "also": {
            "medlora dropout 0": ("medlora", {"dropout": 0.0}), "hf dropout 0": ("hf", {"dropout": 0.0})}}, ROOT))
    # The matmul peak again after training: on this shared machine one reading was 217 GFLOP/s for a
    # bf16 shape that read 429 in the previous run; the best of both is the ceiling FLOP utilisation uses.
    jobs.append(("matmul", "matmul end", dict(jobs[0][2]), ROOT))
    gen = {**base, "new_tokens": cfg.new_tokens, "batch_sizes": cfg.gen_batch_sizes, "repeats": cfg.repeats,
           "threads": cfg.threads, "device": cfg.device}
    decoders = DECODERS if cpu and cfg.quantised else DECODERS[:1]  # int8/int4 decoding use CPU kernels
    impls = [*decoders, "hf"] + (["llamacpp"] if base.get("gguf") and cpu else [])
    for impl in impls:
        jobs.append(("gen", f"gen {impl}", {**gen, "impl": impl}, ROOT))
    if "llamacpp" in impls:  # and without its repacking buffers (its AMX path crashed on a Xeon: workers._llamacpp_gen)
        jobs.append(("gen", "gen llamacpp plain-buffers", {**gen, "impl": "llamacpp", "extra_bufts": False}, ROOT))
    if not cpu:  # a GPU decodes in bf16 (eval.py/serve.py --dtype auto): both sides with bf16 weights
        jobs += [("gen", f"gen {impl} bf16", {**gen, "impl": impl, "dtype": "bf16"}, ROOT) for impl in ("medlora", "hf")]
    if cfg.extras:  # the compiled decode step (serve.py --compile); compiling takes a minute or two per job
        jobs += [("gen", f"gen {impl}+compile", {**gen, "impl": impl, "compile": True}, ROOT)
                 for impl in decoders]
    if not cpu:  # a GPU lease may end mid-run: the compiles (minutes each there) go last, the rest is saved first
        jobs = sorted(jobs, key=lambda j: bool(j[2].get("compile")))
    for _, label, spec, _ in jobs:
        spec["label"] = label
    return jobs


def keep_best_rounds(results: dict) -> dict:
    """Fold the repeated runs of a label ("medlora fp32 #2") into it: the fastest reading is kept (the
    same rule for both sides), every tokens/s reading is listed. An error in any run is kept as the result."""
    merged: dict = {}
    for label, r in results.items():
        base = label.split(" #")[0]
        kept = merged.get(base)
        if kept is not None and "error" in kept:
            continue  # an earlier run failed: that stays the result
        if kept is None or "error" in r:
            merged[base] = r
            continue
        readings = kept.get("tok_per_s_readings", [kept["tok_per_s"]]) + [r["tok_per_s"]]
        merged[base] = {**(r if r["tok_per_s"] > kept["tok_per_s"] else kept), "tok_per_s_readings": readings}
    return merged


def _ratio(a, b):
    return None if not a or not b else a / b


def best_matmul(results: dict) -> dict:
    """Per shape, the best GFLOP/s of the matmul jobs (before and after training)."""
    runs = [r["gflops"] for k, r in results.items() if k.startswith("matmul") and "gflops" in r]
    return {k: max(r.get(k, 0.0) for r in runs) for k in (runs[0] if runs else {})}


def first_divergence(a: list, b: list) -> int:
    """The index of the first token where two greedy answers differ (their length when they never do)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def summarise_gen(results: dict) -> dict:
    """The decoding ratios (against transformers and llama.cpp) and the token checks."""
    s: dict = {}
    hf = results.get("gen hf", {})
    # llama.cpp's reference: the faster of its runs that did not fail (with and without its repacking buffers)
    ran = [k for k in ("gen llamacpp", "gen llamacpp plain-buffers") if k in results and "error" not in results[k]]
    lc_label = max(ran, key=lambda k: results[k]["batch1_tok_per_s"], default=None)
    lc = results[lc_label] if lc_label else {}
    if lc_label:
        s["llamacpp_reference"] = lc_label.removeprefix("gen ")
    for impl in (*DECODERS, *(f"{d}+compile" for d in DECODERS), "llamacpp"):
        r = lc if impl == "llamacpp" else results.get(f"gen {impl}", {})
        if not r or "error" in r or "error" in hf:
            continue
        s[impl] = {k.replace("_tok_per_s", "_x_hf"): _ratio(r[k], hf.get(k)) for k in r if k.endswith("tok_per_s")}
        if impl != "llamacpp" and lc:
            s[impl]["batch1_x_llamacpp"] = _ratio(r["batch1_tok_per_s"], lc["batch1_tok_per_s"])
    ours16, hf16 = results.get("gen medlora bf16", {}), results.get("gen hf bf16", {})
    if ours16 and hf16 and "error" not in ours16 and "error" not in hf16:  # bf16 weights on both sides (GPU)
        s["medlora bf16"] = {k.replace("_tok_per_s", "_x_hf_bf16"): _ratio(ours16[k], hf16.get(k))
                             for k in ours16 if k.endswith("tok_per_s")}
    ours = results.get("gen medlora", {})
    if ours and hf and "error" not in ours and "error" not in hf:
        s["greedy_tokens_equal_hf"] = ours["greedy_tokens"] == hf["greedy_tokens"]
    for impl in (*DECODERS[1:], "llamacpp"):  # how long each follows the full-precision tokens
        q = lc if impl == "llamacpp" else results.get(f"gen {impl}", {})
        if ours and q and "error" not in q and "error" not in ours:
            s[impl.removeprefix("medlora-") + "_first_divergence"] = first_divergence(ours["greedy_tokens"], q["greedy_tokens"])
    for impl in DECODERS:  # the compiled step's greedy tokens against eager's, and how long they follow them
        eager, comp = results.get(f"gen {impl}", {}), results.get(f"gen {impl}+compile", {})
        if eager and comp and "error" not in eager and "error" not in comp:
            s[f"{impl}_compiled_tokens_equal_eager"] = eager["greedy_tokens"] == comp["greedy_tokens"]
            s[f"{impl}_compiled_first_divergence"] = first_divergence(eager["greedy_tokens"], comp["greedy_tokens"])
    return s


def summarise(cfg: BenchConfig, inputs: dict, results: dict) -> dict:
    def flops_of(prefix: str, shared: bool = False) -> float:  # the timed batches only
        sup = sum(inputs[prefix + "supervised_per_batch"][cfg.warmup:])
        prefixes = inputs[prefix + "shared_prefix_per_batch"][cfg.warmup:] if shared else None
        return train_flops(inputs["config"], inputs[prefix + "row_lengths"][cfg.warmup:], sup, cfg.rank, prefixes)

    # FLOP/s counts what each run executes: medlora computes a batch's shared prefix once.
    flops = {(b, sh): flops_of(b, sh) for b in ("", "shuffled_") for sh in (False, True)}
    mm = best_matmul(results)
    s: dict = {"train": {}, "gen": {}, "matmul_gflops": mm}
    for label, r in results.items():
        if not label.startswith(("medlora", "hf")) or "error" in r:
            continue
        prec = "bf16" if " bf16" in label else "fp32"
        work = flops["shuffled_" if label.endswith(" shuffled") else "", bool(r.get("shared_prefix"))]
        achieved = work / (r["tokens"] / r["tok_per_s"]) / 1e9
        r["gflops_per_s"] = achieved
        r["flop_util"] = _ratio(achieved, mm.get(f"{prec} peak"))
    for prec, ours_label in [(p, f"medlora {p}{c}") for p in cfg.precisions for c in ("", " compile", " compile+graphs")]:
        ours, hf = results.get(ours_label, {}), results.get(f"hf+peft {prec}", {})
        if "error" in ours or "error" in hf or not ours or not hf:
            continue
        s["train"][ours_label.removeprefix("medlora ")] = {
            "throughput_x": _ratio(ours["tok_per_s"], hf["tok_per_s"]),
            "step_time_x": _ratio(ours["step_s"], hf["step_s"]),
            "train_peak_memory_x": _ratio(ours["train_peak_mb"], hf["train_peak_mb"]),
            "total_peak_memory_x": _ratio(max(ours["train_peak_mb"], ours["load_peak_mb"]),
                                          max(hf["train_peak_mb"], hf["load_peak_mb"])),
            "first_loss_diff": abs(ours["first_loss"] - hf["first_loss"]),
            "flop_util": ours.get("flop_util")}
        usual = results.get(f"hf+peft {prec} shuffled", {})
        if usual and "error" not in usual:  # medlora as shipped against HF as usually fed
            s["train"][ours_label.removeprefix("medlora ")].update(
                throughput_x_hf_shuffled=_ratio(ours["tok_per_s"], usual["tok_per_s"]),
                train_peak_memory_x_hf_shuffled=_ratio(ours["train_peak_mb"], usual["train_peak_mb"]))
    s["interleaved"] = {label.removeprefix("interleaved "): {
        "medlora_tok_per_s": r["medlora_tok_per_s"], "hf_tok_per_s": r["hf_tok_per_s"],
        "ratio_median": r["ratio_median"], "ratio_min": r["ratios"][0], "ratio_max": r["ratios"][-1], "batches": len(r["ratios"]),
        **({"also_tok_per_s": r["also_tok_per_s"]} if r.get("also_tok_per_s") else {})}
        for label, r in results.items() if label.startswith("interleaved ") and "error" not in r}
    s["gen"] = summarise_gen(results)
    real = sum(sum(b) for b in inputs["row_lengths"][cfg.warmup:])
    s["train_flops_per_token"], s["train_flops_per_token_shared"] = flops["", False] / real, flops["", True] / real
    return s


def _f(x, fmt="{:.0f}"):
    return "—" if x is None else fmt.format(x)


def _prefix_note(inputs: dict) -> str:
    p = inputs["shared_prefix_per_batch"]
    return f"{min(p)}" + (f"-{max(p)}" if max(p) != min(p) else "") + " tokens"


def markdown(record: dict) -> str:
    cfg, res, s = record["config"], record["results"], record["summary"]
    gpu = cfg.get("device", "cpu") == "cuda"
    mem = "peak GPU memory" if gpu else "peak RSS"  # torch.cuda.max_memory_allocated on a GPU
    # The jobs' own thread count (--threads sets it there; the parent's is the machine default).
    threads = next((r["threads"] for r in res.values() if "threads" in r), record["machine"]["threads"])
    where = f"{record['machine']['cuda']} (CUDA)" if gpu else f"{record['machine']['cpu']} ({threads} threads)"
    lines = [f"# bench `{cfg['name']}` — {record['date']}", "",
             f"{where}, torch {record['versions']['torch']}, "
             f"transformers {record['versions'].get('transformers')}, peft {record['versions'].get('peft')}. "
             f"LoRA r={cfg['rank']} on all 7 projections, dropout {cfg['dropout']}, batch {cfg['batch_size']}, rows ≤ "
             f"{cfg['max_len']} tokens, length-bucketed ({record['inputs']['padding_share']:.1%} padding; the same rows in "
             f"shuffled batches: {record['inputs']['shuffled_padding_share']:.1%}), {cfg['steps']} timed steps after "
             f"{cfg['warmup']} warm-up. Training FLOPs per real token: {s['train_flops_per_token'] / 1e9:.3f} G; "
             f"{s['train_flops_per_token_shared'] / 1e9:.3f} G when each batch's shared prefix (the system turn, "
             f"{_prefix_note(record['inputs'])}) is computed once, as medlora does on a CPU (FLOP/s counts this useful "
             f"work; transformers, whose head runs at every position, executes more).", *(["", record["note"]] if record.get("note") else []), "",
             "## Training", "",
             f"| run | tokens/s | s/step | {mem} training (MB) | {mem} incl. load (MB) | GFLOP/s | FLOP util | first loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in res.items():
        if label.startswith(("medlora", "hf")):
            if "error" in r:
                lines.append(f"| {label} | error: {r['error']} |||||||")
                continue
            lines.append(f"| {label} | {r['tok_per_s']:.0f} | {r['step_s']:.2f} | {r['train_peak_mb']:.0f} | "
                         f"{max(r['train_peak_mb'], r['load_peak_mb']):.0f} | {_f(r.get('gflops_per_s'))} | "
                         f"{_f(r.get('flop_util'), '{:.0%}')} | {r['first_loss']:.4f} |")
    repeated = {k: r["tok_per_s_readings"] for k, r in res.items() if "tok_per_s_readings" in r}
    if repeated:
        lines += ["", "Runs of each headline pair, alternating (the fastest is the row above; the machine drifts): " +
                  "; ".join(f"{k} " + ", ".join(f"{x:.0f}" for x in v) for k, v in repeated.items()) + " tokens/s."]
    lines += ["", "Ratios against HF on the same batches; the last two against HF on the same rows in shuffled, "
              "padded batches (the usual stack's defaults; medlora keeps its bucketing).", "",
              "| medlora run | throughput × HF | step time × HF | training peak memory × HF | total peak × HF | FLOP util "
              "| throughput × HF shuffled | peak × HF shuffled |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for prec, t in s["train"].items():
        lines.append(f"| {prec} | {t['throughput_x']:.2f} | {t['step_time_x']:.2f} | {t['train_peak_memory_x']:.2f} | "
                     f"{t['total_peak_memory_x']:.2f} | {_f(t['flop_util'], '{:.0%}')} | "
                     f"{_f(t.get('throughput_x_hf_shuffled'), '{:.2f}')} | {_f(t.get('train_peak_memory_x_hf_shuffled'), '{:.2f}')} |")
    for prec, t in s.get("interleaved", {}).items():
        lines += ["", f"Interleaved in one process ({prec}; medlora's and HF's steps alternating batch by batch on the same "
                  f"batches, so both see the same machine speed): medlora {t['medlora_tok_per_s']:.0f}, HF "
                  f"{t['hf_tok_per_s']:.0f} tokens/s; per-batch speed ratio median {t['ratio_median']:.2f}× "
                  f"({t['ratio_min']:.2f}–{t['ratio_max']:.2f} over {t['batches']} batches)."]
        also = t.get("also_tok_per_s", {})
        if also:  # the same rotation without dropout: what dropout costs each side
            lines[-1] += " In the same rotation: " + "; ".join(
                f"{label} {v:.0f} tokens/s" + (f" (dropout costs {side} {1 - t[f'{side}_tok_per_s'] / v:.0%})"
                                               if (side := label.split()[0]) in ("medlora", "hf") else "")
                for label, v in also.items()) + "."
    for label, r in res.items():
        if label.startswith("interleaved ") and "error" in r:
            lines += ["", f"{label}: error: {r['error']}"]
    mm = s.get("matmul_gflops", {})
    if mm:
        lines += ["", "Matmul GFLOP/s at model shapes (best of the runs before and after training): " +
                  ", ".join(f"{k} {v:.0f}" for k, v in mm.items()) + "."]
    lines += ["", "## Generation (greedy, no early stop)", "",
              "| run | batch 1 tok/s | " + " | ".join(f"batch {b} tok/s" for b in cfg["gen_batch_sizes"][1:]) +
              f" | prefill tok/s | {mem} (MB) |", "|---|" + "---:|" * (len(cfg["gen_batch_sizes"]) + 2)]
    for label, r in res.items():
        if label.startswith("gen"):
            if "error" in r:
                lines.append(f"| {label} | error: {r['error']} |")
                continue
            cells = [_f(r.get(f"batch{b}_tok_per_s"), "{:.1f}") for b in cfg["gen_batch_sizes"]]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['prefill_tok_per_s']:.0f} | "
                         f"{max(r['gen_peak_mb'], r['load_peak_mb']):.0f} |")
    for impl, g in s["gen"].items():
        if isinstance(g, dict):
            lines.append(f"\n{impl}: " + ", ".join(f"{k} {v:.2f}" for k, v in g.items() if v is not None))
    for k, v in s["gen"].items():  # the token checks: equal to HF, first divergences, compiled == eager
        if not isinstance(v, dict):
            lines.append(f"\n{k}: {v}")
    return "\n".join(lines) + "\n"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return {"cpu": cpu, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "peft", "llama_cpp_python"):
        try:
            out[pkg] = md.version(pkg.replace("_", "-"))
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def measured_commit() -> str:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--",
                              "medlora", ":(glob)bench/*.py"], capture_output=True, text=True).stdout.strip()
    return commit + ("+uncommitted changes" if changed else "")  # measured code != HEAD: say so in the record


def write_record(cfg: BenchConfig, inputs: dict, results: dict, meta: dict, out: Path) -> dict:
    """`out/NAME.json` (everything) and `out/NAME.md` (the tables) from the jobs' results."""
    results = keep_best_rounds(results)
    record = {**{k: v for k, v in meta.items() if k != "jobs" and v is not None}, "config": asdict(cfg),
              "inputs": inputs, "results": results}  # (row lengths kept: the FLOPs can be recomputed)
    record["summary"] = summarise(cfg, inputs, results)
    (out / f"{cfg.name}.json").write_text(json.dumps(record, indent=2))
    md = markdown(record)
    (out / f"{cfg.name}.md").write_text(md)
    print(md)
    print(f"[bench] wrote {out / (cfg.name + '.json')} and .md", file=sys.stderr)
    return record


def inputs_mismatch(cfg: BenchConfig, inputs: dict, results: dict) -> list[str]:
    """The training results whose timed tokens differ from what `inputs` would time: a record's FLOPs
    and padding figures must come from the batches its jobs ran."""
    bad = []
    for label, r in results.items():
        if "error" in r or "tokens" not in r:
            continue
        key = "shuffled_row_lengths" if label.endswith(" shuffled") else "row_lengths"
        want = sum(sum(b) for b in inputs[key][cfg.warmup: cfg.warmup + cfg.steps])
        if r["tokens"] != want:
            bad.append(f"{label} timed {r['tokens']} tokens, these inputs {want}")
    return bad


def from_partial(path: Path, out: str | None, work: str | None) -> int:
    """The record of a run that was cut short (a device's time limit, a kill): its jobs' results, machine,
    versions and inputs as saved (a partial without inputs gets them prepared again here: they are
    deterministic for the same data and weights, and the record says so)."""
    saved = json.loads(path.read_text())
    missing = [k for k in ("date", "commit", "machine", "versions", "config", "jobs", "results") if k not in saved]
    if missing:
        raise SystemExit(f"{path}: not a bench partial record (missing {', '.join(missing)})")
    cfg = BenchConfig(**saved["config"])
    cfg.out, cfg.work = out or str(ROOT / "bench" / "results"), work or str(ROOT / "bench" / ".work")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    meta = {k: saved[k] for k in ("date", "commit", "machine", "versions", "only")  if k in saved}
    note = saved.get("note", "") + f" Assembled from a partial run: {len(saved['results'])} of {saved['jobs']} jobs ran."
    inputs = saved.get("inputs")
    if inputs is None:
        Path(cfg.work).mkdir(parents=True, exist_ok=True)
        sys.path.insert(0, str(ROOT))
        inputs = prepare_inputs(cfg, Path(cfg.work))
        bad = inputs_mismatch(cfg, inputs, saved["results"])
        if bad:  # the data preparation changed since the run (e.g. --limit-rows' sampling): FLOPs would be wrong
            raise SystemExit(f"{path}: its inputs were not saved, and the ones prepared now are not what it timed: "
                             + "; ".join(bad) + f". Assemble it with the code of its commit ({saved['commit']}).")
        note += " Its inputs were prepared again where the record was assembled (the same timed tokens, checked)."
    meta["note"] = note.strip()
    write_record(cfg, inputs, saved["results"], meta, Path(cfg.out))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (CI): tiny batches, fp32 only")
    p.add_argument("--name", default=None, help="results file name (default: cpu, or quick)")
    p.add_argument("--out", default=None, help="results folder (default: bench/results)")
    p.add_argument("--work", default=None, help="scratch folder for the HF weights and inputs (default: bench/.work)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--precisions", default=None, help="comma list of fp32,bf16")
    p.add_argument("--before", default=None, help="git ref: also measure medlora as of that commit")
    p.add_argument("--no-extras", action="store_true", help="skip the extra rows (grad checkpointing, bf16 variants)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the GPU comparison (cuda_config)")
    p.add_argument("--rounds", type=int, default=None, help="runs of each headline training pair (default 2)")
    p.add_argument("--only", default=None, help="regex: run only the jobs whose label matches (the matmul peak always runs)")
    p.add_argument("--from-partial", default=None, metavar="FILE",
                   help="write the record of a cut-short run from its NAME.partial.json (runs nothing)")
    a = p.parse_args(argv)
    if a.from_partial:
        return from_partial(Path(a.from_partial), a.out, a.work)
    cfg = BenchConfig()
    cfg = cuda_config(cfg) if a.device == "cuda" else cfg
    cfg = quick_config(cfg) if a.quick else cfg
    cfg.name = a.name or ("quick" if a.quick else cfg.name)
    cfg.out, cfg.work = a.out or cfg.out, a.work or cfg.work
    cfg.steps = a.steps or cfg.steps
    cfg.rounds = cfg.rounds if a.rounds is None else a.rounds
    cfg.precisions = a.precisions.split(",") if a.precisions else cfg.precisions
    cfg.before, cfg.threads = a.before, a.threads
    cfg.extras = cfg.extras and not a.no_extras
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    before_root = None
    if cfg.before:
        before_root = work / f"before-{cfg.before}"
        if not before_root.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before_root), cfg.before], check=True,
                           capture_output=True)
    sys.path.insert(0, str(ROOT))
    from tqdm import tqdm

    print("[bench] preparing shared inputs ...", file=sys.stderr)
    inputs = prepare_inputs(cfg, work)
    base = {"folder": inputs["folder"], "gguf": inputs["gguf"], "pad_id": inputs["pad_id"], "batches": str(work / "inputs.pt")}
    if base["gguf"]:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            base["gguf"] = None  # not installed: no llama.cpp row
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{cfg.name}.partial.json"
    if partial.exists():  # an earlier cut run's results: kept, never overwritten
        aside = partial.with_name(f"{cfg.name}.partial-{int(partial.stat().st_mtime)}.json")
        partial.rename(aside)
        print(f"[bench] kept an earlier run's {partial.name} as {aside.name}", file=sys.stderr)
    jobs = jobs_for(cfg, base, before_root)
    if a.only:
        jobs = [j for j in jobs if j[0] == "matmul" or re.search(a.only, j[1])]
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": measured_commit(),
            "machine": machine(), "versions": versions(), "config": asdict(cfg), "only": a.only, "jobs": len(jobs)}
    results: dict = {}
    for job, label, spec, root in tqdm(jobs, desc="bench", unit="job"):
        limit = cfg.job_timeout and cfg.job_timeout * (3 if spec.get("compile") else 1)  # compiling takes minutes
        results[label] = run_job(job, spec, work, root, limit)
        r = results[label]
        msg = r.get("error") or (f"{r['tok_per_s']:.0f} tok/s" if "tok_per_s" in r else
                                 f"medlora / HF {r['ratio_median']:.2f}x (median over batches)" if "ratio_median" in r else
                                 f"b1 {r['batch1_tok_per_s']:.1f} tok/s" if "batch1_tok_per_s" in r else "ok")
        tqdm.write(f"[bench] {label}: {msg}")
        # A killed run keeps what it measured: `--from-partial` makes the record of it.
        tmp = partial.with_suffix(".tmp")
        tmp.write_text(json.dumps({**meta, "inputs": inputs, "results": results}, indent=2))
        os.replace(tmp, partial)  # atomic: a kill mid-write leaves the previous version
    write_record(cfg, inputs, results, meta, out)
    partial.unlink()
    failed = [k for k, v in results.items() if "error" in v and "llamacpp" not in k]
    return 1 if failed else 0
