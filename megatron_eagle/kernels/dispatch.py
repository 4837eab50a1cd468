"""The one place that picks an attention kernel, from the model config's ``attention_backend``.

:class:`AttentionKernels` is built once per model and shared by every attention layer (ViT and
LLM, with or without context parallelism); it owns the kernels' state (cuDNN graphs, which
kernel failed, the warnings already given). Kernels, in order of preference:

- packed (THD) attention within sub-samples, :meth:`AttentionKernels.packed`: on GPUs with
  ``"auto"`` or ``"cudnn"``, cuDNN's fused SDPA with ragged offsets; then FlashAttention-2's varlen
  kernel (``"auto"``, ``"flash"``, ``"cudnn"``); then exact per-segment SDPA (every backend, CPUs);
- [s, b, h, d] batches (the ViT's tiles), :meth:`AttentionKernels.strided`: on GPUs with ``"auto"`` or
  ``"cudnn"``, cuDNN graphs on megatron's strided q/k/v views; else ``scaled_dot_product_attention``;
- blocks with log-sum-exp for context parallelism, :meth:`AttentionKernels.block_forward` /
  :meth:`AttentionKernels.block_backward`: FlashAttention-2 (``"auto"``, ``"flash"``, ``"cudnn"``) on
  GPUs, else the exact reference.

A kernel that cannot run falls back to the next one, with one warning naming why.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_eagle.kernels.cudnn_graphs import CudnnGraphs, CudnnUnsupported
from megatron_eagle.kernels.cudnn_packed import CudnnPacked
from megatron_eagle.kernels.cudnn_strided import CudnnStrided
from megatron_eagle.kernels.flash import FlashVarlen
from megatron_eagle.kernels.reference import ref_block_bwd, ref_block_fwd, segment_sdpa

BACKENDS = ("auto", "sdpa", "flex", "flash", "cudnn")
_FLASH_BACKENDS = ("auto", "flash", "cudnn")
_CUDNN_BACKENDS = ("auto", "cudnn")


class AttentionKernels:
    """Kernel choice for one ``attention_backend`` and the state of the kernels behind it."""

    def __init__(self, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r}: use one of {list(BACKENDS)}")
        self.backend = backend
        self.cudnn_graphs = CudnnGraphs()
        self.cudnn_packed = CudnnPacked(self.cudnn_graphs)
        self.cudnn_strided = CudnnStrided(self.cudnn_graphs)
        self.flash = FlashVarlen()
        self._warned: set[str] = set()

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message)

    # ------------------------------------------------------------------ packed (THD)
    def packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
               causal: bool, scale: float) -> torch.Tensor:
        """Attention within each sub-sample of a pack: q [t, hq, d], k/v [t, hkv, d] -> [t, hq, d]."""
        out = None
        if self.backend == "cudnn" or (self.backend == "auto" and q.is_cuda):
            try:
                out = self.cudnn_packed(q, k, v, cu_seqlens, causal, scale)
            except CudnnUnsupported as e:  # CPU, no package, pre-Hopper, unsupported graph
                self._warn_once("cudnn-packed", f"cuDNN packed attention unavailable ({e}); "
                                                "using FlashAttention-2 / exact SDPA")
        if out is None and self.backend in _FLASH_BACKENDS:
            out = self.flash.packed(q, k, v, cu_seqlens, max_seqlen, causal, scale)
        if out is None:
            out = segment_sdpa(q, k, v, cu_seqlens, causal, scale)
        return out

    # ------------------------------------------------------------------ batches [s, b, h, d]
    def strided(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention over equal-length sequences in megatron's [s, b, h, d] layout -> [s, b, h, d]."""
        if (q.is_cuda and self.backend in _CUDNN_BACKENDS and q.numel()
                and (attention_mask is None or causal)):
            try:
                return self.cudnn_strided(q, k, v, causal, scale)
            except CudnnUnsupported as e:
                self._warn_once("cudnn-strided", f"cuDNN [s, b, h, d] attention unavailable ({e}); "
                                                 "using scaled_dot_product_attention")
        qb, kb, vb = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [b, h, s, d]
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=attention_mask if not causal else None,
                                           is_causal=causal, scale=scale, enable_gqa=qb.shape[1] != kb.shape[1])
        return o.permute(2, 0, 1, 3)

    # ------------------------------------------------------------------ blocks with log-sum-exp (CP)
    def block_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                      cu_k: torch.Tensor, max_q: int, max_k: int, causal: bool,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [t, hq, d], lse [hq, t] fp32) of one varlen block (layouts of :mod:`.reference`)."""
        if q.shape[0] == 0 or k.shape[0] == 0:
            return (q.new_zeros((q.shape[0], q.shape[1], v.shape[-1])),
                    q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32))
        if self.backend in _FLASH_BACKENDS and self.flash.takes_blocks(q):
            try:
                return self.flash.block_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
            except Exception as e:  # noqa: BLE001 - any refusal: fall back to the exact path
                self.flash.refused(e)
        return ref_block_fwd(q, k, v, cu_q, cu_k, causal, scale)

    def block_backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
                       max_k: int, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv) of one block given the merged ``out``/``lse`` of its query rows."""
        if q.shape[0] == 0 or k.shape[0] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if self.backend in _FLASH_BACKENDS and self.flash.takes_blocks(q):
            try:
                return self.flash.block_backward(dout.to(q.dtype), q, k, v, out.to(q.dtype), lse, cu_q, cu_k,
                                                 max_q, max_k, causal, scale)
            except Exception as e:  # noqa: BLE001
                self.flash.refused(e)
        return ref_block_bwd(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale)

    def varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
               max_q: int, max_k: int, causal: bool, scale: float) -> torch.Tensor:
        """Packed attention through the block kernels, with an exact backward (one CP rank's ring)."""
        return _VarlenAttention.apply(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, self)


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float,
                kernels: AttentionKernels):
        out, lse = kernels.block_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, causal, scale, kernels)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, causal, scale, kernels = ctx.args
        dq, dk, dv = kernels.block_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None
