"""`megatron-eagle plan`: build a pack plan and print a short summary.

    megatron-eagle plan --lengths lengths.txt --seq-len 32768 --dp 64 --out plan.json
    megatron-eagle plan --data out/image-sft out/video --seq-len 65536 --dp 32 --cp 2 --out plan.json
    megatron-eagle plan --synthetic 1000000 --seq-len 131072 --dp 128 --cp 4 --compare --out plan.json
    megatron-eagle plan --curriculum examples/eagle2.5-8b/curriculum.yaml --stage stage2 \\
        --world-size 256 --out plan.json

``--lengths``: one sample per line, ``length`` or ``length tiles`` (a what-if for data not yet
prepared). ``--data``: prepared directories, budgeted by ADS for ``--seq-len``. ``--synthetic N``:
the documented realistic mix (:mod:`.length_mix`). ``--curriculum``: L, layout, trainable modules
and blend come from the stage; each dataset's ``path`` is a prepared directory or a lengths file.
Exit code 0 on success, 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from megatron_eagle.config import ConfigError, load_curriculum
from megatron_eagle.data.packing.common import SampleTable
from megatron_eagle.data.packing.cost_model import DEFAULT_TFLOPS
from megatron_eagle.data.packing.packers import PACKER_NAMES


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `megatron-eagle plan`."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", nargs="+", metavar="DIR", help="prepared data directories")
    src.add_argument("--lengths", metavar="FILE", help="text file: one `length [tiles]` per line")
    src.add_argument("--synthetic", type=int, metavar="N", help="N samples of the realistic mixed distribution")
    src.add_argument("--curriculum", metavar="YAML", help="plan one stage of a curriculum (with --stage, --world-size)")
    src.add_argument("--memory", metavar="PRESET", help="print the per-rank memory breakdown of a model preset "
                     "at --seq-len on --tp/--cp/--pp/--dp (training/memory.py); no plan is written")
    p.add_argument("--gpu-gib", type=float, default=None, help="GPU memory for --memory (default: an H100 80GB)")
    p.add_argument("--stage", help="stage name (with --curriculum)")
    p.add_argument("--world-size", type=int, help="GPUs (with --curriculum); DP = world / (tp*pp*cp)")
    p.add_argument("--seq-len", type=int, help="max tokens per pack, L")
    p.add_argument("--dp", type=int, help="data-parallel ranks")
    p.add_argument("--cp", type=int, default=1, help="context-parallel size: sub-samples pad to 2*CP (default 1)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size, for time estimates only")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size, for time estimates only")
    p.add_argument("--micro-batches", type=int, default=1, help="packs per DP rank per optimizer step (default 1)")
    p.add_argument("--packer", choices=PACKER_NAMES, default="balanced", help="default: balanced")
    p.add_argument("--cost-model", default="eagle2.5-8b", metavar="MODEL",
                   help="model preset, `tokens`, or a model config YAML (default eagle2.5-8b)")
    p.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS, help="achieved TFLOP/s per GPU for step times")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None,
                   help="processes running ADS over --data indexes (default: the CPUs, at most 16)")
    p.add_argument("--compare", action="store_true", help="also run the other packer and print both")
    p.add_argument("--out", help="plan.json to write (required unless --memory)")


def _input_table(args: argparse.Namespace) -> tuple[SampleTable, Counter]:
    if args.lengths:
        from megatron_eagle.data.packing.plan import read_lengths_file

        return read_lengths_file(args.lengths), Counter()
    if args.synthetic is not None:
        from megatron_eagle.data.packing.length_mix import realistic_mix

        if args.synthetic < 1:
            raise ConfigError("--synthetic", "must be >= 1", "give a sample count")
        return realistic_mix(args.synthetic, args.seq_len, args.seed), Counter()
    from megatron_eagle.data.packing.plan_index import table_from_prepared

    return table_from_prepared(args.data, args.seq_len, workers=args.workers)


def _stage_tables(cur_path: str, cur, stage) -> dict[str, SampleTable]:
    from megatron_eagle.data.packing.plan import read_lengths_file
    from megatron_eagle.data.packing.plan_index import table_from_prepared

    tables = {}
    for d in stage.datasets:
        if not d.path:
            raise ConfigError(f"stages[{stage.name}].datasets[{d.name}].path", "missing",
                              "give a prepared directory or a lengths file")
        path = Path(d.path) if Path(d.path).is_absolute() else Path(cur_path).parent / d.path
        if path.is_file():
            tables[d.name] = read_lengths_file(path)
        elif path.is_dir():
            tables[d.name] = table_from_prepared([path], stage.seq_len)[0]
        else:
            raise ConfigError(f"stages[{stage.name}].datasets[{d.name}].path", f"{path} does not exist",
                              "prepare the dataset or fix the path")
    return tables


def _plan(args: argparse.Namespace, packer: str):
    from megatron_eagle.data.packing.plan import PlanSpec, make_plan

    if args.curriculum:
        from megatron_eagle.data.packing.blend import plan_stage

        if not args.stage or not args.world_size:
            raise ConfigError("--curriculum", "needs --stage and --world-size", "add --stage NAME --world-size N")
        cur = load_curriculum(args.curriculum, args.world_size)
        stage = cur.stage(args.stage)
        return plan_stage(cur, stage.name, _stage_tables(args.curriculum, cur, stage), args.world_size, packer,
                          args.tflops)
    if args.seq_len is None or args.dp is None:
        raise ConfigError("--seq-len/--dp", "missing", "give --seq-len L and --dp N")
    table, drops = _input_table(args)
    spec = PlanSpec(args.seq_len, args.dp, cp=args.cp, tp=args.tp, pp=args.pp, packer=packer,
                    cost_model=args.cost_model, seed=args.seed, micro_batches=args.micro_batches, tflops=args.tflops)
    plan = make_plan(table, spec)
    if args.data:
        plan.stats["ads_drops"] = dict(drops)
        plan.source_dataset, plan.source_index = table.dataset, _index_within(table.dataset)
    return plan


def _index_within(dataset):
    """Position of each row inside its own dataset (rows are grouped by dataset)."""
    import numpy as np

    starts = np.r_[0, np.flatnonzero(np.diff(dataset)) + 1]
    return np.arange(len(dataset)) - np.repeat(starts, np.diff(np.r_[starts, len(dataset)]))


def run(args: argparse.Namespace) -> int:
    from megatron_eagle.data.packing.plan import format_table

    if args.memory:
        from megatron_eagle.training.memory import plan_memory_command

        return plan_memory_command(args)
    if not args.out:
        print("error: --out: missing; give the plan.json to write", file=sys.stderr)
        return 2
    try:
        plan = _plan(args, args.packer)
        plans = [plan]
        if args.compare:
            other = [p for p in PACKER_NAMES if p != args.packer][0]
            plans.append(_plan(args, other))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan.write_json(args.out)
    print(format_table(plans))
    s = plan.stats
    print(f"cost model: {plan.cost_model.describe()}")
    print(f"wrote {args.out}: {s['packs']} packs, {s['steps']} steps; dropped {s['dropped']} over-long, "
          f"{s['dropped_tail']} in tail packs (listed as left_over_samples)")
    return 0
