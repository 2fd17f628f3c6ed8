"""The training loop, readable top to bottom.

One optimizer step = `grad_accum` micro-batches. The loss of the step is the mean over *all*
supervised tokens of those micro-batches (each micro-batch's summed loss is divided by the
step's total token count), so short and long examples weigh the same per token however the
batch is split. The head and cross-entropy run only where a label exists, in chunks
(`head_loss`), so the [tokens, 49152] logits tensor never exists.

Checkpoints (every `save_every` steps, on SIGINT/SIGTERM, and at the end) hold the LoRA weights,
optimizer, scheduler, RNG, data position and early-stopping state: `--resume` continues with the
same losses as an uninterrupted run.

Data parallel (`torchrun`): every rank runs this same loop with its own `Dist` (distributed.py):
it takes its rows of each global batch, the step's token count and the LoRA gradients are summed
over ranks, and only rank 0 writes files or prints. A single process is the same code with
`Dist()`, where every collective is a no-op. See docs/distributed.md.

Left out: fp16 loss scaling (bf16 autocast needs none), FSDP and sequence packing.
Mirrors nanoGPT's training loop (warmup + cosine, gradient accumulation, clipping, periodic
validation, best-checkpoint saving) applied to torchtune's LoRA fine-tuning recipe.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import ConfigError, LoRAConfig
from .data import Dataset, Example, bucketed_batches, collate, sample_rows
from .distributed import SINGLE, Dist
from .lora import adapter_state_dict, lora_modules, lora_parameters, save_adapter
from .model import Llama
from .tokenizer import IGNORE


@dataclass
class TrainConfig:
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | linear | constant
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    clip: float = 1.0
    eval_every: int = 100
    val_rows: int = 256  # validation rows used by periodic evaluation (the first N of the split)
    save_every: int = 100
    patience: int = 5  # evaluations without improvement before stopping; 0 = never stop early
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast; LoRA master weights stay fp32)
    nan_policy: str = "stop"  # stop | skip
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each block (compile_blocks)
    share_prefix: bool | None = None  # compute a batch's common prefix once (batch_hidden); None: the device's default

    def __post_init__(self) -> None:
        checks = {
            "--lr": self.lr > 0 and math.isfinite(self.lr), "--batch-size": self.batch_size >= 1,
            "--grad-accum": self.grad_accum >= 1, "--epochs": self.epochs > 0 and math.isfinite(self.epochs),
            "--max-steps": self.max_steps is None or self.max_steps >= 1, "--eval-every": self.eval_every >= 1,
            "--save-every": self.save_every >= 1, "--patience": self.patience >= 0,
            "--clip": self.clip > 0 and math.isfinite(self.clip), "--warmup-steps": self.warmup_steps >= 0,
            "--weight-decay": self.weight_decay >= 0 and math.isfinite(self.weight_decay),
            "--min-lr-ratio": 0 <= self.min_lr_ratio <= 1, "--val-rows": self.val_rows >= 1,
        }
        for flag, ok in checks.items():
            if not ok:
                raise ConfigError(f"{flag}: invalid value ({getattr(self, flag[2:].replace('-', '_'))})")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"--schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.compile and self.gradient_checkpointing:
            raise ConfigError("--compile and --grad-checkpoint: pick one (a compiled block already keeps fewer "
                              "activations; checkpointing a compiled block is not supported)")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"--dtype for training must be fp32 or bf16, got {self.precision!r}")
        if self.nan_policy not in ("stop", "skip"):
            raise ConfigError(f"--on-nan must be stop or skip, got {self.nan_policy!r}")


# ---------------------------------------------------------------------------------------------
# Loss: head + cross-entropy only at labelled positions, in chunks
# ---------------------------------------------------------------------------------------------
class _HeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, t_i) for a frozen head W. The gradient w.r.t. h is computed chunk by
    chunk during the forward pass ((softmax - onehot) @ W), so neither pass keeps [N, vocab] logits."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, chunk: int):
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        # Every chunk reuses one fp32 logits buffer (and one in w's dtype), overwritten in place from
        # logits to softmax to its gradient: a fresh ~50 MB tensor per step of the softmax costs the
        # kernel's zeroing of new pages, and several of them at once raised the step's memory peak.
        rows = min(chunk, h.shape[0])
        logits_buf = torch.empty(rows, w.shape[0], dtype=torch.float32, device=h.device)
        low_buf = logits_buf if w.dtype == torch.float32 else torch.empty(rows, w.shape[0], dtype=w.dtype, device=h.device)
        for s in range(0, h.shape[0], chunk):
            tgt = t[s:s + chunk]
            n = len(tgt)
            logits, low = logits_buf[:n], low_buf[:n]
            torch.mm(h[s:s + n], w.t(), out=low)
            if low is not logits:
                logits.copy_(low)
            top = logits.amax(-1, keepdim=True)
            picked = logits.gather(1, tgt[:, None])
            total = logits.sub_(top).exp_().sum(-1, keepdim=True)  # logits now hold exp(logit - top)
            loss += (total.log() + top - picked).sum()  # log-sum-exp minus the target's logit
            if grad is not None:
                p = logits.div_(total)  # softmax
                p[torch.arange(n, device=p.device), tgt] -= 1.0
                if low is not logits:
                    low.copy_(p)
                grad[s:s + n] = (low @ w).to(h.dtype)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None


# Rows of logits per chunk: one 256 x 49,152 fp32 buffer is ~50 MB (+25 MB in bf16), reused by every
# chunk, while the matmul stays large enough to run at full speed (1024 rows held ~460 MB at the
# step's memory peak, measured before the buffers were reused).
HEAD_CHUNK = 256


def head_loss(model: Llama, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = HEAD_CHUNK) -> tuple[torch.Tensor, int]:
    """(summed CE over supervised tokens, their count). hidden [B, T, C] predicts labels shifted by one."""
    target = labels[:, 1:]
    keep = target != IGNORE
    h = hidden[:, :-1][keep]
    t = target[keep]
    w = model.lm_head.weight
    if torch.is_autocast_enabled(h.device.type):
        dt = torch.get_autocast_dtype(h.device.type)
        h, w = h.to(dt), w.to(dt)
    if w.requires_grad:  # a trainable head (not LoRA's case): take the plain path
        logits = (h @ w.t()).float()
        return torch.nn.functional.cross_entropy(logits, t, reduction="sum"), int(t.numel())
    return _HeadCrossEntropy.apply(h, w, t, chunk), int(t.numel())


def shared_prefix_length(ids: torch.Tensor) -> int:
    """How many leading tokens every row of the batch has in common (the system turn, at least)."""
    same = (ids == ids[:1]).all(0)
    return int(same.cumprod(0).sum())


# Shortest common prefix worth packing for: rows of other chat data may share a few tokens by chance, which
# would save less than the packing's copies cost. Any value gives the same numbers; the system turn is ~93.
MIN_SHARED_PREFIX = 16


def share_prefix_default(device: torch.device) -> bool:
    """Compute a batch's shared prefix once (trainer.batch_hidden)? On a CPU, yes: 1.5-1.6x faster
    (bench/results/cpu.md). On CUDA, no: the packed layout's masked attention and its copies made
    steps ~1.8x slower than running rows whole on an H100 (bf16 6,851 vs 12,408 tokens/s,
    bench/results/cuda.md), where a step of this small model is bound by kernel launches, not FLOPs."""
    return device.type != "cuda"


def batch_hidden(model: Llama, ids: torch.Tensor, share_prefix: bool | None = None) -> torch.Tensor:
    """Final hidden states [B, T, C] for a right-padded batch.

    Every MedQuAD row starts with the same ~93-token system turn: 43% of an average row. With
    `share_prefix`, the model computes that prefix once per batch instead of once per row
    (Llama.forward's `shared_prefix`): the same numbers as running every row whole (causal
    attention: a prefix position never sees what follows it), for a third fewer FLOPs at batch 8
    (0.516 -> 0.345 GFLOP per real token on the bench's MedQuAD batches).
    With LoRA dropout the prefix's positions draw one mask for the batch rather than one per row.
    `share_prefix=None`: the device's default (share_prefix_default).
    """
    if share_prefix is None:
        share_prefix = share_prefix_default(ids.device)
    return model(ids, hidden_only=True, shared_prefix=prefix_to_share(ids) if share_prefix else 0)


def prefix_to_share(ids: torch.Tensor) -> int:
    """The prefix batch_hidden computes once for `ids` (0: none worth it). Rows keep >= 1 own token."""
    B, T = ids.shape
    P = min(shared_prefix_length(ids), T - 1) if B > 1 else 0
    return P if P >= MIN_SHARED_PREFIX else 0


def batch_loss(model: Llama, ids: torch.Tensor, labels: torch.Tensor, precision: str,
               share_prefix: bool | None = None) -> tuple[torch.Tensor, int]:
    device = ids.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        hidden = batch_hidden(model, ids, share_prefix)
        return head_loss(model, hidden, labels)


def compile_blocks(model: Llama, cuda_graphs: bool = False) -> None:
    """`--compile`: torch.compile every transformer block in place (names and state_dict keys unchanged).

    Inductor fuses each block's elementwise chain (norms, rotary, SwiGLU, residuals, LoRA's adds) and
    picks what to keep for the backward pass itself; the matmuls and attention stay the same kernels.
    Measured on 2 CPU cores, 8 x <=256-token MedQuAD batches (the bench's `compile` rows, two runs):
    fp32 +9-12% tokens/s and peak memory 4.2-4.5 -> 2.8 GB; bf16 +14-16%, 2.5 -> 1.9 GB (the eager
    step's peak grows with heap fragmentation; the compiled one allocates fewer, larger buffers). Since
    eager training writes LoRA's and the norms' backward out, the speed gain is ~0-2%; the memory one stays.
    Costs ~30 s of compiling at the first step (and once more for the first no-grad validation).
    `dynamic=True`: batch lengths vary, one graph serves them all; the 30 blocks share it. Same loss
    and gradients as eager within fp32 rounding (tests/test_fastpath.py).
    `cuda_graphs`: on a GPU, each block's compiled forward and backward also replay as CUDA graphs
    (inductor's cudagraph trees): an H100 step of this model is bound by launching small kernels
    (bench/results/cuda.md). A graph is recorded per distinct shape, so batches should repeat theirs
    (pad_to_multiple). On an H200 (torch 2.11, session 18) it crashed: a segmentation fault in a compiled
    block's first backward, and a C++ (CPU) kernel compiled into a block's graph
    (bench/results/cuda-graphs-probe-h200-s18.md); not yet understood, so train.py does not offer it.
    """
    for block in model.model.layers:
        block.compile(dynamic=True, options={"triton.cudagraphs": cuda_graphs})


def pad_to_multiple(ids: torch.Tensor, labels: torch.Tensor, pad_id: int, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch to a length that is a multiple of `multiple`: a few shapes that repeat, as CUDA
    graphs need. The same loss and gradients (real tokens never attend to the padding after them)."""
    extra = -ids.shape[1] % multiple
    if extra == 0:
        return ids, labels
    return (torch.nn.functional.pad(ids, (0, extra), value=pad_id),
            torch.nn.functional.pad(labels, (0, extra), value=IGNORE))


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A batch tensor onto the training device. On CUDA through pinned (page-locked) host memory with a
    non-blocking copy: the copy is queued on the stream and the host goes on launching the step's
    kernels instead of waiting for it. (A batch is ~100 KB of token ids here, so this is about never
    stalling the host, not bandwidth; not yet measured on a GPU.)"""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def supervised_tokens(micro: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(int((lab[:, 1:] != IGNORE).sum()) for _, lab in micro)


def accumulate_gradients(model: Llama, micro: list[tuple[torch.Tensor, torch.Tensor]], precision: str,
                         device, n_sup: int | None = None, dist: Dist = SINGLE,
                         share_prefix: bool | None = None) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step, normalised by the step's total
    supervised tokens (not per micro-batch, which would over-weight short examples).
    Data parallel: `n_sup` is the step's count over *all* ranks, and the gradients are summed
    over ranks once, after the last micro-batch, so every rank ends up holding exactly the
    gradient one process would compute on the union of the ranks' rows.
    Returns (mean loss per supervised token, number of supervised tokens)."""
    if n_sup is None:
        n_sup = supervised_tokens(micro)
    total = 0.0
    for ids, labels in micro:
        loss, _ = batch_loss(model, to_device(ids, device), to_device(labels, device), precision, share_prefix)
        (loss / max(n_sup, 1)).backward()
        total = total + loss.detach()  # summed on the device: one host sync per step, not per micro-batch
    total = float(total)
    if dist.active:
        total = dist.sum_gradients([p for p in model.parameters() if p.requires_grad], total)
    return total / max(n_sup, 1), n_sup


@torch.no_grad()
def evaluate_loss(model: Llama, examples: list[Example], batch_size: int, pad_id: int, precision: str,
                  device, dist: Dist = SINGLE, share_prefix: bool | None = None) -> float:
    """Mean loss per supervised token over `examples` (length-sorted batches, no padding waste).
    Data parallel: rank r evaluates batches r, r + world_size, ... and the loss sums and token
    counts are all-reduced, so every rank gets the token-weighted mean over all of `examples`."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    total, count = 0.0, 0
    for rows in batches[dist.rank::dist.world_size]:
        ids, labels = collate([examples[i] for i in rows], pad_id)
        loss, n = batch_loss(model, to_device(ids, device), to_device(labels, device), precision, share_prefix)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    total, count = dist.sum_floats(total, count)
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------
# Schedule, plot, records
# ---------------------------------------------------------------------------------------------
def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def plot_losses(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["loss"]) for r in recs if r["kind"] == "train" and r.get("loss") is not None]
    va = [(r["step"], r["val_loss"]) for r in recs if r["kind"] == "val"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train (per step)", alpha=0.5, lw=1)
        k = max(1, len(tr) // 20)  # a moving average makes the trend readable
        sm = [sum(x for _, x in tr[max(0, i - k + 1):i + 1]) / len(tr[max(0, i - k + 1):i + 1]) for i in range(len(tr))]
        ax.plot([s for s, _ in tr], sm, label=f"train (mean of {k})", lw=2)
    if va:
        ax.plot(*zip(*va), "o-", label="validation", lw=2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per supervised token")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("medlora LoRA fine-tuning")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def batch_stream(lengths: list[int], batch_size: int, seed: int, epoch: int, pos: int):
    """Endless (epoch, position, batch) from a given data position; each epoch's order is a
    function of (seed, epoch) only, so a resumed run sees exactly the same batches."""
    while True:
        batches = bucketed_batches(lengths, batch_size, seed + epoch)
        for i in range(pos, len(batches)):
            yield epoch, i, batches[i]
        epoch, pos = epoch + 1, 0


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def _trim_metrics(path: Path, step: int) -> None:
    """Keep only the records up to `step`, so a resumed run's log reads like one run. A line cut
    short by a killed process is dropped rather than failing the resume; the rewrite goes through
    a temporary file, so a kill right now cannot lose the records either."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec["step"] <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _check_resumable(c: dict, cfg: TrainConfig, dist: Dist, path: Path) -> None:
    """Refuse a resume that would silently become a different run: the data order is a function
    of the global batch (batch size x processes), the seed and the accumulation."""
    saved_world = c.get("world_size", 1)
    if saved_world != dist.world_size:
        how = ("plain `python train.py`" if saved_world == 1
               else f"`torchrun --nproc-per-node ...` with {saved_world} processes in all")
        raise ConfigError(f"--resume: {path} was written by a run of {saved_world} process(es) and this run has "
                          f"{dist.world_size}; the data order depends on it, so resume with {how}")
    old = c.get("train_config", {})
    changed = [f"--{k.replace('_', '-')} {old[k]} (now {getattr(cfg, k)})"
               for k in ("batch_size", "grad_accum", "seed") if k in old and old[k] != getattr(cfg, k)]
    if changed:
        raise ConfigError(f"--resume: {path} was written with {', '.join(changed)}; these fix the data order, "
                          f"so resume with the values the run started with")


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the LoRA weights, fused: one kernel over all of them per step. Unfused, a CPU runs
    ~10 small ops for each of the 420 tensors (2 cores: 29 -> 8 ms a step, measured); CUDA's default
    (foreach) is also beaten by fused, per PyTorch's docs. The same update within float rounding, and
    what transformers' Trainer uses by default on torch >= 2.8 (adamw_torch_fused)."""
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), fused=fused)


def train(model: Llama, ds: Dataset, cfg: TrainConfig, lora_cfg: LoRAConfig, run_dir: Path, pad_id: int,
          base_model_id: str, adapter_extra: dict | None = None, resume: bool = False,
          device: torch.device = torch.device("cpu"), log=print, on_step=None, dist: Dist = SINGLE) -> dict:
    """Train the LoRA weights of `model`. In a torchrun job every rank calls this with its `dist`;
    `cfg.batch_size` is then per rank and a step sees batch_size x world_size rows."""
    main = dist.is_main
    say = log if main else (lambda *a, **k: None)
    note = tqdm.write if main else (lambda *a, **k: None)
    metrics_path, ckpt_path = run_dir / "metrics.jsonl", run_dir / "checkpoint.pt"
    params = lora_parameters(model)
    if not params:
        raise ConfigError("no LoRA parameters to train (inject LoRA first)")
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.compile:
        compile_blocks(model)
    opt = make_optimizer(params, cfg.lr, cfg.weight_decay)
    lengths = [len(e.ids) for e in ds.train]
    global_batch = cfg.batch_size * dist.world_size  # rows per micro-batch, over all ranks
    steps_per_epoch = math.ceil(len(bucketed_batches(lengths, global_batch, 0)) / cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg))
    if cfg.warmup_steps >= total and not resume:
        say(f"[medlora] warning: --warmup-steps {cfg.warmup_steps} >= the run's {total} steps: the learning rate "
            f"never reaches --lr")
    val = sample_rows(ds.val, cfg.val_rows, cfg.seed)  # a seeded sample of the held-out rows, not the file's head
    state = {"step": 0, "epoch": 0, "pos": 0, "best_val": float("inf"), "best_step": 0, "bad_evals": 0,
             "tokens": 0, "supervised": 0, "elapsed": 0.0, "stopped_early": False}
    torch.manual_seed(cfg.seed + dist.rank)  # ranks draw different dropout masks

    def check_storage() -> str | None:  # fail now rather than at the first save, maybe hours in
        run_dir.mkdir(parents=True, exist_ok=True)
        adapter_bytes = sum(p.numel() * p.element_size() for p in params)
        return ckpt.check_free_space(run_dir, ckpt.estimate_bytes(params), adapter_bytes)

    try:
        warning = dist.on_main(check_storage)
    except OSError as e:
        raise ckpt.CheckpointError(f"{run_dir}: cannot create the run folder ({e.strerror or e})") from None
    if warning:
        say(f"[medlora] warning: {warning}")
    saved_step: int | None = None  # the step of the newest checkpoint on disk, for the NaN message

    if resume:
        c = dist.on_main(lambda: ckpt.load(ckpt_path))  # one reader: other nodes need no shared disk
        _check_resumable(c, cfg, dist, ckpt_path)
        with torch.no_grad():
            for name, m in lora_modules(model).items():
                m.lora_A.weight.copy_(c["lora"][f"base_model.model.{name}.lora_A.weight"])
                m.lora_B.weight.copy_(c["lora"][f"base_model.model.{name}.lora_B.weight"])
        opt.load_state_dict(c["optimizer"])
        sched.load_state_dict(c["scheduler"])
        rngs = c.get("rng_ranks") or [c["rng"]]
        ckpt.set_rng_state(rngs[dist.rank] if len(rngs) == dist.world_size else c["rng"])
        state.update(c["state"])
        saved_step = state["step"]
        if state["stopped_early"]:
            was = c.get("train_config", {}).get("patience")
            if cfg.patience and (was is None or cfg.patience <= was):
                say(f"[medlora] this run stopped early at step {state['step']} (no better validation in {was} "
                    f"evaluations); nothing to do: raise --patience (or 0) to train on")
                total = state["step"]
            else:
                state["stopped_early"] = False
        if state["step"] >= total and not state["stopped_early"]:
            say(f"[medlora] the run is already at step {state['step']} of {total}: nothing to train "
                f"(raise --max-steps or --epochs to train on)")
        if main and metrics_path.exists():
            _trim_metrics(metrics_path, state["step"])
        say(f"[medlora] resumed from {ckpt_path} at step {state['step']}")
    else:
        dist.broadcast_tensors(params)  # every rank starts from rank 0's LoRA weights
        if main and metrics_path.exists():
            metrics_path.unlink()

    def save_checkpoint() -> None:
        nonlocal saved_step
        rngs = dist.gather(ckpt.rng_state())  # every rank's RNG, so dropout resumes exactly too
        dist.on_main(lambda: ckpt.save_atomic(
            {"lora": adapter_state_dict(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": ckpt.rng_state(), "rng_ranks": rngs, "world_size": dist.world_size, "state": dict(state),
             "train_config": asdict(cfg), "lora_config": asdict(lora_cfg)}, ckpt_path))
        saved_step = state["step"]

    def write(fn, what: Path) -> None:
        """A file write on rank 0 whose failure (a full disk) stops every rank with exit 4 and the path,
        rather than a traceback on one rank while the others wait in the next collective."""
        try:
            dist.on_main(fn)
        except OSError as e:
            kept = f"; the last checkpoint, {ckpt_path} (step {saved_step}), is kept" if saved_step is not None else ""
            raise ckpt.CheckpointError(f"cannot write {what}: {e.strerror or e}{kept}") from None

    def record(**rec) -> None:
        def append() -> None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        write(append, metrics_path)

    stop_signal: list[str] = []

    def on_signal(signum, _frame):
        stop_signal.append(signal.Signals(signum).name)

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    stream = batch_stream(lengths, global_batch, cfg.seed, state["epoch"], state["pos"])
    model.train()
    bar = tqdm(total=total, initial=state["step"], desc="train", unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30, disable=not main)
    if val and state["step"] == 0 and "base_val" not in state:
        # Step 0 = the model before any update (B = 0): the baseline every later number is read against.
        v0 = evaluate_loss(model, val, cfg.batch_size, pad_id, cfg.precision, device, dist, cfg.share_prefix)
        state["base_val"] = v0
        record(kind="val", step=0, val_loss=v0, val_ppl=math.exp(min(v0, 50)))
        note(f"step 0 (base model): val loss {v0:.4f} (ppl {math.exp(min(v0, 50)):.2f}) on {len(val)} rows")
    t0 = time.time() - state["elapsed"]
    window: list[tuple[float, int]] = []
    interrupted = False
    try:
        while state["step"] < total:
            # Stop at the same step on every rank: one stopping alone would leave the others waiting
            # in the next all-reduce. (One process: just "did a signal arrive?")
            if dist.any(bool(stop_signal)):
                interrupted = True
                break
            micro, mine_all = [], []
            for _ in range(cfg.grad_accum):
                epoch, pos, rows = next(stream)
                mine = dist.shard(rows)  # this rank's rows of the global batch (all of it in one process)
                mine_all += mine  # (real tokens come from the lengths: the pad id is also <|im_end|>'s id)
                if mine:
                    micro.append(collate([ds.train[i] for i in mine], pad_id))
                state["epoch"], state["pos"] = epoch, pos + 1
            # The step's supervised tokens over all ranks (the loss divisor) and real tokens (for tok/s).
            n_sup, n_tok = dist.sum_ints(supervised_tokens(micro), sum(lengths[i] for i in mine_all))
            step_t = time.time()
            loss_val, n_sup = accumulate_gradients(model, micro, cfg.precision, device, n_sup, dist, cfg.share_prefix)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
            # Loss and gradients are all-reduced, so every rank takes the same branch here.
            finite = math.isfinite(loss_val) and math.isfinite(grad_norm)
            if not finite and cfg.nan_policy == "stop":
                opt.zero_grad(set_to_none=True)
                kept = (f"the last good checkpoint, {ckpt_path} (step {saved_step}), is kept"
                        if saved_step is not None else "no checkpoint had been saved yet")
                raise FloatingPointError(f"loss/gradient is not finite at step {state['step'] + 1} "
                                         f"(loss={loss_val}, grad_norm={grad_norm}); {kept}. Lower --lr "
                                         f"and start again, or continue past bad batches with --on-nan skip "
                                         f"(plus --resume to continue from the checkpoint).")
            lr = sched.get_last_lr()[0]  # the rate this step uses (the scheduler then moves to the next one)
            if finite:
                opt.step()
            else:  # --on-nan skip: no update, but the step still counts, evaluates and saves on schedule
                say(f"[medlora] step {state['step'] + 1}: non-finite loss, batch skipped")
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            state["tokens"] += n_tok if finite else 0
            state["supervised"] += n_sup if finite else 0
            state["elapsed"] = time.time() - t0
            window = (window + [(time.time() - step_t, n_tok)])[-20:]
            tps = sum(n for _, n in window) / max(sum(t for t, _ in window), 1e-9)
            record(kind="train", step=state["step"], loss=loss_val if finite else None, lr=lr,
                   grad_norm=grad_norm if finite else None, tokens=state["tokens"], supervised=state["supervised"],
                   tok_per_s=tps, elapsed=state["elapsed"], **({} if finite else {"skipped": True}))
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:.0f}",  # (no best before the first evaluation)
                            best_val=f"{state['best_val']:.3f}" if math.isfinite(state["best_val"]) else "–")

            last = state["step"] == total
            if val and (state["step"] % cfg.eval_every == 0 or last):
                v = evaluate_loss(model, val, cfg.batch_size, pad_id, cfg.precision, device, dist, cfg.share_prefix)
                record(kind="val", step=state["step"], val_loss=v, val_ppl=math.exp(min(v, 50)))
                if v < state["best_val"]:
                    state.update(best_val=v, best_step=state["step"], bad_evals=0)
                    write(lambda: save_adapter(model, run_dir / "best_adapter", lora_cfg, base_model_id,
                                               {**(adapter_extra or {}), "step": state["step"], "val_loss": v}),
                          run_dir / "best_adapter")
                else:
                    state["bad_evals"] += 1
                note(f"step {state['step']}: val loss {v:.4f} (ppl {math.exp(min(v, 50)):.2f}), "
                     f"best {state['best_val']:.4f} @ {state['best_step']}")
                if cfg.patience and state["bad_evals"] >= cfg.patience:
                    state["stopped_early"] = True
                    note(f"early stop: no improvement in {cfg.patience} evaluations")
                    save_checkpoint()
                    break
                write(lambda: plot_losses(metrics_path, run_dir / "loss.png"), run_dir / "loss.png")
            if state["step"] % cfg.save_every == 0 or last:
                save_checkpoint()
            if on_step is not None:  # tests and tools hook in here (e.g. to interrupt a run)
                on_step(state)
        if interrupted:
            save_checkpoint()
            why = stop_signal[0] if stop_signal else "a signal on another rank"
            say(f"\n[medlora] {why}: checkpoint saved at step {state['step']}; "
                f"resume with the same command plus --resume")
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    def finish() -> None:
        save_adapter(model, run_dir / "adapter", lora_cfg, base_model_id,
                     {**(adapter_extra or {}), "step": state["step"]})
        plot_losses(metrics_path, run_dir / "loss.png")

    write(finish, run_dir / "adapter")
    return {**state, "total_steps": total, "interrupted": interrupted, "minutes": state["elapsed"] / 60,
            "world_size": dist.world_size, "rows_per_step": global_batch * cfg.grad_accum}
