"""The packed micro-batch the model consumes, and helpers to build it.

A pack is the concatenation of sub-samples (text with image tiles / video frames). Each
sub-sample attends only to itself (``cu_seqlens``), RoPE positions restart per sub-sample,
and labels are already shifted (``labels[i]`` is the target for ``tokens[i]``; -100 at each
sub-sample's last token, on unsupervised tokens and on padding).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Sequence

import torch

IGNORE_INDEX = -100


@dataclasses.dataclass
class PackedBatch:
    tokens: torch.Tensor        # [T] int64, the packed token ids (T includes tail padding)
    labels: torch.Tensor        # [T] int64, shifted targets, IGNORE_INDEX where unsupervised
    loss_weights: torch.Tensor  # [T] float32, per-token weight (0 where unsupervised)
    position_ids: torch.Tensor  # [T] int64, restarting at 0 per sub-sample
    cu_seqlens: torch.Tensor    # [n+1] int32, sub-sample boundaries (tail padding is its own segment)
    pixel_values: torch.Tensor  # [n_tiles, 3, S, S] normalised float or uint8 RGB, in <IMG_CONTEXT> run order
    max_seqlen: int
    # Index of pixel_values[0] among the pack's tiles when the batch carries only a share of them
    # (a CP rank's share, decoded by the loader); None: pixel_values holds every tile of the pack.
    tile_offset: Optional[int] = None
    # The host batch this one was copied from (set by ``to``). The model takes data-dependent
    # counts and indices (visual slots, supervised tokens) from it: reading them from the device
    # tensors would make the host wait for the GPU in the middle of the step.
    host: Optional["PackedBatch"] = dataclasses.field(default=None, repr=False, compare=False)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: v for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)}

    def to(self, device: torch.device, non_blocking: bool = False) -> "PackedBatch":
        """A copy on ``device`` that remembers this batch as its host copy (when this one is on the CPU).

        ``non_blocking``: copies from pageable memory are staged before the call returns, so this
        batch may be reused at once; the caller does not wait for the GPU's queue to drain."""
        host = self if self.tokens.device.type == "cpu" else self.host
        return dataclasses.replace(self, host=host, **{k: v.to(device, non_blocking=non_blocking)
                                                       for k, v in self._tensors().items()})

    def host_view(self) -> Optional["PackedBatch"]:
        """The host copy, if it still matches this batch's token layout (None after a CP split)."""
        h = self.host
        return h if h is not None and h.tokens.shape == self.tokens.shape else None

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def loss_weights_for(labels: torch.Tensor, cu_seqlens: torch.Tensor,
                     mode: Literal["sqrt", "token"] = "sqrt") -> torch.Tensor:
    """Per-token weights for one pack.

    ``sqrt`` (Eagle 2.5): w = (1/√n_i) / Σ_j √n_j for sub-sample i with n_i supervised tokens,
    so each sub-sample contributes ∝ √n_i and the weights sum to 1. ``token``: 1/Σ n_j.
    """
    sup = (labels != IGNORE_INDEX).float()
    w = torch.zeros_like(sup)
    bounds = cu_seqlens.tolist()
    counts = [float(sup[s:e].sum()) for s, e in zip(bounds[:-1], bounds[1:])]
    if mode == "token":
        total = sum(counts)
        return sup / total if total > 0 else w
    denom = sum(c ** 0.5 for c in counts)
    if denom == 0:
        return w
    for (s, e), n in zip(zip(bounds[:-1], bounds[1:]), counts):
        if n > 0:
            w[s:e] = sup[s:e] / (n ** 0.5 * denom)
    return w


def pack_samples(samples: Sequence[tuple[torch.Tensor, torch.Tensor]], pixel_values: Sequence[torch.Tensor],
                 tile_shape: tuple[int, int, int], pad_to_multiple: int = 1, pad_id: int = 0,
                 weighting: Literal["sqrt", "token"] = "sqrt") -> PackedBatch:
    """Concatenate ``(input_ids, labels_unshifted)`` sub-samples into one PackedBatch.

    ``labels_unshifted[i]`` is the supervision of token i itself (IGNORE_INDEX if not
    supervised); shifting happens here so no label crosses a sub-sample boundary.
    """
    toks, labs, pos, lens = [], [], [], []
    for ids, lab in samples:
        n = ids.numel()
        shifted = torch.full((n,), IGNORE_INDEX, dtype=torch.long)
        shifted[:-1] = lab[1:]
        toks.append(ids.long())
        labs.append(shifted)
        pos.append(torch.arange(n))
        lens.append(n)
    total = sum(lens)
    pad = (-total) % pad_to_multiple
    if pad:
        toks.append(torch.full((pad,), pad_id, dtype=torch.long))
        labs.append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
        pos.append(torch.arange(pad))
        lens.append(pad)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    labels = torch.cat(labs)
    pv = [p for p in pixel_values if p.numel()]
    pixels = torch.cat(pv) if pv else torch.zeros((0, *tile_shape))
    return PackedBatch(tokens=torch.cat(toks), labels=labels, loss_weights=loss_weights_for(labels, cu, weighting),
                       position_ids=torch.cat(pos), cu_seqlens=cu, pixel_values=pixels, max_seqlen=max(lens))
