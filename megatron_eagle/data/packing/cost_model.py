"""Compute cost of a packed sub-sample, in training FLOPs, derived from the model config.

A pack's cost is the sum over its sub-samples of

    per_token * length  +  per_len2 * length**2  +  per_tile * tiles

- ``per_token``: the matmuls every LLM token passes through (QKV/O projections, SwiGLU MLP,
  LM head) plus the connector share, 2 FLOPs per multiply-add, times the training multiplier.
- ``per_len2``: causal self-attention inside one sub-sample (QK^T and AV, half the square
  because of the causal mask), summed over layers. Packed attention is per sub-sample, so a
  pack of many short samples is much cheaper than one long sample of the same token count.
- ``per_tile``: one SigLIP forward over a 448 px tile (patch embedding, matmuls and
  bidirectional attention over its 1024 patches) and the connector MLP over its 256 tokens.

Training multipliers: a trainable module costs 3x its forward (forward + input grads + weight
grads). A frozen module still needs input grads when something before it trains (2x for its
matmuls; attention has no weights, so 3x); a frozen module with nothing trainable before it
runs forward only (1x). Elementwise work (norms, RoPE, softmax, cross-entropy) is left out.

Cost units are FLOPs; :meth:`CostModel.seconds` turns them into time with an assumed achieved
throughput per GPU (default 400 TFLOP/s, about 40% of an H100's dense bf16 peak).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_eagle.config import PRESETS, ConfigError, FreezeConfig, ModelConfig, load_config, preset_model_config

# Achieved model FLOP/s per GPU used to turn cost into seconds: ~40% MFU of H100 dense bf16 (989 TFLOP/s).
DEFAULT_TFLOPS = 400.0


@dataclass(frozen=True)
class CostModel:
    """Linear + quadratic + per-tile cost of one sub-sample, in FLOPs."""

    name: str
    per_token: float
    per_len2: float
    per_tile: float

    def sample_cost(self, length: np.ndarray, tiles: np.ndarray) -> np.ndarray:
        """Cost of each sub-sample (float64); ``length`` is the (padded) token count it occupies."""
        n = np.asarray(length, dtype=np.float64)
        return self.per_token * n + self.per_len2 * n * n + self.per_tile * np.asarray(tiles, dtype=np.float64)

    def seconds(self, cost: np.ndarray | float, gpus: int = 1, tflops: float = DEFAULT_TFLOPS) -> np.ndarray | float:
        """Time for ``cost`` FLOPs spread evenly over ``gpus`` GPUs of one model replica (TP*PP*CP)."""
        return np.asarray(cost, dtype=np.float64) / (gpus * tflops * 1e12)

    def describe(self) -> str:
        return (f"{self.name}: {self.per_token:.3g} FLOP/token + {self.per_len2:.3g} FLOP*len^2 "
                f"+ {self.per_tile:.3g} FLOP/tile")


def _mult(trainable: bool, upstream_trainable: bool, weightless: bool = False) -> float:
    """Forward+backward multiplier of a module (see module docstring)."""
    if trainable:
        return 3.0
    if upstream_trainable:
        return 3.0 if weightless else 2.0
    return 1.0


def cost_model_from_config(model: ModelConfig, freeze: FreezeConfig | None = None,
                           name: str | None = None) -> CostModel:
    """Derive the coefficients from a model config; ``freeze`` defaults to ``model.freeze``."""
    fz = freeze if freeze is not None else model.freeze
    v, m = model.vision, model.llm
    vit_on, conn_on, llm_on = not fz.vision, not fz.connector, not fz.llm

    # LLM: matmul parameters touched by every token (GQA: K and V are num_kv_heads wide).
    head_dim = m.hidden_size // m.num_heads
    q_width, kv_width = m.num_heads * head_dim, m.num_kv_heads * head_dim
    attn_w = m.hidden_size * (q_width + 2 * kv_width) + q_width * m.hidden_size
    mlp_w = 3 * m.hidden_size * m.ffn_hidden_size
    llm_matmul = m.num_layers * (attn_w + mlp_w) + m.hidden_size * m.vocab_size
    up_llm = vit_on or conn_on
    per_token = 2.0 * llm_matmul * _mult(llm_on, up_llm)
    # Causal attention forward: QK^T and AV are 2*s^2*d each, halved by the mask.
    per_len2 = 2.0 * m.num_layers * m.num_heads * head_dim * _mult(llm_on, up_llm, weightless=True)

    # Vision encoder per tile, plus the connector over the tile's LLM tokens.
    p = v.patches_per_side ** 2
    vit_layer_w = 4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.ffn_hidden_size
    vit_matmul = p * (v.num_layers * vit_layer_w + 3 * v.patch_size ** 2 * v.hidden_size)
    vit_attn = v.num_layers * 4.0 * p * p * v.hidden_size  # bidirectional: full square
    shuffled = int(v.hidden_size / model.downsample_ratio ** 2)
    conn_matmul = model.tokens_per_tile * (shuffled * m.hidden_size + m.hidden_size ** 2)
    per_tile = (2.0 * vit_matmul * _mult(vit_on, False) + vit_attn * _mult(vit_on, False, weightless=True)
                + 2.0 * conn_matmul * _mult(conn_on, vit_on))
    return CostModel(name or model.preset, per_token, per_len2, per_tile)


# A cost model that only counts tokens: planning with it balances token counts, nothing else.
TOKENS = CostModel("tokens", 1.0, 0.0, 0.0)


def resolve_cost_model(spec: str, freeze: FreezeConfig | None = None) -> CostModel:
    """A cost model from a preset name (``eagle2.5-8b``), ``tokens``, or a model YAML path."""
    if spec == "tokens":
        return TOKENS
    if spec in PRESETS:
        return cost_model_from_config(preset_model_config(spec), freeze, name=spec)
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        cfg = load_config(path)
        return cost_model_from_config(cfg.model, freeze, name=f"{cfg.model.preset}@{path.name}")
    raise ConfigError("cost_model", f"{spec!r} is neither a preset, `tokens`, nor a model YAML file",
                      f"use one of {sorted(PRESETS) + ['tokens']} or a path to a config .yaml")
