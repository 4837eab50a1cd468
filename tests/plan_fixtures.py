"""A realistic lengths file for the `megatron-eagle plan` tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megatron_eagle.data.packing.common import SampleTable
from megatron_eagle.data.packing.length_mix import realistic_mix

def write_lengths(path: Path, table: SampleTable, with_tiles: bool = True) -> None:
    """Write a ``--lengths`` file: one ``length [tiles]`` per line."""
    cols = np.stack([table.length, table.tiles], 1) if with_tiles else table.length[:, None]
    np.savetxt(path, cols, fmt="%d")


@pytest.fixture(scope="module")
def lengths_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "lengths.txt"
    write_lengths(path, realistic_mix(5000, 16384, seed=2))
    return path
