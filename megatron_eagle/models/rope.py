"""RoPE on packed (THD) sequences without host-device syncs.

megatron-core's unfused ``_apply_rotary_pos_emb_thd`` (used without transformer-engine) loops over
the sub-samples on the host (``cu_seqlens.tolist()``): one sync per attention layer, a Python loop
over every sub-sample, and one small kernel per piece. With CP = 1 the packed positions are just
``t - cu_seqlens[segment(t)]``, which the GPU computes; the rotation itself is megatron's own
``_apply_rotary_pos_emb_bshd``, so the results are identical.

:class:`PackedRope` is that function, with the state it keeps: the packed cos/sin, gathered and
computed once per pack and shared by every layer's query and key (rounded to the activation dtype,
as megatron does), and on GPUs the rotation as one ``torch.compile``'d kernel (rotate-half and
multiply-add, and its backward, fused); on CPUs the same expression runs eagerly. With CP > 1
megatron's function runs unchanged. :mod:`megatron_eagle.patches.rope_thd` installs it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core.models.common.embeddings import rope_utils


def rotate_cos_sin(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """megatron's non-interleaved ``_apply_rotary_pos_emb_bshd`` as one expression (what gets compiled),
    with cos/sin given: already scaled, in ``t``'s dtype, last dim = the rotary dim."""
    rot_dim = cos.shape[-1]
    x, x_pass = t[..., :rot_dim], t[..., rot_dim:]
    x1, x2 = torch.chunk(x, 2, dim=-1)
    out = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, x_pass), dim=-1)


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] position of each token inside its sub-sample, computed on cu_seqlens' device."""
    idx = torch.arange(total, device=cu_seqlens.device)
    cu = cu_seqlens.to(idx.dtype)
    seg = torch.searchsorted(cu[1:], idx, right=True)
    return idx - cu[seg]


class PackedRope:
    """Drop-in for megatron's ``_apply_rotary_pos_emb_thd`` (``original``), sync-free at CP = 1.

    ``fused``: compile the rotation on CUDA tensors (False: megatron's eager bshd ops on the packed
    positions)."""

    def __init__(self, original: Callable, fused: bool = True):
        self.original = original
        self.fused = fused
        self._compiled: Optional[Callable] = None
        self._cos_sin: Optional[tuple] = None  # (freqs, cu_seqlens, key, cos, sin) of the pack in flight

    def cos_sin(self, freqs: torch.Tensor, cu_seqlens: torch.Tensor, total: int, dtype: torch.dtype,
                mscale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [total, 1, rot_dim] of each packed token, computed once per (freqs, cu_seqlens) pair.

        Every layer of a forward (and its recompute) passes the same two tensors, so only the first
        query of the first layer pays the gather and the transcendentals. One entry is kept, compared
        by tensor identity and version, so a new pack (or an in-place change) misses.
        """
        key = (freqs._version, cu_seqlens._version, total, dtype, float(mscale))
        if self._cos_sin is not None:
            f, cu, k, cos, sin = self._cos_sin
            if f is freqs and cu is cu_seqlens and k == key:
                return cos, sin
        packed = freqs if freqs.size(0) == total else freqs[packed_positions(cu_seqlens, total)]
        packed = packed.reshape(total, 1, packed.shape[-1]).float()
        cos, sin = (torch.cos(packed) * mscale).to(dtype), (torch.sin(packed) * mscale).to(dtype)
        self._cos_sin = (freqs, cu_seqlens, key, cos, sin)
        return cos, sin

    def __call__(self, t, cu_seqlens, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0,
                 cp_group=None):
        if cp_group is None or cp_group.size() != 1:
            return self.original(t, cu_seqlens, freqs, rotary_interleaved=rotary_interleaved,
                                 multi_latent_attention=multi_latent_attention, mscale=mscale, cp_group=cp_group)
        if self.fused and not rotary_interleaved and not multi_latent_attention and t.dim() == 3:
            cos, sin = self.cos_sin(freqs, cu_seqlens, t.size(0), t.dtype, mscale)
            if not t.is_cuda:  # the same expression, eagerly (equal to megatron's op for op)
                return rotate_cos_sin(t, cos, sin)
            if self._compiled is None:
                self._compiled = torch.compile(rotate_cos_sin, dynamic=True)  # pack lengths vary: one graph
            return self._compiled(t, cos, sin)
        if freqs.size(0) == t.size(0):  # megatron's "exact" case: freqs already hold every packed position
            packed = freqs
        else:
            packed = freqs[packed_positions(cu_seqlens, t.size(0))]
        return rope_utils._apply_rotary_pos_emb_bshd(t.unsqueeze(1), packed, rotary_interleaved=rotary_interleaved,
                                                     multi_latent_attention=multi_latent_attention,
                                                     mscale=mscale).squeeze(1)
