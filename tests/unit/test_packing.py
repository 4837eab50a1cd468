"""Pack planner invariants: capacity, at-most-once, drops, determinism, balance vs the Eagle 2 packer."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_eagle.config import ConfigError, FreezeConfig, preset_model_config
from megatron_eagle.data.packing.balanced import layered_pack, pour
from megatron_eagle.data.packing.common import Packs, SampleTable, cp_padded_lengths
from megatron_eagle.data.packing.cost_model import TOKENS, cost_model_from_config, resolve_cost_model
from megatron_eagle.data.packing.length_mix import realistic_mix
from megatron_eagle.data.packing.packers import pack
from megatron_eagle.data.packing.plan import PlanSpec, make_plan

L32, L128 = 32768, 131072


@pytest.fixture(scope="module")
def mix32() -> SampleTable:
    return realistic_mix(30_000, L32, seed=3)


@pytest.fixture(scope="module")
def mix128() -> SampleTable:
    return realistic_mix(30_000, L128, seed=4)


def _check_plan(plan, table: SampleTable) -> None:
    spec = plan.spec
    eff = cp_padded_lengths(table.length, spec.cp)
    # No pack exceeds L (with the CP padding it really occupies).
    assert plan.packs.reduce(eff).max() <= spec.seq_len
    # Every sample at most once; every sample accounted for exactly once (planned, over-long, or tail).
    planned = plan.packs.samples
    assert len(np.unique(planned)) == len(planned)
    everything = np.concatenate([planned, plan.dropped_samples, plan.left_over_samples])
    assert np.array_equal(np.sort(everything), np.arange(len(table)))
    # Exactly one pack per (step, micro, rank); every rank has the same number of steps.
    keys = (plan.step * spec.micro_batches + plan.micro) * spec.dp + plan.rank
    assert np.array_equal(np.sort(keys), np.arange(plan.stats["steps"] * spec.micro_batches * spec.dp))
    assert len(np.unique(np.bincount(plan.rank, minlength=spec.dp))) == 1


@pytest.mark.parametrize("packer", ["eagle2", "balanced"])
@pytest.mark.parametrize("dp,cp,k", [(8, 1, 1), (64, 4, 1), (16, 2, 4)])
def test_plan_invariants(mix32, mix128, packer, dp, cp, k):
    table, L = (mix128, L128) if cp == 4 else (mix32, L32)
    plan = make_plan(table, PlanSpec(L, dp, cp=cp, packer=packer, micro_batches=k))
    _check_plan(plan, table)
    assert plan.stats["packs"] == plan.stats["steps"] * dp * k


def test_overlong_samples_are_dropped_and_counted_never_truncated():
    L = 1024
    lengths = np.array([100, L + 1, 1000, 5000, L, 3, 2 * L, 1021])
    # With CP=4 a sub-sample pads to a multiple of 8: 1021 -> 1024 still fits, L+1 does not.
    plan = make_plan(SampleTable.from_lengths(lengths), PlanSpec(L, dp=1, cp=4, packer="balanced"))
    assert plan.stats["dropped"] == 3
    assert plan.dropped_samples.tolist() == [1, 3, 6]
    assert not set(plan.packs.samples.tolist()) & {1, 3, 6}
    # Kept samples are whole: each pack holds its samples' full (padded) lengths, nothing cut.
    eff = cp_padded_lengths(lengths, 4)
    assert plan.stats["tokens"] == int(lengths[plan.packs.samples].sum())
    assert plan.stats["cp_pad_tokens"] == int((eff - lengths)[plan.packs.samples].sum())
    assert plan.packs.reduce(eff).max() <= L


@pytest.mark.parametrize("packer", ["eagle2", "balanced"])
def test_plans_are_deterministic_for_a_seed(mix32, packer):
    spec = dict(seq_len=L32, dp=16, packer=packer)
    a = make_plan(mix32, PlanSpec(**spec, seed=5)).dumps()
    b = make_plan(mix32, PlanSpec(**spec, seed=5)).dumps()
    c = make_plan(mix32, PlanSpec(**spec, seed=6)).dumps()
    strip = lambda s: s.split('"packs": [', 1)[1]  # the stats carry timings
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


@pytest.mark.parametrize("L,cp,dp", [(L32, 1, 8), (L32, 1, 256), (L128, 4, 64)])
def test_balanced_beats_eagle2_on_imbalance_at_equal_or_better_fill(mix32, mix128, L, cp, dp):
    table = mix128 if L == L128 else mix32
    e = make_plan(table, PlanSpec(L, dp, cp=cp, packer="eagle2")).stats
    b = make_plan(table, PlanSpec(L, dp, cp=cp, packer="balanced")).stats
    assert b["fill_ratio"] >= e["fill_ratio"]
    assert b["fill_ratio"] >= 0.99
    assert b["imbalance"] <= 1.03 < e["imbalance"]
    assert b["step_time_s"] < e["step_time_s"]


def test_micro_batches_balance_the_sum_per_rank(mix32):
    one = make_plan(mix32, PlanSpec(L32, 16, packer="balanced", micro_batches=1)).stats
    four = make_plan(mix32, PlanSpec(L32, 16, packer="balanced", micro_batches=4))
    rand = make_plan(mix32, PlanSpec(L32, 16, packer="eagle2", micro_batches=4)).stats
    assert four.stats["imbalance"] <= one["imbalance"] + 1e-4
    assert four.stats["imbalance"] < rand["imbalance"]
    # With several micro-batches a step mixes rounds from different cost levels.
    steps = four.stats["steps"]
    per_micro = np.zeros((steps, 4))
    np.add.at(per_micro, (four.step, four.micro), four.pack_cost)
    assert np.mean(per_micro.max(1) / per_micro.min(1)) > 1.05


def test_balanced_spreads_expensive_steps_over_the_epoch(mix32):
    plan = make_plan(mix32, PlanSpec(L32, 8, packer="balanced", seed=1))
    step_cost = np.bincount(plan.step, weights=plan.pack_cost)
    # Rounds are built in cost order but shuffled: no trend of cost with step index.
    corr = np.corrcoef(np.arange(len(step_cost)), step_cost)[0, 1]
    assert abs(corr) < 0.1
    assert step_cost.max() / step_cost.min() > 1.1  # the steps do differ; the order is what is shuffled


def _eagle2_reference(lengths: list[int], L: int, delta: int = 20) -> list[list[int]]:
    """Eagle 2 Listing 4, list form: argmin knapsack, append a new one when the sample does not fit."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    k = -(-sum(lengths) // L) + delta
    packs: list[list[int]] = [[] for _ in range(k)]
    loads = [0] * k
    for i in order:
        j = min(range(len(loads)), key=lambda t: (loads[t], t))
        if loads[j] + lengths[i] <= L:
            packs[j].append(i)
            loads[j] += lengths[i]
        else:
            packs.append([i])
            loads.append(lengths[i])
    return [p for p in packs if p]


