"""Packed (THD) attention on cuDNN's fused SDPA, through the cudnn-frontend Python graph API.

q [t, hq, d], k/v [t, hkv, d] (GQA: hq % hkv == 0), bf16/fp16, ``cu_seqlens`` [n + 1] int32 bounding
the sub-samples; attention (causal or not) never crosses a sub-sample. The cuDNN graph sees the
pack as a padded batch [B, h, T, d] whose rows start at ragged offsets (element offsets
``cu * h * d``) and whose per-row lengths come from a padding-mask ``seq_len`` tensor, so the kernels
only touch real tokens. Softmax stats are ragged too ([t, hq] fp32; cuDNN >= 9.6), not [B, h, T, 1].

B (number of sub-samples) and T (tokens) are bucketed (:func:`batch_bucket`, :func:`token_bucket`):
a training run builds one forward and one backward graph per (B, T) bucket pair it meets. Nothing
here needs the real max sequence length, so graphs do not depend on how a pack is split, and
nothing reads device values on the host (no synchronisation).

``import cudnn`` happens on first use only; without the package, a CUDA device of compute
capability >= 9.0 or cuDNN >= 9.6, :func:`unusable_reason` says why and callers fall back.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

MIN_BATCH_BUCKET = 32  # B below this costs nothing extra (empty rows exit at once); fewer graphs
MIN_TOKEN_BUCKET = 1024
TOKEN_BUCKET_STEP = 32768  # above 32K, T grows in 32K steps (pow2 would double the bwd workspace)
MIN_CUDNN_VERSION = 90600  # ragged softmax stats and max_total_seq_len in the backward

_lock = threading.RLock()  # re-entered: _graph -> _build -> _handle
_cudnn: Any = None  # the imported module, once imported
_import_error: Optional[str] = None
_handles: Dict[int, Any] = {}  # device index -> cudnn handle (its stream is set per call)
_graphs: Dict[tuple, "_Graph"] = {}
_unsupported: Dict[tuple, str] = {}  # key -> reason the build failed (not retried)
STATS = {"built": 0, "build_s": 0.0}  # graphs built in this process and the seconds spent


class CudnnUnsupported(RuntimeError):
    """cuDNN cannot run these inputs (missing package, device, version or an unsupported graph)."""


# ----------------------------------------------------------------------------- pure-Python layout

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


# All layers of a step pass the same cu_seqlens tensor: build its layout once. Keyed on the tensor
# object (weakref: a new pack is a new tensor even at a recycled address) and its version counter.
_layout_cache: Dict[tuple, Tuple[Any, int, RaggedLayout]] = {}


def cached_layout(cu_seqlens: torch.Tensor, batch: int, hq: int, hkv: int, d: int) -> RaggedLayout:
    """:func:`ragged_layout`, reused while the same (unmodified) ``cu_seqlens`` tensor comes back."""
    key = (batch, hq, hkv, d, cu_seqlens.device)
    hit = _layout_cache.get(key)
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
        return hit[2]
    lay = ragged_layout(cu_seqlens, batch, hq, hkv, d)
    if len(_layout_cache) > 16:
        _layout_cache.clear()
    _layout_cache[key] = (weakref.ref(cu_seqlens), cu_seqlens._version, lay)
    return lay


# ----------------------------------------------------------------------------- availability

def _import_cudnn() -> Any:
    global _cudnn, _import_error
    if _cudnn is None and _import_error is None:
        try:
            import cudnn  # noqa: F401  (cudnn-frontend; dlopens torch's bundled libcudnn)

            cudnn.backend_version()  # fails here, not mid-step, when libcudnn is missing
            _cudnn = cudnn
        except Exception as e:  # ImportError, OSError, RuntimeError from the backend probe
            _import_error = f"cannot use the cudnn frontend package ({type(e).__name__}: {e})"
    if _cudnn is None:
        raise CudnnUnsupported(_import_error)
    return _cudnn


_device_reason: Dict[int, Optional[str]] = {}  # device index -> why cuDNN cannot run there (None: it can)


def _device_check(device: torch.device) -> Optional[str]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _device_reason:
        major, minor = torch.cuda.get_device_capability(idx)
        reason = None
        if major < 9:
            reason = f"ragged (THD) cuDNN attention needs compute capability >= 9.0, device has {major}.{minor}"
        else:
            try:
                cudnn = _import_cudnn()
                if cudnn.backend_version() < MIN_CUDNN_VERSION:
                    reason = f"cuDNN {cudnn.backend_version_string()} < 9.6 (ragged softmax stats)"
            except CudnnUnsupported as e:
                reason = str(e)
        _device_reason[idx] = reason
    return _device_reason[idx]


def unusable_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why cuDNN packed attention cannot take these inputs, or None if it may (graphs can still fail)."""
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return "inputs are not on a CUDA device"
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (cuDNN fused SDPA takes bf16/fp16)"
    if q.dim() != 3 or k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1] or k.shape[2] != q.shape[2]:
        return f"shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}"
    return _device_check(q.device)


