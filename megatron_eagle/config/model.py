"""The model: SigLIP vision tower, Qwen2.5 decoder, freezing, and the named presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_eagle.config.errors import ConfigError


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
    # Activation recomputation per module: selective recomputes core attention only; auto is
    # resolved before step 1 by the memory model (training/memory.py): the cheapest setting
    # predicted to fit the GPU's memory.
    recompute_vision: Literal["auto", "none", "selective", "full"] = "auto"
    recompute_llm: Literal["auto", "none", "selective", "full"] = "auto"
    # The ViT's saved activations kept in pinned host memory during the step (training/setup.py)
    offload_vision: bool = False

    @property
    def tokens_per_tile(self) -> int:
        return int(self.vision.patches_per_side ** 2 * self.downsample_ratio ** 2)


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
