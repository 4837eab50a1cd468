"""Ours: cost-aware balanced packing, vectorised over packs instead of samples.

The straggler of a step is the DP rank whose pack costs the most. Pack cost is
``a*tokens + b*sum(len_i^2) + c*tiles``: with every pack nearly full, what varies is the
quadratic attention term, i.e. *how* the tokens are split into sub-samples. So the packs that
share a step must have near-identical length structure. This module builds packs that are
(1) full and (2) come in groups of ``width`` near-identical packs; the scheduler
(:mod:`.schedule`) then sorts all packs by cost and gives each step DP packs of equal cost.

Algorithm (lengths sorted descending, ties shuffled with the seed):

1. **Rocks and sand.** Samples longer than ``seq_len/16`` are rocks, the rest sand.
2. **Layered packing of rocks.** Cut the sorted rocks into layers of ``width`` consecutive
   samples (near-equal lengths). Bin-pack the layers by their largest length (best-fit
   decreasing over ~n/width super-items), then open ``width`` packs per bin and deal each
   layer's samples across them, longest sample to the emptiest pack (LPT). Every pack of a bin
   gets one sample of each of its layers: equal tokens and equal cost within the bin, and no
   pack can exceed ``seq_len`` because the bin's layer maxima fit.
3. **Pour sand** into the remaining gaps, largest size class first, each pass fully
   vectorised: with gaps laid end to end (cumulative sum) and sand laid end to end, a grain
   goes to the pack its span falls in; grains straddling a boundary wait for the next pass.
4. **Leftover sand** is packed by step 2 on its own (small, dense lengths: near-perfect fill).
5. **Underfilled packs** (the last bins of steps 2 and 4) give their samples back: poured into
   the remaining gaps, the rest re-packed narrower, so at most one pack stays underfilled.

Cost: O(n log n) for the sort plus O(n / width) Python steps; 10 M samples take seconds.
"""

from __future__ import annotations

import bisect

import numpy as np

from megatron_eagle.data.packing.common import sorted_desc

SAND_DIVISOR = 16  # samples <= seq_len / 16 fill gaps
POUR_REPEATS = 3  # passes per size class (each pass resolves most straddlers)
UNDERFILLED = 0.9  # packs below this fill are re-packed (step 5)


