"""One measurement per process: `python -m bench.workers JOB --spec spec.json` prints one JSON line.

Each job runs in a fresh process so its peak memory is its own (VmHWM, reset after loading the
model so "training peak" excludes the loader's transient buffers; the whole-process peak is
reported too). Jobs: `matmul` (the machine's own matmul peak at the model's shapes), `train`
(LoRA steps, medlora or transformers+PEFT), `pair` (both sides' steps interleaved in one process),
`gen` (greedy decoding and prefill, medlora, transformers `generate`, or llama-cpp-python).
On CUDA (`"device": "cuda"` in the spec) memory is the GPU's: torch.cuda.max_memory_allocated,
reset after loading as VmHWM is on a CPU; every timed call ends with a device synchronise.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status_mb(field: str) -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # not Linux: the lifetime peak is all we can get

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def on_cuda(spec: dict) -> bool:
    return spec.get("device", "cpu") == "cuda"


def sync(spec: dict) -> None:
    """CUDA runs asynchronously: a timer read before the queued kernels finish measures nothing."""
    if on_cuda(spec):
        torch.cuda.synchronize()


def peak_mb(spec: dict, field: str = "VmHWM") -> float:
    """The peak (VmHWM) or current (VmRSS) memory: the process's on a CPU, the GPU's tensors on CUDA."""
    if on_cuda(spec):
        return (torch.cuda.max_memory_allocated() if field == "VmHWM" else torch.cuda.memory_allocated()) / 2**20
    return _status_mb(field)


def reset_peak_of(spec: dict) -> None:
    if on_cuda(spec):
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak()


def timed(fn, warmup: int, n: int, spec: dict | None = None) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        sync(spec or {})
        t = time.perf_counter()
        fn()
        sync(spec or {})
        out.append(time.perf_counter() - t)
    return out


# ----------------------------------------------------------------------------------------------
def matmul(spec: dict) -> dict:
    """GFLOP/s of x @ W^T at the model's shapes, fp32 and bf16: the ceiling training works against."""
    tokens, device = spec["tokens"], spec.get("device", "cpu")
    shapes = {"attn 576->576": (576, 576), "kv 576->192": (576, 192), "mlp 576->1536": (576, 1536),
              "mlp 1536->576": (1536, 576), "head 576->49152": (576, 49152)}
    res = {}
    for dt in ("fp32", "bf16"):
        dtype = torch.float32 if dt == "fp32" else torch.bfloat16
        for name, (i, o) in shapes.items():
            rows = tokens // 2 if "head" in name else tokens
            x, w = torch.randn(rows, i, dtype=dtype, device=device), torch.randn(o, i, dtype=dtype, device=device)
            ts = timed(lambda: F.linear(x, w), 2, spec["repeats"], spec)
            res[f"{dt} {name}"] = 2 * rows * i * o / min(ts) / 1e9
        res[f"{dt} peak"] = max(v for k, v in res.items() if k.startswith(dt))
    return {"gflops": res}


# ----------------------------------------------------------------------------------------------
def sdpa_order(name: str | None):
    """The SDPA kernel order a job asks for: "flash-first" (medlora.model.CUDA_SDPA_ORDER), "cudnn-first"
    (PyTorch 2.11's own on Hopper, what both sides ran before session 18), or None (the code's default)."""
    if name is None:
        return None
    if name == "flash-first":
        from medlora.model import CUDA_SDPA_ORDER

        return list(CUDA_SDPA_ORDER)
    from torch.nn.attention import SDPBackend as B

    return {"cudnn-first": [B.CUDNN_ATTENTION, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH]}[name]


GRAPH_PAD = 64  # CUDA-graph jobs pad lengths to multiples of this: a few shapes, each recorded once


