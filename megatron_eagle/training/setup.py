"""This rank's model stage in megatron-core DDP with its DistributedOptimizer: the setup that the
trainer and the benchmarks share, so that a benchmark measures the step the trainer runs."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

from megatron_eagle.config import ConfigError, ModelConfig, ParallelConfig
from megatron_eagle.models.eagle import EagleModel, build_model
from megatron_eagle.training.memory import MemoryEstimate, device_capacity, resolve_recompute
from megatron_eagle.training.optimizer import OptimConfig, build_optimizer, enable_wgrad_fusion, wrap_ddp

log = logging.getLogger("megatron_eagle.train")


@dataclass
class TrainingState:
    """The model stage, its DDP wrapper and the optimizer over it."""

    model: EagleModel
    ddp: DistributedDataParallel
    optimizer: torch.optim.Optimizer  # megatron's (Chained) DistributedOptimizer
    memory: Optional[MemoryEstimate] = None  # the memory model's prediction for the resolved recompute

    @property
    def chunks(self) -> list[DistributedDataParallel]:
        """The model chunks as megatron's schedules and checkpointing take them."""
        return [self.ddp]


def resolve_model_recompute(model_cfg: ModelConfig, parallel: ParallelConfig, optim: OptimConfig,
                            seq_len: Optional[int], dp: int = 1, chunk_tokens: int = 2048,
                            capacity: Optional[float] = None) -> tuple[ModelConfig, Optional[MemoryEstimate]]:
    """``model_cfg`` with ``auto`` recompute resolved by the memory model for packs of ``seq_len``
    tokens on this GPU (``capacity`` bytes; default: the device's), and the prediction. Without a
    GPU or a length, ``auto`` means no recompute."""
    cap = device_capacity() if capacity is None else capacity
    if seq_len is None:
        est = None
        rv, rl = model_cfg.recompute_vision, model_cfg.recompute_llm
    else:
        est = resolve_recompute(model_cfg, parallel, optim, seq_len, cap, dp=dp, chunk_tokens=chunk_tokens)
        rv, rl = est.recompute_vision, est.recompute_llm
    rv, rl = ("none" if rv == "auto" else rv), ("none" if rl == "auto" else rl)
    return dataclasses.replace(model_cfg, recompute_vision=rv, recompute_llm=rl), est


class HostActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved activations in (pinned) host memory until the backward needs them. Parameters stay
    where they are: megatron's linears accumulate weight gradients into ``param.main_grad`` and
    flag ``param.grad_added_to_main_grad`` on the tensor they saved, and with a host copy in its
    place the parameter gets no gradient at all (``torch.autograd.graph.save_on_cpu`` does that:
    megatron's DDP then fails with overlapped gradient reduction). Copying weights would also
    cost PCIe time for nothing."""

    def __init__(self, pin_memory: bool):
        def pack(t: torch.Tensor):
            if isinstance(t, torch.nn.Parameter) or t.device.type == "cpu":
                return None, t
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin_memory)
            host.copy_(t)
            return t.device, host

        def unpack(packed):
            device, t = packed
            return t if device is None else t.to(device, non_blocking=pin_memory)

        super().__init__(pack, unpack)


def offload_vision_activations(model: EagleModel) -> None:
    """Run the ViT's forward under :class:`HostActivations` (``model.offload_vision``)."""
    vit = getattr(model, "vision_model", None)
    if vit is None:  # a pipeline stage without the ViT
        return
    forward = vit.forward
    pin = torch.cuda.is_available()

    def offloaded(*args, **kwargs):
        with HostActivations(pin):
            return forward(*args, **kwargs)
    vit.forward = offloaded


def check_prediction_fits(est: MemoryEstimate, capacity: float, explicit: bool) -> None:
    """Refuse (before step 1) a prediction over the GPU's ``capacity`` bytes; an explicit recompute
    setting whose static state fits only warns (the prediction assumes every token visual)."""
    if est.total <= capacity:
        return
    gib = 2 ** 30
    if explicit and est.static <= capacity:
        log.warning("the memory model predicts %.1f GiB per rank for vision=%s llm=%s, more than this GPU has; "
                    "`megatron-eagle train --dry-run` prints the breakdown", est.total / gib,
                    est.recompute_vision, est.recompute_llm)
        return
    raise ConfigError("model.recompute_vision/recompute_llm",
                      f"the memory model predicts {est.total / gib:.1f} GiB per rank even with vision="
                      f"{est.recompute_vision}, llm={est.recompute_llm} (static {est.static / gib:.1f} GiB), "
                      f"more than this GPU's {capacity / gib:.1f} GiB",
                      "shard the optimizer state over more data-parallel ranks, use tensor parallelism "
                      "(parallel.tp) or context parallelism (parallel.cp), or shorten seq_len; "
                      "`megatron-eagle train --dry-run` prints the breakdown")


def build_training_state(model_cfg: ModelConfig, parallel: ParallelConfig, optim: OptimConfig, *,
                         chunk_tokens: int = 2048,
                         before_wrap: Optional[Callable[[EagleModel], None]] = None,
                         seq_len: Optional[int] = None) -> TrainingState:
    """Build this rank's model stage, wrap it in DDP and build its optimizer.

    Process groups must exist (``runtime.distributed.init_model_parallel``). ``before_wrap`` runs
    on the bare model before DDP and the optimizer see it: loading weights there makes them the
    optimizer's fp32 master copy too. ``recompute: auto`` is resolved here, for packs of
    ``seq_len`` tokens (:func:`resolve_model_recompute`).
    """
    from megatron.core import parallel_state as ps

    auto = "auto" in (model_cfg.recompute_vision, model_cfg.recompute_llm)
    capacity = device_capacity()
    model_cfg, est = resolve_model_recompute(model_cfg, parallel, optim, seq_len, capacity=capacity,
                                             dp=ps.get_data_parallel_world_size(), chunk_tokens=chunk_tokens)
    if est is not None and capacity is not None:
        check_prediction_fits(est, capacity, explicit=not auto)
    if auto and est is not None:
        log.info("recompute auto -> vision %s, llm %s (predicted peak %.1f GiB)", model_cfg.recompute_vision,
                 model_cfg.recompute_llm, est.total / 2 ** 30)
    model = build_model(model_cfg, parallel, chunk_tokens=chunk_tokens)
    if model_cfg.offload_vision:
        offload_vision_activations(model)
    if before_wrap is not None:
        before_wrap(model)
    bf16 = model_cfg.params_dtype == "bfloat16"
    ddp = wrap_ddp(model, optim, bf16)
    if model_cfg.offload_vision and hasattr(model, "vision_model"):
        # Under saved-tensor hooks (any, even identity ones) megatron's fused weight-gradient path
        # leaves the ViT's weights without a .grad, and DDP's overlapped reduction asserts
        # ("param.grad being None is not safe when overlap_grad_reduce is True"): the offloaded
        # ViT's linears write their weight gradients the unfused way.
        enable_wgrad_fusion(model.vision_model, on=False)
    ddp.config.finalize_model_grads_func = finalize_model_grads
    ddp.config.no_sync_func = ddp.no_sync  # reduce grads once per step, not per micro-batch
    optimizer = build_optimizer([ddp], optim, bf16)
    return TrainingState(model=model, ddp=ddp, optimizer=optimizer, memory=est)
