"""Activation recomputation (selective and full, per module) changes memory, not results."""

from __future__ import annotations

import dataclasses

import torch

from tests.dist import run_distributed


def _loss_and_grads(rank, world, vision_mode, llm_mode):
    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.convert.sharding import load_full_parameters
    from megatron_eagle.models.eagle import build_model
    from megatron_eagle.runtime.distributed import init_model_parallel
    from tests.model_fixtures import full_reference_state, mixed_pack, tiny_model_config

    init_model_parallel(1, 1, 1)
    cfg = tiny_model_config()
    state = full_reference_state(cfg)
    cfg = dataclasses.replace(cfg, recompute_vision=vision_mode, recompute_llm=llm_mode)
    model = build_model(cfg, ParallelConfig())
    expect = {"none": None}.get(llm_mode, llm_mode)
    assert model.language_model.decoder.config.recompute_granularity == expect
    assert model.vision_model.encoder.config.recompute_granularity == {"none": None}.get(vision_mode, vision_mode)
    load_full_parameters(model, state.get)
    model.train()
    loss = model(mixed_pack(cfg))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_recompute_modes_give_identical_loss_and_grads():
    ref_loss, ref_grads = run_distributed(_loss_and_grads, 1, "none", "none")[0]
    for modes in (("selective", "selective"), ("full", "full")):
        loss, grads = run_distributed(_loss_and_grads, 1, *modes)[0]
        assert loss == ref_loss, modes
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-7, msg=f"{modes} {name}")
