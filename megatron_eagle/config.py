"""Typed configuration: dataclasses, YAML loading, dotted ``--set`` overrides, validation.

Every error names the offending field and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config value is invalid. The message names the field and the fix."""

    def __init__(self, field_name: str, problem: str, fix: str):
        self.field = field_name
        super().__init__(f"config field `{field_name}`: {problem}. Fix: {fix}")


@dataclass
class VisionConfig:
    """SigLIP ViT."""

    num_layers: int = 27
    hidden_size: int = 1152
    num_heads: int = 16
    ffn_hidden_size: int = 4304
    patch_size: int = 14
    image_size: int = 448
    layernorm_eps: float = 1e-6

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class LLMConfig:
    """Qwen2.5 decoder."""

    num_layers: int = 28
    hidden_size: int = 3584
    num_heads: int = 28
    num_kv_heads: int = 4
    ffn_hidden_size: int = 18944
    vocab_size: int = 152064
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6
    qkv_bias: bool = True
    tie_embeddings: bool = False
    max_position_embeddings: int = 131072


@dataclass
class FreezeConfig:
    vision: bool = False
    connector: bool = False
    llm: bool = False


@dataclass
class ModelConfig:
    preset: str = "tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    downsample_ratio: float = 0.5
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    # Attention kernel: auto picks cuDNN's fused SDPA for packed (THD) attention on Hopper with the
    # cudnn-frontend package, else FA2 varlen on GPU, exact per-segment SDPA on CPU; "cudnn" asks
    # for cuDNN explicitly, "flash" for FA2.
    attention_backend: Literal["auto", "sdpa", "flex", "flash", "cudnn"] = "auto"
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    init_std: float = 0.02
    # id of <IMG_CONTEXT>; set from the tokenizer / HF config when a model is loaded.
    image_token_id: int = 5
    # Activation recomputation per module: selective recomputes core attention only.
    recompute_vision: Literal["none", "selective", "full"] = "none"
    recompute_llm: Literal["none", "selective", "full"] = "none"

    @property
    def tokens_per_tile(self) -> int:
        return int(self.vision.patches_per_side ** 2 * self.downsample_ratio ** 2)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sp: bool = False
    cp_variant: Literal["ring", "allgather", "ulysses", "hybrid"] = "allgather"
    # hybrid only: Ulysses degree U inside a node (cp = U x ring); 0 = gcd(heads per TP rank, cp), capped per node
    cp_ulysses: int = 0


@dataclass
class LossConfig:
    # "sqrt": Eagle 2.5 per-sub-sample weights w = (1/sqrt n_i) / sum_j sqrt n_j per pack.
    # "token": plain mean over supervised tokens.
    weighting: Literal["sqrt", "token"] = "sqrt"
    chunk_tokens: int = 2048  # tokens per chunk of the chunked cross-entropy


