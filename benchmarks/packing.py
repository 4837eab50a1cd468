#!/usr/bin/env python
"""Packing benchmark: the Eagle 2 knapsack vs our cost-balanced packer, side by side.

For each sequence length L (with the CP the curriculum uses at that length) and DP size, plan
the realistic mixed distribution (:mod:`megatron_eagle.data.packing.length_mix`, documented there and
in BENCHMARKS.md#packing) with both packers and report fill, per-step compute imbalance, the
straggler's estimated step time and the planning time (one process, numpy single-threaded).

    PYTHONPATH=. .venv/bin/python benchmarks/packing.py                 # 10 M samples (~10 min)
    PYTHONPATH=. .venv/bin/python benchmarks/packing.py --samples 200000 --dps 8 64

Writes benchmarks/results/packing.json, packing.md (the table) and packing_steps.png.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core: nothing here may fan out

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.records import git_commit, options, write_json  # noqa: E402

from megatron_eagle.data.packing.length_mix import realistic_mix  # noqa: E402
from megatron_eagle.data.packing.plan import PlanSpec, make_plan  # noqa: E402
from megatron_eagle.data.packing.schedule import Schedule, step_rank_costs  # noqa: E402

CP_FOR_L = {32768: 1, 65536: 2, 131072: 4}  # as in examples/eagle2.5-8b/curriculum.yaml
RESULTS = Path(__file__).resolve().parent / "results"


def step_ratios(plan) -> np.ndarray:
    """Per-step max/mean of rank cost."""
    sched = Schedule(np.arange(len(plan.packs)), plan.step, plan.micro, plan.rank, np.zeros(0, np.int64),
                     plan.stats["steps"])
    per_rank = step_rank_costs(sched, plan.pack_cost, plan.spec.dp)
    return per_rank.max(1) / per_rank.mean(1)


def run(args: argparse.Namespace) -> dict:
    rows, hist = [], {}
    jobs = [(L, dp, pk) for L in args.seq_lens for dp in args.dps for pk in ("eagle2", "balanced")]
    bar = tqdm(total=len(jobs), desc="plans", unit="plan")
    json_write_s = None
    for L in args.seq_lens:
        t0 = time.perf_counter()
        table = realistic_mix(args.samples, L, seed=args.seed)
        gen_s = time.perf_counter() - t0
        cp = CP_FOR_L.get(L, 1)
        for dp in args.dps:
            for packer in ("eagle2", "balanced"):
                plan = make_plan(table, PlanSpec(L, dp, cp=cp, packer=packer, seed=args.seed,
                                                 cost_model=args.cost_model))
                s = plan.stats
                rows.append({"seq_len": L, "cp": cp, "dp": dp, "packer": packer, "samples": s["samples"],
                             "dropped": s["dropped"], "dropped_tail": s["dropped_tail"], "packs": s["packs"],
                             "steps": s["steps"], "fill_ratio": s["fill_ratio"], "imbalance": s["imbalance"],
                             "imbalance_p99": s["imbalance_p99"], "imbalance_max": s["imbalance_max"],
                             "step_time_s": s["step_time_s"], "epoch_time_s": s["epoch_time_s"],
                             "balanced_epoch_time_s": s["balanced_epoch_time_s"], "cp_pad_tokens": s["cp_pad_tokens"],
                             "pack_s": s["timing"]["pack_s"], "schedule_s": s["timing"]["schedule_s"],
                             "plan_s": s["timing"]["plan_s"], "generate_s": gen_s})
                if dp == args.hist_dp:
                    hist[f"{packer}@{L}"] = step_ratios(plan)
                if json_write_s is None and packer == "balanced":
                    with tempfile.TemporaryDirectory() as d:
                        t0 = time.perf_counter()
                        plan.write_json(Path(d) / "plan.json")
                        json_write_s = time.perf_counter() - t0
                        json_mb = (Path(d) / "plan.json").stat().st_size / 1e6
                bar.update(1)
                bar.set_postfix(L=L, dp=dp, packer=packer, plan_s=f"{s['timing']['plan_s']:.1f}")
    bar.close()
    return {"machine": args.machine, "date": args.date, "commit": git_commit(),
            "config": options(args, ("out", "date", "machine")), "python": platform.python_version(),
            "numpy": np.__version__, "samples": args.samples, "seed": args.seed, "cost_model": args.cost_model,
            "tflops_assumed": plan.spec.tflops, "json_write": {"seconds": json_write_s, "megabytes": json_mb},
            "rows": rows}, hist


def markdown(res: dict) -> str:
    out = ["| L | CP | DP | packer | fill | imbalance (mean / p99 / max) | straggler step s | epoch h "
           "| pack + schedule s | dropped (over-long / tail) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        out.append(f"| {r['seq_len'] // 1024}K | {r['cp']} | {r['dp']} | {r['packer']} | {r['fill_ratio']:.4f} "
                   f"| {r['imbalance']:.4f} / {r['imbalance_p99']:.3f} / {r['imbalance_max']:.3f} "
                   f"| {r['step_time_s']:.3f} | {r['epoch_time_s'] / 3600:.1f} "
                   f"| {r['pack_s']:.1f} + {r['schedule_s']:.1f} | {r['dropped']} / {r['dropped_tail']} |")
    return "\n".join(out) + "\n"


def plot(hist: dict, dp: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lens = sorted({int(k.split("@")[1]) for k in hist})
    fig, axes = plt.subplots(1, len(lens), figsize=(5 * len(lens), 3.6), squeeze=False)
    for ax, L in zip(axes[0], lens):
        for packer, color in (("eagle2", "tab:red"), ("balanced", "tab:blue")):
            r = hist.get(f"{packer}@{L}")
            if r is None:
                continue
            ax.hist(r, bins=np.linspace(1.0, max(1.6, float(r.max())), 80), color=color, alpha=0.6,
                    label=f"{packer}: mean {r.mean():.3f}")
        ax.set_title(f"L = {L // 1024}K, DP = {dp}")
        ax.set_xlabel("per-step straggler / mean rank cost")
        ax.set_yscale("log")
        ax.legend()
    axes[0][0].set_ylabel("steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10_000_000)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--dps", type=int, nargs="+", default=[8, 32, 128, 512])
    p.add_argument("--hist-dp", type=int, default=128, help="DP size whose per-step ratios are plotted")
    p.add_argument("--cost-model", default="eagle2.5-8b")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--machine", default="CPU dev box, 2 cores")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    p.add_argument("--out", type=Path, default=RESULTS / "packing.json")
    args = p.parse_args(argv)
    if args.hist_dp not in args.dps:
        args.hist_dp = args.dps[len(args.dps) // 2]
    res, hist = run(args)
    write_json(args.out, res)
    md = markdown(res)
    args.out.with_suffix(".md").write_text(md)
    plot(hist, args.hist_dp, args.out.with_name(args.out.stem + "_steps.png"))
    print(md)
    print(f"plan.json of {res['samples']} samples written in {res['json_write']['seconds']:.1f} s "
          f"({res['json_write']['megabytes']:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
