"""`megatron-eagle train --config RUN.yaml [--set key=value ...] [--dry-run]` (launch with torchrun or srun)."""

from __future__ import annotations

import argparse
import logging
import warnings


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `megatron-eagle train`."""
    p.add_argument("--config", required=True, help="run YAML (see examples/tiny/run.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.save_every_steps=50")
    p.add_argument("--dry-run", action="store_true",
                   help="print each stage's per-rank memory breakdown and recompute choice, train nothing")
    p.add_argument("--world-size", type=int, default=None, help="GPUs for --dry-run (default: the launch's)")
    p.add_argument("--gpu-gib", type=float, default=None,
                   help="GPU memory for --dry-run (default: this GPU's, else an H100 80GB)")


def dry_run(run, world_size: int, gpu_gib=None) -> str:
    """Every stage's memory plan (training/memory.py) on ``world_size`` GPUs."""
    import dataclasses

    from megatron_eagle.training.memory import GIB, device_capacity, plan_text
    from megatron_eagle.training.optimizer import OptimConfig

    cfg = run.config
    cap = gpu_gib * GIB if gpu_gib else device_capacity()
    optim = OptimConfig(grad_reduce_in_fp32=cfg.optim.grad_reduce_in_fp32)
    out = []
    for stage in run.curriculum.stages:
        dp, _ = stage.layout(world_size)
        model = dataclasses.replace(cfg.model, freeze=stage.freeze(),
                                    params_dtype="float32" if cfg.train.precision == "fp32" else "bfloat16")
        out.append(plan_text(model, stage.parallel, optim, stage.seq_len, cap, dp=dp,
                             label=f"stage {stage.name}: "))
    return "\n\n".join(out)


def run(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TE) .*")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    from megatron_eagle.config import ConfigError, load_run
    from megatron_eagle.runtime.distributed import launch_env

    try:
        world = args.world_size or launch_env()[1]
        run = load_run(args.config, args.overrides, world_size=world)
        if args.dry_run:
            print(dry_run(run, world, args.gpu_gib), flush=True)
            return 0
        from megatron_eagle.training.trainer import train

        return train(run)
    except ConfigError as e:
        print(f"config error: {e}", flush=True)
        return 2
