"""Training loader throughput: packs/s and decoded tiles/frames per second per CPU core, and TP
duplicate reading vs read-once-and-broadcast, on real encoded media at the 8B model's geometry.

Builds two prepared datasets in a temp dir with `megatron-eagle prepare` (tiny tokenizer):
  images: JPEG photos/documents 800x600 .. 1700x2200, one or two per sample (IAP: up to 12 tiles
          + thumbnail of 448 px, 256 tokens per tile, as Eagle 2.5-8B)
  videos: H.264 640x360 30 fps (2 s GOP), 30/60/90 s; ADS picks up to 2 fps within the budget
plans each at --seq-len for one DP rank (eagle2.5-8b cost model), and runs the StageLoader with
0/1/2 workers. CPU time counts the main process and its (joined) workers, so "per core" figures
are packs (frames, tiles) per CPU-second. Then two gloo processes (the TP ranks of one DP rank)
load the video stage with tp_mode=duplicate and tp_mode=broadcast.

    PYTHONPATH=. python benchmarks/loader.py [--seq-len 32768] [--packs 8] [--json benchmarks/results/loader.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import git_commit, options, write_json  # noqa: E402


def _cpu_s() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def make_data(root: Path, n_images: int, n_videos: int,
              video_seconds: tuple[int, ...] = (30, 60, 90)) -> dict[str, Path]:
    from benchmarks.video_decode import encode

    from megatron_eagle.data.prepare.pipeline import PrepareConfig, prepare
    from tests.media_factory import conv, tiny_tokenizer_dir, write_image, write_jsonl

    media = root / "media"
    sizes = [(1920, 1080), (1280, 960), (1024, 1366), (800, 600), (1700, 2200), (1600, 1200)]
    for i, (w, h) in enumerate(sizes):
        write_image(media / f"img/{i}.jpg", w, h, "JPEG", seed=i)
    vids = list(video_seconds)
    (media / "vid").mkdir(parents=True, exist_ok=True)
    for s in vids:
        encode(media / f"vid/{s}.mp4", "h264", s, 30, (640, 360), 60)
    img_rows, vid_rows = [], []
    for i in range(n_images):
        if i % 3 == 2:
            img_rows.append({"id": f"i{i}", "image": [f"img/{i % 6}.jpg", f"img/{(i + 1) % 6}.jpg"],
                             "conversations": conv("<image-1> <image-2> Compare them.", "The first is wider.")})
        else:
            img_rows.append({"id": f"i{i}", "image": f"img/{i % 6}.jpg",
                             "conversations": conv("<image>\nDescribe the picture.", "A colour gradient.")})
    for i in range(n_videos):
        vid_rows.append({"id": f"v{i}", "video": f"vid/{vids[i % len(vids)]}.mp4",
                         "conversations": conv("<video>\nWhat moves?", "A white block moves right.")})
    out = {}
    for name, rows in (("images", img_rows), ("videos", vid_rows)):
        src = write_jsonl(root / f"{name}.jsonl", rows)
        out[name] = root / name
        prepare(PrepareConfig(inputs=[str(src)], media_root=str(media), output=str(out[name]),
                              tokenizer=str(tiny_tokenizer_dir()), workers=2, progress=False))
    return out


def make_plan_for(data: Path, seq_len: int):
    from megatron_eagle.config import preset_model_config
    from megatron_eagle.data.packing.plan import PlanSpec, make_plan
    from megatron_eagle.data.packing.plan_index import table_from_prepared

    model = preset_model_config("eagle2.5-8b")
    table, _ = table_from_prepared([data], seq_len, model)
    return model, make_plan(table, PlanSpec(seq_len, dp=1, cost_model="eagle2.5-8b", seed=0))


def run_loader(data: Path, seq_len: int, packs: int, workers: int, pixel_dtype: str = "float32") -> dict:
    from megatron_eagle.data.loading.loader import StageLoader
    from tests.media_factory import tiny_tokenizer

    model, plan = make_plan_for(data, seq_len)
    n = min(packs, plan.stats["steps"])
    ld = StageLoader("bench", plan, [data], tiny_tokenizer(), model, dp_rank=0, num_workers=workers, prefetch=2,
                     total_steps=n, pixel_dtype=pixel_dtype)
    cpu0, t0 = _cpu_s(), time.perf_counter()
    first = None
    for _ in ld:
        if first is None:
            first = time.perf_counter()
    wall = time.perf_counter() - t0
    ld.close()
    cpu = _cpu_s() - cpu0
    m = ld.metrics()
    steady = (time.perf_counter() - first) / max(1, n - 1) if n > 1 else wall
    step_s = float(plan.stats["step_time_s"])  # one pack on one H100 at 400 TFLOP/s (cost model)
    return {"data": data.name, "workers": workers, "pixel_dtype": pixel_dtype, "packs": n,
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "packs_per_s": round(n / wall, 3),
            "steady_s_per_pack": round(steady, 3), "packs_per_core_s": round(n / cpu, 3),
            "samples_per_pack": round(m["samples"] / n, 1), "tiles_per_pack": round(m["tiles"] / n, 1),
            "frames_per_pack": round(m["frames"] / n, 1), "tiles_per_core_s": round(m["tiles"] / cpu, 1),
            "frames_per_core_s": round(m["frames"] / cpu, 1), "tokens_per_pack": round(m["tokens"] / n),
            "h100_s_per_pack": round(step_s, 3),
            "cores_per_h100": round(step_s and (cpu / n) / step_s, 3)}


def _tp_rank(rank: int, world: int, data: str, seq_len: int, packs: int, mode: str, pixel_dtype: str) -> dict:
    import torch.distributed as dist

    from megatron_eagle.data.loading import broadcast as batch_broadcast
    from megatron_eagle.data.loading.loader import StageLoader
    from tests.media_factory import tiny_tokenizer

    model, plan = make_plan_for(Path(data), seq_len)
    n = min(packs, plan.stats["steps"])
    ld = StageLoader("bench", plan, [data], tiny_tokenizer(), model, dp_rank=0, num_workers=0, total_steps=n,
                     tp_mode=mode, tp_group=dist.group.WORLD, pixel_dtype=pixel_dtype)
    bc_s = [0.0]
    orig = batch_broadcast.broadcast_batch

    def timed(*a, **k):
        t = time.perf_counter()
        out = orig(*a, **k)
        bc_s[0] += time.perf_counter() - t
        return out

    batch_broadcast.broadcast_batch = timed
    dist.barrier()
    cpu0, t0 = time.process_time(), time.perf_counter()
    nbytes = 0
    for batches in ld:
        nbytes += sum(b.pixel_values.numel() * b.pixel_values.element_size() for b in batches)
    dist.barrier()
    return {"rank": rank, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0, "packs": n,
            "broadcast_s": bc_s[0], "pixel_mb": nbytes / 1e6}


def run_tp(data: Path, seq_len: int, packs: int) -> list[dict]:
    from tests.dist import run_distributed

    rows = []
    for mode, dtype in (("duplicate", "float32"), ("broadcast", "float32"), ("broadcast", "uint8")):
        res = run_distributed(_tp_rank, 2, str(data), seq_len, packs, mode, dtype, timeout=1200)
        n = res[0]["packs"]
        rows.append({"mode": mode, "pixel_dtype": dtype, "packs": n,
                     "wall_s_per_pack": round(max(r["wall_s"] for r in res) / n, 3),
                     "cpu_s_per_pack_rank0": round(res[0]["cpu_s"] / n, 3),
                     "cpu_s_per_pack_rank1": round(res[1]["cpu_s"] / n, 3),
                     "broadcast_s_per_pack": round(res[0]["broadcast_s"] / n, 3),  # on the sender
                     "pixel_mb_per_pack": round(res[0]["pixel_mb"] / n, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def _synthetic_batch(tokens: int, tiles: int, size: int, dtype: str):
    import torch

    from megatron_eagle.data.loading.pack_builder import LoaderBatch

    g = torch.Generator().manual_seed(0)
    px = torch.randint(0, 256, (tiles, 3, size, size), generator=g, dtype=torch.uint8)
    return LoaderBatch(tokens=torch.randint(0, 1000, (tokens,), generator=g), labels=torch.full((tokens,), -100),
                       loss_weights=torch.rand(tokens, generator=g), position_ids=torch.arange(tokens),
                       cu_seqlens=torch.tensor([0, tokens], dtype=torch.int32),
                       pixel_values=px if dtype == "uint8" else (px.float() / 255.0 - 0.5) / 0.5,
                       max_seqlen=tokens, tile_positions=torch.arange(tiles) * 256,
                       sample_ids=torch.zeros(1, 2, dtype=torch.long))


def _nccl_rank(rank: int, world: int, port: int, tokens: int, tiles: int, size: int, repeat: int, queue) -> None:
    """Per micro-batch GPU-side cost of each TP data mode (the CPU side is measured on the CPU box):
    duplicate = every rank copies its own batch host->device; broadcast = rank 0 copies, NCCL sends."""
    import torch
    import torch.distributed as dist

    from megatron_eagle.data.loading.broadcast import broadcast_batch
    from megatron_eagle.models.vision import normalize_pixels

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    dev = torch.device("cuda", rank)
    out = {}
    for dtype in ("float32", "uint8"):
        for pinned in (False, True):
            b = _synthetic_batch(tokens, tiles, size, dtype)
            if pinned:
                b = b.pin_memory()

            def timed(fn):
                fn()  # warm-up
                torch.cuda.synchronize()
                dist.barrier()
                t = time.perf_counter()
                for _ in range(repeat):
                    fn()
                torch.cuda.synchronize()
                return (time.perf_counter() - t) / repeat

            h2d = timed(lambda: normalize_pixels(b.to(dev).pixel_values))
            bc = timed(lambda: normalize_pixels(broadcast_batch(b if rank == 0 else None, 0, dist.group.WORLD)[0].pixel_values))
            got = broadcast_batch(b if rank == 0 else None, 0, dist.group.WORLD)[0]  # rank 1 regenerates b
            ok = all(torch.equal(getattr(got, f).cpu(), getattr(b, f)) for f in ("pixel_values", "tokens", "labels",
                                                                                  "loss_weights", "cu_seqlens"))
            mb = b.pixel_values.numel() * b.pixel_values.element_size() / 1e6
            out[f"{dtype}{'_pinned' if pinned else ''}"] = {"pixel_mb": round(mb, 1), "h2d_ms": round(h2d * 1e3, 2),
                                                            "broadcast_ms": round(bc * 1e3, 2), "identical": ok}
    queue.put((rank, out))
    dist.destroy_process_group()


def run_nccl(tokens: int, tiles: int, size: int, repeat: int = 5) -> dict:
    import torch.multiprocessing as mp

    from tests.dist import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_nccl_rank, args=(r, 2, port, tokens, tiles, size, repeat, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--packs", type=int, default=8, help="packs timed per configuration")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-tp", action="store_true", help="skip the duplicate-vs-broadcast run")
    ap.add_argument("--video-seconds", type=int, nargs="+", default=[30, 60, 90], help="lengths of the test videos")
    ap.add_argument("--json", default=None)
    ap.add_argument("--nccl", type=int, nargs=3, metavar=("TOKENS", "TILES", "SIZE"),
                    help="only the GPU part: 2 GPUs, synthetic micro-batches of this size (e.g. 32768 118 448)")
    args = ap.parse_args(argv)
    if args.nccl:
        res = run_nccl(*args.nccl)
        print(json.dumps(res, indent=1))
        if args.json:
            write_json(Path(args.json), {"commit": git_commit(), "config": options(args), **res})
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        data = make_data(Path(d), n_images=12 * args.packs, n_videos=args.packs + 2,
                         video_seconds=tuple(args.video_seconds))
        print(f"data prepared in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        rows = []
        for name in ("images", "videos"):
            for w in args.workers:
                rows.append(run_loader(data[name], args.seq_len, args.packs, w))
                print(json.dumps(rows[-1]), file=sys.stderr)
            if max(args.workers) > 0:
                rows.append(run_loader(data[name], args.seq_len, args.packs, max(args.workers), "uint8"))
                print(json.dumps(rows[-1]), file=sys.stderr)
        tp = [] if args.no_tp else run_tp(data["videos"], args.seq_len, max(2, args.packs // 2))
    print("| data | workers | pixels | packs/s | s/pack steady | packs per core-s | samples/pack | tiles/pack | "
          "frames/pack | tiles per core-s | frames per core-s | H100 s/pack | cores per H100 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['workers']} | {r['pixel_dtype']} | {r['packs_per_s']:.2f} | "
              f"{r['steady_s_per_pack']:.2f} | {r['packs_per_core_s']:.2f} | {r['samples_per_pack']} | "
              f"{r['tiles_per_pack']} | {r['frames_per_pack']} | {r['tiles_per_core_s']} | {r['frames_per_core_s']} | "
              f"{r['h100_s_per_pack']:.2f} | {r['cores_per_h100']:.2f} |")
    if tp:
        print("\n| TP mode | pixels | s/pack (wall) | CPU s/pack rank 0 | CPU s/pack rank 1 | broadcast s/pack "
              "| MB/pack |")
        print("|---|---|---|---|---|---|---|")
        for r in tp:
            print(f"| {r['mode']} | {r['pixel_dtype']} | {r['wall_s_per_pack']:.2f} | "
                  f"{r['cpu_s_per_pack_rank0']:.2f} | "
                  f"{r['cpu_s_per_pack_rank1']:.2f} | {r['broadcast_s_per_pack']:.3f} | {r['pixel_mb_per_pack']} |")
    if args.json:
        write_json(Path(args.json), {"commit": git_commit(), "config": options(args), "seq_len": args.seq_len,
                                     "loader": rows, "tp": tp})
    return 0


if __name__ == "__main__":
    sys.exit(main())
