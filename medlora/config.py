"""Configuration as plain dataclasses.

`ModelConfig` is read from (and written back to) a Hugging Face `config.json`, so a folder we
export loads in transformers and a folder transformers wrote loads here. Only plain Llama
(SmolLM, SmolLM2, Llama-2-style) is supported; anything else fails loudly rather than loading
weights into the wrong shape.

`LoRAConfig` mirrors PEFT's `LoraConfig` (`r`, `lora_alpha`, `lora_dropout`, `target_modules`,
`use_rslora`), with the targets checked against the seven Llama projections. Left out: DoRA,
per-module rank/alpha patterns, and LoRA on the embedding or the (tied) LM head.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value or flag is invalid; the message names it."""


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    max_position_embeddings: int = 8192
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 2

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("model config: num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a transformers `config.json` dict; refuse architectures we do not implement."""
        arch = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        if arch != "llama" and "LlamaForCausalLM" not in archs:
            raise ConfigError(f"{source}: unsupported architecture model_type={arch!r} "
                              f"architectures={archs}; medlora implements plain Llama (SmolLM/SmolLM2)")
        # transformers >= 5 keeps rope settings in `rope_parameters`; older files use `rope_theta`.
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ConfigError(f"{source}: rope scaling {scaling} is not supported")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ConfigError(f"{source}: attention/MLP biases are not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported (silu only)")
        heads = cfg.get("num_attention_heads")
        if not heads:
            raise ConfigError(f"{source}: missing required field 'num_attention_heads'")
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0]
        try:
            return cls(
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=eos,
                pad_token_id=cfg.get("pad_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:  # a field of the wrong type ("hidden_size": "576x")
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` that transformers' LlamaForCausalLM loads (old and new rope keys both)."""
        d = asdict(self)
        d.update(
            architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
            attention_bias=False, mlp_bias=False, attention_dropout=0.0, initializer_range=0.02,
            rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            use_cache=True, torch_dtype="float32",
        )
        return d


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = parse_targets(self.targets)
        if int(self.rank) <= 0:
            raise ConfigError(f"--rank must be a positive integer, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"--alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in ALL_TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"--targets: unknown module(s) {bad or '(none given)'}; "
                              f"choose from {', '.join(ALL_TARGETS)}, 'all-linear' or 'attention'")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.use_rslora else self.rank)


ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS


def parse_targets(spec: str) -> list[str]:
    """'all-linear' | 'attention' | 'mlp' | comma list of module names."""
    spec = spec.strip()
    if spec in ("all-linear", "all"):
        return list(ALL_TARGETS)
    if spec in ("attention", "attn"):
        return list(ATTENTION_TARGETS)
    if spec == "mlp":
        return list(MLP_TARGETS)
    return [t.strip() for t in spec.split(",") if t.strip()]
