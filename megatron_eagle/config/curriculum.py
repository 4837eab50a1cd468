"""Curriculum: the ordered training stages in one YAML (lengths, data, layout, freezing, LR) and their checks.

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

A dataset entry may instead name a recipe index written by ``megatron-eagle prepare --recipe``:
``{name: sft, recipe: data/sft/recipe.json}`` stands for every dataset of the recipe, each with
``repeat: repeat_time`` (times the entry's own ``repeat``, default 1), named ``sft/<dataset>``.

Stage length is one of ``steps``, ``tokens`` or ``samples``. With ``repeat`` the length follows
from the data (each dataset ``repeat`` times, fractional repeats take a seeded subset) and must
not be given. DP follows from the world size: ``dp = world / (tp*pp*cp)``, and the packs of one
step, ``global_batch_tokens / seq_len``, are split into ``micro_batches`` per DP rank.

How the datasets of a stage are blended and planned: :mod:`megatron_eagle.data.packing.blend`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from megatron_eagle.config.errors import ConfigError
from megatron_eagle.config.io import from_dict, read_yaml
from megatron_eagle.config.model import PRESETS, FreezeConfig, ModelConfig, preset_model_config
from megatron_eagle.config.parallel import ParallelConfig
from megatron_eagle.config.validate import check_layout

Module = Literal["vision", "connector", "llm"]


@dataclass
class DatasetRef:
    """One dataset of a stage: a prepared directory (``path``) and its share."""

    name: str = ""
    path: Optional[str] = None
    weight: Optional[float] = None  # share of the stage's samples (normalised over the stage)
    repeat: Optional[float] = None  # passes over the dataset (2.5 = twice plus a seeded half)
    recipe: Optional[str] = None  # a recipe index (prepare --recipe); expands to its datasets


RECIPE_INDEX = "recipe.json"
RECIPE_FORMAT = "megatron-eagle recipe 1"


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
        return check_layout(None, self.parallel, stage=self.name, world_size=world_size,
                            packs_per_step=self.packs_per_step)


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

def _check_stage(s: Stage, i: int) -> None:
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


def check_curriculum(cur: Curriculum, model: Optional[ModelConfig] = None, world_size: Optional[int] = None,
                     only: Optional[str] = None) -> None:
    """Check every stage, and that its layout fits ``model`` (default: the curriculum's preset).

    With ``world_size`` also that each stage's layout and batch divide it (``only``: that stage alone).
    """
    if cur.model not in PRESETS:
        raise ConfigError("model", f"unknown preset {cur.model!r}", f"use one of {sorted(PRESETS)}")
    if not cur.stages:
        raise ConfigError("stages", "empty", "list the stages in training order")
    names = [s.name for s in cur.stages]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError("stages", f"duplicate stage names {dup}", "give every stage a unique name")
    model = model if model is not None else preset_model_config(cur.model)
    for i, s in enumerate(cur.stages):
        _check_stage(s, i)
        world = world_size if only is None or s.name == only else None
        check_layout(model, s.parallel, stage=s.name, seq_len=s.seq_len, world_size=world,
                     packs_per_step=s.packs_per_step)


def _recipe_datasets(ref: DatasetRef, where: str, base_dir: Path) -> list[DatasetRef]:
    """The datasets of the recipe index ``ref.recipe`` (relative to ``base_dir``) as stage entries."""
    import json
    import os

    if ref.weight is not None or ref.path:
        raise ConfigError(where, "a `recipe` entry takes its datasets and repeat_time from the recipe index",
                          "drop `path`/`weight`; scale every repeat_time with `repeat` if needed")
    p = Path(ref.recipe)
    full = p if p.is_absolute() else base_dir / p
    if full.is_dir():
        full, p = full / RECIPE_INDEX, p / RECIPE_INDEX
    try:
        index = json.loads(full.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}.recipe", f"cannot read {full} ({type(e).__name__})",
                          "run `megatron-eagle prepare --recipe RECIPE.json --output DIR` and name DIR/recipe.json")
    if not isinstance(index, dict) or index.get("format") != RECIPE_FORMAT:
        raise ConfigError(f"{where}.recipe", f"{full} is not a recipe index",
                          "name the recipe.json that `megatron-eagle prepare --recipe` wrote, not the input recipe")
    scale = 1.0 if ref.repeat is None else ref.repeat
    out = []
    for e in index["datasets"]:
        path = e["path"] if os.path.isabs(e["path"]) else str(p.parent / e["path"])
        out.append(DatasetRef(name=f"{ref.name}/{e['name']}", path=path, repeat=float(e["repeat_time"]) * scale))
    return out


def expand_recipes(cur: Curriculum, base_dir: str | Path = ".") -> None:
    """Replace every stage's ``recipe`` entries by the recipe's datasets (in place)."""
    for i, s in enumerate(cur.stages):
        if not any(d.recipe for d in s.datasets):
            continue
        out: list[DatasetRef] = []
        for d in s.datasets:
            out += _recipe_datasets(d, f"stages[{s.name or i}].datasets[{d.name}]", Path(base_dir)) \
                if d.recipe else [d]
        s.datasets = out


def load_curriculum(path: str | Path, world_size: Optional[int] = None, model: Optional[ModelConfig] = None,
                    only: Optional[str] = None) -> Curriculum:
    """Parse and check a curriculum YAML (see :func:`check_curriculum`); recipe entries are expanded
    relative to the YAML's folder."""
    data = read_yaml(path, "write `model:`, `seed:` and `stages:` keys")
    cur = from_dict(Curriculum, data)
    expand_recipes(cur, Path(path).parent)
    check_curriculum(cur, model, world_size, only)
    return cur
