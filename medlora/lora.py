"""LoRA by hand: y = W x + (alpha / r) · B(A(dropout(x))), with W frozen.

`LoRALinear` replaces an `nn.Linear` in place and keeps its weight under the same key
(`...q_proj.weight`), so base checkpoints still load; the adapter adds `lora_A.weight` [r, in]
and `lora_B.weight` [out, r]. B starts at zero, so a fresh adapter changes nothing; A starts
Kaiming-uniform (as PEFT does), so B gets a gradient from step one.

Adapters are saved in PEFT's on-disk format (`adapter_config.json`,
`adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`) so PEFT loads ours
and we load PEFT's. Mirrors torchtune's LoRALinear and minLoRA's one-line merge.

Left out: DoRA, QLoRA (a 4-bit base), per-module ranks, and LoRA on the embedding or the tied LM
head (docs/lora.md says why, with the tests that prove each claim).
"""
from __future__ import annotations

import json
import math
import os
import weakref
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ALL_TARGETS, ATTENTION_TARGETS, ConfigError, LoRAConfig
from .model import written_out_backward
from .weights import readable_by_all

PEFT_PREFIX = "base_model.model."


class AdapterError(RuntimeError):
    """An adapter does not fit the model or is malformed; the message names file and tensor."""


class _LoRAMatmul(torch.autograd.Function):
    """y = x W^T + (x_a A^T) B^T for 2-D x, with W frozen and x_a = dropout(x), gradients written out.

    The same numbers autograd gives for the formula; written by hand for the orientation of LoRA's thin
    matmuls. On a CPU a product whose *output* is thin ([T, out] x [out, r]) runs 2-4x slower than the
    same product transposed ([r, out] x [out, T]), so each is computed with r as its row count:
    dB = (h^T dy)^T, dh = (B^T dy^T)^T. Adds fold into an in-place addmm_. One LoRA layer's forward + backward at a
    training batch's shapes (T=1285, 576 -> 1536): fp32 28.8 -> 27.1 ms (the base alone: 23.5).
    """

    @staticmethod
    def forward(ctx, x, x_a, w, a, b):
        h = (a @ x_a.t()).t()  # [T, r]
        ctx.save_for_backward(x_a, w, a, b, h)
        ctx.same_input = x_a is x  # no dropout: one input, one gradient
        return (x @ w.t()).addmm_(h, b.t())  # in place: addmm() would first copy x W^T into a new output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x_a, w, a, b, h = ctx.saved_tensors
        dh = (b.t() @ dy.t()).t()  # [T, r]
        db = (h.t() @ dy).t() if ctx.needs_input_grad[4] else None
        da = dh.t() @ x_a if ctx.needs_input_grad[3] else None
        dx = dx_a = None
        if ctx.same_input and ctx.needs_input_grad[0]:
            dx = (dy @ w).addmm_(dh, a)
        else:
            dx = dy @ w if ctx.needs_input_grad[0] else None
            dx_a = dh @ a if ctx.needs_input_grad[1] else None
        return dx, dx_a, None, da, db


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout's mask for x, in x's dtype: 0 with probability p, else 1 / (1 - p); x * mask is
    F.dropout(x, p) in training.

    On a CPU the mask comes from 16 random bits per element, four from each 64-bit draw of the generator.
    PyTorch's CPU dropout draws per element (6.3 ms for a [1300, 576] input on 2 cores, ~80% of it in
    the generator), which made LoRA dropout 0.05 cost 24-27% of a training step. The price: p is
    rounded to a multiple of 2^-16 within [2^-16, 1 - 2^-16] (0.05 -> 0.0500031), and the scale follows
    the rounded p. Other devices draw with bernoulli_ (one kernel).
    """
    if x.device.type != "cpu":
        return torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    k = min(max(round(p * 65536), 1), 65535)  # dropped: a uniform 16-bit integer among the lowest k values
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, 2**63 - 1)  # (the top value never comes)
    keep = bits.view(torch.int16)[:n].view(x.shape) >= k - 32768
    return keep.to(x.dtype).mul_(65536 / (65536 - k))


class SharedDropout(nn.Module):
    """LoRA dropout with one mask per input tensor for all the LoRA layers that read it.

    q, k and v project the same normed hidden state, gate and up another: inject_lora gives every LoRA
    layer of a model one SharedDropout, and the layers that read the same tensor in a forward pass get
    the same masked copy (PEFT draws one per layer). 4 masks per block instead of 7, fewer random
    numbers and one backward pass through the mask per input. Each layer's own `training` flag decides
    whether it drops. The last mask is held (not the masked copy, whose graph would keep a forward's
    activations alive): a masked copy already freed, as a checkpointed forward frees it, is made again
    from the mask, so a recomputed forward (--grad-checkpoint) draws as many masks as the first one and
    gets the same ones. A layer that reads the same tensor a second time gets a new mask, as F.dropout would.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self._last: tuple | None = None  # (weakref to the input, its mask, weakref to the masked copy, ids of layers served)

    def forward(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        if self.p == 0 or not layer.training:
            return x
        if torch.compiler.is_compiling():
            # A traced graph has no tensor identities to share by: one mask per layer, drawn in the graph.
            # (Inductor's own dropout made a compiled bf16 step 37% slower at p = 0.05, this 22%; eager 6-13%.)
            return x * dropout_mask(x, self.p)
        if self._last is not None:
            source, mask, masked, served = self._last
            if source() is x and id(layer) not in served:
                served.add(id(layer))
                x_a = masked()
                if x_a is None:
                    x_a = x * mask
                    self._last = (source, mask, weakref.ref(x_a), served)
                return x_a
        mask = dropout_mask(x, self.p)
        x_a = x * mask
        self._last = (weakref.ref(x), mask, weakref.ref(x_a), {id(layer)})
        return x_a

    def train(self, mode: bool = True) -> SharedDropout:
        self._last = None  # nothing held across a switch to eval (or back)
        return super().train(mode)

    def __getstate__(self) -> dict:  # copies and pickles of a model never carry the held mask
        return {**self.__dict__, "_last": None}

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # same Parameter, same key: frozen base
        self.weight.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.dropout = SharedDropout(dropout)  # inject_lora shares one among a model's LoRA layers
        dev = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight)
        # LoRA weights are fp32 masters; they run in the activation dtype (autocast may lower it further).
        # The scaling multiplies B ([out, r]), not the [tokens, out] output: same product, fewer FLOPs.
        x_a = self.dropout(x, self)
        if written_out_backward() and not self.weight.requires_grad:
            return self._train_forward(x, x_a)  # (a base weight someone unfroze takes autograd's path below)
        # The formula as written: inference, compiled blocks (compiled bf16 steps were ~15% slower with
        # the hand-written backward, measured), and a trainable base weight.
        a, b = self._lora_weights(x.dtype)
        return F.linear(x, self.weight) + F.linear(F.linear(x_a, a), b)

    def _lora_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A and scaling * B in `dtype`; the fp32 masters get their gradients back through the cast."""
        return self.lora_A.weight.to(dtype), (self.lora_B.weight * self.scaling).to(dtype)

    def _train_forward(self, x: torch.Tensor, x_a: torch.Tensor) -> torch.Tensor:
        """The same product through _LoRAMatmul, in the dtype F.linear would compute in."""
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        w, (a, b) = self.weight.to(dt), self._lora_weights(dt)
        x2 = x.to(dt).reshape(-1, self.in_features)
        x_a2 = x2 if x_a is x else x_a.to(dt).reshape(-1, self.in_features)
        return _LoRAMatmul.apply(x2, x_a2, w, a, b).view(*x.shape[:-1], self.out_features)

    def delta(self) -> torch.Tensor:
        """scaling · B @ A in float32 (merging in bf16 loses the small update)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        merged = self.weight.float() + self.delta()
        if not torch.isfinite(merged).all():
            raise AdapterError("merge produced NaN/inf; the adapter weights are broken")
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every target projection in a LoRALinear and freeze everything else; return the names."""
    if lora_modules(model):  # (checked before freezing: a second call used to freeze the first LoRA's weights)
        raise AdapterError("the model already has LoRA layers: inject into a model without them (or merge and "
                           "load a fresh copy)")
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    shared = SharedDropout(cfg.dropout)  # one mask per input tensor, whichever layers read it
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in cfg.targets and isinstance(module, nn.Linear):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            layer = LoRALinear(module, cfg.rank, cfg.alpha, cfg.dropout, cfg.use_rslora)
            layer.dropout = shared
            setattr(parent, leaf, layer)
            names.append(name)
    if not names:
        raise AdapterError(f"no module matched the LoRA targets {cfg.targets}")
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def parameter_report(model: nn.Module) -> dict:
    """Trainable (LoRA) parameters per target module and in total, with their share of the model."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    per_target: dict[str, int] = {}
    for name, m in lora_modules(model).items():
        leaf = name.rsplit(".", 1)[-1]
        per_target[leaf] = per_target.get(leaf, 0) + m.lora_A.weight.numel() + m.lora_B.weight.numel()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "share": trainable / max(total, 1), "per_target": per_target}