@dataclass
class EagleConfig:
    """Top-level config. Sections other than model/parallel/loss belong to later stages."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 1234


# ----------------------------------------------------------------------------- presets

SIGLIP_SO400M_448 = dict(num_layers=27, hidden_size=1152, num_heads=16, ffn_hidden_size=4304,
                         patch_size=14, image_size=448, layernorm_eps=1e-6)

PRESETS: dict[str, dict[str, Any]] = {
    "eagle2.5-8b": dict(
        vision=SIGLIP_SO400M_448,
        llm=dict(num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4, ffn_hidden_size=18944,
                 vocab_size=152064, rope_theta=1e6, rms_eps=1e-6, qkv_bias=True, tie_embeddings=False),
    ),
    "eagle2.5-2b": dict(
        vision=SIGLIP_SO400M_448,
        llm=dict(num_layers=28, hidden_size=1536, num_heads=12, num_kv_heads=2, ffn_hidden_size=8960,
                 vocab_size=151936, rope_theta=1e6, rms_eps=1e-6, qkv_bias=True, tie_embeddings=True),
    ),
    # Runs in seconds on a CPU. 112 px tiles of 14 px patches: 8x8 patches -> 4x4 = 16 tokens/tile.
    "tiny": dict(
        vision=dict(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64, patch_size=14,
                    image_size=112, layernorm_eps=1e-6),
        llm=dict(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                 vocab_size=512, rope_theta=10000.0, rms_eps=1e-6, qkv_bias=True, tie_embeddings=False,
                 max_position_embeddings=8192),
    ),
}


def preset_model_config(name: str) -> ModelConfig:
    """A ModelConfig for a named preset."""
    if name not in PRESETS:
        raise ConfigError("model.preset", f"unknown preset {name!r}", f"use one of {sorted(PRESETS)}")
    p = PRESETS[name]
    return ModelConfig(preset=name, vision=VisionConfig(**p["vision"]), llm=LLMConfig(**p["llm"]))


# ----------------------------------------------------------------------------- (de)serialisation

def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(name, f"expected a mapping, got {value!r}", "give a YAML mapping")
        return from_dict(tp, value, prefix=name)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(name, f"{value!r} is not allowed", f"use one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"expected a list, got {value!r}", "give a YAML list")
        return [_coerce(v, inner, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(name, f"expected true/false, got {value!r}", "write true or false")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(name, f"expected an integer, got {value!r}", "write a whole number")
        return int(value)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"expected a number, got {value!r}", "write a number such as 1e-4") from None
    if tp is str:
        return str(value)
    return value


def from_dict(cls, data: dict[str, Any], prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys by name."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (data or {}).items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(path, "unknown field", f"remove it or use one of {sorted(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override has no '='", "write --set section.key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"`{p}` is not a section", "override a leaf field")
        node[parts[-1]] = _parse_scalar(raw)
    return data


def _merge_preset(data: dict[str, Any]) -> dict[str, Any]:
    """Expand ``model.preset`` into full vision/llm sections; explicit keys win."""
    model = data.get("model") or {}
    name = model.get("preset", "tiny")
    base = to_dict(preset_model_config(name))
    for section in ("vision", "llm"):
        base[section].update(model.get(section) or {})
    merged = {**base, **{k: v for k, v in model.items() if k not in ("vision", "llm")}}
    merged["vision"], merged["llm"] = base["vision"], base["llm"]
    data = dict(data)
    data["model"] = merged
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls=EagleConfig):
    """Load a config from YAML (safe loader) plus overrides, expand presets, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(str(path), "top level is not a mapping", "write `key: value` pairs")
    data = apply_overrides(data, list(overrides or []))
    if "model" in {f.name for f in dataclasses.fields(cls)}:
        data = _merge_preset(data)
    cfg = from_dict(cls, data)
    if isinstance(cfg, EagleConfig):
        validate(cfg)
    return cfg