def test_eagle2_packer_matches_the_paper_listing():
    rng = np.random.default_rng(0)
    lengths = rng.permutation(np.r_[rng.integers(1, 4000, 300), rng.integers(3000, 4096, 40)])  # distinct-ish
    lengths = np.unique(lengths)  # distinct lengths: no tie-breaking differences
    rng.shuffle(lengths)
    got = pack(lengths, 4096, "eagle2", seed=0)
    ours = sorted(sorted(got[p].tolist()) for p in range(len(got)))
    ref = sorted(sorted(p) for p in _eagle2_reference(lengths.tolist(), 4096))
    assert ours == ref


def test_layered_pack_and_pour_never_overflow():
    rng = np.random.default_rng(1)
    L = 1000
    lens = np.sort(rng.integers(60, L + 1, 5000))[::-1]
    pid, load = layered_pack(lens, L, width=7)
    assert np.array_equal(np.bincount(pid, weights=lens, minlength=len(load)).astype(np.int64), load)
    assert load.max() <= L
    gap = L - load
    sand = np.sort(rng.integers(1, 60, 20000))[::-1]
    before = gap.copy()
    where = pour(gap, sand, L)
    got = np.bincount(where[where >= 0], weights=sand[where >= 0], minlength=len(gap))
    assert np.array_equal(before - gap, got.astype(np.int64))
    assert gap.min() >= 0
    # Sand is plentiful, so almost every gap closes to below the smallest grain class.
    assert np.mean(gap) < 5


