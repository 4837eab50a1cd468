"""Types and helpers shared by the planners: the sample table, packs in CSR form, CP padding.

The packers (:mod:`.balanced`, :mod:`.eagle2`) and the registry that picks one (:mod:`.packers`)
import this module; it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SampleTable:
    """Per-sample planner input. Row ``i`` is sample index ``i`` in every plan."""

    length: np.ndarray  # int64: LLM tokens after ADS (text + 256 per tile/frame)
    tiles: np.ndarray  # int64: ViT tiles (images incl. thumbnail) or frames (video); 0 for text
    dataset: np.ndarray  # int32: index into ``datasets``
    datasets: list[str] = field(default_factory=lambda: ["data"])

    def __post_init__(self) -> None:
        self.length = np.ascontiguousarray(self.length, dtype=np.int64)
        n = len(self.length)
        self.tiles = np.zeros(n, np.int64) if self.tiles is None else np.ascontiguousarray(self.tiles, dtype=np.int64)
        self.dataset = (np.zeros(n, np.int32) if self.dataset is None
                        else np.ascontiguousarray(self.dataset, dtype=np.int32))
        if len(self.tiles) != n or len(self.dataset) != n:
            raise ValueError(f"length/tiles/dataset sizes differ: {n}, {len(self.tiles)}, {len(self.dataset)}")
        if n and self.length.min() < 1:
            bad = int(np.argmin(self.length))
            raise ValueError(f"sample {bad} has length {int(self.length[bad])}; lengths must be >= 1")

    def __len__(self) -> int:
        return len(self.length)

    @classmethod
    def from_lengths(cls, length, tiles=None, dataset=None, datasets: list[str] | None = None) -> "SampleTable":
        return cls(np.asarray(length), None if tiles is None else np.asarray(tiles),
                   None if dataset is None else np.asarray(dataset), datasets or ["data"])

    @classmethod
    def concat(cls, tables: list["SampleTable"]) -> "SampleTable":
        """Stack tables; dataset ids are offset so every source keeps its own names."""
        names: list[str] = []
        ds = []
        for t in tables:
            ds.append(t.dataset + len(names))
            names += t.datasets
        return cls(np.concatenate([t.length for t in tables]), np.concatenate([t.tiles for t in tables]),
                   np.concatenate(ds), names)


@dataclass
class Packs:
    """Packs in CSR form: pack ``p`` holds ``samples[offsets[p]:offsets[p+1]]``."""

    samples: np.ndarray  # int64 sample indices
    offsets: np.ndarray  # int64, len(packs) + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, p: int) -> np.ndarray:
        return self.samples[self.offsets[p]:self.offsets[p + 1]]

    def pack_of_sample(self) -> np.ndarray:
        """Pack index of every entry of ``samples``."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.offsets))

    def reduce(self, per_sample: np.ndarray) -> np.ndarray:
        """Sum a per-sample quantity (indexed by sample index) over each pack, as float64."""
        vals = np.asarray(per_sample, dtype=np.float64)[self.samples]
        return np.bincount(self.pack_of_sample(), weights=vals, minlength=len(self))

    def select(self, order: np.ndarray) -> "Packs":
        """The packs ``order`` (pack indices), in that order."""
        sizes = np.diff(self.offsets)[order]
        offsets = np.zeros(len(order) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        starts = np.repeat(self.offsets[:-1][order] - offsets[:-1], sizes)
        return Packs(self.samples[np.arange(offsets[-1], dtype=np.int64) + starts], offsets)

    @classmethod
    def from_assignment(cls, sample_idx: np.ndarray, pack_id: np.ndarray) -> "Packs":
        """Group ``sample_idx`` by ``pack_id``; empty pack ids are squeezed out, order kept."""
        if len(pack_id) == 0:
            return cls(np.zeros(0, np.int64), np.zeros(1, np.int64))
        counts = np.bincount(pack_id)
        used = counts > 0
        dense = (np.cumsum(used) - 1)[pack_id]
        order = np.argsort(dense, kind="stable")
        offsets = np.zeros(int(used.sum()) + 1, np.int64)
        np.cumsum(counts[used], out=offsets[1:])
        return cls(np.asarray(sample_idx, np.int64)[order], offsets)


def cp_padded_lengths(length: np.ndarray, cp: int) -> np.ndarray:
    """Tokens each sub-sample occupies with context parallelism: a multiple of 2*CP.

    Ring attention's zigzag split cuts every sub-sample into 2*CP chunks; the padding is
    real compute and a real slot, so packers see the padded length.
    """
    if cp <= 1:
        return np.asarray(length, dtype=np.int64)
    q = 2 * cp
    return (np.asarray(length, dtype=np.int64) + q - 1) // q * q


def sorted_desc(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices sorting ``values`` descending; ties broken by a seeded shuffle."""
    perm = rng.permutation(len(values))
    return perm[np.argsort(-values[perm], kind="stable")]
