"""Packed (THD) rotary embeddings without a host sync per layer.

megatron-core's unfused THD RoPE (``rope_utils._apply_rotary_pos_emb_thd``, used without
transformer-engine) reads the sub-sample lengths with ``.tolist()`` and loops over them in
Python: two device-to-host syncs per layer (query and key) in every forward. Without context
parallelism the positions are just ``t - cu_seqlens[segment(t)]``, which the GPU computes; the
rotation itself is megatron's own ``_apply_rotary_pos_emb_bshd``, so the results are identical.
With CP > 1 megatron's function runs unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils

_ORIGINAL = rope_utils._apply_rotary_pos_emb_thd


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] position of each token inside its sub-sample, computed on cu_seqlens' device."""
    idx = torch.arange(total, device=cu_seqlens.device)
    cu = cu_seqlens.to(idx.dtype)
    seg = torch.searchsorted(cu[1:], idx, right=True)
    return idx - cu[seg]


def _apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, rotary_interleaved=False, multi_latent_attention=False,
                              mscale=1.0, cp_group=None):
    if cp_group is None or cp_group.size() != 1:
        return _ORIGINAL(t, cu_seqlens, freqs, rotary_interleaved=rotary_interleaved,
                         multi_latent_attention=multi_latent_attention, mscale=mscale, cp_group=cp_group)
    if freqs.size(0) == t.size(0):  # megatron's "exact" case: freqs already hold every packed position
        packed = freqs
    else:
        packed = freqs[packed_positions(cu_seqlens, t.size(0))]
    return rope_utils._apply_rotary_pos_emb_bshd(t.unsqueeze(1), packed, rotary_interleaved=rotary_interleaved,
                                                 multi_latent_attention=multi_latent_attention,
                                                 mscale=mscale).squeeze(1)


def install(enable: bool = True) -> None:
    """Route megatron's unfused THD RoPE through the sync-free version (or back)."""
    rope_utils._apply_rotary_pos_emb_thd = _apply_rotary_pos_emb_thd if enable else _ORIGINAL


install()
