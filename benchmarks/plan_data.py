#!/usr/bin/env python
"""`megatron-eagle plan --data` speed: ADS over a prepared index against a per-record reference.

Writes a synthetic ``index.jsonl`` of N records (50% images of 1-3 random sizes from a pool of
common camera/screen resolutions plus random ones, 35% videos of 5-600 s, 15% text), then times
``table_from_prepared`` (counts-only ADS, memoised grids, spawned workers) against the reference
path (full ``plan_sample`` per record, one process), checks both tables are equal, and prints
records/s.

    python benchmarks/plan_data.py --records 200000 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMMON = [(1920, 1080), (1280, 720), (1024, 768), (4032, 3024), (3024, 4032), (800, 600), (640, 480),
          (2048, 1536), (1080, 1920), (512, 512), (1024, 1024), (2480, 3508)]  # photos, screens, A4 scans


def write_index(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path / "index.jsonl", "w") as f:
        for i in range(n):
            r = rng.random()
            if r < 0.5:
                media = [{"type": "image", **dict(zip(("width", "height"), rng.choice(COMMON) if rng.random() < 0.7
                                                       else (rng.randint(200, 4000), rng.randint(200, 4000))))}
                         for _ in range(rng.choice([1, 1, 1, 2, 3]))]
            elif r < 0.85:
                d = rng.uniform(5, 600)
                media = [{"type": "video", "fps": 30.0, "frames": int(d * 30), "duration": d}]
            else:
                media = []
            f.write(json.dumps({"key": f"{i:09d}", "shard": "s-000000.tar", "text_tokens": rng.randint(50, 4000),
                                "media": media}) + "\n")
    (path / "manifest.json").write_text("{}")


def reference_table(root: Path, seq_len: int):
    """The reference: iter_index + plan_sample (frame indices and timestamps built) per record."""
    from megatron_eagle.data.media.ads import ImagePlan, plan_sample
    from megatron_eagle.data.packing.plan_index import ads_config_for
    from megatron_eagle.data.shards import iter_index

    cfg = ads_config_for({})
    lengths, tiles = [], []
    for rec in iter_index(root):
        res = plan_sample(rec, seq_len, cfg)
        if res.plan is None:
            lengths.append(seq_len + 1)
            tiles.append(0)
        else:
            lengths.append(res.plan.num_tokens)
            tiles.append(sum(m.num_tiles if isinstance(m, ImagePlan) else m.num_frames for m in res.plan.media))
    return lengths, tiles


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)
    from megatron_eagle.data.media import tiling
    from megatron_eagle.data.packing.plan_index import table_from_prepared

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_index(root, args.records)
        t = time.perf_counter()
        ref = reference_table(root, args.seq_len)
        t_old = time.perf_counter() - t
        print(f"reference (plan_sample per record, 1 process): {args.records / t_old:,.0f} records/s "
              f"({t_old:.1f} s)")
        for w in args.workers:
            tiling._choose_grid.cache_clear()
            t = time.perf_counter()
            table, _ = table_from_prepared([root], args.seq_len, workers=w)
            dt = time.perf_counter() - t
            assert table.length.tolist() == ref[0] and table.tiles.tolist() == ref[1], "tables differ"
            print(f"table_from_prepared, {w} worker(s): {args.records / dt:,.0f} records/s "
                  f"({dt:.1f} s, {t_old / dt:.1f}x); "
                  f"10M records: {1e7 / (args.records / dt) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
