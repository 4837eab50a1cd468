"""The vision encoder is data-parallel inside the CP group.

Each CP rank encodes a contiguous, count-balanced share of the pack's tiles and video frames
(ViT -> pixel shuffle -> connector). The training loader decodes only that share on each rank
(``tile_offset`` says where it starts); a batch holding every tile is sliced here instead.
Visual token k fills the k-th ``<IMG_CONTEXT>`` slot of the pack; the zigzag split decides which
CP rank holds that slot, and one all-to-all (uneven counts, differentiable) sends every visual
token straight to its owner. Nothing the size of the whole pack is materialised: a rank holds its
share of tiles, the tokens it encoded and the tokens its own slots need. Because both a source's
share and a rank's local slots are in ascending slot order, the received rows (concatenated in
source-rank order) are already in local slot order.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from megatron_eagle.parallel.comm import all_to_all_rows
from megatron_eagle.parallel.cp_split import CPLayout


def tile_shares(n_tiles: int, cp: int) -> list[tuple[int, int]]:
    """Contiguous tile ranges per CP rank, sizes differing by at most one."""
    base, extra = divmod(n_tiles, cp)
    out, a = [], 0
    for r in range(cp):
        b = a + base + (1 if r < extra else 0)
        out.append((a, b))
        a = b
    return out


def route_counts(dest: torch.Tensor, shares: list[tuple[int, int]], tokens_per_tile: int,
                 rank: int) -> tuple[list[int], list[int], torch.Tensor]:
    """(send counts per destination, receive counts per source, send order of this rank's tokens)."""
    P = len(shares)
    lo, hi = shares[rank]
    mine = dest[lo * tokens_per_tile:hi * tokens_per_tile]
    send = torch.bincount(mine, minlength=P).tolist()
    recv = [int((dest[a * tokens_per_tile:b * tokens_per_tile] == rank).sum()) for a, b in shares]
    return send, recv, torch.argsort(mine, stable=True)


def local_tiles(pixel_values: torch.Tensor, n_tiles: int, share: tuple[int, int],
                tile_offset: Optional[int] = None) -> torch.Tensor:
    """This rank's tiles ``share`` = [lo, hi) of a pack of ``n_tiles``: ``pixel_values`` holds either the
    whole pack (``tile_offset`` None or 0; sliced here) or exactly the share, starting at pack tile
    ``tile_offset`` (used as is). Raises ValueError on anything else."""
    lo, hi = share
    n = int(pixel_values.shape[0])
    if not tile_offset and n == n_tiles:
        return pixel_values[lo:hi]
    if tile_offset is None:
        raise ValueError(f"batch has {n_tiles} tiles' worth of <IMG_CONTEXT> tokens but {n} tiles")
    if tile_offset == lo and n == hi - lo:
        return pixel_values
    raise ValueError(f"batch holds tiles [{tile_offset}, {tile_offset + n}) of a pack of {n_tiles}, but this "
                     f"CP rank encodes [{lo}, {hi}); build the loader with this rank's cp_rank and the stage's cp")


def encode_and_route(encode: Callable[[torch.Tensor], torch.Tensor], pixel_values: torch.Tensor,
                     tokens: torch.Tensor, layout: CPLayout, image_token_id: int, tokens_per_tile: int,
                     hidden_size: int, dtype: torch.dtype,
                     keepalive: Optional[Iterable[torch.nn.Parameter]] = None,
                     tile_offset: Optional[int] = None) -> torch.Tensor:
    """Visual embeddings for this rank's local ``<IMG_CONTEXT>`` slots, in local order: [n_local_slots, H].

    ``tokens`` are the whole (un-split) pack's ids; ``encode`` maps tiles [n, 3, S, S] to
    visual tokens [n * tokens_per_tile, H]. ``pixel_values`` are the whole pack's tiles, or (with
    ``tile_offset``) only this rank's share of them, starting at that pack tile."""
    ctx = layout.ctx
    slots = torch.nonzero(tokens == image_token_id).squeeze(1)
    if slots.numel() % tokens_per_tile:
        raise ValueError(f"batch has {slots.numel()} <IMG_CONTEXT> tokens, not a multiple of {tokens_per_tile} "
                         "per tile")
    n_tiles = slots.numel() // tokens_per_tile
    shares = tile_shares(n_tiles, ctx.size)
    mine = local_tiles(pixel_values, n_tiles, shares[ctx.rank], tile_offset)  # raises before any collective
    own, _ = layout.owner()
    dest = own[layout.dst[slots]]
    send, recv, order = route_counts(dest, shares, tokens_per_tile, ctx.rank)
    lo, hi = shares[ctx.rank]
    if hi > lo:
        vis = encode(mine).to(dtype)
    else:
        vis = torch.zeros((0, hidden_size), dtype=dtype, device=tokens.device)
        if keepalive is not None and n_tiles:
            # Peers encode tiles, so at CP=1 these parameters would get gradients: keep them in the
            # graph (zero gradient) so DDP's overlapped grad hooks fire on this rank too.
            vis = vis + sum(p.reshape(-1)[:1].sum() for p in keepalive if p.requires_grad) * 0.0
    return all_to_all_rows(vis.index_select(0, order), send, recv, ctx.group)
