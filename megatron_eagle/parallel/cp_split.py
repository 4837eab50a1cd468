"""Zigzag split of a packed batch over the context-parallel group, and its inverse.

Every sub-sample (``cu_seqlens`` segment, tail padding included) is padded to a multiple of
2·CP (pad token, ignored label, zero weight) and cut into 2·CP equal chunks; CP rank r holds
chunks r and 2·CP−1−r of every sub-sample, so causal work is balanced per sub-sample. The
local sequence is, per sub-sample, [chunk r, chunk 2·CP−1−r]: global positions ascend along
it, which the attention variants and the vision routing rely on. Under sequence parallelism a
padding segment is appended so the local length divides by TP.

The decoder receives ``cu_seqlens`` of the *padded global* pack (as TransformerEngine's THD
CP does): megatron's THD RoPE divides them by CP and applies the zigzag positions itself.
Loss weights are those of the whole pack (computed before the split), so Σ_ranks Σ_local w·CE
is the un-split loss and a rank holding only padding contributes exactly 0.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_eagle.batch import IGNORE_INDEX, PackedBatch
from megatron_eagle.parallel.comm import gather_rows_replicated
from megatron_eagle.parallel.groups import CPContext


def ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenation of ``arange(s, s + n)`` for each (s, n), vectorised."""
    lengths = lengths.long()
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long, device=starts.device)
    offsets = torch.cumsum(lengths, 0) - lengths
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=starts.device), lengths)
    return starts.long()[seg] + torch.arange(total, device=starts.device) - offsets[seg]


