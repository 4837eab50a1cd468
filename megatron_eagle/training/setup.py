"""This rank's model stage in megatron-core DDP with its DistributedOptimizer: the setup that the
trainer and the benchmarks share, so that a benchmark measures the step the trainer runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

from megatron_eagle.config import ModelConfig, ParallelConfig
from megatron_eagle.models.eagle import EagleModel, build_model
from megatron_eagle.training.optimizer import OptimConfig, build_optimizer, wrap_ddp


@dataclass
class TrainingState:
    """The model stage, its DDP wrapper and the optimizer over it."""

    model: EagleModel
    ddp: DistributedDataParallel
    optimizer: torch.optim.Optimizer  # megatron's (Chained) DistributedOptimizer

    @property
    def chunks(self) -> list[DistributedDataParallel]:
        """The model chunks as megatron's schedules and checkpointing take them."""
        return [self.ddp]


def build_training_state(model_cfg: ModelConfig, parallel: ParallelConfig, optim: OptimConfig, *,
                         chunk_tokens: int = 2048,
                         before_wrap: Optional[Callable[[EagleModel], None]] = None) -> TrainingState:
    """Build this rank's model stage, wrap it in DDP and build its optimizer.

    Process groups must exist (``runtime.distributed.init_model_parallel``). ``before_wrap`` runs
    on the bare model before DDP and the optimizer see it: loading weights there makes them the
    optimizer's fp32 master copy too.
    """
    model = build_model(model_cfg, parallel, chunk_tokens=chunk_tokens)
    if before_wrap is not None:
        before_wrap(model)
    bf16 = model_cfg.params_dtype == "bfloat16"
    ddp = wrap_ddp(model, optim, bf16)
    ddp.config.finalize_model_grads_func = finalize_model_grads
    ddp.config.no_sync_func = ddp.no_sync  # reduce grads once per step, not per micro-batch
    optimizer = build_optimizer([ddp], optim, bf16)
    return TrainingState(model=model, ddp=ddp, optimizer=optimizer)
