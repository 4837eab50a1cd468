"""`megatron-eagle train --config RUN.yaml [--set key=value ...]` (launch with torchrun or srun)."""

from __future__ import annotations

import argparse
import logging
import warnings


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `megatron-eagle train`."""
    p.add_argument("--config", required=True, help="run YAML (see examples/tiny/run.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.save_every_steps=50")


def run(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TE) .*")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    from megatron_eagle.config import ConfigError, load_run
    from megatron_eagle.runtime.distributed import launch_env

    try:
        run = load_run(args.config, args.overrides, world_size=launch_env()[1])
        from megatron_eagle.training.trainer import train

        return train(run)
    except ConfigError as e:
        print(f"config error: {e}", flush=True)
        return 2