def _medlora_train(spec: dict):
    from medlora.config import LoRAConfig
    from medlora.lora import inject_lora
    from medlora.trainer import accumulate_gradients
    from medlora.weights import load_pretrained

    bf16_weights = spec["precision"] == "bf16" and spec.get("bf16_weights", True)
    model, _, _ = load_pretrained(spec["folder"], dtype=torch.bfloat16 if bf16_weights else torch.float32, verbose=False)
    device = torch.device(spec.get("device", "cpu"))
    model.to(device)
    inject_lora(model, LoRAConfig(rank=spec["rank"], alpha=2 * spec["rank"], dropout=spec["dropout"], targets=TARGETS))
    model.gradient_checkpointing = spec.get("grad_checkpoint", False)
    if spec.get("sdpa_order"):  # attend()'s kernel order on CUDA
        import medlora.model

        medlora.model.CUDA_SDPA_ORDER = sdpa_order(spec["sdpa_order"])
    graphs = spec.get("cuda_graphs", False)  # (a GPU job; compile jobs never run `--before` commits)
    if spec.get("compile"):
        from medlora.trainer import compile_blocks

        compile_blocks(model, cuda_graphs=graphs)  # compiled by the first warm-up step
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    try:  # train.py's optimizer (fused AdamW); `--before` commits may predate make_optimizer
        from medlora.trainer import make_optimizer
    except ImportError:
        make_optimizer = lambda params, lr, wd: torch.optim.AdamW(params, lr=lr)  # noqa: E731
    opt = make_optimizer(params, 1e-4, 0.01)
    # Computing each batch's shared prefix once: train.py's default for the device unless the spec says;
    # `--before` commits may predate the device default (they shared it everywhere) or the option itself.
    try:
        from medlora.trainer import share_prefix_default
    except ImportError:
        share_prefix_default = lambda device: True  # noqa: E731
    share = {"share_prefix": spec.get("share_prefix", share_prefix_default(device))}
    if "share_prefix" not in inspect.signature(accumulate_gradients).parameters:
        share = {}

    def step(ids, labels, lengths):
        if graphs:  # lengths padded to multiples of 64, so CUDA graphs recorded for a length replay
            from medlora.trainer import pad_to_multiple

            ids, labels = pad_to_multiple(ids, labels, spec["pad_id"], GRAPH_PAD)
            torch.compiler.cudagraph_mark_step_begin()
        loss, _ = accumulate_gradients(model, [(ids, labels)], spec["precision"], device, **share)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, sum(p.numel() for p in params), share.get("share_prefix", False)


