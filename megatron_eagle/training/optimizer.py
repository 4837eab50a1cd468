"""megatron-core DDP, DistributedOptimizer and LR schedule for the model chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_eagle.patches import wgrad_fusion
from megatron_eagle.training import flat_adamw


@dataclass
class OptimConfig:
    lr: float = 2e-5
    min_lr: float = 0.0
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_fraction: float = 0.03
    decay_style: str = "cosine"
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = True  # GPUs only (wrap_ddp): grad reduce-scatter during the backward
    overlap_param_gather: bool = False
    # torch's fused (single-kernel) AdamW instead of its multi-tensor foreach path, where the
    # master params live on CUDA (megatron falls back to torch.optim.AdamW without apex/TE).
    fused_adam: bool = True
    # Gradient buffers (and DP reduction) in fp32; False halves their memory (bf16 grads).
    grad_reduce_in_fp32: bool = True
    # Weight-gradient GEMMs accumulate straight into the grad buffers (patches/wgrad_fusion.py);
    # used where the GPU build of torch has the fused GEMM.
    wgrad_fusion: bool = True
    # One fused AdamW + clip + bf16-param-copy pass over flat per-bucket buffers
    # (training/flat_adamw.py) instead of megatron's per-parameter steps; same arithmetic.
    flat_adamw: bool = True


def wrap_ddp(model: torch.nn.Module, optim: OptimConfig, bf16: bool) -> DistributedDataParallel:
    """Wrap one model chunk in megatron-core DDP (contiguous fp32 grad buffers)."""
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=optim.grad_reduce_in_fp32,
        overlap_grad_reduce=optim.overlap_grad_reduce and torch.cuda.is_available(),
        overlap_param_gather=optim.overlap_param_gather and torch.cuda.is_available(),
        use_distributed_optimizer=optim.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # non-finite steps are skipped by the trainer instead
        bucket_size=None if not torch.cuda.is_available() else 40_000_000,
    )
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)
    device = next(model.parameters()).device
    if optim.wgrad_fusion and wgrad_fusion.available(device):
        enable_wgrad_fusion(model)
    return ddp


def enable_wgrad_fusion(model: torch.nn.Module, on: bool = True) -> int:
    """Switch weight-gradient accumulation into ``main_grad`` on (or off) for every Column/RowParallelLinear
    of a DDP-wrapped model (needs apex or the ``wgrad_fusion`` patch); returns how many were switched."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if on and not wgrad_fusion.installed():
        raise RuntimeError("weight-gradient fusion needs apex or megatron_eagle.patches.install_all() first")
    n = 0
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
            m.gradient_accumulation_fusion = on
            n += 1
    return n


def build_optimizer(chunks: list[DistributedDataParallel], optim: OptimConfig, bf16: bool):
    """AdamW (decoupled weight decay) with fp32 master weights when params are bf16."""
    cfg = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        overlap_param_gather=optim.overlap_param_gather and torch.cuda.is_available(),
    )
    optimizer = get_megatron_optimizer(cfg, chunks)
    if optim.fused_adam:  # also for any part the flat step does not take
        use_fused_adamw(optimizer)
    if optim.flat_adamw and optim.use_distributed_optimizer:
        flat_adamw.enable(optimizer)
    return optimizer


def use_fused_adamw(optimizer, require_cuda: bool = True) -> int:
    """Switch megatron's inner ``torch.optim.AdamW`` to ``fused=True`` where all its params are on
    CUDA. Returns how many inner optimizers were switched. The flag is per param group, so a
    checkpoint restores whichever path it was saved with."""
    switched = 0
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        params = [p for g in inner.param_groups for p in g["params"]]
        if not params or not all((p.is_cuda or not require_cuda) and p.is_floating_point() for p in params):
            continue
        for group in [inner.defaults, *inner.param_groups]:
            group["fused"], group["foreach"] = True, False
        inner._step_supports_amp_scaling = True
        switched += 1
    return switched


def build_scheduler(optimizer, optim: OptimConfig, total_steps: int) -> OptimizerParamScheduler:
    """Linear warmup then cosine decay, counted in optimizer steps (one sample = one step)."""
    warmup = int(round(optim.warmup_fraction * total_steps))
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, 1), lr_decay_style=optim.decay_style,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant")
