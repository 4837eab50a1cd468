"""megatron-core's ``SplitAlongDim`` -> :func:`~megatron_eagle.models.qkv_split.split_along_dim` when
transformer-engine's is absent.

megatron splits the fused qkv with transformer-engine's copy-free ``SplitAlongDim`` when TE is
installed and with ``torch.split`` (a concatenation in the backward) otherwise: this fills that gap.
"""

from __future__ import annotations

import megatron.core.transformer.attention as megatron_attention

from megatron_eagle.models.qkv_split import split_along_dim
from megatron_eagle.patches.targets import require

TARGETS = ("megatron.core.transformer.attention:SplitAlongDim",)


def check() -> None:
    require(*TARGETS)


def install() -> None:
    if megatron_attention.SplitAlongDim is None:
        megatron_attention.SplitAlongDim = split_along_dim
