"""Packed (THD) attention on cuDNN's fused SDPA (graphs of :mod:`.cudnn_graphs`).

q [t, hq, d], k/v [t, hkv, d] (GQA: hq % hkv == 0), bf16/fp16, ``cu_seqlens`` [n + 1] int32 bounding
the sub-samples; attention (causal or not) never crosses a sub-sample. The cuDNN graph sees the
pack as a padded batch [B, h, T, d] whose rows start at ragged offsets (element offsets
``cu * h * d``) and whose per-row lengths come from a padding-mask ``seq_len`` tensor, so the kernels
only touch real tokens. Softmax stats are ragged too ([t, hq] fp32; cuDNN >= 9.6), not [B, h, T, 1].

B (number of sub-samples) and T (tokens) are bucketed (:func:`batch_bucket`, :func:`token_bucket`):
a training run builds one forward and one backward graph per (B, T) bucket pair it meets. Nothing
here needs the real max sequence length, so graphs do not depend on how a pack is split, and
nothing reads device values on the host (no synchronisation).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from megatron_eagle.kernels.cudnn_graphs import CudnnGraphs, CudnnUnsupported, Graph

MIN_BATCH_BUCKET = 32  # B below this costs nothing extra (empty rows exit at once); fewer graphs
MIN_TOKEN_BUCKET = 1024
TOKEN_BUCKET_STEP = 32768  # above 32K, T grows in 32K steps (pow2 would double the bwd workspace)


def batch_bucket(n: int) -> int:
    """Graph batch size for ``n`` sub-samples: at least 32, else the next power of two."""
    b = MIN_BATCH_BUCKET
    while b < n:
        b *= 2
    return b


def token_bucket(t: int) -> int:
    """Graph token count T >= t: powers of two from 1024 up to 32K, then multiples of 32K."""
    if t > TOKEN_BUCKET_STEP:
        return -(-t // TOKEN_BUCKET_STEP) * TOKEN_BUCKET_STEP
    b = MIN_TOKEN_BUCKET
    while b < t:
        b *= 2
    return b


@dataclass
class RaggedLayout:
    """Device tensors describing a pack to cuDNN (all [B(+1), 1, 1, 1])."""

    seq_len: torch.Tensor  # int32 [B]: real length of each row, 0 for empty and padding rows
    off_q: torch.Tensor  # int64 [B + 1]: element offset of each row in q / o / dq / do (cu * hq * d)
    off_kv: torch.Tensor  # int64 [B + 1]: the same for k / v / dk / dv (cu * hkv * d)
    off_stats: torch.Tensor  # int64 [B + 1]: the same for the [t, hq] fp32 stats (cu * hq)


def ragged_layout(cu_seqlens: torch.Tensor, batch: int, hq: int, hkv: int, d: int) -> RaggedLayout:
    """Seq lengths and ragged offsets of a pack for a graph of ``batch`` rows (``batch`` >= n).

    Rows past the n sub-samples get length 0 and start where the last one ends; empty sub-samples
    (repeated boundaries) are rows of length 0. Computed on ``cu_seqlens``' device, without a sync.
    """
    n = cu_seqlens.numel() - 1
    if n > batch:
        raise ValueError(f"{n} sub-samples do not fit a graph of {batch} rows")
    cu = cu_seqlens.reshape(-1).to(torch.int64)
    starts = torch.cat([cu, cu[-1:].expand(batch - n)])  # padding rows start where the pack ends
    seq_len = torch.diff(starts).clamp_min_(0).to(torch.int32)
    return RaggedLayout(seq_len=seq_len.view(batch, 1, 1, 1),
                        off_q=(starts * (hq * d)).view(batch + 1, 1, 1, 1),
                        off_kv=(starts * (hkv * d)).view(batch + 1, 1, 1, 1),
                        off_stats=(starts * hq).view(batch + 1, 1, 1, 1))


def _build(graphs: CudnnGraphs, key: tuple, device: torch.device) -> Graph:
    kind, B, T, hq, hkv, d, dtype, scale, causal = key
    cudnn = graphs.module()
    g, io, f32 = graphs.new_graph(dtype, device)
    tensor = graphs.tensor
    # Token-major THD strides; the batch stride is nominal (rows start at their ragged offsets).
    dq_, sq_ = (B, hq, T, d), (T * hq * d, d, hq * d, 1)
    dk_, sk_ = (B, hkv, T, d), (T * hkv * d, d, hkv * d, 1)
    ds_, ss_ = (B, hq, T, 1), (hq * T, 1, hq, 1)  # stats as [t, hq]
    t: Dict[str, Any] = {"q": tensor(g, "q", dq_, sq_, io)}
    for n in ("k", "v"):
        t[n] = tensor(g, n, dk_, sk_, io)
    for n in ("seq_q", "seq_kv"):
        t[n] = tensor(g, n, (B, 1, 1, 1), (1, 1, 1, 1), cudnn.data_type.INT32)
    for n in ("off_q", "off_o", "off_k", "off_v", "off_stats"):
        t[n] = tensor(g, n, (B + 1, 1, 1, 1), (1, 1, 1, 1), cudnn.data_type.INT64)
    t["q"].set_ragged_offset(t["off_q"])
    t["k"].set_ragged_offset(t["off_k"])
    t["v"].set_ragged_offset(t["off_v"])
    common = dict(attn_scale=scale, use_padding_mask=True, seq_len_q=t["seq_q"], seq_len_kv=t["seq_kv"],
                  **graphs.mask_kwargs(causal))
    if kind == "fwd":
        o, stats = g.sdpa(name="sdpa", q=t["q"], k=t["k"], v=t["v"], generate_stats=True, **common)
        o.set_output(True).set_dim(list(dq_)).set_stride(list(sq_)).set_ragged_offset(t["off_o"])
        stats.set_output(True).set_data_type(f32).set_dim(list(ds_)).set_stride(list(ss_))
        stats.set_ragged_offset(t["off_stats"])
        t["o"], t["stats"] = o, stats
    else:
        t["o"] = tensor(g, "o", dq_, sq_, io)
        t["do"] = tensor(g, "do", dq_, sq_, io)
        t["stats"] = tensor(g, "stats", ds_, ss_, f32)
        t["o"].set_ragged_offset(t["off_o"])
        t["do"].set_ragged_offset(t["off_o"])
        t["stats"].set_ragged_offset(t["off_stats"])
        dq, dk, dv = g.sdpa_backward(name="sdpa_backward", q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["do"],
                                     stats=t["stats"], max_total_seq_len_q=T, max_total_seq_len_kv=T,
                                     use_deterministic_algorithm=False, **common)
        dq.set_output(True).set_dim(list(dq_)).set_stride(list(sq_)).set_ragged_offset(t["off_q"])
        dk.set_output(True).set_dim(list(dk_)).set_stride(list(sk_)).set_ragged_offset(t["off_k"])
        dv.set_output(True).set_dim(list(dk_)).set_stride(list(sk_)).set_ragged_offset(t["off_v"])
        t["dq"], t["dk"], t["dv"] = dq, dk, dv
    return graphs.finish(g, t)


def _keys(q: torch.Tensor, k: torch.Tensor, n: int, scale: float, causal: bool,
          buckets: Optional[Tuple[int, int]]) -> Tuple[tuple, tuple]:
    B, T = buckets if buckets is not None else (batch_bucket(n), token_bucket(q.shape[0]))
    if B < n or T < q.shape[0]:
        raise ValueError(f"buckets B={B} T={T} too small for {n} sub-samples of {q.shape[0]} tokens")
    base = (B, T, q.shape[1], k.shape[1], q.shape[2], q.dtype, float(scale), bool(causal))
    return ("fwd",) + base, ("bwd",) + base


class _CudnnPackedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, attn: "CudnnPacked", fwd: Graph, bwd_key: tuple):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        lay = attn.layout(cu_seqlens, bwd_key[1], q.shape[1], k.shape[1], q.shape[2])
        # zeros: tokens past cu_seqlens[-1] (if any) are never written by the kernel
        out = torch.zeros_like(q)
        stats = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
        attn.graphs.execute(fwd, q.device, {"q": q, "k": k, "v": v, "o": out, "stats": stats, "seq_q": lay.seq_len,
                                            "seq_kv": lay.seq_len, "off_q": lay.off_q, "off_o": lay.off_q,
                                            "off_k": lay.off_kv, "off_v": lay.off_kv, "off_stats": lay.off_stats})
        ctx.save_for_backward(q, k, v, out, stats, lay.seq_len, lay.off_q, lay.off_kv, lay.off_stats)
        ctx.attn, ctx.bwd_key = attn, bwd_key
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, stats, seq_len, off_q, off_kv, off_stats = ctx.saved_tensors
        graphs = ctx.attn.graphs
        entry = graphs.get(ctx.bwd_key, q.device, _build)  # built already unless the forward ran without grad
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        graphs.execute(entry, q.device, {"q": q, "k": k, "v": v, "o": out, "do": dout.contiguous(), "stats": stats,
                                         "dq": dq, "dk": dk, "dv": dv, "seq_q": seq_len, "seq_kv": seq_len,
                                         "off_q": off_q, "off_o": off_q, "off_k": off_kv, "off_v": off_kv,
                                         "off_stats": off_stats})
        return dq, dk, dv, None, None, None, None


class CudnnPacked:
    """Packed cuDNN attention on a graph cache, with the pack layout of the step in flight."""

    def __init__(self, graphs: CudnnGraphs):
        self.graphs = graphs
        # All layers of a step pass the same cu_seqlens tensor: its layout is built once. Keyed on the
        # tensor object (weakref: a new pack is a new tensor even at a recycled address) and its version.
        self._layouts: Dict[tuple, Tuple[Any, int, RaggedLayout]] = {}

    def layout(self, cu_seqlens: torch.Tensor, batch: int, hq: int, hkv: int, d: int) -> RaggedLayout:
        """:func:`ragged_layout`, reused while the same (unmodified) ``cu_seqlens`` tensor comes back."""
        key = (batch, hq, hkv, d, cu_seqlens.device)
        hit = self._layouts.get(key)
        if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
            return hit[2]
        lay = ragged_layout(cu_seqlens, batch, hq, hkv, d)
        if len(self._layouts) > 16:
            self._layouts.clear()
        self._layouts[key] = (weakref.ref(cu_seqlens), cu_seqlens._version, lay)
        return lay

    def unusable_reason(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
        """Why these [t, h, d] inputs cannot run here, or None."""
        if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
            return f"shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}"
        return self.graphs.unusable_reason(q, k, v)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool,
                 scale: float, buckets: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Packed attention (differentiable); raises :class:`CudnnUnsupported` when it cannot run.

        ``buckets`` = (B, T) overrides the graph's batch/token buckets (benchmarks: time must not grow
        with them). Both graphs are built before autograd records the op, so an unsupported shape
        raises here (callers fall back) rather than in the backward.
        """
        reason = self.unusable_reason(q, k, v)
        if reason is not None:
            raise CudnnUnsupported(reason)
        if q.shape[0] == 0:
            return torch.zeros_like(q)
        fwd_key, bwd_key = _keys(q, k, cu_seqlens.numel() - 1, scale, causal, buckets)
        fwd = self.graphs.get(fwd_key, q.device, _build)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            self.graphs.get(bwd_key, q.device, _build)  # fail now (and fall back) rather than in the backward
        return _CudnnPackedFn.apply(q, k, v, cu_seqlens, self, fwd, bwd_key)
