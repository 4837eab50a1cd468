"""Webdataset tar shards and the per-sample metadata index.

Layout of a prepared directory::

    OUT/shard-000000.tar ...   webdataset tars; sample KEY has members KEY.json, KEY.m0.jpg, KEY.m1.mp4 ...
    OUT/index.jsonl            one record per written sample, in shard order (see ``index_record``)
    OUT/manifest.json          counts, shard list (name, samples, bytes, sha256), tokenizer fingerprint
    OUT/rejects.jsonl          one line per rejected input line

Shards are written with webdataset's TarWriter with fixed mtime/owner/mode, so the same samples
give byte-identical tars. A shard is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

FORMAT_VERSION = 1
TAR_BLOCK = 512
TAR_RECORD = 10240  # tarfile pads archives to 20 blocks
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
TMP_RE = re.compile(r"^\.shard-\d{6}\.tar\.tmp(\.\d+)?$")
INDEX_NAME, MANIFEST_NAME, REJECTS_NAME = "index.jsonl", "manifest.json", "rejects.jsonl"
WORK_DIR = ".work"
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(text: Union[str, int]) -> int:
    """'1GiB', '500MB', '2e9', 4096 -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse size {text!r}; write e.g. 1GiB, 500MB or 2e9")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return n


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def member_tar_bytes(size: int) -> int:
    """Bytes one member takes in a USTAR tar: a header block plus the data padded to 512."""
    return TAR_BLOCK + TAR_BLOCK * math.ceil(size / TAR_BLOCK)


def sample_tar_bytes(member_sizes: Iterable[int]) -> int:
    return sum(member_tar_bytes(s) for s in member_sizes)


def plan_shards(sample_bytes: Sequence[int], shard_size: int) -> list[tuple[int, int]]:
    """Split samples, in order, into ``[start, end)`` ranges of balanced byte size.

    The number of shards is ceil(total / shard_size); a sample goes to the shard its midpoint falls
    in, so every shard holds about total/K bytes. Depends only on the sizes, never on worker count.
    """
    n = len(sample_bytes)
    if n == 0:
        return []
    total = float(sum(sample_bytes))
    k = max(1, math.ceil(total / shard_size))
    ranges: list[tuple[int, int]] = []
    start, cum, cur = 0, 0.0, 0
    for i, b in enumerate(sample_bytes):
        target = min(k - 1, int((cum + b / 2.0) * k / total)) if total else 0
        if target > cur and i > start:
            ranges.append((start, i))
            start = i
            cur = target
        cum += b
    ranges.append((start, n))
    return ranges


# ----------------------------------------------------------------------------- writing

@dataclass
class ShardSample:
    """One sample ready to write: key, member suffix -> bytes (``json`` first), index metadata."""

    key: str
    members: dict[str, bytes]
    meta: dict[str, Any]


def tar_writer(fileobj):
    """webdataset TarWriter with everything that would vary between runs pinned: mtime 0, fixed
    owner names (uid/gid stay 0), mode 0444, no encoding, plain USTAR headers."""
    from webdataset.writer import TarWriter

    tw = TarWriter(fileobj, user="megatron-eagle", group="megatron-eagle", mode=0o444,
                   encoder=False, mtime=0)
    # TarWriter does not hand its `format` to tarfile, whose default (PAX) may add extended headers.
    tw.tarstream.format = tarfile.USTAR_FORMAT
    return tw


def scan_tar(path: Union[str, Path]) -> list[tuple[str, int, int, int]]:
    """Members of a tar as ``(name, header_offset, data_offset, size)``, reading headers only."""
    out = []
    with tarfile.open(path, mode="r:") as tf:
        for ti in tf:
            out.append((ti.name, ti.offset, ti.offset_data, ti.size))
    return out


def split_member_name(name: str) -> tuple[str, str]:
    """'KEY.m0.jpg' -> ('KEY', 'm0.jpg') the way webdataset groups members (first dot of the basename)."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base or "/" in name:
        raise ValueError(f"unexpected member name {name!r}")
    key, suffix = base.split(".", 1)
    return key, suffix


def index_records_from_scan(shard: str, members: list[tuple[str, int, int, int]],
                            metas: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Attach shard locations to sample metadata, in tar order; raises if they disagree."""
    groups: list[tuple[str, list[tuple[str, int, int, int]]]] = []
    for m in members:
        key, _ = split_member_name(m[0])
        if not groups or groups[-1][0] != key:
            groups.append((key, []))
        groups[-1][1].append(m)
    if [g[0] for g in groups] != [m["key"] for m in metas]:
        raise RuntimeError(f"{shard}: tar keys do not match the samples written")
    records = []
    for (key, ms), meta in zip(groups, metas):
        first, last = ms[0], ms[-1]
        rec = dict(meta)
        rec.update(shard=shard, offset=first[1],
                   length=last[2] + TAR_BLOCK * math.ceil(last[3] / TAR_BLOCK) - first[1],
                   members={split_member_name(n)[1]: [off, size] for n, _, off, size in ms})
        records.append(rec)
    return records


