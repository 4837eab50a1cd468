"""Core attention for packed (THD) and batched (SBHD) inputs, plugged in via ModuleSpec.

Replaces megatron-core's local ``DotProductAttention``, which cannot take packed sequences
and materialises a full [s, s] score matrix. Attention is causal within each sub-sample
and never crosses sub-samples (``cu_seqlens``). Kernels, in order of preference:
- GPU, THD, ``backend="cudnn"`` or ``"auto"``: cuDNN's fused SDPA with ragged offsets
  (:mod:`megatron_eagle.models.cudnn_attention`); falls back to the kernels below, with one warning
  naming why, where cuDNN cannot run (no cudnn-frontend package, pre-Hopper, graph unsupported);
- GPU, THD: FlashAttention-2's varlen kernel (``aten::_flash_attention_forward``, differentiable),
  with GQA handled inside the kernel (no repeated K/V heads); ``torch.nn.attention.varlen`` as
  a fallback (its keywords differ across torch versions);
- GPU/CPU fallback and exact reference: per-segment ``scaled_dot_product_attention``
  (memory O(max_len²) per segment at worst, never O(total²)).
With context parallelism (``PackedSeqParams`` carrying a CP layout) the THD path runs the
configured CP variant of :mod:`megatron_eagle.parallel.cp_attention` instead.
SBHD (the ViT's batches of tiles): on GPUs with ``backend`` "auto"/"cudnn", cuDNN graphs on megatron's
strided q/k/v views (:mod:`megatron_eagle.models.cudnn_sbhd_attention`, no copies around the kernel);
elsewhere, or where those cannot run, ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

try:  # torch >= 2.9 (signature differs across versions: feature-detect at call time)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except Exception:  # pragma: no cover
    _varlen_attn = None


def segment_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 causal: bool, scale: float) -> torch.Tensor:
    """Exact packed attention: SDPA on each [start, end) segment. q/k/v are [t, h, d]."""
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        qs, ks, vs = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=gqa)
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


# Pass K/V with fewer heads than Q straight to the flash kernel (GQA inside the kernel). Switched
# off only if a GPU check finds the kernel wrong for GQA inputs; then K/V heads are repeated.
GQA_NATIVE = True
_ATEN_FLASH_OK: Optional[bool] = None  # None: untried; False: failed once, use the fallbacks
# Whether backend="auto" tries cuDNN before FA2 on GPUs: on, measured in the training step on H100
# (+8-9% at 8K and 32K; attention alone 1.6-1.8x, same errors). Where cuDNN cannot run (no
# cudnn-frontend package, pre-Hopper) "auto" warns once and runs FA2. BENCHMARKS.md, "Third session".
AUTO_PREFERS_CUDNN = True
# Whether the [s, b, h, d] path (the ViT's tiles) runs on cuDNN graphs that take megatron's strided
# layouts (models/cudnn_sbhd_attention.py: no copies around the kernel) before falling back to SDPA.
SBHD_PREFERS_CUDNN = True
_CUDNN_WARNED = False
_SBHD_WARNED = False


def _flash_device(t: torch.Tensor) -> bool:
    return t.is_cuda


def _aten_flash(q, k, v, cu, max_seqlen, causal, scale):
    """aten's FlashAttention-2 varlen forward; output [t, h, d] (its LSE etc. are dropped)."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0, causal, False,
                                                   scale=scale)[0]


def varlen_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 max_seqlen: int, causal: bool, scale: float) -> Optional[torch.Tensor]:
    """Packed flash attention (GPU only); None when no flash kernel takes these inputs."""
    global _ATEN_FLASH_OK
    if not _flash_device(q) or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    cu = cu_seqlens.to(torch.int32)
    if q.shape[1] != k.shape[1] and not GQA_NATIVE:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if _ATEN_FLASH_OK is not False:
        try:
            out = _aten_flash(q, k, v, cu, max_seqlen, causal, scale)
            _ATEN_FLASH_OK = True
            return out
        except torch.OutOfMemoryError:
            raise
        except (AttributeError, RuntimeError, TypeError) as e:  # op missing or refusing these inputs
            if _ATEN_FLASH_OK:
                raise
            _ATEN_FLASH_OK = False
            warnings.warn(f"aten flash varlen attention unavailable ({e}); using torch.nn.attention.varlen")
    if _varlen_attn is None:
        return None
    if q.shape[1] != k.shape[1]:  # not every torch version takes enable_gqa: expand kv heads
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    try:
        return _varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale,
                            window_size=(-1, 0) if causal else (-1, -1))
    except TypeError:  # is_causal keyword instead of window_size
        return _varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, is_causal=causal, scale=scale)