def _handle(device: torch.device) -> Any:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    h = _handles.get(idx)
    if h is None:
        cudnn = _import_cudnn()
        with _lock:
            h = _handles.get(idx)
            if h is None:
                with torch.cuda.device(idx):
                    h = cudnn.create_handle()
                _handles[idx] = h
    return h


# ----------------------------------------------------------------------------- graphs

@dataclass
class _Graph:
    graph: Any
    t: Dict[str, Any]  # name -> cudnn tensor handle
    workspace: int
    uids: Dict[str, int]  # name -> tensor uid, for executing without the frontend's dict rebuild


def _tensor(g, name: str, dims, strides, dtype) -> Any:
    return g.tensor(name=name, dim=list(dims), stride=list(strides), data_type=dtype)


def _offsets(g, cudnn, batch: int, names) -> Dict[str, Any]:
    return {n: _tensor(g, n, (batch + 1, 1, 1, 1), (1, 1, 1, 1), cudnn.data_type.INT64) for n in names}


def _mask_kwargs(cudnn, causal: bool) -> dict:
    # Top-left diagonal, right bound 0 = causal inside each row (rows have equal q/kv lengths).
    return dict(diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_right_bound=0) if causal else {}


def _build(key: tuple, device: torch.device) -> _Graph:
    kind, B, T, hq, hkv, d, dtype, scale, causal = key
    cudnn = _import_cudnn()
    io = cudnn.data_type.BFLOAT16 if dtype == torch.bfloat16 else cudnn.data_type.HALF
    f32 = cudnn.data_type.FLOAT
    g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32,
                      handle=_handle(device))
    # Token-major THD strides; the batch stride is nominal (rows start at their ragged offsets).
    dq_, sq_ = (B, hq, T, d), (T * hq * d, d, hq * d, 1)
    dk_, sk_ = (B, hkv, T, d), (T * hkv * d, d, hkv * d, 1)
    ds_, ss_ = (B, hq, T, 1), (hq * T, 1, hq, 1)  # stats as [t, hq]
    t: Dict[str, Any] = {}
    for n in ("q",):
        t[n] = _tensor(g, n, dq_, sq_, io)
    for n in ("k", "v"):
        t[n] = _tensor(g, n, dk_, sk_, io)
    for n in ("seq_q", "seq_kv"):
        t[n] = _tensor(g, n, (B, 1, 1, 1), (1, 1, 1, 1), cudnn.data_type.INT32)
    t.update(_offsets(g, cudnn, B, ("off_q", "off_o", "off_k", "off_v", "off_stats")))
    t["q"].set_ragged_offset(t["off_q"])
    t["k"].set_ragged_offset(t["off_k"])
    t["v"].set_ragged_offset(t["off_v"])
    common = dict(attn_scale=scale, use_padding_mask=True, seq_len_q=t["seq_q"], seq_len_kv=t["seq_kv"],
                  **_mask_kwargs(cudnn, causal))
    if kind == "fwd":
        o, stats = g.sdpa(name="sdpa", q=t["q"], k=t["k"], v=t["v"], generate_stats=True, **common)
        o.set_output(True).set_dim(list(dq_)).set_stride(list(sq_)).set_ragged_offset(t["off_o"])
        stats.set_output(True).set_data_type(f32).set_dim(list(ds_)).set_stride(list(ss_))
        stats.set_ragged_offset(t["off_stats"])
        t["o"], t["stats"] = o, stats
    else:
        t["o"] = _tensor(g, "o", dq_, sq_, io)
        t["do"] = _tensor(g, "do", dq_, sq_, io)
        t["stats"] = _tensor(g, "stats", ds_, ss_, f32)
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
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return _Graph(graph=g, t=t, workspace=int(g.get_workspace_size()), uids={n: x.get_uid() for n, x in t.items()})


def _graph(key: tuple, device: torch.device, build=None) -> _Graph:
    """The built graph for ``key`` (``build(key, device)``, default the packed graphs), cached."""
    with _lock:
        entry = _graphs.get(key)
        if entry is not None:
            return entry
        if key in _unsupported:
            raise CudnnUnsupported(_unsupported[key])
        t0 = time.perf_counter()
        try:
            entry = (build or _build)(key, device)
        except CudnnUnsupported:
            raise
        except Exception as e:  # cudnnGraphNotSupportedError or a frontend error: remember, fall back
            _unsupported[key] = f"cuDNN graph {key} unsupported ({type(e).__name__}: {e})"
            raise CudnnUnsupported(_unsupported[key]) from e
        STATS["built"] += 1
        STATS["build_s"] += time.perf_counter() - t0
        _graphs[key] = entry
        return entry


