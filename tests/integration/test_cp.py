"""Context parallelism on 2 gloo processes: every variant equals CP=1 (forward and all gradients).

One spawn runs everything (process start-up dominates on CPU): attention-level checks of each
variant on awkward sub-sample lengths (1, not divisible by 2*cp, tail padding, GQA and head
counts that do not split evenly), then the whole Eagle model (ViT data-parallel inside the CP
group, routed embeddings, RoPE, loss reduction) against the single-rank model on three packs,
including one where a CP rank holds only padding and unsupervised tokens.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist import run_distributed

VARIANTS = ["ring", "allgather", "ulysses", "hybrid"]
ATTN_CASES = [  # (variant, query heads, kv heads, ulysses degree)
    ("ring", 4, 2, 0), ("allgather", 4, 2, 0), ("ulysses", 4, 2, 0), ("ulysses", 6, 3, 0), ("ulysses", 3, 1, 0),
    ("hybrid", 4, 2, 2), ("hybrid", 4, 2, 1),
]


def model_grads(model, cp: int) -> dict[str, torch.Tensor]:
    """Full-layout grads as megatron's DDP would leave them: summed over the CP group, ÷ cp
    (the schedule multiplied the loss by cp)."""
    from megatron.core import parallel_state as ps

    from tests.integration.test_model_parallel import _grads_full

    out = {}
    for name, g in _grads_full(model).items():
        g = g.clone()
        if cp > 1:
            torch.distributed.all_reduce(g, group=ps.get_context_parallel_group())
            g /= cp
        out[name] = g
    return out


def run_model(cfg, parallel, state, batch) -> dict:
    """Loss, grads and final hidden of ``batch`` through megatron's schedule on this layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_eagle.convert.sharding import load_full_parameters
    from megatron_eagle.models.eagle import build_model

    model = build_model(cfg, parallel)
    load_full_parameters(model, state.get)
    model.config.finalize_model_grads_func = None
    losses = []

    def forward_step(data_iter, m):
        out = m(next(data_iter))

        def loss_func(output):
            losses.append(output.detach().clone())
            return output, {"loss": output.detach()}
        return out, loss_func

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
                                num_microbatches=1, seq_length=batch.num_tokens, micro_batch_size=1,
                                forward_only=False)
    grads = model_grads(model, parallel.cp)
    hidden = None
    if parallel.pp == 1:
        with torch.no_grad():
            hidden = model(batch, return_hidden=True)
    return {"loss": losses[0].item() if losses else None, "grads": grads, "hidden": hidden,
            "last": ps.is_pipeline_last_stage()}


def compare(ref: dict, got: dict) -> dict[str, float]:
    """Max abs differences (loss, hidden, every gradient) and the max relative gradient error."""
    out = {"loss": abs(got["loss"] - ref["loss"]) if got["loss"] is not None else 0.0}
    if got["hidden"] is not None:
        out["hidden"] = (got["hidden"] - ref["hidden"]).abs().max().item()
    grad, rel = 0.0, 0.0
    for name, g in got["grads"].items():
        r = ref["grads"][name]
        d = (g - r).abs().max().item()
        grad = max(grad, d)
        rel = max(rel, d / max(r.abs().max().item(), 1e-12))
    out["grad"], out["grad_rel"] = grad, rel
    out["same_params"] = set(got["grads"]) == set(ref["grads"])
    return out