def packed_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool,
                 scale: float) -> Optional[torch.Tensor]:
    """Packed attention on cuDNN, or None where it cannot run (warns once per process, naming why)."""
    global _CUDNN_WARNED
    from megatron_eagle.models import cudnn_attention

    try:
        return cudnn_attention.cudnn_packed_attention(q, k, v, cu_seqlens, causal, scale)
    except cudnn_attention.CudnnUnsupported as e:  # CPU, no package, pre-Hopper, unsupported graph
        reason = str(e)
    if not _CUDNN_WARNED:
        _CUDNN_WARNED = True
        warnings.warn(f"cuDNN packed attention unavailable ({reason}); using FlashAttention-2 / exact SDPA")
    return None


def sbhd_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
               scale: float) -> Optional[torch.Tensor]:
    """[s, b, h, d] attention on cuDNN with strided layouts, or None where it cannot run (warns once)."""
    global _SBHD_WARNED
    from megatron_eagle.models import cudnn_attention, cudnn_sbhd_attention

    try:
        return cudnn_sbhd_attention.cudnn_sbhd_attention(q, k, v, causal, scale)
    except cudnn_attention.CudnnUnsupported as e:
        if not _SBHD_WARNED and q.is_cuda:
            _SBHD_WARNED = True
            warnings.warn(f"cuDNN [s, b, h, d] attention unavailable ({e}); using scaled_dot_product_attention")
    return None


class PackedCoreAttention(MegatronModule):
    """Core attention with the constructor/forward contract of megatron's DotProductAttention."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        backend: str = "auto",
    ):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.pg_collection = pg_collection
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.backend = backend
        assert (attention_dropout or config.attention_dropout or 0.0) == 0.0, "attention dropout unsupported"

    @property
    def causal(self) -> bool:
        return self.attn_mask_type == AttnMaskType.causal or self.attn_mask_type == AttnMaskType.padding_causal

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params: Optional[PackedSeqParams] = None):
        causal = self.causal if attn_mask_type is None else attn_mask_type in (
            AttnMaskType.causal, AttnMaskType.padding_causal)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            layout = getattr(packed_seq_params, "cp_layout", None)
            if layout is not None:  # context parallel: this rank's zigzag share of the pack
                from megatron_eagle.parallel.cp_attention import cp_attention

                assert causal, "context parallelism is for the causal LLM only"
                # CP kernels know auto/flash/sdpa; cuDNN is not wired into them, so they run as "auto".
                cp_backend = "auto" if self.backend == "cudnn" else self.backend
                out = cp_attention(query, key, value, layout, self.softmax_scale, cp_backend)
                return out.reshape(out.shape[0], -1)
            cp = getattr(self.pg_collection, "cp", None) if self.pg_collection is not None else None
            if cp is not None and self.config.context_parallel_size > 1:
                raise RuntimeError("context_parallel_size > 1 but the packed batch was not CP-split; run the "
                                   "model through EagleModel.forward (it splits packs with parallel/cp_split.py)")
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            out = None
            if self.backend == "cudnn" or (self.backend == "auto" and AUTO_PREFERS_CUDNN and query.is_cuda):
                out = packed_cudnn(query, key, value, cu, causal, self.softmax_scale)
            if out is None and self.backend in ("auto", "flash", "cudnn"):
                out = varlen_flash(query, key, value, cu, int(packed_seq_params.max_seqlen_q), causal,
                                   self.softmax_scale)
            if out is None:
                out = segment_sdpa(query, key, value, cu, causal, self.softmax_scale)
            return out.reshape(out.shape[0], -1)
        s, b = query.shape[:2]
        if (query.is_cuda and SBHD_PREFERS_CUDNN and self.backend in ("auto", "cudnn") and query.numel()
                and (attention_mask is None or causal)):
            out = sbhd_cudnn(query, key, value, causal, self.softmax_scale)
            if out is not None:
                return out.reshape(s, b, -1)
        # SBHD: [s, b, h, d] -> SDPA on [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask if not causal else None,
                                           is_causal=causal, scale=self.softmax_scale,
                                           enable_gqa=q.shape[1] != k.shape[1])
        return o.permute(2, 0, 1, 3).reshape(s, b, -1)