def zigzag_positions(cu_global: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """Global (padded) positions held by CP ``rank``, in local order."""
    g = cu_global[:-1].long()
    c = (cu_global[1:] - cu_global[:-1]).long() // (2 * cp)
    starts = torch.stack([g + rank * c, g + (2 * cp - 1 - rank) * c], 1).flatten()
    return ranges(starts, torch.stack([c, c], 1).flatten())


@dataclasses.dataclass
class CPLayout:
    """This rank's share of one pack plus the index maps the CP attention and routing reuse."""

    ctx: CPContext
    cu_global: torch.Tensor  # int32 [n+1]: padded sub-sample boundaries of the whole pack
    max_seqlen: int  # longest padded sub-sample
    positions: torch.Tensor  # int64 [t_local]: global padded positions held here (ascending)
    src: torch.Tensor  # int64 [T_padded]: original pack index of each padded position, -1 = padding
    dst: torch.Tensor  # int64 [T]: padded position of each original token
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_weights: torch.Tensor
    position_ids: torch.Tensor
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def cp(self) -> int:
        return self.ctx.size

    @property
    def num_local(self) -> int:
        return int(self.positions.numel())

    @property
    def cu_local(self) -> torch.Tensor:
        return self.cu_global // self.cp

    def cached(self, key, fn):
        """Per-pack memo (index maps are computed by the first layer, reused by the others)."""
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def positions_of(self, rank: int) -> torch.Tensor:
        return self.cached(("pos", rank), lambda: zigzag_positions(self.cu_global, self.cp, rank))

    def owner(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(CP rank, local index) holding each padded global position."""
        def make():
            T = int(self.cu_global[-1])
            own = torch.empty(T, dtype=torch.long, device=self.positions.device)
            idx = torch.empty_like(own)
            for r in range(self.cp):
                p = self.positions_of(r)
                own[p] = r
                idx[p] = torch.arange(p.numel(), device=p.device)
            return own, idx
        return self.cached("owner", make)

    def packed_seq_params(self) -> "CPPackedSeqParams":
        cu = self.cu_global.to(torch.int32)
        return CPPackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=self.max_seqlen,
                                 max_seqlen_kv=self.max_seqlen, cp_layout=self)

    def gather_full(self, local: torch.Tensor) -> torch.Tensor:
        """Local rows [t_local, ...] of every rank -> the original pack's rows [T, ...] (padding dropped).
        The backward keeps this rank's rows (every rank computes the same function of the result)."""
        every = gather_rows_replicated(local, self.ctx.group)  # [cp * t_local, ...], rank-major
        own, idx = self.owner()
        rows = own[self.dst] * self.num_local + idx[self.dst]
        return every.index_select(0, rows)


@dataclasses.dataclass
class CPPackedSeqParams(PackedSeqParams):
    """PackedSeqParams (global padded cu_seqlens, for megatron's RoPE) carrying this rank's layout."""

    cp_layout: Optional[CPLayout] = None


def padded_lengths(lengths: torch.Tensor, cp: int, sp_tp: int) -> torch.Tensor:
    """Sub-sample lengths rounded up to 2·cp (zero-length ones dropped), plus a padding
    segment if needed so the local length (total / cp) divides by ``sp_tp``."""
    q = 2 * cp
    lengths = lengths[lengths > 0]
    n = (lengths + q - 1) // q * q
    local = int(n.sum()) // cp
    extra = 0
    while (local + extra * 2) % sp_tp:  # each extra chunk-pair adds 2 local tokens per rank
        extra += 1
    if extra:
        n = torch.cat([n, n.new_tensor([extra * q])])
    return n


def split_batch(batch: PackedBatch, ctx: CPContext, pad_id: int = 0) -> CPLayout:
    """This CP rank's zigzag share of ``batch`` (text fields only; tiles go through vision_cp)."""
    dev = batch.tokens.device
    cu = batch.cu_seqlens.long().to(dev)
    if int(cu[-1]) != batch.num_tokens:
        raise ValueError(f"cu_seqlens end at {int(cu[-1])} but the pack has {batch.num_tokens} tokens")
    lengths = cu[1:] - cu[:-1]
    if bool((lengths < 0).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    starts = cu[:-1][lengths > 0]
    lengths = lengths[lengths > 0]
    n = padded_lengths(lengths, ctx.size, ctx.sp_tp)
    cu_g = torch.zeros(len(n) + 1, dtype=torch.long, device=dev)
    cu_g[1:] = torch.cumsum(n, 0)
    T = int(cu_g[-1])
    # original index of every padded position (-1 where padding was inserted)
    seg = torch.repeat_interleave(torch.arange(len(n), device=dev), n)
    off = torch.arange(T, device=dev) - cu_g[:-1][seg]
    real_len = torch.cat([lengths, lengths.new_zeros(len(n) - len(lengths))])
    real_start = torch.cat([starts, starts.new_zeros(len(n) - len(lengths))])
    src = torch.where(off < real_len[seg], real_start[seg] + off, torch.full_like(off, -1))
    dst = torch.empty(batch.num_tokens, dtype=torch.long, device=dev)
    keep = src >= 0
    dst[src[keep]] = torch.arange(T, device=dev)[keep]
    pos = zigzag_positions(cu_g, ctx.size, ctx.rank)
    s = src[pos]
    real = s >= 0
    sc = s.clamp(min=0)
    return CPLayout(
        ctx=ctx, cu_global=cu_g.to(torch.int32), max_seqlen=int(n.max()) if len(n) else 0, positions=pos, src=src,
        dst=dst,
        tokens=torch.where(real, batch.tokens[sc], torch.full_like(sc, pad_id)),
        labels=torch.where(real, batch.labels[sc], torch.full_like(sc, IGNORE_INDEX)),
        loss_weights=torch.where(real, batch.loss_weights[sc], torch.zeros((), dtype=batch.loss_weights.dtype,
                                                                            device=dev)),
        position_ids=off[pos])


def pad_token_for(image_token_id: int, preferred: Optional[int] = 0) -> int:
    """A pad id that is not <IMG_CONTEXT> (padding must never take a visual slot)."""
    p = 0 if preferred is None else preferred
    return p if p != image_token_id else image_token_id + 1
