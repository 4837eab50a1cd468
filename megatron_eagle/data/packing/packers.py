"""Sequence packing: the packer registry and :func:`pack`.

A packer turns per-sample lengths (tokens each sub-sample occupies, CP padding included) into
a pack id per sample such that no pack holds more than ``seq_len`` tokens. Two packers:

- ``eagle2``: the Eagle 2 balance-aware greedy knapsack (:mod:`.eagle2`), the baseline;
- ``balanced``: ours (:mod:`.balanced`), cost-aware, designed so that the packs run
  together at one step have equal compute.

Which DP rank runs which pack at which step is decided afterwards (:mod:`.schedule`).
Everything is numpy arrays: 10 M samples are packed in seconds.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from megatron_eagle.config import ConfigError
from megatron_eagle.data.packing.balanced import pack_balanced
from megatron_eagle.data.packing.common import Packs
from megatron_eagle.data.packing.eagle2 import pack_eagle2

# A packer maps padded lengths to a pack id per sample (not necessarily dense).
Packer = Callable[..., np.ndarray]


def get_packer(name: str) -> Packer:
    """The packing function registered under ``name``."""
    packers: dict[str, Packer] = {"eagle2": pack_eagle2, "balanced": pack_balanced}
    if name not in packers:
        raise ConfigError("packer", f"unknown packer {name!r}", f"use one of {sorted(packers)}")
    return packers[name]


PACKER_NAMES = ("eagle2", "balanced")


def pack(eff_len: np.ndarray, seq_len: int, packer: str = "balanced", *, seed: int = 0, width: int = 1,
         **kwargs) -> Packs:
    """Pack samples with padded lengths ``eff_len`` (all <= seq_len) into packs of at most ``seq_len``.

    Returns packs of sample indices (positions in ``eff_len``); ``width`` is the number of
    packs the balanced packer builds side by side (a multiple of the DP size).
    """
    eff_len = np.asarray(eff_len, dtype=np.int64)
    if len(eff_len) and eff_len.max() > seq_len:
        raise ValueError(f"{int((eff_len > seq_len).sum())} samples exceed seq_len={seq_len}; drop them first")
    rng = np.random.default_rng(seed)
    pack_id = get_packer(packer)(eff_len, seq_len, rng=rng, width=width, **kwargs)
    return Packs.from_assignment(np.arange(len(eff_len), dtype=np.int64), pack_id)
