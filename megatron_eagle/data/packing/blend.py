"""Blending and planning of a curriculum stage: which samples it draws, and its pack plan.

Blending is exact: sample counts per dataset come from the weights by the largest-remainder
rule (so they sum exactly and each is within 1 of its share), and which samples are taken is
a seeded permutation per pass over a dataset. Same YAML + same seed = same blend. The stages
come checked from :mod:`megatron_eagle.config.curriculum`.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from megatron_eagle.config import ConfigError, Curriculum, Stage, preset_model_config
from megatron_eagle.data.packing.common import SampleTable

MIN_FILL = 0.99  # pack fill assumed when sizing a stage given in steps/tokens (balanced packer: >= 0.99)


def largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total``, each within 1 of ``total * share`` (ties: earlier first)."""
    shares = np.asarray(shares, dtype=np.float64)
    exact = shares / shares.sum() * total
    counts = np.floor(exact).astype(np.int64)
    rest = total - int(counts.sum())
    if rest > 0:
        frac = exact - counts
        counts[np.argsort(-frac, kind="stable")[:rest]] += 1
    return counts


def blend_counts(stage: Stage, sizes: list[int], mean_tokens: Optional[list[float]] = None) -> np.ndarray:
    """Samples to draw from each dataset of ``stage`` (``sizes``: samples available in each).

    ``repeat`` (a recipe's ``repeat_time``): below 1, ``int(repeat * size)`` samples (Eagle 2.5's rule);
    from 1 up, ``round(repeat * size)``, i.e. ``repeat`` passes over the dataset. ``weight``: the stage's sample total split by weight, where
    the total is ``samples``, or is sized from ``mean_tokens`` (mean length per dataset) to hold
    ``tokens`` (or ``steps * global_batch_tokens``) at ``MIN_FILL`` plus one spare step, so packing
    does not fall short of the requested steps; the planner cuts the plan back to them (whole
    steps, in shuffled order, so the proportions hold up to the few steps cut).
    """
    if stage.uses_repeats():
        return np.array([int(d.repeat * n) if d.repeat < 1 else int(math.floor(d.repeat * n + 0.5))
                         for d, n in zip(stage.datasets, sizes)], np.int64)
    w = np.array([d.weight for d in stage.datasets], np.float64)
    if stage.samples is not None:
        total = stage.samples
    else:
        if mean_tokens is None:
            raise ValueError("mean_tokens is needed to size a stage given in steps or tokens")
        tokens = stage.tokens if stage.tokens is not None else stage.steps * stage.global_batch_tokens
        per_sample = float(np.dot(w / w.sum(), np.asarray(mean_tokens, np.float64)))
        total = int(math.ceil((tokens / MIN_FILL + stage.global_batch_tokens) / per_sample))
    return largest_remainder(w, total)


def blend_indices(counts: np.ndarray, sizes: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset id, index within dataset) of every drawn sample, grouped by dataset.

    A dataset drawn more often than its size is passed over repeatedly, each pass a fresh
    seeded permutation, so no sample repeats before all others have appeared.
    """
    ds, idx = [], []
    for d, (c, n) in enumerate(zip(counts.tolist(), sizes)):
        if c and not n:
            raise ValueError(f"dataset {d} is empty but {c} samples were requested")
        rng = np.random.default_rng([seed, d])
        parts = [rng.permutation(n) for _ in range(c // n)] if n else []
        if n and c % n:
            parts.append(rng.permutation(n)[:c % n])
        got = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        ds.append(np.full(len(got), d, np.int32))
        idx.append(got.astype(np.int64))
    return np.concatenate(ds), np.concatenate(idx)


def blend_tables(stage: Stage, tables: dict[str, SampleTable], seed: int) -> tuple[SampleTable, np.ndarray, np.ndarray]:
    """One planner table for the stage from per-dataset tables (already budgeted for its seq_len).

    Returns (table, dataset id, index within that dataset) per row; row order is by dataset.
    Over-long samples stay in: the planner drops and counts them.
    """
    missing = [d.name for d in stage.datasets if d.name not in tables]
    if missing:
        raise ConfigError(f"stages[{stage.name}].datasets", f"no data for {missing}", "pass a table for each dataset")
    tabs = [tables[d.name] for d in stage.datasets]
    sizes = [len(t) for t in tabs]
    means = [float(t.length[t.length <= stage.seq_len].mean()) if (t.length <= stage.seq_len).any() else 1.0
             for t in tabs]
    counts = blend_counts(stage, sizes, means)
    ds, idx = blend_indices(counts, sizes, seed)
    length = np.concatenate([tabs[d].length[idx[ds == d]] for d in range(len(tabs))])
    tiles = np.concatenate([tabs[d].tiles[idx[ds == d]] for d in range(len(tabs))])
    table = SampleTable(length, tiles, ds, [d.name for d in stage.datasets])
    return table, ds, idx


def plan_stage(cur: Curriculum, name: str, tables: dict[str, SampleTable], world_size: int,
               packer: str = "balanced", tflops: Optional[float] = None):
    """The pack plan of stage ``name`` on ``world_size`` GPUs.

    ``tables`` maps each dataset name to its samples budgeted (ADS) for the stage's seq_len.
    The cost model follows the stage's trainable modules; a length in steps or tokens caps the
    plan at that many steps. Sample indices in the plan are rows of the blend; ``plan.source_*``
    map them back to (dataset, index in dataset).
    """
    from megatron_eagle.data.packing.cost_model import cost_model_from_config
    from megatron_eagle.data.packing.plan import PlanSpec, make_plan

    stage = cur.stage(name)
    dp, micro = stage.layout(world_size)
    seed = cur.stage_seed(name)
    table, ds, idx = blend_tables(stage, tables, seed)
    steps = stage.steps
    if stage.tokens is not None:
        steps = math.ceil(stage.tokens / stage.global_batch_tokens)
    p = stage.parallel
    spec = PlanSpec(stage.seq_len, dp, cp=p.cp, tp=p.tp, pp=p.pp, packer=packer, cost_model=cur.model, seed=seed,
                    micro_batches=micro, max_steps=steps)
    if tflops is not None:
        spec.tflops = tflops
    cm = cost_model_from_config(preset_model_config(cur.model), stage.freeze(), name=f"{cur.model}:{stage.name}")
    plan = make_plan(table, spec, cm)
    plan.source_dataset, plan.source_index = ds, idx
    return plan
