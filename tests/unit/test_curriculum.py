"""Curriculum YAML: the paper's schedule, validation errors that name the field, exact blending."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from megatron_eagle.config import ConfigError, load_curriculum
from megatron_eagle.data.packing.blend import blend_counts, blend_indices, blend_tables, largest_remainder, plan_stage
from megatron_eagle.data.packing.common import SampleTable
from megatron_eagle.data.packing.length_mix import realistic_mix

EXAMPLE = Path(__file__).resolve().parents[2] / "examples/eagle2.5-8b/curriculum.yaml"


def test_example_is_the_papers_progressive_schedule():
    cur = load_curriculum(EXAMPLE, world_size=256)
    rows = [(s.name, s.seq_len, s.global_batch_tokens // s.seq_len, s.lr.peak, sorted(s.trainable))
            for s in cur.stages]
    full = ["connector", "llm", "vision"]
    assert rows == [("stage1", 4096, 1024, 2e-4, ["connector"]), ("stage1.5", 8192, 1024, 2e-5, full),
                    ("stage2", 32768, 256, 2e-5, full), ("stage3", 65536, 128, 2e-5, full),
                    ("stage4", 131072, 128, 2e-5, full)]
    # CP grows with length so no GPU holds more than 32K tokens of a pack.
    assert [s.seq_len // s.parallel.cp for s in cur.stages[2:]] == [32768] * 3
    assert cur.stages[0].freeze().llm and cur.stages[0].freeze().vision and not cur.stages[0].freeze().connector
    assert [s.layout(256) for s in cur.stages] == [(256, 4), (128, 8), (128, 2), (64, 2), (32, 4)]


def _write(tmp_path, stages, **top) -> Path:
    p = tmp_path / "cur.yaml"
    p.write_text(yaml.safe_dump({"model": "eagle2.5-8b", "seed": 1, **top, "stages": stages}))
    return p


def _stage(**kw):
    s = {"name": "s", "seq_len": 32768, "datasets": [{"name": "a", "weight": 1.0}], "global_batch_tokens": 32768 * 8,
         "steps": 10, "parallel": {"tp": 1, "pp": 1, "cp": 1}}
    s.update(kw)
    return s


@pytest.mark.parametrize("change,field", [
    (dict(steps=None), "steps/tokens/samples"),
    (dict(tokens=5), "steps/tokens/samples"),
    (dict(global_batch_tokens=50000), "global_batch_tokens"),
    (dict(datasets=[{"name": "a", "weight": 1.0}, {"name": "b", "repeat": 2}]), "datasets"),
    (dict(datasets=[{"name": "a", "repeat": 1}]), "steps"),
    (dict(datasets=[{"name": "a", "weight": 0}]), "datasets[a]"),
    (dict(datasets=[]), "datasets"),
    (dict(parallel={"cp": 3}), "seq_len"),
    (dict(parallel={"tp": 3}), "parallel"),
    (dict(lr={"peak": 1e-5, "min": 1e-4}), "lr"),
    (dict(lr={"warmup": 1.5}), "lr.warmup"),
    (dict(trainable=["vision", "decoder"]), "trainable[1]"),
    (dict(trainable=[]), "trainable"),
    (dict(epochs=2), "epochs"),
])
def test_invalid_stages_name_the_field(tmp_path, change, field):
    stage = {k: v for k, v in _stage(**change).items() if v is not None}
    with pytest.raises(ConfigError) as e:
        load_curriculum(_write(tmp_path, [stage]))
    assert field in e.value.field or field in str(e.value)


def test_world_size_checks(tmp_path):
    path = _write(tmp_path, [_stage(parallel={"tp": 2, "cp": 2})])
    load_curriculum(path, world_size=16)  # dp 4 divides 8 packs per step
    with pytest.raises(ConfigError, match="not a multiple of tp\\*pp\\*cp=4"):
        load_curriculum(path, world_size=18)
    with pytest.raises(ConfigError, match="do not split over dp=3"):
        load_curriculum(path, world_size=12)
    with pytest.raises(ConfigError, match="duplicate"):
        load_curriculum(_write(tmp_path, [_stage(), _stage()]))
    with pytest.raises(ConfigError, match="unknown preset"):
        load_curriculum(_write(tmp_path, [_stage()], model="llama-9"))


def test_largest_remainder_is_exact():
    c = largest_remainder(np.array([0.5, 0.3, 0.2]), 7)
    assert c.sum() == 7 and c.tolist() == [4, 2, 1]
    rng = np.random.default_rng(0)
    for _ in range(50):
        w = rng.random(5) + 0.01
        n = int(rng.integers(1, 10_000))
        c = largest_remainder(w, n)
        assert c.sum() == n
        assert np.all(np.abs(c - w / w.sum() * n) < 1)


def test_blend_counts_by_weights_and_repeats(tmp_path):
    cur = load_curriculum(_write(tmp_path, [
        _stage(name="w", steps=None, samples=1000, datasets=[{"name": "a", "weight": 3}, {"name": "b", "weight": 1}]),
        _stage(name="r", steps=None, datasets=[{"name": "a", "repeat": 2.5}, {"name": "b", "repeat": 1}]),
        _stage(name="t", steps=None, tokens=32768 * 8 * 10,
               datasets=[{"name": "a", "weight": 1}, {"name": "b", "weight": 1}])]))
    assert blend_counts(cur.stage("w"), [10, 10]).tolist() == [750, 250]
    assert blend_counts(cur.stage("r"), [7, 5]).tolist() == [18, 5]  # 2.5 * 7 = 17.5 -> 18
    # Sized by tokens: enough samples of the given mean length for the tokens at 99% fill plus a spare step.
    c = blend_counts(cur.stage("t"), [100, 100], mean_tokens=[1000.0, 3000.0])
    assert c.tolist() == [c[0], c[0]] and c.sum() == int(np.ceil((32768 * 80 / 0.99 + 32768 * 8) / 2000))


def test_blend_indices_deterministic_and_no_repeat_within_a_pass():
    ds, idx = blend_indices(np.array([25, 3]), [10, 7], seed=4)
    a = idx[ds == 0]
    assert len(a) == 25 and sorted(a[:10]) == list(range(10)) and sorted(a[10:20]) == list(range(10))
    assert len(set(a[20:])) == 5
    ds2, idx2 = blend_indices(np.array([25, 3]), [10, 7], seed=4)
    assert np.array_equal(idx, idx2) and np.array_equal(ds, ds2)
    assert not np.array_equal(idx, blend_indices(np.array([25, 3]), [10, 7], seed=5)[1])


@pytest.fixture(scope="module")
def mix_tables():
    t = realistic_mix(40_000, 32768, seed=9)
    sub = lambda m: SampleTable(t.length[t.dataset == m], t.tiles[t.dataset == m], None)
    return {"images": sub(0), "videos": sub(1), "text": sub(2)}


def test_blend_proportions_hold_in_the_plan(tmp_path, mix_tables):
    stage = _stage(name="mix", steps=40, global_batch_tokens=32768 * 32, parallel={"tp": 2, "cp": 2},
                   datasets=[{"name": "images", "weight": 0.6}, {"name": "videos", "weight": 0.3},
                             {"name": "text", "weight": 0.1}])
    cur = load_curriculum(_write(tmp_path, [stage]))
    table, ds, idx = blend_tables(cur.stage("mix"), mix_tables, seed=cur.stage_seed("mix"))
    counts = np.bincount(ds)
    assert np.all(np.abs(counts - np.array([0.6, 0.3, 0.1]) * counts.sum()) < 1)  # exact in the blend
    # Rows point at the right source samples.
    assert np.array_equal(table.length[ds == 1], mix_tables["videos"].length[idx[ds == 1]])

    plan = plan_stage(cur, "mix", mix_tables, world_size=32)
    assert plan.stats["steps"] == 40 and plan.spec.dp == 8 and plan.spec.micro_batches == 4
    got = np.array(list(plan.stats["samples_per_dataset"].values()), float)
    assert np.allclose(got / got.sum(), [0.6, 0.3, 0.1], atol=0.02)
    # The plan and its source map are deterministic for the curriculum seed.
    again = plan_stage(cur, "mix", mix_tables, world_size=32)
    assert np.array_equal(plan.packs.samples, again.packs.samples)
    assert np.array_equal(plan.source_index, again.source_index)


def test_trainable_modules_change_the_cost(tmp_path, mix_tables):
    base = dict(steps=5, global_batch_tokens=32768 * 8, datasets=[{"name": "videos", "weight": 1}])
    cur = load_curriculum(_write(tmp_path, [_stage(name="full", **base),
                                            _stage(name="conn", trainable=["connector"], **base)]))
    full = plan_stage(cur, "full", mix_tables, world_size=8)
    conn = plan_stage(cur, "conn", mix_tables, world_size=8)
    assert conn.stats["step_time_s"] < 0.8 * full.stats["step_time_s"]
