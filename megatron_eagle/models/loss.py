"""Weighted cross-entropy on supervised tokens without the full [tokens × vocab] logits.

Only supervised positions are projected. They are processed in chunks; each chunk's
logits (GEMM in the weights' dtype, cross-entropy in fp32) live only inside an activation
checkpoint, so peak memory is one chunk's logits (forward) and backward recomputes them.
Logits are vocab-parallel under TP and reduced by megatron-core's ``vocab_parallel_cross_entropy``.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from torch.utils.checkpoint import checkpoint


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
              pad_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    # The GEMM runs in the weights' dtype (bf16: tensor cores, fp32 accumulation), the softmax in
    # fp32. An fp32 GEMM here runs off the tensor cores and copies the whole [V, H] weight to fp32
    # for every chunk.
    logits = torch.matmul(hidden.to(weight.dtype), weight.t()).float()  # [c, V/tp]
    if pad_mask is not None:  # padded vocabulary rows take no probability mass
        logits = logits.masked_fill(pad_mask, float("-inf"))
    return tensor_parallel.vocab_parallel_cross_entropy(logits.unsqueeze(1), labels.unsqueeze(1)).squeeze(1)


def vocab_pad_mask(weight: torch.Tensor, vocab_size: Optional[int]) -> Optional[torch.Tensor]:
    """[V/tp] True where this TP rank's output rows are padding (global row >= ``vocab_size``);
    None when the rank holds none."""
    if vocab_size is None:
        return None
    rows = weight.shape[0]
    start = rows * ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    if start + rows <= vocab_size:
        return None
    return torch.arange(start, start + rows, device=weight.device) >= vocab_size


def chunked_weighted_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        loss_weights: torch.Tensor, chunk_tokens: int = 2048,
                        supervised: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None
                        ) -> torch.Tensor:
    """Σ_t w_t · CE(h_t Wᵀ, y_t) over supervised tokens.

    hidden: [T, H] (full sequence on every TP rank); weight: [V/tp, H] this rank's vocab
    shard; labels: [T] (-100 = ignore); loss_weights: [T]. ``supervised``: the positions with
    labels >= 0 if known (from the host copy of the batch: finding them on the device syncs).
    ``vocab_size``: the true vocabulary; rows of ``weight`` at or past it (TP padding) are masked out.
    Returns a scalar.
    """
    sel = supervised if supervised is not None else (labels >= 0).nonzero(as_tuple=True)[0]
    if sel.numel() == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0  # keeps the graph (and grads) defined
    h, y, w = hidden.index_select(0, sel), labels.index_select(0, sel), loss_weights.index_select(0, sel)
    total = hidden.new_zeros((), dtype=torch.float32)
    pad_mask = vocab_pad_mask(weight, vocab_size)
    for start in range(0, h.shape[0], chunk_tokens):
        end = start + chunk_tokens
        ce = checkpoint(_chunk_ce, h[start:end], weight, y[start:end], pad_mask, use_reentrant=False)
        total = total + (ce * w[start:end].float()).sum()
    return total


def full_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[T, V] logits gathered over TP (for inference and tests, not training)."""
    logits = torch.matmul(hidden, weight.t())
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)
