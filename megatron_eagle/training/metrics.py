"""Per-step metrics: RUN_DIR/metrics.jsonl (every step), console, TensorBoard, W&B, progress bar."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("megatron_eagle.train")


def peak_memory_gib() -> float:
    """Peak GPU memory allocated on GPU; peak resident set size of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


class MetricsWriter:
    """Writes on global rank 0 only; others construct it with ``enabled=False``."""

    def __init__(self, run_dir: str | Path, enabled: bool, log_every: int, tensorboard: bool,
                 wandb_project: Optional[str], config: dict[str, Any], total_steps: int):
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = self._wandb = self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception:  # tensorboard not installed: jsonl and console still work
                self._tb = None
        if wandb_project or os.environ.get("WANDB_PROJECT"):
            try:
                import wandb

                self._wandb = wandb.init(project=wandb_project or os.environ["WANDB_PROJECT"],
                                         dir=str(run_dir), config=config, resume="allow")
            except Exception as e:  # not installed or not logged in
                log.warning("Weights & Biases disabled: %s", e)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True)

    def new_stage(self, name: str, total_steps: int, start: int) -> None:
        if self._bar is not None:
            self._bar.reset(total=total_steps)
            self._bar.set_description(name)
            self._bar.update(start)

    def write(self, record: dict[str, Any], global_step: int) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"train/{k}", v, global_step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=global_step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        elif record["step"] % self.log_every == 0:
            print(f"[{record['stage']}] step {record['step']:>6} loss {record['loss']:.4f} "
                  f"grad_norm {record['grad_norm']:.3f} lr {record['lr']:.2e} "
                  f"tok/s {record['tokens_per_s']:.0f} mfu {record['mfu']:.3f} "
                  f"wait {record['loader_wait_s']:.2f}s skipped {record['skipped']}", flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
