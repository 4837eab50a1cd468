"""Packed (THD) rotary embeddings without a host sync per layer.

megatron-core's unfused THD RoPE (``rope_utils._apply_rotary_pos_emb_thd``, used without
transformer-engine) reads the sub-sample lengths with ``.tolist()`` and loops over them in
Python: two device-to-host syncs per layer (query and key) in every forward. Without context
parallelism the positions are just ``t - cu_seqlens[segment(t)]``, which the GPU computes; the
rotation itself is megatron's own ``_apply_rotary_pos_emb_bshd``, so the results are identical.
The packed cos/sin are gathered and computed once per pack and shared by every layer's query and
key (rounded to the activation dtype, as megatron does); on GPUs the rotation runs as one
``torch.compile``'d kernel per call (rotate-half and multiply-add, and its backward, fused), on CPUs
as the same expression eagerly. ``FUSED = False`` restores megatron's eager ops. With CP > 1 megatron's function runs unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils

_ORIGINAL = rope_utils._apply_rotary_pos_emb_thd
FUSED = True  # compile the rotation on CUDA tensors
_compiled = None
_cos_sin_cache: list = []  # [(freqs, cu_seqlens, key, cos, sin)]: the pack in flight (one entry)


def rotate_cos_sin(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """megatron's non-interleaved ``_apply_rotary_pos_emb_bshd`` as one expression (what gets compiled),
    with cos/sin given: already scaled, in ``t``'s dtype, last dim = the rotary dim."""
    rot_dim = cos.shape[-1]
    x, x_pass = t[..., :rot_dim], t[..., rot_dim:]
    x1, x2 = torch.chunk(x, 2, dim=-1)
    out = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, x_pass), dim=-1)


def packed_cos_sin(freqs: torch.Tensor, cu_seqlens: torch.Tensor, total: int, dtype: torch.dtype,
                   mscale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [total, 1, rot_dim] of each packed token, computed once per (freqs, cu_seqlens) pair.

    Every layer of a forward (and its recompute) passes the same two tensors, so only the first
    query of the first layer pays the gather and the transcendentals. The cache holds one entry
    and compares tensors by identity and version, so a new pack (or an in-place change) misses.
    """
    key = (freqs._version, cu_seqlens._version, total, dtype, float(mscale))
    if _cos_sin_cache:
        f, cu, k, cos, sin = _cos_sin_cache[0]
        if f is freqs and cu is cu_seqlens and k == key:
            return cos, sin
    packed = freqs if freqs.size(0) == total else freqs[packed_positions(cu_seqlens, total)]
    packed = packed.reshape(total, 1, packed.shape[-1]).float()
    cos, sin = (torch.cos(packed) * mscale).to(dtype), (torch.sin(packed) * mscale).to(dtype)
    _cos_sin_cache[:] = [(freqs, cu_seqlens, key, cos, sin)]
    return cos, sin


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
    if FUSED and not rotary_interleaved and not multi_latent_attention and t.dim() == 3:
        global _compiled
        cos, sin = packed_cos_sin(freqs, cu_seqlens, t.size(0), t.dtype, mscale)
        if not t.is_cuda:  # the same expression, eagerly (equal to megatron's op for op)
            return rotate_cos_sin(t, cos, sin)
        if _compiled is None:
            _compiled = torch.compile(rotate_cos_sin, dynamic=True)  # pack lengths vary: one graph for all
        return _compiled(t, cos, sin)
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
