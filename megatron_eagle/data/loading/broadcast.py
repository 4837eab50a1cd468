"""Send a LoaderBatch from one rank to the others of a group (TP ranks of one DP rank).

Four collectives per micro-batch: a fixed-size int64 header (shapes, max_seqlen, pixel dtype,
error count, tile share), then one int64 buffer (tokens, labels, positions, cu_seqlens, tile
positions, sample ids, row status), the float32 loss weights, and the pixels (float32 or uint8).
With CP > 1 the group is one CP rank's TP group, whose source built that CP rank's tile share.
Works with gloo (CPU tensors) and NCCL (tensors on the current CUDA device; receivers get the
batch on the device).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_eagle.data.loading.pack_builder import LoaderBatch

_HEADER = 12
_DTYPES = {0: torch.float32, 1: torch.uint8}
_CODES = {v: k for k, v in _DTYPES.items()}


def group_device(group: Any) -> torch.device:
    """Where tensors must live for collectives on ``group``: CUDA for NCCL, else CPU."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_batch(batch: Optional[LoaderBatch], src: int, group: Any, errors: int = 0
                    ) -> tuple[LoaderBatch, int]:
    """Broadcast ``batch`` (given on ``src``, a global rank; None elsewhere) over ``group``.

    Returns (the batch, the source's error count for it) on every rank; on NCCL it lives on the GPU.
    """
    dev = group_device(group)
    is_src = dist.get_rank() == src
    header = torch.zeros(_HEADER, dtype=torch.int64)
    if is_src:
        b = batch
        pv = b.pixel_values
        header = torch.tensor([b.tokens.numel(), b.cu_seqlens.numel(), pv.shape[0], pv.shape[-1] if pv.dim() == 4
                               else 0, b.tile_positions.numel(), b.sample_ids.shape[0], b.max_seqlen,
                               _CODES[pv.dtype], errors, b.tile_offset, _or(b.pack_tiles),
                               _or(None if b.row_status is None else b.row_status.numel())], dtype=torch.int64)
    header = header.to(dev)
    dist.broadcast(header, src, group=group)
    T, n_cu, n_tiles, S, n_pos, n_smp, max_seqlen, code, errors, offset, pack_tiles, n_rows = header.tolist()
    n_int = 3 * T + n_cu + n_pos + 2 * n_smp + max(n_rows, 0)
    if is_src:
        status = [] if b.row_status is None else [b.row_status.long()]
        ints = torch.cat([b.tokens.long(), b.labels.long(), b.position_ids.long(), b.cu_seqlens.long(),
                          b.tile_positions.long(), b.sample_ids.long().reshape(-1), *status]).to(dev)
        weights = b.loss_weights.float().to(dev)
        pixels = b.pixel_values.contiguous().to(dev)
    else:
        ints = torch.empty(n_int, dtype=torch.int64, device=dev)
        weights = torch.empty(T, dtype=torch.float32, device=dev)
        pixels = torch.empty((n_tiles, 3, S, S), dtype=_DTYPES[code], device=dev)
    dist.broadcast(ints, src, group=group)
    dist.broadcast(weights, src, group=group)
    if n_tiles:
        dist.broadcast(pixels, src, group=group)
    if is_src and dev.type == "cpu":
        return batch, errors
    parts = torch.split(ints, [T, T, T, n_cu, n_pos, 2 * n_smp, max(n_rows, 0)])
    out = LoaderBatch(tokens=parts[0], labels=parts[1], loss_weights=weights, position_ids=parts[2],
                      cu_seqlens=parts[3].to(torch.int32), pixel_values=pixels.reshape(n_tiles, 3, S, S)
                      if n_tiles else pixels, max_seqlen=int(max_seqlen), tile_positions=parts[4],
                      sample_ids=parts[5].reshape(-1, 2), row_status=parts[6] if n_rows >= 0 else None,
                      tile_offset=int(offset), pack_tiles=pack_tiles if pack_tiles >= 0 else None)
    return out, errors


def _or(n: Optional[int]) -> int:
    """An optional count for the header (-1 = None)."""
    return -1 if n is None else int(n)
