"""One optimizer step: megatron's forward/backward schedule over the micro-batches, then a
guarded optimizer update that skips non-finite steps instead of corrupting the weights."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_eagle.batch import PackedBatch
from megatron_eagle.training import flat_adamw
from megatron_eagle.training.flat_adamw import FusedClipStep


def forward_backward(ddp_model, batches: Sequence[PackedBatch], device: torch.device,
                     poison_loss: bool = False) -> list[torch.Tensor]:
    """Run all micro-batches of this DP rank; returns per-pack losses on the last PP stage.

    The losses stay device tensors: reading them here would make the host wait for the whole
    backward before it starts the optimizer's bookkeeping (:func:`prepare_step` overlaps it).
    """
    def forward_step(data_iterator, model):
        # non_blocking: a blocking copy would wait for the GPU to finish the previous micro-batch;
        # the batch keeps its host copy, from which the model reads counts without device syncs.
        # uint8 tiles travel as bytes; the ViT normalises them on the device.
        batch = next(data_iterator).to(device, non_blocking=True)
        output = model(batch)

        def loss_func(loss: torch.Tensor):
            if poison_loss:
                loss = loss * float("nan")
            return loss, {"loss": loss.detach().clone()}  # megatron scales `loss` in place

        return output, loss_func

    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp_model],
        num_microbatches=len(batches), seq_length=max(b.num_tokens for b in batches), micro_batch_size=1,
        forward_only=False)
    return [d["loss"] for d in out]


def prepare_step(optimizer) -> tuple[bool, float]:
    """Grads into the optimizer's main grads, then their global norm: (found_inf, grad_norm).

    Call it right after :func:`forward_backward`, before anything reads a loss: its per-parameter
    host work then runs while the GPU still works through the backward (reading the losses first
    left the GPU idle for that time, 7 ms per step on H100 at 8K). The norm is reduced over all
    model-parallel ranks, so every rank takes the same decision.
    """
    if optimizer.prepare_grads():  # found inf with a loss scaler (fp16)
        return True, float("nan")
    return False, float(optimizer.get_grad_norm())


def finish_step(optimizer, clip_grad: float, grad_norm: float) -> bool:
    """Clip by ``grad_norm`` and update; skips (returns False) when the norm is not finite."""
    if not math.isfinite(grad_norm):
        return False
    coeff = clip_grad / (grad_norm + 1.0e-6)  # megatron's clip coefficient
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = part.get_parameters()
        if not params or clip_grad <= 0 or coeff >= 1.0:
            continue
        fused: Optional[FusedClipStep] = flat_adamw.installed(part)
        if fused is not None:  # folded into the fused update
            fused.clip_next_step(coeff)
        else:
            clip_grad_by_total_norm_fp32(params, max_norm=clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads())


def guarded_optimizer_step(optimizer, clip_grad: float) -> tuple[bool, float]:
    """megatron's ChainedOptimizer.step with a finiteness check between norm and update.

    Returns (updated, grad_norm): :func:`prepare_step` then :func:`finish_step`.
    """
    found_inf, grad_norm = prepare_step(optimizer)
    if found_inf:
        return False, grad_norm
    return finish_step(optimizer, clip_grad, grad_norm), grad_norm
