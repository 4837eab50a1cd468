"""LayerNorm / RMSNorm for megatron ModuleSpecs that also works with sequence parallelism.

megatron-core's torch fallback refuses sequence parallelism; the only thing SP needs from
a norm is that its params are marked ``sequence_parallel`` so their gradients are
all-reduced across TP (each rank sees only its share of the sequence).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class Norm:
    """Factory with the signature megatron's specs expect; returns a torch norm module."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        kind = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
        norm = kind(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)
        return norm