def write_shard(path: Union[str, Path], samples: Iterable[ShardSample]) -> dict[str, Any]:
    """Write samples to ``path`` atomically (temp file, fsync, rename); returns the shard summary
    ``{name, samples, bytes, sha256}`` and the index records under ``records``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    metas: list[dict[str, Any]] = []
    try:
        with open(tmp, "wb") as f:
            tw = tar_writer(f)
            for s in samples:
                tw.write({"__key__": s.key, **s.members})
                metas.append(s.meta)
            tw.close()
            f.flush()
            os.fsync(f.fileno())
        records = index_records_from_scan(path.name, scan_tar(tmp), metas)
        summary = {"name": path.name, "samples": len(records), "bytes": tmp.stat().st_size,
                   "sha256": file_sha256(tmp)}
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    summary["records"] = records
    return summary


def file_sha256(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""):
            h.update(b)
    return h.hexdigest()


def remove_stale(out: Path, keep: set[str]) -> list[str]:
    """Delete our own shard and temp files in ``out`` that the current plan does not name."""
    removed = []
    for p in out.iterdir():
        if (SHARD_RE.match(p.name) and p.name not in keep) or TMP_RE.match(p.name):
            p.unlink()
            removed.append(p.name)
    return removed


def write_json_atomic(path: Union[str, Path], obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl_atomic(path: Union[str, Path], rows: Iterable[dict[str, Any]]) -> int:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


# ----------------------------------------------------------------------------- reading

def is_url(root: Union[str, Path]) -> bool:
    """True for fsspec URLs (``s3://bucket/x``, ``file:///data/x``); plain paths are read directly."""
    return "://" in str(root)


def join_root(root: Union[str, Path], name: str) -> str:
    return f"{str(root).rstrip('/')}/{name}" if is_url(root) else str(Path(root) / name)


def _open_text(root: Union[str, Path], name: str):
    if is_url(root):
        import fsspec

        return fsspec.open(join_root(root, name), "rt", encoding="utf-8").open()
    return open(Path(root) / name, encoding="utf-8")


def load_manifest(root: Union[str, Path]) -> dict[str, Any]:
    with _open_text(root, MANIFEST_NAME) as f:
        return json.loads(f.read())


def iter_index_lines(root: Union[str, Path]) -> Iterator[str]:
    """The non-empty lines of a prepared directory's index (JSON, one record each), in shard order."""
    with _open_text(root, INDEX_NAME) as f:
        for line in f:
            if line.strip():
                yield line


def iter_index(root: Union[str, Path]) -> Iterator[dict[str, Any]]:
    """Index records of a prepared directory (a path or an fsspec URL), in shard order."""
    for line in iter_index_lines(root):
        yield json.loads(line)


def load_index(root: Union[str, Path]) -> list[dict[str, Any]]:
    return list(iter_index(root))


class ShardReader:
    """Random access to samples through index offsets: one seek + read per member, no tar scan.

    ``root`` is a directory or an fsspec URL (``s3://...``, ``file:///...``); for a URL each
    member is one ranged read (``cat_file(start, end)``), so only the member's bytes are
    fetched. Keeps a few local shard files open; use as a context manager or call ``close``.
    Do not share a reader across processes (open files share their offset after fork).
    """

    def __init__(self, root: Union[str, Path], max_open: int = 8):
        self.url: Optional[str] = str(root).rstrip("/") if is_url(root) else None
        self.root = Path(root) if self.url is None else None
        self.max_open = max_open
        self._files: dict[str, Any] = {}
        self._fs: Any = None
        self._fs_root = ""
        if self.url is not None:
            from fsspec.core import url_to_fs

            self._fs, self._fs_root = url_to_fs(self.url)

    def _file(self, shard: str):
        f = self._files.pop(shard, None)
        if f is None:
            f = open(self.root / shard, "rb")
            if len(self._files) >= self.max_open:
                old = next(iter(self._files))
                self._files.pop(old).close()
        self._files[shard] = f  # most recently used last
        return f

    def read_member(self, record: dict[str, Any], suffix: str) -> bytes:
        off, size = record["members"][suffix]
        shard = record["shard"]
        if not SHARD_RE.match(shard):
            raise ValueError(f"not a shard name: {shard!r}")
        if self._fs is not None:
            data = self._fs.cat_file(f"{self._fs_root.rstrip('/')}/{shard}", start=off, end=off + size)
        else:
            f = self._file(shard)
            f.seek(off)
            data = f.read(size)
        if len(data) != size:
            raise IOError(f"{shard}: short read for {record['key']}.{suffix}")
        return data

    def read_sample(self, record: dict[str, Any]) -> dict[str, bytes]:
        """All members of a sample: ``{"json": ..., "m0.jpg": ...}``."""
        return {s: self.read_member(record, s) for s in record["members"]}

    def read_json(self, record: dict[str, Any]) -> dict[str, Any]:
        return json.loads(self.read_member(record, "json"))

    def read_media(self, record: dict[str, Any], i: int) -> bytes:
        """Encoded bytes of the sample's i-th medium (media order of the record)."""
        return self.read_member(record, record["media"][i]["member"])

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_sample(root: Union[str, Path], record: dict[str, Any]) -> dict[str, bytes]:
    """One sample's members by random access (opens and closes the shard)."""
    with ShardReader(root, max_open=1) as r:
        return r.read_sample(record)


def index_meta(sample: dict[str, Any]) -> dict[str, Any]:
    """The index fields of a sample JSON (everything but the conversation text)."""
    return {k: v for k, v in sample.items() if k != "conversations"}


def shard_samples_from_source(reader: ShardReader, records: Iterable[dict[str, Any]]) -> Iterator[ShardSample]:
    """Re-emit already-written samples (for resharding), bytes copied verbatim."""
    for r in records:
        members = reader.read_sample(r)
        meta = {k: v for k, v in r.items() if k not in ("shard", "offset", "length", "members")}
        yield ShardSample(r["key"], members, meta)


def find_shards(root: Union[str, Path]) -> list[str]:
    return sorted(p.name for p in Path(root).iterdir() if SHARD_RE.match(p.name))
