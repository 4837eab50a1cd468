"""Pixel shuffle (ratio 0.5) and the MLP connector (`mlp1` of Eagle 2.5)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_eagle.models.linear import BiasInGemmColumnParallelLinear


def pixel_shuffle(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """[n, g, g, C] patch grid -> [n, g*r, g*r, C/r²]: each 2×2 block of patches becomes one token.

    Output token (i, j) holds channels ordered (dy, dx, c) of the input patches
    (2i+dy, 2j+dx), which is the channel order of InternVL/Eagle's pixel shuffle (v2).
    """
    n, g, g2, c = x.shape
    k = int(round(1 / ratio))
    assert g == g2 and g % k == 0, f"patch grid {g}x{g2} does not shuffle by {k}"
    x = x.reshape(n, g // k, k, g // k, k, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, g // k, g // k, k * k * c)


class MLPConnector(MegatronModule):
    """LayerNorm(4C) -> Linear(4C, H) -> GELU -> Linear(H, H), tensor-parallel (column, row)."""

    def __init__(self, config: TransformerConfig, in_features: int, hidden_size: int, eps: float = 1e-5):
        # Visual tokens are few and not sequence-sharded: plain TP without SP here.
        cfg = copy.copy(config)
        cfg.sequence_parallel = False
        super().__init__(config=cfg)
        self.norm = torch.nn.LayerNorm(in_features, eps=eps, dtype=cfg.params_dtype)
        init = lambda w: torch.nn.init.normal_(w, std=cfg.init_method_std)  # noqa: E731
        self.fc1 = BiasInGemmColumnParallelLinear(in_features, hidden_size, config=cfg, init_method=init, bias=True,
                                                  gather_output=False, skip_bias_add=False)
        self.fc2 = RowParallelLinear(hidden_size, hidden_size, config=cfg, init_method=init, bias=True,
                                     input_is_parallel=True, skip_bias_add=False)
        for b in (self.fc1.bias, self.fc2.bias):
            torch.nn.init.zeros_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.fc1(self.norm(x))
        x, _ = self.fc2(F.gelu(x))
        return x
