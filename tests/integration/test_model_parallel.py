"""TP / PP / TP×PP (and SP) forward loss and every gradient equal the single-rank result."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed


def _grads_full(model):
    """Full-layout gradients of this stage (TP-gathered)."""
    from megatron.core import parallel_state as ps
    from megatron_eagle.convert.sharding import _layer_offsets, _named_params, global_name, unshard

    offsets = _layer_offsets(model)
    out = {}
    for name, p in _named_params(model):
        if p.grad is None:
            continue
        g = p.grad.clone()
        # what finalize_model_grads does for SP norms and Qwen3's q/k norms (shared by every head)
        if getattr(p, "sequence_parallel", False) or "q_layernorm" in name or "k_layernorm" in name:
            torch.distributed.all_reduce(g, group=ps.get_tensor_model_parallel_group())
        fake = torch.nn.Parameter(g.detach().clone(), requires_grad=False)
        for attr in ("tensor_model_parallel", "partition_dim"):
            if hasattr(p, attr):
                setattr(fake, attr, getattr(p, attr))
        out[global_name(name, offsets)] = unshard(name, fake, model, ps.get_tensor_model_parallel_group())
    return out


def _run(rank, world, tp, pp, sp, tie, preset="tiny"):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.convert.sharding import load_full_parameters
    from megatron_eagle.models.eagle import build_model
    from megatron_eagle.runtime.distributed import init_model_parallel
    from tests.model_fixtures import full_reference_state, mixed_pack, tiny_model_config

    cfg = tiny_model_config(tie=tie, preset=preset)
    init_model_parallel(1, 1, 1)
    ref_state = full_reference_state(cfg)
    batch = mixed_pack(cfg, pad_to_multiple=2)

    init_model_parallel(tp, pp, 1)
    parallel = ParallelConfig(tp=tp, pp=pp, sp=sp)
    model = build_model(cfg, parallel)
    load_full_parameters(model, ref_state.get)
    model.config.finalize_model_grads_func = None

    losses = []

    def forward_step(data_iter, m):
        b = next(data_iter)
        out = m(b)

        def loss_func(output):
            losses.append(output.detach().clone())
            return output, {"loss": output.detach()}
        return out, loss_func

    seq = batch.num_tokens  # megatron divides by tp itself under SP
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
        seq_length=seq, micro_batch_size=1, forward_only=False)
    grads = _grads_full(model)
    if tie and pp > 1:
        # Tied embedding copies on the first and last stage: sum their grads (what megatron's
        # finalize_model_grads does) before comparing with the single-rank gradient.
        from megatron_eagle.convert.sharding import TIED_EMBEDDING
        g = grads.pop("language_model.output_layer.weight", None)
        g = g if g is not None else grads.get(TIED_EMBEDDING, torch.zeros(cfg.llm.padded_vocab_size(tp),
                                                                           cfg.llm.hidden_size))
        g = g.clone()
        torch.distributed.all_reduce(g, group=ps.get_embedding_group())
        if TIED_EMBEDDING in grads:
            grads[TIED_EMBEDDING] = g
    return {"loss": losses[0].item() if losses else None, "grads": grads,
            "last": ps.is_pipeline_last_stage()}


def _collect(results):
    loss = [r["loss"] for r in results if r["last"]][0]
    grads = {}
    for r in results:
        grads.update(r["grads"])
    return loss, grads


@pytest.fixture(scope="module")
def single_rank():
    return {tie: _collect(run_distributed(_run, 1, 1, 1, False, tie)) for tie in (False, True)}


@pytest.mark.parametrize("tp,pp,sp,tie", [
    (2, 1, False, False), (2, 1, True, True), (1, 2, False, True), (2, 2, True, False),
])
def test_parallel_equals_single_rank(single_rank, tp, pp, sp, tie):
    ref_loss, ref_grads = single_rank[tie]
    loss, grads = _collect(run_distributed(_run, tp * pp, tp, pp, sp, tie))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0 or "vision" in name, f"{name} has no gradient"
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("tp,sp", [(2, True)])
def test_qwen3_parallel_equals_single_rank(tp, sp):
    """Qwen3 (q/k RMSNorm, head_dim != hidden/heads, no qkv bias, a vocabulary TP does not divide):
    TP (+SP) loss and every gradient equal the single rank's; padded vocabulary rows get none."""
    preset = "tiny-eagle2.5-qwen3-8b"
    ref_loss, ref_grads = _collect(run_distributed(_run, 1, 1, 1, False, False, preset))
    loss, grads = _collect(run_distributed(_run, tp, tp, 1, sp, False, preset))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(grads) == set(ref_grads)
    assert any("q_layernorm" in n for n in grads) and any("k_layernorm" in n for n in grads)
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0 or "vision" in name, f"{name} has no gradient"
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    out = ref_grads["language_model.output_layer.weight"]
    assert out.shape[0] == 512 and out[509:].abs().max() == 0 and out[:509].abs().sum() > 0
