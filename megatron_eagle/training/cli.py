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
    from megatron_eagle.config import ConfigError
    from megatron_eagle.training.run_config import load_run_config

    try:
        cfg = load_run_config(args.config, args.overrides)
        from megatron_eagle.training.trainer import train

        return train(cfg)
    except ConfigError as e:
        print(f"config error: {e}", flush=True)
        return 2