def _hf_train(spec: dict):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    dtype = torch.bfloat16 if spec["precision"] == "bf16" and spec.get("bf16_weights", False) else torch.float32
    device = torch.device(spec.get("device", "cpu"))
    model = LlamaForCausalLM.from_pretrained(spec["folder"], dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=spec["dropout"],
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    if spec.get("grad_checkpoint"):
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # Trainer's default on torch >= 2.8: adamw_torch_fused
    pad = spec["pad_id"]
    order = sdpa_order(spec.get("sdpa_order"))

    def step(ids, labels, lengths):
        att = (torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()  # right padding
        ids, att, labels = ids.masked_fill(att == 0, pad).to(device), att.to(device), labels.to(device)
        with contextlib.ExitStack() as stack:  # (the backward pass runs the kernels the forward chose)
            if order:
                from torch.nn.attention import sdpa_kernel

                stack.enter_context(sdpa_kernel(order, set_priority=True))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16"):
                out = model(input_ids=ids, attention_mask=att, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    return step, sum(p.numel() for p in params), False


# A side's training setup -> (step(ids, labels, lengths), trainable parameter count, prefix shared?).
TRAIN_SETUP = {"medlora": _medlora_train, "hf": _hf_train}


def train(spec: dict) -> dict:
    torch.manual_seed(0)
    data = torch.load(spec["batches"])
    batches = data["shuffled_batches" if spec.get("batching") == "shuffled" else "batches"]
    t0 = time.perf_counter()
    step, n_train, shared_prefix = TRAIN_SETUP[spec["impl"]](spec)
    load_s = time.perf_counter() - t0
    loaded_mb, load_peak_mb = peak_mb(spec, "VmRSS"), peak_mb(spec)
    reset_peak_of(spec)
    w = spec["warmup"]
    losses, times = [], []
    extra_warmup = 0
    for i, (ids, labels, lengths) in enumerate(batches[: w + spec["steps"]]):
        if i == w and spec.get("cuda_graphs"):  # a CUDA graph is recorded at a shape's second run: each padded
            seen = {}                            # length the timed steps use runs twice first (after the first
            for batch in batches[w: w + spec["steps"]]:  # loss is taken), so the timing is of replays
                seen.setdefault(-(-batch[0].shape[1] // GRAPH_PAD), batch)
            for batch in list(seen.values()) * 2:
                step(*batch)
                extra_warmup += 1
        sync(spec)
        t = time.perf_counter()
        losses.append(step(ids, labels, lengths))
        sync(spec)
        if i >= w:
            times.append(time.perf_counter() - t)
    tokens = sum(sum(b[2]) for b in batches[w: w + spec["steps"]])
    return {"trainable_params": n_train, "load_s": load_s, "first_loss": losses[0], "losses": losses,
            "step_s": sum(times) / len(times), "tokens": tokens, "tok_per_s": tokens / sum(times),
            "rss_after_load_mb": loaded_mb, "load_peak_mb": load_peak_mb, "train_peak_mb": peak_mb(spec),
            "threads": torch.get_num_threads(), "shared_prefix": shared_prefix,
            **({"extra_warmup_steps": extra_warmup} if extra_warmup else {})}


def pair(spec: dict) -> dict:
    """medlora's and transformers + PEFT's training steps interleaved in one process, batch by batch
    (the order flips every batch): both sides see the same machine speed, so the ratio survives the
    drift that moves separate runs by 10-25% on a shared machine. Memory is the separate jobs' business.
    `spec["also"]`: more sides in the same rotation, {label: (impl, spec overrides)}, e.g. each side
    without LoRA dropout, so what dropout costs is measured at one machine speed too."""
    torch.manual_seed(0)
    batches = torch.load(spec["batches"])["batches"]
    sides = {impl: (impl, {}) for impl in TRAIN_SETUP} | {k: tuple(v) for k, v in spec.get("also", {}).items()}
    steps = {label: TRAIN_SETUP[impl]({**spec, **over, "impl": impl})[0] for label, (impl, over) in sides.items()}
    w = spec["warmup"]
    times: dict[str, list[float]] = {label: [] for label in steps}
    for i, (ids, labels, lengths) in enumerate(batches[: w + spec["steps"]]):
        for label in (list(steps) if i % 2 == 0 else list(steps)[::-1]):
            sync(spec)
            t = time.perf_counter()
            steps[label](ids, labels, lengths)
            sync(spec)
            if i >= w:
                times[label].append(time.perf_counter() - t)
    tokens = sum(sum(b[2]) for b in batches[w: w + spec["steps"]])
    ratios = sorted(h / m for m, h in zip(times["medlora"], times["hf"]))  # same batch: time ratio = speed ratio
    return {"medlora_tok_per_s": tokens / sum(times["medlora"]), "hf_tok_per_s": tokens / sum(times["hf"]),
            "ratios": ratios, "ratio_median": statistics.median(ratios), "tokens": tokens,
            "also_tok_per_s": {label: tokens / sum(times[label]) for label in spec.get("also", {})}}


# ----------------------------------------------------------------------------------------------
def _medlora_gen(spec: dict):
    from medlora.generate import GenConfig, generate_ids
    from medlora.weights import load_pretrained

    dtype = torch.bfloat16 if spec.get("dtype") == "bf16" else torch.float32
    model, tok, _ = load_pretrained(spec["folder"], dtype=dtype, verbose=False)
    model.to(spec.get("device", "cpu")).eval()
    if spec["impl"] in ("medlora-int8", "medlora-int4"):
        from medlora.quant import quantize_int4, quantize_int8

        (quantize_int8 if spec["impl"] == "medlora-int8" else quantize_int4)(model)
    if spec.get("compile"):
        from medlora.generate import compile_decoding

        # compiled by the warm-up call of each timed batch size; on a GPU each step replays as a CUDA graph
        compile_decoding(model, cuda_graphs=spec.get("device") == "cuda")

    def run(prompts, n):  # no stop tokens: every row decodes exactly n tokens
        rows = [[] for _ in prompts]
        for step in generate_ids(model, prompts, GenConfig(max_new_tokens=n), pad_id=tok.pad_id):
            for r, t in enumerate(step):
                rows[r].append(t)
        return rows

    return run


def _hf_gen(spec: dict):
    from transformers import LlamaForCausalLM

    device = spec.get("device", "cpu")
    dtype = torch.bfloat16 if spec.get("dtype") == "bf16" else torch.float32
    model = LlamaForCausalLM.from_pretrained(spec["folder"], dtype=dtype).to(device).eval()
    pad = spec["pad_id"]

    @torch.no_grad()
    def run(prompts, n):
        P = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts], device=device)
        att = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=pad)
        return out[:, P:].tolist()

    return run


def _llamacpp_gen(spec: dict):
    """llama.cpp through llama-cpp-python. `extra_bufts: False` loads the weights into plain CPU buffers:
    llama.cpp's "extra buffer types" repack them for its AMX and interleaved kernels, and on the Xeon of
    session 20 its AMX matmul crashed (SIGSEGV in the first decode; ggml-org/llama.cpp#20824 reports the
    same fault in ggml_backend_amx_mul_mat), so the bench also runs it without them."""
    from unittest import mock

    import llama_cpp.llama
    from llama_cpp import Llama

    defaults = llama_cpp.llama.llama_cpp.llama_model_default_params

    def model_params():  # llama-cpp-python's Llama() has no argument for it: its defaults, one field changed
        p = defaults()
        p.use_extra_bufts = spec.get("extra_bufts", True)
        return p

    with mock.patch.object(llama_cpp.llama.llama_cpp, "llama_model_default_params", model_params):
        llm = Llama(model_path=spec["gguf"], n_ctx=2048, n_threads=torch.get_num_threads(), n_batch=512, verbose=False)

    def run(prompts, n):
        if len(prompts) != 1:
            raise NotImplementedError("llama-cpp-python decodes one sequence at a time")
        llm.reset()
        out = []
        for t in llm.generate(prompts[0], top_k=1, temp=0.0, reset=True):
            out.append(t)
            if len(out) == n:
                break
        return [out]

    return run


def gen(spec: dict) -> dict:
    torch.manual_seed(0)
    data = torch.load(spec["batches"])
    t0 = time.perf_counter()
    run = {"medlora": _medlora_gen, "medlora-int8": _medlora_gen, "medlora-int4": _medlora_gen, "hf": _hf_gen,
           "llamacpp": _llamacpp_gen}[spec["impl"]](spec)
    load_s, load_peak_mb = time.perf_counter() - t0, peak_mb(spec)
    reset_peak_of(spec)
    n = spec["new_tokens"]
    res = {}
    for b in spec["batch_sizes"]:
        if spec["impl"] == "llamacpp" and b > 1:
            continue
        prompts = data["prompts"][:b]
        ts = timed(lambda: run(prompts, n), 1, spec["repeats"], spec)
        res[f"batch{b}_tok_per_s"] = b * n / min(ts)
    first = run(data["prompts"][:1], n)[0]
    long_prompt = data["long_prompt"]
    ts = timed(lambda: run([long_prompt], 1), 1, spec["repeats"], spec)
    res.update(prefill_tokens=len(long_prompt), prefill_tok_per_s=len(long_prompt) / min(ts),
               greedy_tokens=first, load_s=load_s, load_peak_mb=load_peak_mb, gen_peak_mb=peak_mb(spec))
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("job", choices=["matmul", "train", "pair", "gen"])
    p.add_argument("--spec", required=True)
    a = p.parse_args(argv)
    spec = json.loads(open(a.spec).read())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    out = {"matmul": matmul, "train": train, "pair": pair, "gen": gen}[a.job](spec)
    print("BENCH " + json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
