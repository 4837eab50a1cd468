"""Assign packs to (step, micro-batch, DP rank).

A step is one optimizer step: every DP rank runs ``micro_batches`` packs, then the gradient
all-reduce makes every rank wait for the slowest one. The straggler is therefore the rank with
the largest *sum* of pack costs in the step; ``imbalance`` is max/mean of those sums.

Both schedules give every rank the same number of packs: the ``P mod (DP * micro_batches)``
packs left out of the epoch are
underfilled ones first, then those with the fewest samples (their samples are reported as
``dropped_tail`` and listed, so a next epoch can start with them). Nothing is duplicated.

- ``random`` (the Eagle 2.5 way): shuffle packs, deal them in order.
- ``cost``: sort packs by cost and cut the sorted list into rounds of DP packs (near-equal
  cost inside a round), shuffle the rounds with the seed (long and short steps spread over the
  epoch), put ``micro_batches`` rounds in a step, and give each next round's most expensive
  pack to the rank with the smallest running sum (LPT), which cancels the residual spread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Schedule:
    """``pack[i]`` runs at ``step[i]``, micro-batch ``micro[i]``, on DP rank ``rank[i]``.

    Entries are sorted by (step, micro, rank)."""

    pack: np.ndarray
    step: np.ndarray
    micro: np.ndarray
    rank: np.ndarray
    left_out: np.ndarray  # packs not scheduled (tail)
    num_steps: int


def _split_tail(pack_size: np.ndarray, pack_tokens: np.ndarray, per_step: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kept, left_out) pack indices. The ``P mod per_step`` packs left out are underfilled packs
    (< 90% of the fullest) first, then those with the fewest samples (fewest tokens on ties), so
    fill goes up and the fewest samples miss the epoch."""
    n = len(pack_tokens)
    n_out = n % per_step
    if n_out == 0:
        return np.arange(n), np.zeros(0, np.int64)
    perm = rng.permutation(n)
    full = pack_tokens[perm] >= 0.9 * pack_tokens.max()
    by_size = perm[np.lexsort((pack_tokens[perm], pack_size[perm], full))]
    return np.sort(by_size[n_out:]), np.sort(by_size[:n_out])


def _finish(pack_grid: np.ndarray, rank_grid: np.ndarray, left_out: np.ndarray) -> Schedule:
    """From (steps, micro, dp) grids of packs and ranks to a flat, sorted schedule."""
    s, k, dp = pack_grid.shape
    step = np.repeat(np.arange(s), k * dp)
    micro = np.tile(np.repeat(np.arange(k), dp), s)
    rank = rank_grid.reshape(-1)
    pack = pack_grid.reshape(-1)
    order = np.lexsort((rank, micro, step))
    return Schedule(pack[order], step[order], micro[order], rank[order], left_out, s)


def schedule_random(pack_size: np.ndarray, pack_tokens: np.ndarray, dp: int, micro_batches: int,
                    rng: np.random.Generator) -> Schedule:
    """Shuffle and deal: what Eagle 2.5's sampler does with the packs of its knapsack."""
    per_step = dp * micro_batches
    kept, left_out = _split_tail(pack_size, pack_tokens, per_step, rng)
    grid = rng.permutation(kept).reshape(-1, micro_batches, dp)
    ranks = np.broadcast_to(np.arange(dp), grid.shape)
    return _finish(grid, ranks, left_out)


def schedule_by_cost(pack_cost: np.ndarray, pack_size: np.ndarray, pack_tokens: np.ndarray, dp: int,
                     micro_batches: int, rng: np.random.Generator) -> Schedule:
    """Equal-cost rounds of DP packs, shuffled, LPT-combined into steps of ``micro_batches`` rounds."""
    per_step = dp * micro_batches
    kept, left_out = _split_tail(pack_size, pack_tokens, per_step, rng)
    perm = rng.permutation(kept)
    by_cost = perm[np.argsort(pack_cost[perm], kind="stable")]
    rounds = by_cost.reshape(-1, dp)[:, ::-1]  # each round: most expensive first
    rounds = rounds[rng.permutation(len(rounds))]
    steps = len(rounds) // micro_batches
    grid = rounds.reshape(steps, micro_batches, dp)
    ranks = np.empty_like(grid)
    # Round 0: a random rank order per step, so no rank always gets the most expensive pack.
    ranks[:, 0, :] = np.argsort(rng.random((steps, dp)), axis=1)
    sums = np.zeros((steps, dp))
    rows = np.arange(steps)[:, None]
    sums[rows, ranks[:, 0, :]] = pack_cost[grid[:, 0, :]]
    for j in range(1, micro_batches):
        ranks[:, j, :] = np.argsort(sums, axis=1, kind="stable")  # emptiest rank takes the biggest pack
        sums[rows, ranks[:, j, :]] += pack_cost[grid[:, j, :]]
    return _finish(grid, ranks, left_out)


def truncate(sched: Schedule, steps: int) -> Schedule:
    """Keep the first ``steps`` steps (step order is already shuffled); later packs join ``left_out``."""
    keep = sched.step < steps
    left = np.sort(np.concatenate([sched.left_out, sched.pack[~keep]]))
    return Schedule(sched.pack[keep], sched.step[keep], sched.micro[keep], sched.rank[keep], left, steps)


def step_rank_costs(sched: Schedule, pack_cost: np.ndarray, dp: int) -> np.ndarray:
    """(steps, dp) matrix of each rank's summed pack cost per step."""
    flat = np.bincount(sched.step * dp + sched.rank, weights=pack_cost[sched.pack], minlength=sched.num_steps * dp)
    return flat.reshape(sched.num_steps, dp)
