"""Every rank of a DP replica trains on the same packs: agree on bad sub-samples before the forward.

The TP x CP x PP ranks of one replica each build (or receive) the same packs, and their token
sides are identical by construction. Which sub-samples are bad can still differ between them:
with CP each rank decodes only its share of a pack's tiles, so a corrupt medium is seen only by
the rank(s) whose share holds it (and the loss is computed on the last pipeline stage, which
decodes nothing); a transient read error may hit one rank and not another. Before the forward
pass, one small all-reduce (MAX) per step over the replica group carries, for every micro-batch,
a fingerprint of the token side and each plan row's status (``LoaderBatch.row_status``). Then
every rank, identically:

- blanks the sub-samples that any rank blanked (:func:`blank_subsamples`: labels ignored, loss
  weights re-normalised exactly as ``loss_weights_for`` would, tiles blank), so the loss and the
  gradients are those of the pack in which they contribute nothing;
- if the token sides differ (a row left out on some ranks only, or any fingerprint mismatch),
  replaces the pack by the same all-padding pack of the largest length (zero loss weight) and
  logs an error: no hang, no silent divergence, at the price of one micro-batch.

The returned batches go to ``StageLoader.settle`` so the loader counts each rejection once.
"""

from __future__ import annotations

import logging
from typing import Literal, Sequence

import torch
import torch.distributed as dist

from megatron_eagle.batch import IGNORE_INDEX
from megatron_eagle.data.loading.broadcast import group_device
from megatron_eagle.data.loading.pack_builder import ROW_BLANKED, ROW_LEFT_OUT, ROW_USED, LoaderBatch, blank_subsamples

log = logging.getLogger("megatron_eagle.train")
_FP = 4  # fingerprint entries per micro-batch: tokens, cu_seqlens entries, two checksums


def _checksum(x: torch.Tensor) -> torch.Tensor:
    """Position-weighted int64 sum (exact: |x| < 2^20 per entry, < 2^20 entries, weights < 2^16)."""
    x = x.long().reshape(-1)
    w = torch.arange(x.numel(), device=x.device) % 65521 + 1
    return (x * w).sum().reshape(1)


def summary(batch: LoaderBatch) -> torch.Tensor:
    """[_FP + n_rows] int64: the token side's fingerprint, then each plan row's status."""
    dev = batch.tokens.device
    fp = torch.cat([torch.tensor([batch.num_tokens, batch.cu_seqlens.numel()], device=dev),
                    _checksum(batch.tokens), _checksum(batch.cu_seqlens)])
    return torch.cat([fp, batch.statuses().to(dev).long()])


def padding_pack(like: LoaderBatch, n_tokens: int, n_rows: int, pad_id: int) -> LoaderBatch:
    """One all-padding segment of ``n_tokens`` with zero loss weight and no tiles; every row left out."""
    dev = like.tokens.device
    return LoaderBatch(tokens=torch.full((n_tokens,), pad_id, dtype=torch.long, device=dev),
                       labels=torch.full((n_tokens,), IGNORE_INDEX, dtype=torch.long, device=dev),
                       loss_weights=torch.zeros(n_tokens, dtype=torch.float32, device=dev),
                       position_ids=torch.arange(n_tokens, device=dev),
                       cu_seqlens=torch.tensor([0, n_tokens], dtype=torch.int32, device=dev),
                       pixel_values=like.pixel_values[:0], max_seqlen=n_tokens,
                       tile_positions=torch.zeros(0, dtype=torch.long, device=dev),
                       sample_ids=torch.zeros((0, 2), dtype=torch.long, device=dev),
                       row_status=torch.full((n_rows,), ROW_LEFT_OUT, dtype=torch.long, device=dev),
                       tile_offset=0, pack_tiles=0)


def settle_batch(batch: LoaderBatch, hi: torch.Tensor, lo: torch.Tensor, weighting: Literal["sqrt", "token"],
                 pad_id: int) -> tuple[LoaderBatch, bool]:
    """Apply the group's maximum ``hi`` and minimum ``lo`` of :func:`summary` to one batch.
    Returns (the agreed batch, whether the ranks' token sides differed)."""
    fp_hi, fp_lo, st_hi, st_lo = hi[:_FP], lo[:_FP], hi[_FP:], lo[_FP:]
    left_out_somewhere = st_hi == ROW_LEFT_OUT
    if not torch.equal(fp_hi, fp_lo) or bool((left_out_somewhere & (st_lo != ROW_LEFT_OUT)).any()):
        return padding_pack(batch, int(fp_hi[0]), int(st_hi.numel()), pad_id), True
    if torch.equal(st_hi, st_lo):  # every rank saw the same: nothing to change
        return batch, False
    local = batch.statuses().cpu()
    in_pack = local != ROW_LEFT_OUT
    seg = torch.cumsum(in_pack.long(), 0) - 1  # row -> cu_seqlens segment
    new = (st_hi == ROW_BLANKED) & (local == ROW_USED)
    return blank_subsamples(batch, seg[new].tolist(), weighting), False


def agree_on_batches(batches: Sequence[LoaderBatch], group, weighting: Literal["sqrt", "token"] = "sqrt",
                     pad_id: int = 0) -> list[LoaderBatch]:
    """The replica's agreed micro-batches of one step (see the module doc). ``group`` holds every rank
    of this DP replica (TP x CP x PP, :func:`megatron_eagle.runtime.distributed.replica_group`); all of
    them must call this with the batches of the same step. ``weighting`` is the loss weighting the
    loader used; ``pad_id`` (not ``<IMG_CONTEXT>``) fills a replaced pack. One all-reduce."""
    if group is None or dist.get_world_size(group) == 1:
        return list(batches)
    dev = group_device(group)
    parts = [summary(b).to(dev) for b in batches]
    vec = torch.cat(parts)
    both = torch.cat([vec, -vec])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    both = both.cpu()  # the one host sync
    hi, lo = both[:vec.numel()], -both[vec.numel():]
    out, start = [], 0
    for i, (b, p) in enumerate(zip(batches, parts)):
        end = start + p.numel()
        agreed, diverged = settle_batch(b, hi[start:end], lo[start:end], weighting, pad_id)
        if diverged:
            log.error("micro-batch %d: the ranks of this replica built different packs (a read error on some of "
                      "them only?); every rank trains on a padding pack instead", i)
        out.append(agreed)
        start = end
    return out


def rejected_rows(batches: Sequence[LoaderBatch]) -> int:
    """Plan rows left out or blanked in ``batches`` (count them on one rank per replica)."""
    return sum(int((b.statuses() != ROW_USED).sum()) for b in batches)


__all__ = ["agree_on_batches", "padding_pack", "rejected_rows", "settle_batch", "summary"]
