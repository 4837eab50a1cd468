"""Core attention for packed (THD) and batched (SBHD) inputs, plugged in via ModuleSpec.

Replaces megatron-core's local ``DotProductAttention``, which cannot take packed sequences
and materialises a full [s, s] score matrix. Attention is causal within each sub-sample
and never crosses sub-samples (``cu_seqlens``). The kernel is chosen by the model's
:class:`~megatron_eagle.kernels.dispatch.AttentionKernels` (``attention_backend``). With
context parallelism (``PackedSeqParams`` carrying a CP layout) the THD path runs the
configured CP variant of :mod:`megatron_eagle.parallel.cp_attention` on the same kernels.
"""

from __future__ import annotations

import math
from typing import Optional

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_eagle.kernels.dispatch import AttentionKernels
from megatron_eagle.parallel.cp_attention import cp_attention
from megatron_eagle.parallel.cp_split import CPPackedSeqParams


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
        kernels: Optional[AttentionKernels] = None,
    ):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.pg_collection = pg_collection
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.kernels = kernels if kernels is not None else AttentionKernels()
        assert (attention_dropout or config.attention_dropout or 0.0) == 0.0, "attention dropout unsupported"

    @property
    def causal(self) -> bool:
        return self.attn_mask_type == AttnMaskType.causal or self.attn_mask_type == AttnMaskType.padding_causal

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params: Optional[PackedSeqParams] = None):
        causal = self.causal if attn_mask_type is None else attn_mask_type in (
            AttnMaskType.causal, AttnMaskType.padding_causal)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            if isinstance(packed_seq_params, CPPackedSeqParams):  # context parallel: this rank's zigzag share
                assert causal, "context parallelism is for the causal LLM only"
                out = cp_attention(query, key, value, packed_seq_params.cp_layout, self.softmax_scale, self.kernels)
                return out.reshape(out.shape[0], -1)
            cp = getattr(self.pg_collection, "cp", None) if self.pg_collection is not None else None
            if cp is not None and self.config.context_parallel_size > 1:
                raise RuntimeError("context_parallel_size > 1 but the packed batch was not CP-split; run the "
                                   "model through EagleModel.forward (it splits packs with parallel/cp_split.py)")
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            out = self.kernels.packed(query, key, value, cu, int(packed_seq_params.max_seqlen_q), causal,
                                      self.softmax_scale)
            return out.reshape(out.shape[0], -1)
        s, b = query.shape[:2]
        out = self.kernels.strided(query, key, value, causal, self.softmax_scale, attention_mask)
        return out.reshape(s, b, -1)
