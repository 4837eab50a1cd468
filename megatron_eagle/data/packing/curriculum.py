"""Curriculum: the ordered training stages in one YAML, validated, with exact deterministic blending.

Example (see ``examples/eagle2.5-8b/curriculum.yaml`` for the paper's five stages)::

    model: eagle2.5-8b          # preset: checks the parallel layout, derives the cost model
    seed: 1234
    stages:
      - name: stage2
        seq_len: 32768
        datasets:               # all `weight` (share of the stage's samples) or all `repeat`
          - {name: image-sft, path: data/image-sft, weight: 0.5}
          - {name: open-data, path: data/open-data, weight: 0.5}
        trainable: [vision, connector, llm]
        lr: {peak: 2.0e-5, min: 0.0, warmup: 0.03, decay: cosine}
        global_batch_tokens: 8388608   # 256 packs of 32768
        samples: 9200000               # or steps: N, or tokens: N
        parallel: {tp: 1, pp: 1, cp: 1}

Stage length is one of ``steps``, ``tokens`` or ``samples``. With ``repeat`` the length follows
from the data (each dataset ``repeat`` times, fractional repeats take a seeded subset) and must
not be given. DP follows from the world size: ``dp = world / (tp*pp*cp)``, and the packs of one
step, ``global_batch_tokens / seq_len``, are split into ``micro_batches`` per DP rank.

Blending is exact: sample counts per dataset come from the weights by the largest-remainder
rule (so they sum exactly and each is within 1 of its share), and which samples are taken is
a seeded permutation per pass over a dataset. Same YAML + same seed = same blend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import yaml

from megatron_eagle.config import (PRESETS, ConfigError, EagleConfig, FreezeConfig, ParallelConfig, from_dict,
                                   preset_model_config, validate)
from megatron_eagle.data.packing.common import SampleTable

Module = Literal["vision", "connector", "llm"]
MIN_FILL = 0.99  # pack fill assumed when sizing a stage given in steps/tokens (balanced packer: >= 0.99)


@dataclass
class DatasetRef:
    """One dataset of a stage: a prepared directory (``path``) and its share."""

    name: str = ""
    path: Optional[str] = None
    weight: Optional[float] = None  # share of the stage's samples (normalised over the stage)
    repeat: Optional[float] = None  # passes over the dataset (2.5 = twice plus a seeded half)


@dataclass
class LRSchedule:
    peak: float = 2e-5
    min: float = 0.0
    warmup: float = 0.03  # fraction of the stage's steps
    decay: Literal["cosine", "linear", "constant"] = "cosine"


@dataclass
class Stage:
    name: str = ""
    seq_len: int = 0
    datasets: list[DatasetRef] = field(default_factory=list)
    trainable: list[Module] = field(default_factory=lambda: ["vision", "connector", "llm"])
    lr: LRSchedule = field(default_factory=LRSchedule)
    global_batch_tokens: int = 0
    steps: Optional[int] = None
    tokens: Optional[int] = None
    samples: Optional[int] = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def packs_per_step(self) -> int:
        return self.global_batch_tokens // self.seq_len

    def freeze(self) -> FreezeConfig:
        """Frozen modules: everything not listed in ``trainable``."""
        t = set(self.trainable)
        return FreezeConfig(vision="vision" not in t, connector="connector" not in t, llm="llm" not in t)

    def uses_repeats(self) -> bool:
        return bool(self.datasets) and self.datasets[0].repeat is not None

    def layout(self, world_size: int) -> tuple[int, int]:
        """(dp, micro_batches) on ``world_size`` GPUs; raises ConfigError naming the fix."""
        p = self.parallel
        mp = p.tp * p.pp * p.cp
        where = f"stages[{self.name}]"
        if world_size < 1 or world_size % mp:
            raise ConfigError(f"{where}.parallel", f"world size {world_size} is not a multiple of tp*pp*cp={mp}",
                              f"run on a multiple of {mp} GPUs or change tp/pp/cp")
        dp = world_size // mp
        if self.packs_per_step % dp:
            ok = [d for d in range(1, self.packs_per_step + 1) if self.packs_per_step % d == 0]
            raise ConfigError(f"{where}.global_batch_tokens",
                              f"{self.packs_per_step} packs per step do not split over dp={dp} ranks",
                              f"make dp one of {ok[-8:]} (world size = dp*{mp}) or change global_batch_tokens")
        return dp, self.packs_per_step // dp


@dataclass
class Curriculum:
    model: str = "eagle2.5-8b"
    seed: int = 1234
    stages: list[Stage] = field(default_factory=list)

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError("stages", f"no stage named {name!r}", f"use one of {[s.name for s in self.stages]}")

    def stage_seed(self, name: str) -> int:
        """A per-stage seed, so stages draw independent blends from one curriculum seed."""
        return self.seed * 1000 + [s.name for s in self.stages].index(name)


# ----------------------------------------------------------------------------- validation

def _check_stage(s: Stage, i: int, model: str) -> None:
    w = f"stages[{i}]"
    if not s.name:
        raise ConfigError(f"{w}.name", "missing", "give every stage a unique name")
    w = f"stages[{s.name}]"
    if s.seq_len < 1:
        raise ConfigError(f"{w}.seq_len", "missing or < 1", "set the stage's max sequence length, e.g. 32768")
    if s.global_batch_tokens < s.seq_len or s.global_batch_tokens % s.seq_len:
        raise ConfigError(f"{w}.global_batch_tokens", f"{s.global_batch_tokens} is not a positive multiple of "
                          f"seq_len={s.seq_len}", f"use packs_per_step * seq_len, e.g. {256 * s.seq_len}")
    if not s.datasets:
        raise ConfigError(f"{w}.datasets", "empty", "list at least one dataset with a weight or repeat")
    names = [d.name for d in s.datasets]
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"{w}.datasets", f"names must be unique and non-empty, got {names}", "rename them")
    kinds = {(d.weight is not None, d.repeat is not None) for d in s.datasets}
    if (True, True) in kinds or (False, False) in kinds or len(kinds) != 1:
        raise ConfigError(f"{w}.datasets", "each dataset needs exactly one of weight/repeat, the same kind in a stage",
                          "give all datasets of the stage a `weight`, or all a `repeat`")
    for d in s.datasets:
        v = d.weight if d.weight is not None else d.repeat
        if not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"{w}.datasets[{d.name}]", f"weight/repeat must be > 0, got {v}", "use a positive number")
    lengths = [k for k in ("steps", "tokens", "samples") if getattr(s, k) is not None]
    if s.uses_repeats() and lengths:
        raise ConfigError(f"{w}.{lengths[0]}", "a stage with `repeat` takes its length from the data",
                          "remove steps/tokens/samples, or use `weight` instead of `repeat`")
    if not s.uses_repeats() and len(lengths) != 1:
        raise ConfigError(f"{w}", f"give exactly one of steps/tokens/samples, got {lengths or 'none'}",
                          "set e.g. `steps: 5000` (or tokens / samples)")
    for k in lengths:
        if getattr(s, k) < 1:
            raise ConfigError(f"{w}.{k}", "must be >= 1", f"set a positive {k}")
    if not s.trainable:
        raise ConfigError(f"{w}.trainable", "empty", "list the modules to train: vision, connector, llm")
    lr = s.lr
    if not (lr.peak > 0 and 0 <= lr.min <= lr.peak):
        raise ConfigError(f"{w}.lr", f"need peak > 0 and 0 <= min <= peak, got peak={lr.peak} min={lr.min}",
                          "e.g. lr: {peak: 2.0e-5, min: 0.0}")
    if not 0 <= lr.warmup < 1:
        raise ConfigError(f"{w}.lr.warmup", f"{lr.warmup} is not a fraction in [0, 1)", "e.g. 0.03")
    p = s.parallel
    if p.cp > 1 and s.seq_len % (2 * p.cp):
        raise ConfigError(f"{w}.seq_len", f"{s.seq_len} is not a multiple of 2*cp={2 * p.cp}",
                          "use a power-of-two length or a smaller cp")
    try:  # heads/layers divisibility for this layout, using the model checks in config.py
        validate(EagleConfig(model=preset_model_config(model), parallel=p))
    except ConfigError as e:
        raise ConfigError(f"{w}.parallel", f"does not fit model {model}: {e}",
                          "choose tp/pp that divide the model") from None
    if s.seq_len > preset_model_config(model).llm.max_position_embeddings:
        raise ConfigError(f"{w}.seq_len", f"{s.seq_len} exceeds model max_position_embeddings",
                          "use a shorter stage or a model with longer positions")


def validate_curriculum(cur: Curriculum, world_size: Optional[int] = None) -> None:
    """Check every stage; with ``world_size`` also that each stage's layout and batch divide it."""
    if cur.model not in PRESETS:
        raise ConfigError("model", f"unknown preset {cur.model!r}", f"use one of {sorted(PRESETS)}")
    if not cur.stages:
        raise ConfigError("stages", "empty", "list the stages in training order")
    names = [s.name for s in cur.stages]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError("stages", f"duplicate stage names {dup}", "give every stage a unique name")
    for i, s in enumerate(cur.stages):
        _check_stage(s, i, cur.model)
        if world_size is not None:
            s.layout(world_size)


def load_curriculum(path: str | Path, world_size: Optional[int] = None) -> Curriculum:
    """Parse and validate a curriculum YAML."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "top level is not a mapping", "write `model:`, `seed:` and `stages:` keys")
    cur = from_dict(Curriculum, data)
    validate_curriculum(cur, world_size)
    return cur


# ----------------------------------------------------------------------------- blending

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

    ``repeat``: round(repeat * size). ``weight``: the stage's sample total split by weight, where
    the total is ``samples``, or is sized from ``mean_tokens`` (mean length per dataset) to hold
    ``tokens`` (or ``steps * global_batch_tokens``) at ``MIN_FILL`` plus one spare step, so packing
    does not fall short of the requested steps; the planner cuts the plan back to them (whole
    steps, in shuffled order, so the proportions hold up to the few steps cut).
    """
    if stage.uses_repeats():
        return np.array([int(math.floor(d.repeat * n + 0.5)) for d, n in zip(stage.datasets, sizes)], np.int64)
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