_streams: Dict[int, int] = {}  # device index -> stream last set on its handle


def _execute(entry: _Graph, device: torch.device, feeds: Dict[str, torch.Tensor]) -> None:
    handle = _handle(device)
    stream = torch.cuda.current_stream(device).cuda_stream
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if _streams.get(idx) != stream:  # runs on torch's current stream, like every other kernel
        _import_cudnn().set_stream(handle=handle, stream=stream)
        _streams[idx] = stream
    workspace = torch.empty(max(entry.workspace, 1), dtype=torch.uint8, device=device)
    entry.graph._execute({entry.uids[n]: x.data_ptr() for n, x in feeds.items()}, workspace.data_ptr(), handle)


def clear_cache() -> None:
    """Drop built graphs and remembered failures (tests, benchmarks)."""
    with _lock:
        _graphs.clear()
        _unsupported.clear()
        _layout_cache.clear()
        STATS.update(built=0, build_s=0.0)


# ----------------------------------------------------------------------------- autograd

def _keys(q: torch.Tensor, k: torch.Tensor, n: int, scale: float, causal: bool,
          buckets: Optional[Tuple[int, int]]) -> Tuple[tuple, tuple, int, int]:
    B, T = buckets if buckets is not None else (batch_bucket(n), token_bucket(q.shape[0]))
    if B < n or T < q.shape[0]:
        raise ValueError(f"buckets B={B} T={T} too small for {n} sub-samples of {q.shape[0]} tokens")
    base = (B, T, q.shape[1], k.shape[1], q.shape[2], q.dtype, float(scale), bool(causal))
    return ("fwd",) + base, ("bwd",) + base, B, T


class _CudnnPackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, fwd: _Graph, bwd_key: tuple):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        lay = cached_layout(cu_seqlens, bwd_key[1], q.shape[1], k.shape[1], q.shape[2])
        # zeros: tokens past cu_seqlens[-1] (if any) are never written by the kernel
        out = torch.zeros_like(q)
        stats = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
        _execute(fwd, q.device, {"q": q, "k": k, "v": v, "o": out, "stats": stats, "seq_q": lay.seq_len,
                                 "seq_kv": lay.seq_len, "off_q": lay.off_q, "off_o": lay.off_q,
                                 "off_k": lay.off_kv, "off_v": lay.off_kv, "off_stats": lay.off_stats})
        ctx.save_for_backward(q, k, v, out, stats, lay.seq_len, lay.off_q, lay.off_kv, lay.off_stats)
        ctx.bwd_key = bwd_key
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, stats, seq_len, off_q, off_kv, off_stats = ctx.saved_tensors
        entry = _graph(ctx.bwd_key, q.device)  # built already unless the forward ran without grad
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        _execute(entry, q.device, {"q": q, "k": k, "v": v, "o": out, "do": dout.contiguous(), "stats": stats,
                                   "dq": dq, "dk": dk, "dv": dv, "seq_q": seq_len, "seq_kv": seq_len,
                                   "off_q": off_q, "off_o": off_q, "off_k": off_kv, "off_v": off_kv,
                                   "off_stats": off_stats})
        return dq, dk, dv, None, None, None


def cudnn_packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           causal: bool, scale: float,
                           buckets: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Packed attention on cuDNN (differentiable); raises :class:`CudnnUnsupported` when it cannot run.

    ``buckets`` = (B, T) overrides the graph's batch/token buckets (benchmarks: time must not grow
    with them). Both graphs are built before autograd records the op, so an unsupported shape
    raises here (callers fall back) rather than in the backward.
    """
    reason = unusable_reason(q, k, v)
    if reason is not None:
        raise CudnnUnsupported(reason)
    if q.shape[0] == 0:
        return torch.zeros_like(q)
    # Build the forward graph eagerly so an unsupported shape surfaces before autograd records anything.
    fwd_key, bwd_key, _, _ = _keys(q, k, cu_seqlens.numel() - 1, scale, causal, buckets)
    fwd = _graph(fwd_key, q.device)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        _graph(bwd_key, q.device)  # fail now (and fall back) rather than in the backward
    return _CudnnPackedAttention.apply(q, k, v, cu_seqlens, fwd, bwd_key)
