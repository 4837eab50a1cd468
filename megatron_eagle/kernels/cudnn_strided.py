"""Batched [s, b, h, d] attention on cuDNN's fused SDPA that reads and writes megatron's layouts.

The ViT's attention runs on batches of equal-length tiles in megatron's [s, b, h, d] layout, with
q, k and v strided views into the fused qkv projection (per head [q | k | v]). Through
``F.scaled_dot_product_attention`` that costs copies around the kernel: the output comes back
[b, h, s, d] and is permuted into [s, b, h*d], and autograd concatenates dq, dk and dv into the qkv
gradient. Here the cuDNN graph takes every tensor with its real strides:

- q, k, v are read where they are (no ``contiguous()``);
- the output is written as [s, b, h, d] (``reshape(s, b, h*d)`` is a view);
- when q, k and v are disjoint slices of one contiguous buffer, dq, dk and dv are written into one
  buffer of the same layout, which :func:`megatron_eagle.models.qkv_split.split_along_dim` hands on
  as the qkv gradient without a concatenation.

Graphs are keyed by batch size, heads, length and strides, and cached in the same
:class:`~megatron_eagle.kernels.cudnn_graphs.CudnnGraphs` as the packed graphs (its device, package
and fallback rules apply).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_eagle.kernels.cudnn_graphs import CudnnGraphs, CudnnUnsupported, Graph

_ALIGN_BYTES = 16  # cuDNN's pointer alignment; strides must keep it for every row


Layout = Tuple[tuple, tuple]  # (shape, strides) of an [s, b, h, d] tensor


def _layout(x: torch.Tensor) -> Layout:
    return tuple(x.shape), tuple(x.stride())


def _contiguous(shape) -> Layout:
    s, b, h, d = shape
    return tuple(shape), (b * h * d, h * d, d, 1)


def _cudnn_dims(layout: Layout) -> Tuple[list, list]:
    """cuDNN dims/strides [b, h, s, d] of an [s, b, h, d] layout."""
    (s, b, h, d), (ss, sb, sh, sd) = layout
    return [b, h, s, d], [sb, sh, ss, sd]


def _aligned(x: torch.Tensor) -> bool:
    e = x.element_size()
    return (x.stride(-1) == 1 and x.data_ptr() % _ALIGN_BYTES == 0
            and all((st * e) % _ALIGN_BYTES == 0 for st in x.stride()[:-1]))


def unusable_reason(graphs: CudnnGraphs, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why these [s, b, h, d] inputs cannot run here, or None."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"expected [s, b, h, d] inputs, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if 0 in q.shape or 0 in k.shape:
        return f"empty input {tuple(q.shape)}"
    reason = graphs.unusable_reason(q, k, v)  # device, dtype, package, head-count rules
    if reason is not None:
        return reason
    if k.shape[:2] != q.shape[:2] or v.shape != k.shape:
        return f"shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}"
    if not all(_aligned(x) for x in (q, k, v)):
        return "q/k/v not 16-byte aligned with unit stride in the head dim"
    return None


def packed_qkv_base(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q, k and v are equal-strided, disjoint slices of one storage, so their gradients can
    share one buffer with the same strides (every element of each row written once)."""
    if not (q.stride() == k.stride() == v.stride() and q.shape[:3] == k.shape[:3] == v.shape[:3]):
        return False
    if len({x.untyped_storage().data_ptr() for x in (q, k, v)}) != 1:
        return False
    oq, ok, ov = (x.storage_offset() for x in (q, k, v))
    d_q, d_k, d_v = q.shape[-1], k.shape[-1], v.shape[-1]
    row = min(st for st, n in zip(q.stride()[:-1], q.shape[:-1]) if n > 1) if q.numel() > q.shape[-1] else None
    return ok - oq == d_q and ov - ok == d_k and (row is None or row >= d_q + d_k + d_v)


