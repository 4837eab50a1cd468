"""The model: SigLIP/SigLIP2 vision tower, Qwen2.5/Qwen3 decoder, freezing, and the named presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from megatron_eagle.config.errors import ConfigError


@dataclass
class VisionConfig:
    """SigLIP ViT, or a fixed-resolution SigLIP2 (the same layers; NaFlex SigLIP2 is not supported).

    ``select_layer`` has HF's meaning: -1 = the encoder's output after the post-layernorm; any other
    value = ``hidden_states[select_layer]`` (-4: the output of the 4th-last layer), taken before the
    post-layernorm; the layers after it are not built.
    """

    num_layers: int = 27
    hidden_size: int = 1152
    num_heads: int = 16
    ffn_hidden_size: int = 4304
    patch_size: int = 14
    image_size: int = 448
    layernorm_eps: float = 1e-6
    family: Literal["siglip", "siglip2"] = "siglip"
    select_layer: int = -1

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def layers_used(self) -> int:
        """Encoder layers whose output the features need (``hidden_states[select_layer]``)."""
        n = self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer
        if not 1 <= n <= self.num_layers:
            raise ConfigError("model.vision.select_layer", f"{self.select_layer} selects no encoder layer of "
                              f"{self.num_layers}", f"use -1 (last) to -{self.num_layers}")
        return n

    @property
    def post_layernorm(self) -> bool:
        """HF applies the post-layernorm only to ``last_hidden_state`` (select_layer -1)."""
        return self.select_layer == -1


@dataclass
class LLMConfig:
    """Qwen2.5 or Qwen3 decoder.

    ``vocab_size`` is the true vocabulary (checkpoint / tokenizer). The embedding and output layer
    hold :attr:`padded_vocab_size` rows so tensor parallelism divides them; the padded rows are
    never a prediction (masked in the loss, sliced off the logits) and never exported.
    """

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
    family: Literal["qwen2", "qwen3"] = "qwen2"
    qk_layernorm: bool = False      # Qwen3: RMSNorm over each query/key head before RoPE
    head_dim: Optional[int] = None  # None: hidden_size // num_heads (Qwen3 sets 128)
    # megatron's make_vocab_size_divisible_by: rows are padded to a multiple of lcm(this, tp), which
    # is the same padded size for every power-of-two TP up to it (checkpoints reshard freely).
    make_vocab_size_divisible_by: int = 128

    @property
    def kv_channels(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Rows of the embedding / output layer at tensor parallelism ``tp``."""
        multiple = math.lcm(max(1, self.make_vocab_size_divisible_by), tp)
        return -(-self.vocab_size // multiple) * multiple


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


SIGLIP_SO400M_448 = dict(num_layers=27, hidden_size=1152, num_heads=16, ffn_hidden_size=4304,
                         patch_size=14, image_size=448, layernorm_eps=1e-6)
# google/siglip2-so400m-patch16-512 (fixed resolution): 32x32 patches -> 1024 tokens, 256 after the shuffle.
SIGLIP2_SO400M_512 = dict(SIGLIP_SO400M_448, patch_size=16, image_size=512, family="siglip2")
# google/siglip2-so400m-patch14-448: the current official training recipe's tower.
SIGLIP2_SO400M_448 = dict(SIGLIP_SO400M_448, family="siglip2")
QWEN25_7B = dict(num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4, ffn_hidden_size=18944,
                 vocab_size=152064, rope_theta=1e6, rms_eps=1e-6, qkv_bias=True, tie_embeddings=False)
QWEN3_8B = dict(num_layers=36, hidden_size=4096, num_heads=32, num_kv_heads=8, ffn_hidden_size=12288,
                vocab_size=151936, rope_theta=1e6, rms_eps=1e-6, qkv_bias=False, tie_embeddings=False,
                max_position_embeddings=40960, family="qwen3", qk_layernorm=True, head_dim=128)
# Tiny ViTs for CPU tests. 112 px tiles of 14 px patches: 8x8 patches -> 4x4 = 16 tokens/tile;
# the SigLIP2 patch16 one: 128 px tiles of 16 px patches, the same 16 tokens/tile.
_TINY_VIT = dict(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64, patch_size=14, image_size=112,
                 layernorm_eps=1e-6)
_TINY_LLM = dict(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=128, vocab_size=512,
                 rope_theta=10000.0, rms_eps=1e-6, qkv_bias=True, tie_embeddings=False, max_position_embeddings=8192)

PRESETS: dict[str, dict[str, Any]] = {
    # The released nvidia/Eagle2.5-8B: SigLIP2-so400m-patch16-512 + Qwen2.5-7B.
    "eagle2.5-8b": dict(vision=SIGLIP2_SO400M_512, llm=QWEN25_7B),
    # The official training scripts' current recipe: SigLIP2-so400m-patch14-448 + Qwen3-8B.
    "eagle2.5-qwen3-8b": dict(vision=SIGLIP2_SO400M_448, llm=QWEN3_8B),
    "eagle2.5-2b": dict(
        vision=SIGLIP_SO400M_448,
        llm=dict(num_layers=28, hidden_size=1536, num_heads=12, num_kv_heads=2, ffn_hidden_size=8960,
                 vocab_size=151936, rope_theta=1e6, rms_eps=1e-6, qkv_bias=True, tie_embeddings=True),
    ),
    # Runs in seconds on a CPU.
    "tiny": dict(vision=_TINY_VIT, llm=_TINY_LLM),
    # Tiny versions of the two 8B layouts (the same layer types and options, CPU-sized).
    "tiny-eagle2.5-8b": dict(vision=dict(_TINY_VIT, patch_size=16, image_size=128, family="siglip2"),
                             llm=_TINY_LLM),
    "tiny-eagle2.5-qwen3-8b": dict(
        vision=dict(_TINY_VIT, num_layers=5, family="siglip2"),
        llm=dict(_TINY_LLM, qkv_bias=False, family="qwen3", qk_layernorm=True, head_dim=24, vocab_size=509),
    ),
}


def preset_model_config(name: str) -> ModelConfig:
    """A ModelConfig for a named preset."""
    if name not in PRESETS:
        raise ConfigError("model.preset", f"unknown preset {name!r}", f"use one of {sorted(PRESETS)}")
    p = PRESETS[name]
    return ModelConfig(preset=name, vision=VisionConfig(**p["vision"]), llm=LLMConfig(**p["llm"]))