def test_cost_model_from_the_8b_config():
    cm = resolve_cost_model("eagle2.5-8b")
    # Qwen2.5-7B matmuls: 28 layers * (Q,O 3584^2 + K,V 3584*512 + MLP 3*3584*18944) + LM head 3584*152064.
    params = 28 * (2 * 3584**2 + 2 * 3584 * 512 + 3 * 3584 * 18944) + 3584 * 152064
    assert cm.per_token == pytest.approx(6 * params)
    assert cm.per_len2 == pytest.approx(6 * 28 * 3584)  # 3 x causal forward 2*s^2*d per layer
    # A 448px SigLIP tile costs a few TFLOPs in training.
    assert 2e12 < cm.per_tile < 4e12
    # At 128K attention dominates: one 128K sample costs far more than 32 x 4K of equal tokens.
    one = cm.sample_cost(np.array([L128]), np.array([0])).sum()
    many = cm.sample_cost(np.full(32, 4096), np.zeros(32)).sum()
    assert one / many > 2.5
    # Stage 1 (connector only): no weight grads in ViT or LLM, so everything is cheaper.
    frozen = cost_model_from_config(preset_model_config("eagle2.5-8b"), FreezeConfig(vision=True, llm=True))
    assert frozen.per_token < cm.per_token and frozen.per_tile < cm.per_tile / 2
    assert frozen.per_len2 == cm.per_len2  # attention backward is still needed for input grads


def test_cost_model_names():
    assert resolve_cost_model("tokens") is TOKENS
    assert resolve_cost_model("tiny").per_token < resolve_cost_model("eagle2.5-2b").per_token
    with pytest.raises(ConfigError, match="cost_model"):
        resolve_cost_model("gpt-5")


def test_spec_validation_names_the_field():
    t = SampleTable.from_lengths([10, 20])
    with pytest.raises(ConfigError, match="seq_len.*2\\*cp"):
        make_plan(t, PlanSpec(1000, dp=2, cp=3))
    with pytest.raises(ConfigError, match="`dp`"):
        make_plan(t, PlanSpec(1024, dp=0))
    with pytest.raises(ConfigError, match="`packer`"):
        make_plan(t, PlanSpec(1024, dp=1, packer="ffd"))


def test_packs_csr_helpers():
    packs = Packs.from_assignment(np.arange(6), np.array([4, 1, 4, 9, 1, 1]))
    assert [packs[i].tolist() for i in range(len(packs))] == [[1, 4, 5], [0, 2], [3]]
    sel = packs.select(np.array([2, 0]))
    assert [sel[i].tolist() for i in range(len(sel))] == [[3], [1, 4, 5]]
    assert packs.reduce(np.array([1, 2, 3, 4, 5, 6])).tolist() == [2 + 5 + 6, 1 + 3, 4]


def test_empty_and_tiny_inputs():
    plan = make_plan(SampleTable.from_lengths([5000, 6000]), PlanSpec(4096, dp=2))
    assert plan.stats["packs"] == 0 and plan.stats["dropped"] == 2 and plan.stats["imbalance"] is None
    plan = make_plan(SampleTable.from_lengths([10, 20, 30]), PlanSpec(4096, dp=4))
    assert plan.stats["packs"] == 0 and plan.stats["dropped_tail"] == 3  # one pack cannot feed 4 ranks


@pytest.mark.parametrize("width", [1, 64])
def test_balanced_packs_are_full_but_at_most_one(width):
    # Only short samples: everything is sand packed in bins of `width` packs, whose last bin is
    # partly empty unless step 5 re-packs it.
    lens = np.random.default_rng(2).integers(16, 300, 50_000)
    packs = pack(lens, L32, "balanced", seed=0, width=width)
    load = packs.reduce(lens)
    assert load.max() <= L32
    assert (load < 0.9 * L32).sum() <= 1
    assert load.sum() / (len(packs) * L32) > 0.995
