"""Baseline: the Eagle 2 balance-aware greedy knapsack (Eagle 2 §2.3; Eagle 2.5 min-heap form).

Sort lengths descending, open ceil(sum/L) + delta empty packs, and put each sample into the
currently shortest pack if it fits; otherwise open a new pack holding it. This is LPT
scheduling on tokens: every pack gets a mix of long and short samples and near-equal token
counts, but nothing looks at compute, so packs with one long sample (quadratic attention) and
packs of many short ones end up side by side in a step.

Eagle 2 applies it to random groups of ~4k samples (``megabatch``); Eagle 2.5 packs a whole
shard at once (``megabatch=-1``, our default). Eagle 2.5 packs each DP rank's shard separately;
we pack globally, which can only help its fill, so the comparison is not tilted our way.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from megatron_eagle.data.packing.common import sorted_desc


def _knapsack(lens: list[int], seq_len: int, delta: int, first_id: int) -> tuple[list[int], int]:
    """Greedy min-heap knapsack over ``lens`` (already sorted descending); returns ids and next id."""
    k = math.ceil(sum(lens) / seq_len) + delta
    heap = [(0, first_id + i) for i in range(k)]  # already a valid heap
    out = [0] * len(lens)
    nxt = first_id + k
    replace, push = heapq.heapreplace, heapq.heappush
    for j, ln in enumerate(lens):
        load, p = heap[0]
        if load + ln <= seq_len:
            replace(heap, (load + ln, p))
            out[j] = p
        else:  # the shortest pack cannot take it: a new pack holds it
            push(heap, (ln, nxt))
            out[j] = nxt
            nxt += 1
    return out, nxt


def pack_eagle2(eff_len: np.ndarray, seq_len: int, *, rng: np.random.Generator, delta: int = 20,
                megabatch: int = -1, **_unused) -> np.ndarray:
    """Pack id per sample (ids may skip numbers: unused packs are squeezed out by the caller)."""
    n = len(eff_len)
    pack_id = np.zeros(n, np.int64)
    if n == 0:
        return pack_id
    if megabatch is None or megabatch <= 0:
        groups = [np.arange(n)]
    else:  # Eagle 2: random groups of `megabatch` samples, each packed on its own
        perm = rng.permutation(n)
        groups = [perm[i:i + megabatch] for i in range(0, n, megabatch)]
    nxt = 0
    for g in groups:
        order = g[sorted_desc(eff_len[g], rng)]
        ids, nxt = _knapsack(eff_len[order].tolist(), seq_len, delta, nxt)
        pack_id[order] = ids
    return pack_id
