"""The memory model's static terms against the real tensors of a built training state (tiny preset,
bf16 parameters, megatron DDP + DistributedOptimizer on gloo): parameters, gradient buffers and
optimizer state (fp32 master shards and both Adam moments, after one step), at DP 1 and sharded
over DP 2 with a frozen ViT."""

from __future__ import annotations

import pytest

from tests.dist import run_distributed


def _real_and_predicted(rank, world, freeze_vision):
    import dataclasses

    import torch

    from megatron_eagle.config import ParallelConfig, preset_model_config
    from megatron_eagle.runtime.distributed import init_model_parallel
    from megatron_eagle.training.memory import static_bytes
    from megatron_eagle.training.optimizer import OptimConfig
    from megatron_eagle.training.setup import build_training_state
    from megatron_eagle.training.step import guarded_optimizer_step

    init_model_parallel(tp=1, seed=1)
    mc = preset_model_config("tiny")
    mc = dataclasses.replace(mc, params_dtype="bfloat16",
                             freeze=dataclasses.replace(mc.freeze, vision=freeze_vision))
    st = build_training_state(mc, ParallelConfig(), OptimConfig(), seq_len=256)
    guarded_optimizer_step(st.optimizer, 1.0)  # Adam state is created by the first step
    real = {"params": sum(p.numel() * p.element_size() for p in st.model.parameters()),
            "grads": sum(p.main_grad.numel() * p.main_grad.element_size()
                         for p in st.model.parameters() if p.requires_grad)}
    opt = 0
    for part in getattr(st.optimizer, "chained_optimizers", [st.optimizer]):
        inner = part.optimizer
        for g in inner.param_groups:
            for p in g["params"]:  # this rank's fp32 master shard ...
                opt += p.numel() * p.element_size()
                for v in inner.state.get(p, {}).values():  # ... and its two moments
                    if torch.is_tensor(v) and v.numel() > 1:
                        opt += v.numel() * v.element_size()
    real["optimizer"] = opt
    pred = static_bytes(mc, ParallelConfig(), OptimConfig(), dp=world)
    return real, pred, (st.memory.recompute_vision, st.memory.recompute_llm)


@pytest.mark.parametrize("world,freeze_vision", [(1, False), (2, True)])
def test_static_terms_equal_the_real_tensor_sizes(world, freeze_vision):
    for real, pred, recompute in run_distributed(_real_and_predicted, world, freeze_vision, timeout=240):
        assert real["params"] == pred["params"]
        assert real["grads"] == pred["grads"]
        # DP shards are whole buckets: each rank's share is within a few elements of 1/DP
        assert abs(real["optimizer"] - pred["optimizer"]) <= 0.02 * pred["optimizer"], (real, pred)
        assert recompute == ("none", "none")  # auto on a CPU: nothing to fit


def _refusal(rank, world):
    import dataclasses

    from megatron_eagle.config import ConfigError, ParallelConfig, preset_model_config
    from megatron_eagle.runtime.distributed import init_model_parallel
    from megatron_eagle.training import setup
    from megatron_eagle.training.memory import GIB
    from megatron_eagle.training.optimizer import OptimConfig

    init_model_parallel(tp=1, seed=1)
    setup.device_capacity = lambda: 79.18 * GIB  # an H100 80GB
    cfg = dataclasses.replace(preset_model_config("eagle2.5-8b"), params_dtype="bfloat16")
    try:  # refused before anything is built: the 8B model's static state alone is 135 GiB
        setup.build_training_state(cfg, ParallelConfig(), OptimConfig(), seq_len=32768)
    except ConfigError as e:
        refused = (e.field, e.fix)
    small = dataclasses.replace(preset_model_config("eagle2.5-2b"), params_dtype="bfloat16")
    chosen = setup.resolve_model_recompute(small, ParallelConfig(), OptimConfig(), 65536)[0]
    return refused, (chosen.recompute_vision, chosen.recompute_llm)


def test_auto_refuses_what_cannot_fit_and_resolves_with_the_gpu_memory():
    refused, chosen = run_distributed(_refusal, 1, timeout=240)[0]
    assert refused[0].startswith("model.recompute") and "parallel.tp" in refused[1] and "--dry-run" in refused[1]
    assert chosen == ("full", "full")
