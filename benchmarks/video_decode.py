"""Sparse (planned-frame) video decoding vs decoding every frame, on real encoded videos.

Encodes test videos with PyAV (H.264/libx264, MPEG-4 Part 2, VP9) of several lengths, plans
frames the way ADS does (segment centres, <= 2 fps, capped), and times
  sparse: megatron_eagle.data.media.video.decode_frames (seek to keyframe, decode forward)
  full:   decode every frame in order, converting only the planned ones
Both resize the planned frames to tile size. Runs on CPU.

    PYTHONPATH=. python benchmarks/video_decode.py [--lengths 10 60 300] [--frames 8 32 128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.records import git_commit, options, write_json  # noqa: E402

from megatron_eagle.data.media.ads import sample_frame_indices  # noqa: E402
from megatron_eagle.data.media.video import decode_all_frames, decode_frames, probe_video  # noqa: E402

CODECS = {"h264": ("libx264", "mp4", {"preset": "veryfast"}),
          "mpeg4": ("mpeg4", "mp4", {}),
          "vp9": ("libvpx-vp9", "webm", {"deadline": "realtime", "cpu-used": "8"})}


def encode(path: Path, codec: str, seconds: float, fps: int, size: tuple[int, int], gop: int) -> Path:
    import av
    import numpy as np

    name, _, opts = CODECS[codec]
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(str(path), "w") as c:
        s = c.add_stream(name, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.gop_size = gop
        s.options = dict(opts)
        for i in range(int(seconds * fps)):
            # moving gradients + a bouncing block: real motion so inter frames carry data
            a = np.empty((h, w, 3), np.uint8)
            a[..., 0] = (xx + 3 * i) % 256
            a[..., 1] = (yy + 2 * i) % 256
            a[..., 2] = ((xx ^ yy) + i) % 256
            x0 = (7 * i) % (w - 40)
            a[20:60, x0:x0 + 40] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=float, nargs="+", default=[10.0, 60.0, 300.0], help="video seconds")
    ap.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 32, 128], help="planned frames (capped at 2 fps)")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--size", type=int, nargs=2, default=[320, 240])
    ap.add_argument("--gop-seconds", type=float, default=2.0, help="keyframe interval")
    ap.add_argument("--tile", type=int, default=448)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write results here")
    args = ap.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for codec in args.codecs:
            for secs in args.lengths:
                path = Path(d) / f"{codec}_{int(secs)}.{CODECS[codec][1]}"
                t0 = time.perf_counter()
                encode(path, codec, secs, args.fps, tuple(args.size), max(1, int(args.gop_seconds * args.fps)))
                enc_s = time.perf_counter() - t0
                info = probe_video(path)
                info.update(start=0.0, end=info["duration"])
                total = info["frames"]
                for n in sorted({min(n, max(1, int(2 * secs))) for n in args.frames}):
                    plan = sample_frame_indices(info, n)
                    idx = list(plan.frame_indices)
                    size = (args.tile, args.tile)
                    sparse = best_of(lambda: decode_frames(path, idx, size=size), args.repeat)
                    keep = set(idx)
                    full = best_of(lambda: decode_all_frames(path, size=size, keep=keep), args.repeat)
                    rows.append({"codec": codec, "seconds": secs, "frames_in_video": total, "planned": len(idx),
                                 "bytes": path.stat().st_size, "encode_s": round(enc_s, 2),
                                 "sparse_s": round(sparse, 4), "full_s": round(full, 4),
                                 "sparse_planned_fps": round(len(idx) / sparse, 1),
                                 "full_planned_fps": round(len(idx) / full, 1),
                                 "full_decoded_fps": round(total / full, 1), "speedup": round(full / sparse, 2)})
                    print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"| codec | video | frames | planned | sparse s | full s | planned frames/s sparse | "
          f"planned frames/s full | full decode frames/s | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['codec']} | {r['seconds']:g} s | {r['frames_in_video']} | {r['planned']} | {r['sparse_s']:.3f} | "
              f"{r['full_s']:.3f} | {r['sparse_planned_fps']:.0f} | {r['full_planned_fps']:.0f} | "
              f"{r['full_decoded_fps']:.0f} | {r['speedup']:.1f}x |")
    if args.json:  # one record per row, each with the run's commit and options
        commit, config = git_commit(), options(args)
        write_json(Path(args.json), [dict(r, commit=commit, config=config) for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
