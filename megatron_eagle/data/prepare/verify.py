"""`megatron-eagle verify`: check a prepared directory end to end.

Every shard matches its manifest entry (size, sha256); every index record's offsets match the tar
members; every sample's JSON agrees with its index record and every medium decodes; the manifest
counts agree with the index and rejects.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_eagle.data.media.image import MediaError, MediaLimits, probe_image
from megatron_eagle.data.media.video import probe_video
from megatron_eagle.data.prepare.shard_jobs import pool_context
from megatron_eagle.data.shards import (INDEX_NAME, REJECTS_NAME, file_sha256, find_shards, index_meta, load_index,
                                        load_manifest, scan_tar, split_member_name)

LOCATION_FIELDS = ("shard", "offset", "length", "members")
VIDEO_FIELDS = ("duration", "fps", "frames", "width", "height")


@dataclass
class VerifyReport:
    samples: int = 0
    shards: int = 0
    images: int = 0
    videos: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _check_media(rec: dict[str, Any], data: bytes, i: int, limits: MediaLimits) -> list[str]:
    m, where = rec["media"][i], f"{rec['key']}.{rec['media'][i]['member']}"
    try:
        if m["type"] == "image":
            info = probe_image(data, limits)
            if (info["width"], info["height"]) != (m["width"], m["height"]):
                return [f"{where}: decodes to {info['width']}x{info['height']}, index says {m['width']}x{m['height']}"]
        else:
            info = probe_video(data, limits)
            bad = [k for k in VIDEO_FIELDS if info[k] != m[k]]
            if bad:
                return [f"{where}: video {bad} differ from the index"]
    except MediaError as e:
        return [f"{where}: does not decode ({e})"]
    return []


def verify_shard(root: str, shard: dict[str, Any], records: list[dict[str, Any]], decode: bool,
                 limits: MediaLimits) -> tuple[list[str], int, int]:
    """Check one shard file against its manifest entry and index records; returns (errors, images, videos)."""
    path, name = Path(root) / shard["name"], shard["name"]
    errs: list[str] = []
    if not path.exists():
        return [f"{name}: missing"], 0, 0
    if path.stat().st_size != shard["bytes"]:
        errs.append(f"{name}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
    if file_sha256(path) != shard["sha256"]:
        errs.append(f"{name}: sha256 differs from the manifest")
    try:
        members = scan_tar(path)
    except Exception as e:
        return errs + [f"{name}: not a readable tar ({type(e).__name__}: {e})"], 0, 0
    by_key: dict[str, dict[str, tuple[int, int, int]]] = defaultdict(dict)
    order: list[str] = []
    for mname, hdr, off, size in members:
        try:
            key, suffix = split_member_name(mname)
        except ValueError:
            errs.append(f"{name}: unexpected member {mname!r}")
            continue
        if key not in by_key:
            order.append(key)
        by_key[key][suffix] = (hdr, off, size)
    if order != [r["key"] for r in records]:
        errs.append(f"{name}: tar holds {len(order)} samples, index lists {len(records)} (or in another order)")
    n_img = n_vid = 0
    with open(path, "rb") as f:
        for rec in records:
            tar_members = by_key.get(rec["key"], {})
            if {s: [o, n] for s, (_, o, n) in tar_members.items()} != rec["members"]:
                errs.append(f"{rec['key']}: index offsets do not match the tar members")
                continue
            first_hdr = min(h for h, _, _ in tar_members.values())
            if first_hdr != rec["offset"]:
                errs.append(f"{rec['key']}: index offset {rec['offset']} but first header at {first_hdr}")
            f.seek(rec["members"]["json"][0])
            try:
                sample = json.loads(f.read(rec["members"]["json"][1]))
            except ValueError:
                errs.append(f"{rec['key']}: sample JSON does not parse")
                continue
            if index_meta(sample) != {k: v for k, v in rec.items() if k not in LOCATION_FIELDS}:
                errs.append(f"{rec['key']}: sample JSON disagrees with its index record")
            for i, m in enumerate(rec["media"]):
                if decode:
                    off, size = rec["members"][m["member"]]
                    f.seek(off)
                    errs += _check_media(rec, f.read(size), i, limits)
                n_img += m["type"] == "image"
                n_vid += m["type"] == "video"
    return errs, n_img, n_vid


def _verify_job(args: tuple) -> tuple[list[str], int, int]:
    return verify_shard(*args)


def verify(root: str | Path, decode: bool = True, workers: int = 1) -> VerifyReport:
    """Run every check; never raises for a broken directory, collects errors instead."""
    root = Path(root)
    rep = VerifyReport()
    try:
        manifest = load_manifest(root)
        records = load_index(root)
    except (OSError, ValueError) as e:
        rep.errors.append(f"cannot read manifest/index: {e}")
        return rep
    rejects = []
    with open(root / REJECTS_NAME, encoding="utf-8") as f:
        rejects = [json.loads(l) for l in f if l.strip()]
    rep.samples, rep.shards = len(records), len(manifest["shards"])
    m = manifest
    if m["input_samples"] != m["written_samples"] + m["rejected_samples"]:
        rep.errors.append("manifest: input_samples != written_samples + rejected_samples")
    if m["written_samples"] != len(records):
        rep.errors.append(f"manifest says {m['written_samples']} written, {INDEX_NAME} has {len(records)}")
    if sum(s["samples"] for s in m["shards"]) != len(records):
        rep.errors.append("manifest shard sample counts do not add up to the index")
    if m["rejected_samples"] != len(rejects):
        rep.errors.append(f"manifest says {m['rejected_samples']} rejected, {REJECTS_NAME} has {len(rejects)}")
    if dict(Counter(r["reason"] for r in rejects)) != m["rejected_by_reason"]:
        rep.errors.append("manifest rejected_by_reason disagrees with rejects.jsonl")
    if len({r["key"] for r in records}) != len(records):
        rep.errors.append("duplicate sample keys in the index")
    names = [s["name"] for s in m["shards"]]
    if sorted(names) != find_shards(root):
        rep.errors.append(f"shard files on disk {find_shards(root)} differ from the manifest {names}")
    per_shard: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        per_shard[r["shard"]].append(r)
    if set(per_shard) - set(names):
        rep.errors.append(f"index names shards not in the manifest: {sorted(set(per_shard) - set(names))}")
    limits = MediaLimits(**m.get("limits", {}))
    jobs = [(str(root), s, per_shard.get(s["name"], []), decode, limits) for s in m["shards"]]
    if workers > 1 and len(jobs) > 1:
        with pool_context().Pool(min(workers, len(jobs))) as pool:
            results = pool.map(_verify_job, jobs)
    else:
        results = [_verify_job(j) for j in jobs]
    for errs, ni, nv in results:
        rep.errors += errs
        rep.images += ni
        rep.videos += nv
    return rep


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `megatron-eagle verify`."""
    p.add_argument("path", help="prepared directory")
    p.add_argument("--no-decode", action="store_true", help="skip decoding media (structure checks only)")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))


def run(args: argparse.Namespace) -> int:
    rep = verify(args.path, decode=not args.no_decode, workers=args.workers)
    for e in rep.errors[:50]:
        print(f"ERROR {e}")
    if len(rep.errors) > 50:
        print(f"... and {len(rep.errors) - 50} more errors")
    status = "OK" if rep.ok else f"FAILED ({len(rep.errors)} errors)"
    print(f"verify {args.path}: {rep.samples} samples, {rep.shards} shards, {rep.images} images, "
          f"{rep.videos} videos: {status}")
    return 0 if rep.ok else 1
