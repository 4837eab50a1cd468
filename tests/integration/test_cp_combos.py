"""Context parallelism composed with TP and PP, and the hybrid Ulysses x ring layout (4 gloo processes).

One spawn: the single-rank reference, then TP2xCP2 (with sequence parallelism), PP2xCP2 and
CP4 (hybrid 2x2 and plain variants at attention level), each against the reference.
"""

from __future__ import annotations

import pytest

from tests.dist import run_distributed

COMBOS = {  # name -> ParallelConfig kwargs
    "tp2_cp2_sp_allgather": dict(tp=2, cp=2, sp=True, cp_variant="allgather"),
    "tp2_cp2_ulysses": dict(tp=2, cp=2, cp_variant="ulysses"),
    "pp2_cp2_ring": dict(pp=2, cp=2, cp_variant="ring"),
    "cp4_hybrid_2x2": dict(cp=4, cp_variant="hybrid", cp_ulysses=2),
}
ATTN_CASES = [("ring", 4, 2, 0), ("allgather", 4, 2, 0), ("ulysses", 6, 2, 0), ("hybrid", 4, 2, 2),
              ("hybrid", 3, 1, 2)]


def _run(rank, world):
    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.runtime.distributed import init_model_parallel
    from tests.cp_fixtures import AWKWARD_LENGTHS, attention_case, awkward_mixed_pack
    from tests.model_fixtures import full_reference_state, tiny_model_config
    from tests.integration.test_cp import compare, run_model

    cfg = tiny_model_config()
    init_model_parallel(1, 1, 1)
    state = full_reference_state(cfg)
    batch = awkward_mixed_pack(cfg)
    ref = run_model(cfg, ParallelConfig(), state, batch)
    out = {"model": {}, "attn": {}, "ref_loss": ref["loss"]}
    for name, kw in COMBOS.items():
        par = ParallelConfig(**kw)
        init_model_parallel(par.tp, par.pp, par.cp)
        got = run_model(cfg, par, state, batch)
        d = compare(ref, {**got, "grads": got["grads"]}) if got["grads"] else {}
        d["names"] = sorted(got["grads"])
        d["last"] = got["last"]
        d["loss_value"] = got["loss"]
        out["model"][name] = d
    init_model_parallel(1, 1, world)
    for variant, hq, hk, u in ATTN_CASES:
        out["attn"][(variant, hq, hk, u)] = attention_case(variant, world, AWKWARD_LENGTHS, hq, hk, ulysses=u)
    out["ref_names"] = sorted(ref["grads"])
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_run, 4)


@pytest.mark.parametrize("combo", list(COMBOS))
def test_combo_equals_single_rank(results, combo):
    ref_loss = results[0]["ref_loss"]
    names = set()
    for r in results:
        d = r["model"][combo]
        names |= set(d["names"])
        if d["last"]:
            assert abs(d["loss_value"] - ref_loss) <= 1e-5 * ref_loss, d
        if "hidden" in d:
            assert d["hidden"] < 1e-4, d
        assert d["grad"] < 1e-6 or d["grad_rel"] < 1e-4, d
    assert names == set(results[0]["ref_names"])


def test_attention_variants_cp4(results):
    for r in results:
        for case, a in r["attn"].items():
            for key in ("out", "dq", "dk", "dv"):
                assert a[key] < 2e-5 * max(1.0, a["scale"]), (case, key, a)
            for key in ("dq_pad", "dk_pad", "dv_pad"):
                assert a[key] == 0.0, (case, key, a)