def _build(graphs: CudnnGraphs, key: tuple, device: torch.device) -> Graph:
    kind, layouts, dtype, scale, causal = key
    dims, strides = {}, {}
    for n, lay in layouts:
        dims[n], strides[n] = _cudnn_dims(lay)
    g, io, f32 = graphs.new_graph(dtype, device)
    b, hq, s, d = dims["q"]
    t = {n: graphs.tensor(g, n, dims[n], strides[n], io) for n in ("q", "k", "v")}
    stats_dims, stats_strides = (b, hq, s, 1), (hq * s, s, 1, 1)
    common = dict(attn_scale=scale, **graphs.mask_kwargs(causal))
    if kind == "sbhd-fwd":
        o, stats = g.sdpa(name="sdpa", q=t["q"], k=t["k"], v=t["v"], generate_stats=True, **common)
        o.set_output(True).set_dim(dims["o"]).set_stride(strides["o"])
        stats.set_output(True).set_data_type(f32).set_dim(list(stats_dims)).set_stride(list(stats_strides))
        t["o"], t["stats"] = o, stats
    else:
        t["o"] = graphs.tensor(g, "o", dims["o"], strides["o"], io)
        t["do"] = graphs.tensor(g, "do", dims["o"], strides["o"], io)
        t["stats"] = graphs.tensor(g, "stats", stats_dims, stats_strides, f32)
        grads = g.sdpa_backward(name="sdpa_backward", q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["do"],
                                stats=t["stats"], use_deterministic_algorithm=False, **common)
        for n, x in zip(("dq", "dk", "dv"), grads):
            x.set_output(True).set_dim(dims[n]).set_stride(strides[n])
            t[n] = x
    return graphs.finish(g, t)


def grad_layouts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: bool) -> Tuple[Layout, ...]:
    """Layouts of dq, dk, dv: q/k/v's own when they are packed slices of one buffer (see
    :func:`packed_qkv_base`; the gradients then share one buffer too), else contiguous."""
    if packed:
        return tuple(_layout(x) for x in (q, k, v))
    return tuple(_contiguous(x.shape) for x in (q, k, v))


def grad_buffers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: bool) -> Tuple[torch.Tensor, ...]:
    """dq, dk, dv in the layouts of :func:`grad_layouts` (views of one buffer when packed)."""
    if packed:
        base = q.storage_offset()
        span = max(x.storage_offset() - base + sum((n - 1) * st for n, st in zip(x.shape, x.stride())) + 1
                   for x in (q, k, v))
        flat = torch.empty(span, dtype=q.dtype, device=q.device)
        return tuple(flat.as_strided(x.shape, x.stride(), x.storage_offset() - base) for x in (q, k, v))
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


def _key(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, base: tuple, packed: bool) -> tuple:
    """Graph key: every tensor's layout, dtype, scale, causality."""
    layouts = [("q", _layout(q)), ("k", _layout(k)), ("v", _layout(v)),
               ("o", _contiguous(q.shape[:3] + v.shape[3:]))]
    if kind == "sbhd-bwd":
        layouts += list(zip(("dq", "dk", "dv"), grad_layouts(q, k, v, packed)))
    return (kind, tuple(layouts)) + base


class _CudnnStridedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, graphs: CudnnGraphs, fwd: Graph, bwd_key: tuple, packed: bool):
        s, b, h, d = q.shape
        out = torch.empty(s, b, h, v.shape[-1], dtype=q.dtype, device=q.device)
        stats = torch.empty(b, h, s, 1, dtype=torch.float32, device=q.device)
        graphs.execute(fwd, q.device, {"q": q, "k": k, "v": v, "o": out, "stats": stats})
        ctx.save_for_backward(q, k, v, out, stats)
        ctx.graphs, ctx.bwd_key, ctx.packed = graphs, bwd_key, packed
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, stats = ctx.saved_tensors
        dout = dout if dout.stride() == out.stride() else dout.contiguous()
        dq, dk, dv = grad_buffers(q, k, v, ctx.packed)
        entry = ctx.graphs.get(ctx.bwd_key, q.device, _build)  # built already unless the forward ran without grad
        ctx.graphs.execute(entry, q.device, {"q": q, "k": k, "v": v, "o": out, "do": dout, "stats": stats,
                                             "dq": dq, "dk": dk, "dv": dv})
        return dq, dk, dv, None, None, None, None


class CudnnStrided:
    """[s, b, h, d] cuDNN attention on a graph cache."""

    def __init__(self, graphs: CudnnGraphs):
        self.graphs = graphs

    def unusable_reason(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
        return unusable_reason(self.graphs, q, k, v)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
        """Attention over [s, b, h, d] q/k/v (any strides, unit stride in d), output [s, b, h, d]; raises
        :class:`~megatron_eagle.kernels.cudnn_graphs.CudnnUnsupported` where it cannot run. Both graphs
        are built before autograd records the op, so failures surface here."""
        reason = unusable_reason(self.graphs, q, k, v)
        if reason is not None:
            raise CudnnUnsupported(reason)
        base, packed = (q.dtype, float(scale), bool(causal)), packed_qkv_base(q, k, v)
        fwd = self.graphs.get(_key("sbhd-fwd", q, k, v, base, packed), q.device, _build)
        bwd_key = _key("sbhd-bwd", q, k, v, base, packed)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            self.graphs.get(bwd_key, q.device, _build)
        return _CudnnStridedFn.apply(q, k, v, self.graphs, fwd, bwd_key, packed)