# ---------------------------------------------------------------------------------------------
# PEFT on-disk format
# ---------------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA tensors under PEFT's on-disk keys."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous().cpu()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous().cpu()
    return out


def peft_config(cfg: LoRAConfig, base_model: str, extra: dict | None = None) -> dict:
    d = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
        "target_modules": sorted(cfg.targets), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "revision": None,
    }
    if extra:
        d["revision"] = extra.get("base_revision")  # PEFT loads the base at this revision
        d["medlora"] = extra  # our provenance (base model hash, run record pointer); PEFT ignores it
    return d


def save_adapter(model: nn.Module, folder: str | os.PathLike, cfg: LoRAConfig, base_model: str,
                 extra: dict | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors (each file atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "adapter_model.safetensors.tmp"
    save_file(adapter_state_dict(model), str(tmp), metadata={"format": "pt"})
    readable_by_all(tmp)
    os.replace(tmp, folder / "adapter_model.safetensors")
    tmp = folder / "adapter_config.json.tmp"
    tmp.write_text(json.dumps(peft_config(cfg, base_model, extra), indent=2))
    os.replace(tmp, folder / "adapter_config.json")


# Where each target sits in a block: PEFT's target_modules may name a module by any suffix of its path.
MODULE_PATHS = {t: f"model.layers.N.{'self_attn' if t in ATTENTION_TARGETS else 'mlp'}.{t}" for t in ALL_TARGETS}


def adapter_targets(spec, cfg_path: Path) -> list[str]:
    """PEFT's target_modules -> medlora's names: "all-linear", a list of names or of path suffixes
    ("self_attn.q_proj"). A regular expression (a string other than "all-linear") is refused."""
    if spec == "all-linear":
        return list(ALL_TARGETS)
    if not isinstance(spec, list) or not spec:
        raise AdapterError(f"{cfg_path}: target_modules {spec!r} is not supported: give a list of module names "
                           f"(of {', '.join(ALL_TARGETS)}) or \"all-linear\"")
    out = []
    for name in spec:
        match = [t for t, path in MODULE_PATHS.items() if isinstance(name, str) and (path == name or path.endswith("." + name))]
        if len(match) != 1:
            raise AdapterError(f"{cfg_path}: target_modules entry {name!r} names none of medlora's LoRA modules "
                               f"({', '.join(ALL_TARGETS)})")
        out.append(match[0])
    return sorted(set(out), key=ALL_TARGETS.index)


def _adapter_config(folder: Path) -> tuple[Path, dict]:
    """(path, parsed adapter_config.json) of a PEFT adapter folder that has both of its files."""
    cfg_path, w_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.exists() or not w_path.exists():
        raise AdapterError(f"{folder}: expected adapter_config.json and adapter_model.safetensors (PEFT format)")
    try:
        return cfg_path, json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path}: invalid JSON ({e})") from None


def read_adapter(folder: str | os.PathLike) -> tuple[LoRAConfig, dict, dict[str, torch.Tensor]]:
    """(LoRAConfig, raw adapter_config, tensors) — safetensors only, never pickle."""
    folder = Path(folder)
    cfg_path, raw = _adapter_config(folder)
    w_path = folder / "adapter_model.safetensors"
    if raw.get("peft_type", "LORA") != "LORA" or raw.get("use_dora"):
        raise AdapterError(f"{cfg_path}: only plain LoRA adapters are supported")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise AdapterError(f"{cfg_path}: per-module rank/alpha patterns are not supported")
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules"):  # LoRA on some layers only
        if raw.get(key) not in (None, [], ""):
            raise AdapterError(f"{cfg_path}: {key} is not supported (medlora puts LoRA on every layer)")
    init = raw.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):  # PiSSA, OLoRA, LoftQ, EVA, CorDA: they also change the base
        raise AdapterError(f"{cfg_path}: init_lora_weights={init!r} is not supported: that initialisation rewrites "
                           "the base weights too, which the adapter file does not carry")
    targets = adapter_targets(raw.get("target_modules"), cfg_path)
    try:
        cfg = LoRAConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]),
                         dropout=float(raw.get("lora_dropout", 0.0)), targets=targets,
                         use_rslora=bool(raw.get("use_rslora", False)))
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{cfg_path}: not a LoRA config medlora can use ({e})") from None
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{w_path}: cannot read safetensors ({e})") from None
    for key, t in tensors.items():  # the rank in the config and in the tensors must agree (checked before any model)
        rank = t.shape[0] if ".lora_A." in key else t.shape[-1] if ".lora_B." in key else None
        if rank is not None and (t.dim() != 2 or rank != cfg.rank):
            raise AdapterError(f"{w_path}: tensor {key} has shape {tuple(t.shape)}, but {cfg_path.name} says r={cfg.rank}")
    return cfg, raw, tensors