def _best_fit_layers(layer_max: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing of layers (sizes descending) into bins of ``seq_len``."""
    nl = len(layer_max)
    base = nl + 1  # key = gap * base + bin: one sorted int list, smallest adequate gap first
    keys: list[int] = []
    bins: list[list[int]] = []
    for j, s in enumerate(layer_max):
        k = bisect.bisect_left(keys, s * base)
        if k < len(keys):
            key = keys.pop(k)
            b = key % base
            bins[b].append(j)
            bisect.insort(keys, key - s * base)
        else:
            bins.append([j])
            bisect.insort(keys, (seq_len - s) * base + len(bins) - 1)
    return bins


def layered_pack(lens_desc: np.ndarray, seq_len: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 2 above. Returns (pack id per position, load per pack); pack ids are dense per bin."""
    n = len(lens_desc)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    width = max(1, int(width))
    layer_max = lens_desc[::width].tolist()  # sorted descending, so the first of a layer is its max
    bins = _best_fit_layers(layer_max, seq_len)
    if width == 1:  # one sample per layer: the bins are the packs
        pack_of = np.repeat(np.arange(len(bins), dtype=np.int64), [len(b) for b in bins])
        pos = np.fromiter((j for b in bins for j in b), np.int64, n)
        out = np.empty(n, np.int64)
        out[pos] = pack_of
        return out, np.bincount(out, weights=lens_desc, minlength=len(bins)).astype(np.int64)
    pack_of = np.empty(n, np.int64)
    load = np.zeros(len(bins) * width, np.int64)
    for b, layers in enumerate(bins):
        lo = b * width
        bl = load[lo:lo + width]  # a view: updates land in `load`
        for j in layers:
            seg = lens_desc[j * width:(j + 1) * width]
            # Longest sample of the layer to the emptiest pack; stable so ties are deterministic.
            tgt = np.argsort(bl, kind="stable")[:len(seg)]
            bl[tgt] += seg
            pack_of[j * width:j * width + len(seg)] = lo + tgt
    return pack_of, load


def pour(gap: np.ndarray, sizes_desc: np.ndarray, seq_len: int) -> np.ndarray:
    """Step 3: place grains (sizes descending) into gaps; returns pack per grain or -1. Updates ``gap``."""
    m = len(sizes_desc)
    assign = np.full(m, -1, np.int64)
    if m == 0 or len(gap) == 0:
        return assign
    # Size classes (hi/2, hi], largest first; grains are sorted so each class is a slice.
    hi = int(sizes_desc[0])
    neg = -sizes_desc
    start = 0
    while start < m:
        lo = hi // 2
        stop = int(np.searchsorted(neg, -lo, side="left"))  # grains with size > lo
        todo = np.arange(start, stop)
        for _ in range(POUR_REPEATS):
            if todo.size == 0:
                break
            x = sizes_desc[todo]
            elig = np.flatnonzero(gap >= x[-1])  # packs that can take the smallest grain of the class
            if elig.size == 0:
                break
            g_end = np.cumsum(gap[elig])
            x_end = np.cumsum(x)
            p = np.searchsorted(g_end, x_end - x, side="right")
            ok = p < elig.size
            ok[ok] = x_end[ok] <= g_end[p[ok]]
            if not ok.any():
                break
            tgt = elig[p[ok]]
            assign[todo[ok]] = tgt
            gap -= np.bincount(tgt, weights=x[ok], minlength=len(gap)).astype(np.int64)
            todo = todo[~ok]
        start, hi = stop, lo
    return assign


def pack_balanced(eff_len: np.ndarray, seq_len: int, *, rng: np.random.Generator, width: int = 1,
                  **_unused) -> np.ndarray:
    """Pack id per sample (see module docstring); ``width`` should be a multiple of the DP size."""
    n = len(eff_len)
    if n == 0:
        return np.zeros(0, np.int64)
    order = sorted_desc(eff_len, rng)
    lens = eff_len[order]
    tau = max(1, seq_len // SAND_DIVISOR)
    n_rock = int(np.searchsorted(-lens, -tau, side="left"))  # lens > tau

    pos_pack = np.empty(n, np.int64)
    rock_pack, load = layered_pack(lens[:n_rock], seq_len, width)
    pos_pack[:n_rock] = rock_pack
    gap = seq_len - load
    sand = lens[n_rock:]
    grain = pour(gap, sand, seq_len)
    placed = grain >= 0
    pos_pack[n_rock:][placed] = grain[placed]
    rest = np.flatnonzero(~placed)  # still descending
    if rest.size:
        rest_pack, _ = layered_pack(sand[rest], seq_len, width)
        pos_pack[n_rock + rest] = rest_pack + len(load)
    for _ in range(3):  # a wide re-pack can leave a partly empty last bin: once more, narrower
        if not _repack_underfilled(lens, pos_pack, seq_len):
            break
    pack_id = np.empty(n, np.int64)
    pack_id[order] = pos_pack
    return pack_id


def _repack_underfilled(lens: np.ndarray, pos_pack: np.ndarray, seq_len: int) -> bool:
    """Step 5: the last bins of steps 2 and 4 can be partly empty. Their samples are poured into
    the other packs' gaps and the rest re-packed by step 2 (narrower), so at most one pack stays
    underfilled (an underfilled pack would be a cheap outlier in its step). Updates ``pos_pack``;
    returns whether anything was re-packed."""
    n_packs = int(pos_pack.max()) + 1
    load = np.bincount(pos_pack, weights=lens, minlength=n_packs).astype(np.int64)
    under = (load > 0) & (load < UNDERFILLED * seq_len)  # ids left empty by a previous round are skipped
    if under.sum() <= 1:
        return False
    move = np.flatnonzero(under[pos_pack])  # positions, so lengths stay descending
    gap = np.where(under, 0, seq_len - load)
    where = pour(gap, lens[move], seq_len)
    placed = where >= 0
    pos_pack[move[placed]] = where[placed]
    rest = move[~placed]
    if rest.size:
        rest_pack, _ = layered_pack(lens[rest], seq_len, max(1, rest.size // 20_000))
        pos_pack[rest] = rest_pack + n_packs
    return True
