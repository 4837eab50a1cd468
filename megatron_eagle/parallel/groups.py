"""The context-parallel group of this rank and, for the hybrid variant, its two levels.

The CP group is megatron-core's (``parallel_state.get_context_parallel_group()``), so CP
composes with TP, PP and DP exactly as megatron lays ranks out (CP ranks are strided by TP).
Variants map onto a two-level split ``cp = U x R`` of the group in CP-rank order:

- ``ring``: U=1, R=cp; ``ulysses``: U=cp, R=1; ``allgather``: all-gather over the whole group;
- ``hybrid``: Ulysses inside groups of U consecutive CP ranks (intra-node: CP ranks
  ``ρU .. ρU+U-1``) x ring across the R strided groups (ranks ``u, U+u, 2U+u, ...``), the
  level-0 / level-1 layout of megatron's ``hierarchical_context_parallel_sizes`` (used when present).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_eagle.config import ConfigError, ParallelConfig, ulysses_degree

_SUBGROUPS: dict[tuple, dict[tuple[int, ...], object]] = {}  # (all CP groups, U) -> ranks -> group


@dataclass
class CPContext:
    """Everything the split, the attention and the loss need to know about CP on this rank."""

    group: object  # the CP process group
    ranks: list[int]  # its global ranks, in CP-rank order
    rank: int  # this rank's CP rank
    variant: str
    ulysses: int  # U: Ulysses (head all-to-all) degree
    ring: int  # R: ring degree (cp = U * R)
    intra_group: object = None  # U consecutive CP ranks (Ulysses level)
    inter_group: object = None  # R strided CP ranks (ring level)
    inter_ranks: Optional[list[int]] = None  # global ranks of the ring level, in ring order
    sp_tp: int = 1  # local sequence length must divide by this (TP size under sequence parallelism)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def intra_rank(self) -> int:
        return self.rank % self.ulysses

    @property
    def inter_rank(self) -> int:
        return self.rank // self.ulysses


def gpus_per_node() -> int:
    for name in ("LOCAL_WORLD_SIZE", "SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE"):
        v = os.environ.get(name, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return n if n > 0 else 1 << 30


def _all_cp_groups() -> tuple[tuple[int, ...], ...]:
    from megatron.core import parallel_state as ps

    mine = list(ps.get_context_parallel_global_ranks())
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return tuple(sorted({tuple(g) for g in every}))


def _two_level_groups(cp_groups: tuple[tuple[int, ...], ...], u: int) -> dict[tuple[int, ...], object]:
    """Create (collectively, on every rank, same order) the Ulysses and ring subgroups of every CP group."""
    key = (cp_groups, u)
    if key not in _SUBGROUPS:
        made = {}
        for g in cp_groups:
            r = len(g) // u
            for sub in [g[i * u:(i + 1) * u] for i in range(r)] + [g[j::u] for j in range(u)]:
                made[tuple(sub)] = dist.new_group(list(sub)) if len(sub) > 1 else None
        _SUBGROUPS[key] = made
    return _SUBGROUPS[key]


def build_cp_context(parallel: ParallelConfig, num_heads: int) -> Optional[CPContext]:
    """The CP context of this rank (None when cp == 1). Collective over all ranks for hybrid."""
    if parallel.cp <= 1:
        return None
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_context_parallel_world_size() != parallel.cp:
        have = ps.get_context_parallel_world_size() if ps.model_parallel_is_initialized() else None
        raise ConfigError("parallel.cp", f"{parallel.cp} but megatron's context-parallel group has size {have}",
                          "call init_model_parallel(tp, pp, cp) with the same cp before building the model")
    u = ulysses_degree(parallel, num_heads, gpus_per_node())
    group = ps.get_context_parallel_group()
    ranks = list(ps.get_context_parallel_global_ranks())
    rank = ps.get_context_parallel_rank()
    r = parallel.cp // u
    ctx = CPContext(group=group, ranks=ranks, rank=rank, variant=parallel.cp_variant, ulysses=u, ring=r,
                    sp_tp=parallel.tp if parallel.sp else 1)
    if u == 1:
        ctx.inter_group, ctx.inter_ranks = group, ranks
    elif r == 1:
        ctx.intra_group = group
    else:
        hier = ps.get_hierarchical_context_parallel_groups(check_initialized=False)
        if hier and len(hier) == 2 and dist.get_world_size(hier[0]) == u:
            ctx.intra_group, ctx.inter_group = hier
        else:
            subs = _two_level_groups(_all_cp_groups(), u)
            ctx.intra_group = subs[tuple(ranks[(rank // u) * u:(rank // u + 1) * u])]
            ctx.inter_group = subs[tuple(ranks[rank % u::u])]
        ctx.inter_ranks = ranks[rank % u::u]
    return ctx
