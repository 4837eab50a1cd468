"""Packed (THD) rotary embeddings without a host sync per layer.

megatron-core's unfused THD RoPE (``rope_utils._apply_rotary_pos_emb_thd``, used without
transformer-engine) reads the sub-sample lengths with ``.tolist()`` and loops over them in
Python: two device-to-host syncs per layer (query and key) in every forward. Without context
parallelism the positions are just ``t - cu_seqlens[segment(t)]``, which the GPU computes; the
rotation itself is megatron's own ``_apply_rotary_pos_emb_bshd``, so the results are identical.
On GPUs the same rotation runs as one ``torch.compile``'d kernel per call (cos/sin, rotate-half,
multiply-add and its backward fused; ``FUSED = False`` restores megatron's eager ops).
With CP > 1 megatron's function runs unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils

_ORIGINAL = rope_utils._apply_rotary_pos_emb_thd
FUSED = True  # compile the rotation on CUDA tensors
_compiled = None


def rotate(t: torch.Tensor, freqs: torch.Tensor, mscale: float = 1.0) -> torch.Tensor:
    """megatron's non-interleaved ``_apply_rotary_pos_emb_bshd`` as one expression (what gets compiled)."""
    rot_dim = freqs.shape[-1]
    x, x_pass = t[..., :rot_dim], t[..., rot_dim:]
    cos = (torch.cos(freqs) * mscale).to(t.dtype)
    sin = (torch.sin(freqs) * mscale).to(t.dtype)
    x1, x2 = torch.chunk(x, 2, dim=-1)
    out = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, x_pass), dim=-1)


def _rotate_bshd(t: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool, multi_latent_attention: bool,
                 mscale: float) -> torch.Tensor:
    global _compiled
    if FUSED and t.is_cuda and not rotary_interleaved and not multi_latent_attention:
        if _compiled is None:
            _compiled = torch.compile(rotate, dynamic=True)  # pack lengths vary: one graph for all
        return _compiled(t, freqs, mscale)
    return rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=rotary_interleaved,
                                                 multi_latent_attention=multi_latent_attention, mscale=mscale)


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
    return _rotate_bshd(t.unsqueeze(1), packed, rotary_interleaved, multi_latent_attention, mscale).squeeze(1)


def install(enable: bool = True) -> None:
    """Route megatron's unfused THD RoPE through the sync-free version (or back)."""
    rope_utils._apply_rotary_pos_emb_thd = _apply_rotary_pos_emb_thd if enable else _ORIGINAL


install()
