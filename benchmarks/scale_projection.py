#!/usr/bin/env python
"""The speedup at scale, projected from measured pack times.

1. **measure** (GPU; CPU with ``--preset tiny`` as a smoke test): plan the realistic mixed length
   distribution (:mod:`megatron_eagle.data.packing.length_mix`) at each L with both planners (the
   Eagle 2 knapsack and ``balanced``), take a random sample of packs from each, and time one
   training step of every sampled pack on both stacks: ``hf-strong`` (fp32 master, gradient
   checkpointing) and ``ours`` (``recompute: auto``).
2. **fit**: per stack, a cost model ``t = c0 + c1 * tokens + c2 * sum(len^2) + c3 * tiles`` by least
   squares on the measured times; its error on held-out packs by leave-one-out.
3. **project**: plan a large sample of the distribution at DP 64, 256 and 512; every step's time is
   the slowest rank's predicted time plus a gradient all-reduce estimate (ring, ``--bus-gbs`` GB/s
   per GPU, bf16 gradients), for "Eagle 2 packer + hf-strong" and "our packer + our stack";
   tokens/s per GPU and the ratio. Writes a JSON record and a PNG of step time against DP.

    python benchmarks/scale_projection.py --seq-lens 32768 65536 --packs-per-planner 6 \\
        --out benchmarks/results/scale_projection.json --png benchmarks/results/scale_projection.png
    python benchmarks/scale_projection.py --fit-only --samples-in OUT/samples.json ...   # re-fit, no GPU
    python benchmarks/scale_projection.py --preset tiny --seq-lens 512 --packs-per-planner 3 --project-samples 3000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == REPO / "benchmarks":
    sys.path[0] = str(REPO)
elif str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.records import git_commit, write_json  # noqa: E402

STACKS = {"hf-strong": ("hf-strong+fp32-master+gc", "eagle2"), "ours": ("ours+rc-auto", "balanced")}
DPS = (64, 256, 512)


def _features(lens: list[int], tiles: int) -> list[float]:
    a = np.asarray(lens, dtype=np.float64)
    return [1.0, float(a.sum()), float((a * a).sum()), float(tiles)]


def plan(table, seq_len: int, dp: int, packer: str, cost_model: str, seed: int = 0):
    from megatron_eagle.data.packing.plan import PlanSpec, make_plan

    return make_plan(table, PlanSpec(seq_len, dp, packer=packer, cost_model=cost_model, seed=seed))


def measure(args) -> list[dict]:
    """Step time of each sampled pack on both stacks (one process, one GPU or the CPU)."""
    import torch

    from benchmarks.train.hf_strong import HFStrongSide
    from benchmarks.train.ours import OursSide
    from benchmarks.train.packs import pack_from_samples
    from benchmarks.train.variants import parse_variant
    from megatron_eagle.config import preset_model_config
    from megatron_eagle.data.packing.length_mix import realistic_mix
    from megatron_eagle.runtime.distributed import init_distributed, init_model_parallel

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    rt = init_distributed()
    init_model_parallel(tp=1, seed=1234)
    device = rt.device
    cfg = preset_model_config(args.preset)
    cfg.params_dtype = "bfloat16" if device.type == "cuda" else "float32"
    rng = np.random.default_rng(args.seed)
    samples = []
    for L in args.seq_lens:
        table = realistic_mix(args.mix_samples, L, seed=args.seed)
        chosen = []
        for packer in ("eagle2", "balanced"):
            p = plan(table, L, 8, packer, args.cost_model, args.seed)
            for i in rng.choice(len(p.packs), size=min(args.packs_per_planner, len(p.packs)), replace=False):
                idx = p.packs[int(i)]
                chosen.append((packer, table.length[idx].tolist(), table.tiles[idx].tolist()))
        packs = [pack_from_samples(cfg, lens, tiles, seed=k) for k, (_, lens, tiles) in enumerate(chosen)]
        if device.type == "cuda":
            packs = [p.__class__(**{**p.__dict__, "batch": p.batch.to(device)}) for p in packs]
        worst = max(p.tiles for p in packs)
        for stack, (variant, _) in STACKS.items():
            v = parse_variant(variant)
            try:
                side = (HFStrongSide(cfg, v, device) if v.side == "hf-strong"
                        else OursSide(cfg, v, 1, device, L, worst))
            except torch.OutOfMemoryError as e:
                print(f"# {stack} at {L}: out of memory building ({e})", flush=True)
                continue
            for (packer, lens, tiles), pk in zip(chosen, packs):
                times = []
                try:
                    for _ in range(1 + args.repeats):  # the first call builds kernels for new shapes
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        side.step([pk])
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        times.append(time.perf_counter() - t0)
                    t = float(np.median(times[1:]))
                    status = "ok"
                except torch.OutOfMemoryError:
                    t, status = None, "oom"
                samples.append(dict(stack=stack, variant=variant, planner=packer, seq_len=L, lens=lens,
                                    tiles=pk.tiles, seconds=t, status=status))
                print(f"# {stack:9s} L {L} {packer:8s} subsamples {len(lens):3d} tiles {pk.tiles:4d} "
                      f"sum len^2 {sum(x * x for x in lens):.3g}  {t if t is None else round(t, 4)} s", flush=True)
            side.close()
            del side
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return samples


def fit(samples: list[dict]) -> dict:
    """Per stack: least-squares coefficients over all its ok samples and the leave-one-out error."""
    out = {}
    for stack in STACKS:
        rows = [s for s in samples if s["stack"] == stack and s["status"] == "ok"]
        if len(rows) < 2:
            continue
        X = np.array([_features(s["lens"], s["tiles"]) for s in rows])
        y = np.array([s["seconds"] for s in rows])
        scale = np.maximum(np.abs(X).max(0), 1e-12)
        ridge = 1e-6

        def solve(Xs, ys):
            A = Xs / scale
            coef = np.linalg.solve(A.T @ A + ridge * np.eye(A.shape[1]), A.T @ ys)
            return coef / scale
        coef = solve(X, y)
        loo = []
        for i in range(len(rows)):
            keep = np.arange(len(rows)) != i
            c = solve(X[keep], y[keep])
            loo.append(abs(float(X[i] @ c) - y[i]) / y[i])
        out[stack] = dict(coef=coef.tolist(), n=len(rows), heldout_mean_abs_err=float(np.mean(loo)),
                          heldout_max_abs_err=float(np.max(loo)),
                          fit_mean_abs_err=float(np.mean(np.abs(X @ coef - y) / y)))
    return out


def project(args, fits: dict) -> list[dict]:
    """Step time and tokens/s per GPU at each DP: slowest rank's predicted time + all-reduce."""
    from megatron_eagle.config import preset_model_config
    from megatron_eagle.data.packing.length_mix import realistic_mix
    from megatron_eagle.training.memory import param_counts

    n_params = sum(param_counts(preset_model_config(args.preset)).values())
    rows = []
    for L in args.seq_lens:
        table = realistic_mix(args.project_samples, L, seed=args.seed + 1)
        for dp in DPS:
            allreduce = 2 * (dp - 1) / dp * n_params * 2 / (args.bus_gbs * 1e9)
            for stack, (_, packer) in STACKS.items():
                if stack not in fits:
                    continue
                coef = np.asarray(fits[stack]["coef"])
                p = plan(table, L, dp, packer, args.cost_model, args.seed)
                t_pack = np.array([_features(table.length[p.packs[i]], int(table.tiles[p.packs[i]].sum())) @ coef
                                   for i in range(len(p.packs))])
                tok_pack = np.array([float(table.length[p.packs[i]].sum()) for i in range(len(p.packs))])
                steps = int(p.step.max()) + 1 if len(p.step) else 0
                per_rank = np.zeros((steps, dp))
                np.add.at(per_rank, (p.step, p.rank), t_pack)
                tokens = np.bincount(p.step, weights=tok_pack, minlength=steps)
                full = np.bincount(p.step, minlength=steps) == dp  # complete steps only
                if not full.any():
                    continue
                step_s = per_rank[full].max(1) + allreduce
                rows.append(dict(seq_len=L, dp=dp, stack=stack, planner=packer, steps=int(full.sum()),
                                 step_s=float(step_s.mean()), allreduce_s=allreduce,
                                 imbalance=float((per_rank[full].max(1) / per_rank[full].mean(1)).mean()),
                                 tokens_per_s_per_gpu=float(tokens[full].sum() / step_s.sum() / dp)))
    for r in rows:
        base = next((b for b in rows if b["stack"] == "hf-strong" and b["seq_len"] == r["seq_len"]
                     and b["dp"] == r["dp"]), None)
        r["speedup_vs_hf_strong"] = (r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]) if base else None
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lens = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(1, len(lens), figsize=(5 * len(lens), 4), squeeze=False)
    for ax, L in zip(axes[0], lens):
        for stack, label in (("hf-strong", "Eagle 2 packer + hf-strong"), ("ours", "our packer + our stack")):
            rs = sorted((r for r in rows if r["seq_len"] == L and r["stack"] == stack), key=lambda r: r["dp"])
            if rs:
                ax.plot([r["dp"] for r in rs], [r["step_s"] for r in rs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("DP (GPUs)")
        ax.set_ylabel("projected step time (s)")
        ax.set_title(f"L = {L // 1024}K, one pack per GPU per step")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="eagle2.5-2b")
    ap.add_argument("--cost-model", default=None, help="planner cost model (default: the preset)")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 65536])
    ap.add_argument("--packs-per-planner", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=1, help="timed steps per pack (after one untimed)")
    ap.add_argument("--mix-samples", type=int, default=20000, help="samples planned to draw the measured packs")
    ap.add_argument("--project-samples", type=int, default=400000, help="samples planned per projection")
    ap.add_argument("--bus-gbs", type=float, default=50.0, help="all-reduce bus bandwidth per GPU, GB/s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples-in", type=Path, default=None, help="measured samples JSON (with --fit-only)")
    ap.add_argument("--fit-only", action="store_true", help="fit and project the samples of --samples-in")
    ap.add_argument("--samples-out", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="JSON record")
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    args = ap.parse_args(argv)
    args.cost_model = args.cost_model or args.preset
    if args.fit_only:
        rec = json.loads(args.samples_in.read_text())
        samples = rec["samples"] if isinstance(rec, dict) else rec
    else:
        samples = measure(args)
    if args.samples_out:
        write_json(args.samples_out, samples)
    fits = fit(samples)
    rows = project(args, fits)
    print("| stack | cost-model fit error (held-out mean / max) | samples |\n|---|---|---|")
    for stack, f in fits.items():
        print(f"| {stack} | {100 * f['heldout_mean_abs_err']:.1f}% / {100 * f['heldout_max_abs_err']:.1f}% | {f['n']} |")
    print("\n| L | DP | stack | planner | step s | all-reduce s | imbalance | tokens/s/GPU | vs hf-strong |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seq_len'] // 1024}K | {r['dp']} | {r['stack']} | {r['planner']} | {r['step_s']:.4f} | "
              f"{r['allreduce_s']:.4f} | {r['imbalance']:.3f} | {r['tokens_per_s_per_gpu']:.0f} | "
              f"{r['speedup_vs_hf_strong']:.2f}x |")
    if args.png and rows:
        plot(rows, args.png)
    if args.out:
        import torch

        write_json(args.out, dict(date=args.date, commit=git_commit(), command=" ".join(sys.argv), torch=torch.__version__,
                                  device=(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"),
                                  config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                  fits=fits, projection=rows, samples=samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
