"""Weighted cross-entropy on supervised tokens without the full [tokens × vocab] logits.

Only supervised positions are projected. They are processed in chunks; each chunk's
logits (GEMM in the weights' dtype, cross-entropy in fp32) live only inside an activation
checkpoint, so peak memory is one chunk's logits (forward) and backward recomputes them.
Logits are vocab-parallel under TP and reduced by megatron-core's ``vocab_parallel_cross_entropy``.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from torch.utils.checkpoint import checkpoint


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # The GEMM runs in the weights' dtype (bf16: tensor cores, fp32 accumulation), the softmax in
    # fp32. An fp32 GEMM here runs off the tensor cores and copies the whole [V, H] weight to fp32
    # for every chunk.
    logits = torch.matmul(hidden.to(weight.dtype), weight.t()).float()  # [c, V/tp]
    return tensor_parallel.vocab_parallel_cross_entropy(logits.unsqueeze(1), labels.unsqueeze(1)).squeeze(1)


def chunked_weighted_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        loss_weights: torch.Tensor, chunk_tokens: int = 2048,
                        supervised: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_t w_t · CE(h_t Wᵀ, y_t) over supervised tokens.

    hidden: [T, H] (full sequence on every TP rank); weight: [V/tp, H] this rank's vocab
    shard; labels: [T] (-100 = ignore); loss_weights: [T]. ``supervised``: the positions with
    labels >= 0 if known (from the host copy of the batch: finding them on the device syncs).
    Returns a scalar.
    """
    sel = supervised if supervised is not None else (labels >= 0).nonzero(as_tuple=True)[0]
    if sel.numel() == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0  # keeps the graph (and grads) defined
    h, y, w = hidden.index_select(0, sel), labels.index_select(0, sel), loss_weights.index_select(0, sel)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        end = start + chunk_tokens
        ce = checkpoint(_chunk_ce, h[start:end], weight, y[start:end], use_reentrant=False)
        total = total + (ce * w[start:end].float()).sum()
    return total


def full_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[T, V] logits gathered over TP (for inference and tests, not training)."""
    logits = torch.matmul(hidden, weight.t())
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)
