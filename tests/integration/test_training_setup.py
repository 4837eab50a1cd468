"""training/setup.py: the model, DDP and optimizer setup shared by the trainer and the benchmarks."""

from __future__ import annotations

import torch

from tests.dist import run_distributed


def _build_and_step(rank, world):
    from megatron.core.distributed import finalize_model_grads

    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.runtime.distributed import init_model_parallel
    from megatron_eagle.training.optimizer import OptimConfig
    from megatron_eagle.training.setup import build_training_state
    from megatron_eagle.training.step import forward_backward, guarded_optimizer_step
    from tests.model_fixtures import mixed_pack, tiny_model_config

    init_model_parallel(seed=3)
    cfg = tiny_model_config()
    seen = []

    def before_wrap(model):  # sees the bare model: no DDP grad buffers yet
        seen.append((type(model).__name__, any(hasattr(p, "main_grad") for p in model.parameters())))

    state = build_training_state(cfg, ParallelConfig(), OptimConfig(lr=1e-3), before_wrap=before_wrap)
    ddp = state.ddp
    before = {n: p.detach().clone() for n, p in state.model.named_parameters() if p.requires_grad}
    ddp.zero_grad_buffer()
    state.optimizer.zero_grad()
    losses = forward_backward(ddp, [mixed_pack(cfg, seed=0)], torch.device("cpu"))
    updated, grad_norm = guarded_optimizer_step(state.optimizer, 1.0)
    moved = sum(not torch.equal(p.detach(), before[n]) for n, p in state.model.named_parameters() if n in before)
    return dict(seen=seen, chunks=state.chunks == [ddp], module=ddp.module is state.model,
                finalize=ddp.config.finalize_model_grads_func is finalize_model_grads,
                no_sync=ddp.config.no_sync_func == ddp.no_sync, loss=float(losses[0]), updated=updated,
                grad_norm=grad_norm, moved=moved, params=len(before))


def test_build_training_state_wires_ddp_and_optimizer():
    r = run_distributed(_build_and_step, 1, timeout=180)[0]
    assert r["seen"] == [("EagleModel", False)]
    assert r["chunks"] and r["module"] and r["finalize"] and r["no_sync"]
    assert r["updated"] and r["grad_norm"] > 0 and torch.isfinite(torch.tensor(r["loss"]))
    assert r["moved"] == r["params"] > 0  # one step moves every trainable parameter