def _run(rank, world):
    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.runtime.distributed import init_model_parallel
    from tests.cp_fixtures import (AWKWARD_LENGTHS, attention_case, awkward_mixed_pack, lopsided_pack, one_tile_pack,
                                   share_of)
    from tests.model_fixtures import full_reference_state, mixed_pack, tiny_model_config

    cfg = tiny_model_config()
    init_model_parallel(1, 1, 1)
    state = full_reference_state(cfg)
    packs = {"mixed": mixed_pack(cfg), "awkward": awkward_mixed_pack(cfg), "lopsided": lopsided_pack(),
             "one_tile": one_tile_pack(cfg)}
    refs = {name: run_model(cfg, ParallelConfig(), state, b) for name, b in packs.items()}

    init_model_parallel(1, 1, world)
    attn = {}
    for variant, hq, hk, u in ATTN_CASES:
        r = attention_case(variant, world, AWKWARD_LENGTHS, hq, hk, ulysses=u)
        attn[(variant, hq, hk, u)] = r
    from megatron_eagle.parallel.cp_split import split_batch
    from megatron_eagle.parallel.groups import build_cp_context

    ctx = build_cp_context(ParallelConfig(cp=world, cp_variant="ring"), cfg.llm.num_heads)
    lop = split_batch(packs["lopsided"], ctx)
    supervised = int((lop.labels >= 0).sum())
    one_tile_slots = int((split_batch(packs["one_tile"], ctx).tokens == cfg.image_token_id).sum())
    model = {}
    for variant in VARIANTS:
        par = ParallelConfig(cp=world, cp_variant=variant)
        for name, b in packs.items():
            model[(variant, name)] = compare(refs[name], run_model(cfg, par, state, b))
    for variant in ("allgather", "ring"):  # pixels pre-sliced as the CP loader delivers them
        for name in ("mixed", "awkward", "one_tile"):
            model[(variant + "+share", name)] = compare(refs[name], run_model(
                cfg, ParallelConfig(cp=world, cp_variant=variant), state, share_of(packs[name], cfg, world, rank)))
    rc = dataclasses.replace(cfg, recompute_llm="full", recompute_vision="full")  # recompute re-runs CP comms
    for variant in ("ring", "allgather"):
        model[(variant + "+recompute", "awkward")] = compare(
            refs["awkward"], run_model(rc, ParallelConfig(cp=world, cp_variant=variant), state, packs["awkward"]))
    return {"attn": attn, "model": model, "ref_losses": {k: v["loss"] for k, v in refs.items()},
            "lopsided_supervised": supervised, "one_tile_slots": one_tile_slots}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_run, 2)


def test_attention_variants_match_reference(results):
    for rank_res in results:
        for case, r in rank_res["attn"].items():
            for key in ("out", "dq", "dk", "dv"):
                assert r[key] < 2e-5 * max(1.0, r["scale"]), (case, key, r)
            for key in ("dq_pad", "dk_pad", "dv_pad"):  # padding never receives gradient
                assert r[key] == 0.0, (case, key, r)


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_cp2_equals_cp1(results, variant):
    ref_losses = results[0]["ref_losses"]
    assert ref_losses["lopsided"] > 0
    sup = [r["lopsided_supervised"] for r in results]
    assert sup[0] > 0 and sup[1] == 0, sup  # rank 1: padding and unsupervised tokens only
    assert [r["one_tile_slots"] for r in results] == [16, 0]  # rank 1: no tile, no slot, still routes
    for rank_res in results:
        for pack in ("mixed", "awkward", "lopsided", "one_tile"):
            d = rank_res["model"][(variant, pack)]
            assert d["same_params"], pack
            assert d["loss"] <= 1e-5 * ref_losses[pack], (pack, d)
            assert d["hidden"] < 1e-4, (pack, d)
            assert d["grad"] < 1e-6 or d["grad_rel"] < 1e-4, (pack, d)


@pytest.mark.parametrize("variant", ["ring", "allgather"])
def test_model_cp2_with_activation_recompute(results, variant):
    for rank_res in results:
        d = rank_res["model"][(variant + "+recompute", "awkward")]
        assert d["same_params"] and d["loss"] <= 1e-5 * results[0]["ref_losses"]["awkward"], d
        assert d["grad"] < 1e-6 or d["grad_rel"] < 1e-4, d


@pytest.mark.parametrize("variant", ["allgather", "ring"])
def test_model_cp2_with_share_only_pixels_equals_cp1(results, variant):
    """Each CP rank holding only its tile share (as the CP loader delivers) gives CP=1's loss and gradients."""
    for rank_res in results:
        for pack in ("mixed", "awkward", "one_tile"):
            d = rank_res["model"][(variant + "+share", pack)]
            assert d["same_params"] and d["loss"] <= 1e-5 * results[0]["ref_losses"][pack], (pack, d)
            assert d["hidden"] < 1e-4, (pack, d)
            assert d["grad"] < 1e-6 or d["grad_rel"] < 1e-4, (pack, d)