def load_adapter(model: nn.Module, folder: str | os.PathLike, merge: bool = False, trainable: bool = False) -> LoRAConfig:
    """Inject LoRA as the adapter describes and load its weights (ours or PEFT's)."""
    cfg, _, tensors = read_adapter(folder)
    if not lora_modules(model):
        inject_lora(model, cfg)
    mods = lora_modules(model)
    clash = _structure_clash(mods, cfg)
    if clash:  # copying the tensors alone would keep the old layers' scale (alpha, rsLoRA) without a word
        raise AdapterError(f"{folder}: the model already has LoRA layers with {clash}; load the adapter into "
                           "a model without LoRA")
    unmerge_lora(model)  # a merged layer holds the old adapter's update in its weight: take it out first
    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight": (m, ab) for n, m in mods.items() for ab in "AB"}
    # PEFT writes keys without the adapter name; strip one if a tool kept it (".lora_A.default.weight").
    tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    where = Path(folder) / "adapter_model.safetensors"
    if missing or unexpected:
        raise AdapterError(f"{where}: adapter does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for key, (m, ab) in expected.items():
            dst = getattr(m, f"lora_{ab}").weight
            if tuple(tensors[key].shape) != tuple(dst.shape):
                raise AdapterError(f"{where}: tensor {key} has shape {tuple(tensors[key].shape)}, the model needs "
                                   f"{tuple(dst.shape)} (an adapter for another base model?)")
            dst.copy_(tensors[key])
            dst.requires_grad_(trainable)
    if merge:
        merge_lora(model)
    return cfg


def _structure_clash(mods: dict[str, LoRALinear], cfg: LoRAConfig) -> str | None:
    """How a model's existing LoRA layers differ from an adapter's config, or None."""
    scaling = cfg.scaling
    have_targets = sorted({n.rsplit(".", 1)[-1] for n in mods})
    diffs = []
    if {m.rank for m in mods.values()} != {cfg.rank}:
        diffs.append(f"rank {sorted({m.rank for m in mods.values()})} (the adapter has r={cfg.rank})")
    if any(not math.isclose(m.scaling, scaling) for m in mods.values()):
        diffs.append(f"scale {sorted({m.scaling for m in mods.values()})} (the adapter's alpha {cfg.alpha:g}"
                     f"{' with rsLoRA' if cfg.use_rslora else ''} gives {scaling:g})")
    if have_targets != sorted(cfg.targets):
        diffs.append(f"targets {','.join(have_targets)} (the adapter has {','.join(sorted(cfg.targets))})")
    return "; ".join(diffs) or None


def adapter_base_mismatch(folder: str | os.PathLike, base_info: dict) -> str | None:
    """Why this adapter must not be applied to the loaded base, or None. An adapter records the
    sha256 of the weights it was trained on; applying it to other weights of the same shape
    would run without error and quietly give a worse model."""
    _, raw = _adapter_config(Path(folder))  # the config is enough: the tensors are read when applied
    want = (raw.get("medlora") or {}).get("base_sha256")  # a GGUF file's sha256, or {file: sha256} of a folder
    have = base_info.get("sha256")
    if want and have and want != have:
        return (f"{folder} was trained on base weights with sha256 {_digest(want)}, but the loaded base "
                f"{base_info.get('id')} has {_digest(have)}; pass the matching --model")
    return None


def _digest(sha) -> str:
    if isinstance(sha, dict):
        return "{" + ", ".join(f"{k}: {v[:12]}..." for k, v in sha.items()) + "}"
    return f"{str(sha)[:12]}..."
