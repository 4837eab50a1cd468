"""Random access to prepared datasets for the training loader: index records by row, shard members.

A prepared directory (``megatron-eagle prepare`` output, a local path or an fsspec URL) becomes a
:class:`DataSource`: ``index.jsonl`` is scanned once for line offsets (8 bytes per sample; records
are parsed only when a pack needs them), shards are read by ``ShardReader`` (one seek + read, or one
ranged read for a URL, per member). An index behind a URL is mirrored once to a local cache file.

Sources are pickled into DataLoader workers; file handles and readers are opened lazily in the
process that uses them, never shared across a fork.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from megatron_eagle.config import ConfigError, ModelConfig
from megatron_eagle.data.media.ads import ADSConfig
from megatron_eagle.data.media.prompt import PromptFormat, format_from_manifest
from megatron_eagle.data.packing.plan_index import ads_config_for
from megatron_eagle.data.shards import INDEX_NAME, ShardReader, is_url, join_root, load_manifest

_CHUNK = 64 << 20


def line_offsets(path: Union[str, Path]) -> np.ndarray:
    """Start offsets of the non-blank lines of a file plus the end offset: ``[n + 1]`` int64.

    Line ``i`` is ``bytes[offsets[i]:offsets[i + 1]]`` (blank lines in between are skipped when read).
    """
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    base = 0
    with open(path, "rb") as f:
        prev_nl = -1  # offset of the last newline seen
        while True:
            buf = f.read(_CHUNK)
            if not buf:
                break
            nl = np.flatnonzero(np.frombuffer(buf, np.uint8) == 10).astype(np.int64) + base
            if len(nl):
                line_start = np.concatenate([[prev_nl + 1], nl[:-1] + 1])
                starts.append(line_start)
                ends.append(nl)
                prev_nl = int(nl[-1])
            base += len(buf)
    if base > prev_nl + 1:  # last line without a trailing newline
        starts.append(np.array([prev_nl + 1], np.int64))
        ends.append(np.array([base], np.int64))
    if not starts:
        return np.zeros(1, np.int64)
    s, e = np.concatenate(starts), np.concatenate(ends)
    keep = e - s > 0  # empty lines; whitespace-only lines are rare and checked when read
    s, e = s[keep], e[keep]
    # Row i spans [s[i], s[i+1]) so the next row's start doubles as this row's end.
    return np.concatenate([s, [e[-1] if len(e) else 0]]).astype(np.int64)


class IndexFile:
    """``index.jsonl`` with random access: ``idx[i]`` is the i-th record (the planner's row order)."""

    def __init__(self, root: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None):
        self.root = str(root)
        if is_url(root):
            self.path = _mirror(join_root(root, INDEX_NAME), cache_dir)
        else:
            self.path = str(Path(root) / INDEX_NAME)
            if not os.path.isfile(self.path):
                raise ConfigError("data", f"{root} has no {INDEX_NAME}",
                                  "point the stage's dataset path at a directory written by `megatron-eagle prepare`")
        self.offsets = line_offsets(self.path)
        self._f: Any = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"{self.root}: record {i} out of range ({len(self)} records)")
        if self._f is None or self._pid != os.getpid():
            self._f, self._pid = open(self.path, "rb"), os.getpid()
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        self._f.seek(a)
        return json.loads(self._f.read(b - a))

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_f"], d["_pid"] = None, -1
        return d

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _mirror(url: str, cache_dir: Optional[Union[str, Path]]) -> str:
    """Copy a remote file to ``cache_dir`` (default: the temp dir) once; returns the local path."""
    import fsspec

    cache = Path(cache_dir or Path(tempfile.gettempdir()) / "megatron-eagle-index")
    cache.mkdir(parents=True, exist_ok=True)
    local = cache / (hashlib.sha1(url.encode()).hexdigest()[:16] + ".jsonl")
    if not local.exists():
        tmp = local.with_name(f".{local.name}.{os.getpid()}")
        with fsspec.open(url, "rb") as src, open(tmp, "wb") as dst:
            while True:
                b = src.read(_CHUNK)
                if not b:
                    break
                dst.write(b)
        os.replace(tmp, local)
    return str(local)


@dataclass
class DataSource:
    """One prepared dataset as the loader reads it."""

    name: str
    root: str
    index: IndexFile
    ads: ADSConfig
    manifest: dict[str, Any] = field(default_factory=dict)
    _reader: Optional[ShardReader] = field(default=None, repr=False)
    _pid: int = field(default=-1, repr=False)

    @property
    def prompt(self) -> PromptFormat:
        """The prompt format the dataset was prepared (and its tokens counted) with."""
        return format_from_manifest(self.manifest)

    def reader(self) -> ShardReader:
        """This process's shard reader (opened on first use after a fork)."""
        if self._reader is None or self._pid != os.getpid():
            self._reader, self._pid = ShardReader(self.root), os.getpid()
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_reader"], d["_pid"] = None, -1
        return d

    def close(self) -> None:
        if self._reader is not None and self._pid == os.getpid():
            self._reader.close()
        self._reader = None
        self.index.close()


def open_source(root: Union[str, Path], model: ModelConfig, name: Optional[str] = None,
                cache_dir: Optional[Union[str, Path]] = None) -> DataSource:
    """A :class:`DataSource` for a prepared directory or URL, budgeted with ``model``'s tile geometry."""
    manifest = load_manifest(root) if is_url(root) or (Path(root) / "manifest.json").is_file() else {}
    name = name or str(root).rstrip("/").rsplit("/", 1)[-1]
    return DataSource(name, str(root), IndexFile(root, cache_dir), ads_config_for(manifest, model), manifest)