def validate(cfg: EagleConfig, world_size: Optional[int] = None) -> None:
    """Check that the model fits the parallel layout; raise ConfigError naming the fix."""
    m, p = cfg.model, cfg.parallel
    for name in ("tp", "pp", "cp"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name}", "must be >= 1", f"set parallel.{name}=1 or more")
    if m.vision.image_size % m.vision.patch_size:
        raise ConfigError("model.vision.image_size", "not a multiple of patch_size",
                          f"use a multiple of {m.vision.patch_size}")
    side = m.vision.patches_per_side
    if abs(side * m.downsample_ratio - round(side * m.downsample_ratio)) > 1e-9:
        raise ConfigError("model.downsample_ratio", f"{side} patches per side do not shuffle evenly",
                          "use 0.5 with an even patch grid")
    checks = [
        ("model.llm.num_heads", m.llm.num_heads, p.tp),
        ("model.llm.num_kv_heads", m.llm.num_kv_heads, p.tp),
        ("model.vision.num_heads", m.vision.num_heads, p.tp),
        ("model.llm.ffn_hidden_size", m.llm.ffn_hidden_size, p.tp),
        ("model.vision.ffn_hidden_size", m.vision.ffn_hidden_size, p.tp),
    ]
    for fname, value, div in checks:
        if value % div:
            raise ConfigError(fname, f"{value} is not divisible by parallel.tp={div}",
                              f"choose parallel.tp from {[d for d in range(1, value + 1) if value % d == 0 and d <= 8]}")
    if m.llm.num_heads % m.llm.num_kv_heads:
        raise ConfigError("model.llm.num_kv_heads", "does not divide num_heads", "use a divisor of num_heads")
    if m.llm.num_layers % p.pp:
        raise ConfigError("model.llm.num_layers", f"{m.llm.num_layers} layers not divisible by parallel.pp={p.pp}",
                          f"choose parallel.pp from {[d for d in range(1, m.llm.num_layers + 1) if m.llm.num_layers % d == 0]}")
    if m.llm.vocab_size % p.tp:
        raise ConfigError("model.llm.vocab_size", f"not divisible by parallel.tp={p.tp}",
                          "pad the vocabulary to a multiple of tp")
    if p.cp > 1:
        ulysses_degree(p, m.llm.num_heads)  # raises ConfigError naming the fix
    if p.sp and p.tp == 1:
        raise ConfigError("parallel.sp", "sequence parallel needs tp > 1", "set parallel.sp=false or parallel.tp>1")
    if world_size is not None:
        mp = p.tp * p.pp * p.cp
        if world_size % mp:
            raise ConfigError("parallel", f"world size {world_size} is not divisible by tp*pp*cp={mp}",
                              f"launch a multiple of {mp} processes or change parallel.tp/pp/cp")
    if m.llm.hidden_size % m.llm.num_heads:
        raise ConfigError("model.llm.hidden_size", "not divisible by num_heads", "use a multiple of num_heads")
    if not math.isfinite(m.init_std) or m.init_std <= 0:
        raise ConfigError("model.init_std", "must be a positive number", "use e.g. 0.02")


CP_VARIANTS = ("ring", "allgather", "ulysses", "hybrid")


def ulysses_degree(parallel: ParallelConfig, num_heads: int, local_gpus: int = 1 << 30) -> int:
    """Ulysses degree U of the configured CP variant (cp = U x ring); raises ConfigError naming the fix.

    ``local_gpus``: GPUs per node, the cap of the automatic hybrid degree (Ulysses stays inside a node).
    """
    cp, v = parallel.cp, parallel.cp_variant
    heads = num_heads // parallel.tp  # query heads per TP rank
    if v not in CP_VARIANTS:
        raise ConfigError("parallel.cp_variant", f"unknown {v!r}", f"use one of {list(CP_VARIANTS)}")
    if parallel.cp_ulysses and v != "hybrid":
        raise ConfigError("parallel.cp_ulysses", f"only used by cp_variant=hybrid (got {v})",
                          "remove it or set parallel.cp_variant=hybrid")
    if v in ("ring", "allgather"):
        return 1
    if v == "ulysses":
        if cp > heads:
            raise ConfigError("parallel.cp_variant", f"ulysses splits heads over cp={cp} ranks but each TP rank has "
                              f"{heads} query heads", "use cp_variant=hybrid (ulysses x ring), ring or allgather")
        return cp
    u = parallel.cp_ulysses
    if u == 0:  # Eagle 2.5's rule: gcd(heads, cp), kept inside a node
        cap = max(1, local_gpus // parallel.tp)
        u = max(d for d in range(1, math.gcd(heads, cp) + 1) if cp % d == 0 and heads % d == 0 and d <= cap)
    if u < 1 or cp % u:
        raise ConfigError("parallel.cp_ulysses", f"{u} does not divide cp={cp}",
                          f"use one of {[d for d in range(1, cp + 1) if cp % d == 0]}")
    if u > heads:
        raise ConfigError("parallel.cp_ulysses", f"{u} > {heads} query heads per TP rank",
                          f"use at most {heads} (a divisor of cp={cp})")
    return u
