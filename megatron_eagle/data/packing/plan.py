"""Pack plans: samples -> packs -> (step, micro-batch, DP rank), with fill and balance statistics.

``make_plan(table, PlanSpec(...))`` drops over-long samples (counted, never truncated), packs
the rest with the chosen packer, schedules the packs, and measures:

- ``fill_ratio``: real tokens / (scheduled packs * seq_len). CP padding and empty slots are waste.
- ``imbalance``: per step, max over DP ranks of the rank's summed pack cost divided by the
  mean; averaged over steps (``imbalance_p99`` / ``imbalance_max`` show the tail).
- ``step_time_s``: the straggler's estimated time per step (cost model FLOPs over
  TP*PP*CP GPUs at ``tflops`` achieved TFLOP/s each), and ``epoch_time_s`` summed over steps.

``plan.json`` (see :meth:`Plan.write_json`)::

    {"version": 1, "config": {...}, "stats": {...},
     "packs": [{"step": 0, "micro": 0, "rank": 0, "samples": [12, 7, 40]}, ...],
     "dropped_samples": [...],   # over-long sample indices
     "left_over_samples": [...], # in tail packs left out so every rank has equal steps
     "sources": {"datasets": [...], "dataset": [...], "index": [...]}}  # blended stages only

Sample indices are rows of the input (line numbers of a ``--lengths`` file, 0-based).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megatron_eagle.config import ConfigError
from megatron_eagle.data.packing.common import Packs, SampleTable, cp_padded_lengths
from megatron_eagle.data.packing.cost_model import DEFAULT_TFLOPS, CostModel, resolve_cost_model
from megatron_eagle.data.packing.packers import PACKER_NAMES, pack
from megatron_eagle.data.packing.schedule import Schedule, schedule_by_cost, schedule_random, step_rank_costs, truncate

# The balanced packer bin-packs ~n/width layers in Python; aim for at most this many layers.
TARGET_LAYERS = 20_000
MAX_WIDTH = 512


@dataclass
class PlanSpec:
    """What to plan for: one curriculum stage on one parallel layout."""

    seq_len: int
    dp: int
    cp: int = 1
    tp: int = 1
    pp: int = 1
    packer: str = "balanced"
    cost_model: str = "eagle2.5-8b"
    seed: int = 0
    micro_batches: int = 1  # packs per DP rank per optimizer step (gradient accumulation)
    tflops: float = DEFAULT_TFLOPS  # achieved TFLOP/s per GPU, for time estimates
    max_steps: Optional[int] = None  # keep only this many (randomly ordered) steps; the rest is left over

    def validate(self) -> None:
        for name in ("seq_len", "dp", "cp", "tp", "pp", "micro_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}", f"set {name} to 1 or more")
        if self.cp > 1 and self.seq_len % (2 * self.cp):
            raise ConfigError("seq_len", f"{self.seq_len} is not a multiple of 2*cp={2 * self.cp}",
                              f"use a multiple of {2 * self.cp}, e.g. {self.seq_len // (2 * self.cp) * 2 * self.cp}")
        if self.packer not in PACKER_NAMES:
            raise ConfigError("packer", f"unknown packer {self.packer!r}", f"use one of {list(PACKER_NAMES)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps", f"must be >= 1, got {self.max_steps}", "leave it unset or give a step count")
        if not self.tflops > 0:
            raise ConfigError("tflops", "must be positive", "give the achieved TFLOP/s per GPU, e.g. 400")


@dataclass
class Plan:
    """A scheduled pack plan. ``packs[i]`` runs at ``step[i]``/``micro[i]`` on DP rank ``rank[i]``."""

    spec: PlanSpec
    cost_model: CostModel
    packs: Packs
    step: np.ndarray
    micro: np.ndarray
    rank: np.ndarray
    pack_cost: np.ndarray
    dropped_samples: np.ndarray
    left_over_samples: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)
    # For blended stages: row i of the input is sample source_index[i] of dataset source_dataset[i].
    datasets: list[str] = field(default_factory=list)
    source_dataset: Optional[np.ndarray] = None
    source_index: Optional[np.ndarray] = None

    def to_dict(self) -> dict[str, Any]:
        """The plan.json content as Python objects (slow for millions of packs; see write_json)."""
        return json.loads(self.dumps())

    def _pack_lines(self):
        s, m, r = self.step.tolist(), self.micro.tolist(), self.rank.tolist()
        samples, off = self.packs.samples.tolist(), self.packs.offsets.tolist()
        for i in range(len(s)):
            yield (f'{{"step": {s[i]}, "micro": {m[i]}, "rank": {r[i]}, '
                   f'"samples": [{", ".join(map(str, samples[off[i]:off[i + 1]]))}]}}')

    def dumps(self) -> str:
        head = {"version": 1, "config": {**asdict(self.spec), "cost_model": self.cost_model.describe()},
                "stats": self.stats}
        parts = [json.dumps(head)[:-1], ', "packs": [\n', ",\n".join(self._pack_lines()), "\n]",
                 f', "dropped_samples": {json.dumps(self.dropped_samples.tolist())}',
                 f', "left_over_samples": {json.dumps(self.left_over_samples.tolist())}']
        if self.source_dataset is not None:
            parts.append(f', "sources": {{"datasets": {json.dumps(self.datasets)}, '
                         f'"dataset": {json.dumps(self.source_dataset.tolist())}, '
                         f'"index": {json.dumps(self.source_index.tolist())}}}')
        parts.append("}\n")
        return "".join(parts)

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(self.dumps())


def choose_width(n: int) -> int:
    """Packs the balanced packer builds side by side: ~n/TARGET_LAYERS (speed), small (fill)."""
    return max(1, min(n // TARGET_LAYERS, MAX_WIDTH))


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def make_plan(table: SampleTable, spec: PlanSpec, cost_model: CostModel | None = None) -> Plan:
    """Drop over-long samples, pack, schedule, and measure (see module docstring)."""
    spec.validate()
    cm = cost_model or resolve_cost_model(spec.cost_model)
    t0 = time.perf_counter()
    eff = cp_padded_lengths(table.length, spec.cp)
    over = eff > spec.seq_len
    keep = np.flatnonzero(~over)
    local = pack(eff[keep], spec.seq_len, spec.packer, seed=spec.seed, width=choose_width(len(keep)))
    packs = Packs(keep[local.samples], local.offsets)
    t1 = time.perf_counter()

    sample_cost = cm.sample_cost(eff, table.tiles)
    pack_cost = packs.reduce(sample_cost)
    pack_tokens = packs.reduce(eff)
    pack_size = np.diff(packs.offsets)
    rng = _rng(spec.seed, 1)
    if spec.packer == "balanced":
        sched = schedule_by_cost(pack_cost, pack_size, pack_tokens, spec.dp, spec.micro_batches, rng)
    else:
        sched = schedule_random(pack_size, pack_tokens, spec.dp, spec.micro_batches, rng)
    if spec.max_steps is not None and sched.num_steps > spec.max_steps:
        sched = truncate(sched, spec.max_steps)
    scheduled = packs.select(sched.pack)
    left = packs.select(sched.left_out).samples
    t2 = time.perf_counter()

    plan = Plan(spec, cm, scheduled, sched.step, sched.micro, sched.rank, pack_cost[sched.pack],
                np.flatnonzero(over), np.sort(left), datasets=list(table.datasets))
    plan.stats = _stats(plan, table, eff, sched, pack_cost, {"pack_s": t1 - t0, "schedule_s": t2 - t1,
                                                              "plan_s": t2 - t0})
    return plan


def _stats(plan: Plan, table: SampleTable, eff: np.ndarray, sched: Schedule, pack_cost: np.ndarray,
           timing: dict[str, float]) -> dict[str, Any]:
    spec = plan.spec
    n_packs = len(plan.packs)
    tokens = int(table.length[plan.packs.samples].sum())
    padded = int(eff[plan.packs.samples].sum())
    per_rank = step_rank_costs(sched, pack_cost, spec.dp)
    gpus = spec.tp * spec.pp * spec.cp
    if sched.num_steps:
        straggler = per_rank.max(1)
        ratio = straggler / per_rank.mean(1)
        step_s = plan.cost_model.seconds(straggler, gpus, spec.tflops)
        ideal_s = plan.cost_model.seconds(per_rank.mean(1), gpus, spec.tflops)
        imb = {"imbalance": float(ratio.mean()), "imbalance_p99": float(np.percentile(ratio, 99)),
               "imbalance_max": float(ratio.max())}
        times = {"step_time_s": float(step_s.mean()), "epoch_time_s": float(step_s.sum()),
                 "balanced_epoch_time_s": float(ideal_s.sum())}
    else:
        imb = {"imbalance": None, "imbalance_p99": None, "imbalance_max": None}
        times = {"step_time_s": None, "epoch_time_s": 0.0, "balanced_epoch_time_s": 0.0}
    ds_counts = np.bincount(table.dataset[plan.packs.samples], minlength=len(table.datasets))
    return {
        "samples": len(table),
        "planned_samples": int(len(plan.packs.samples)),
        "dropped": int(len(plan.dropped_samples)),
        "dropped_tail": int(len(plan.left_over_samples)),
        "packs": n_packs,
        "steps": sched.num_steps,
        "micro_batches": spec.micro_batches,
        "tokens": tokens,
        "fill_ratio": tokens / (n_packs * spec.seq_len) if n_packs else 0.0,
        "cp_pad_tokens": padded - tokens,
        **imb,
        **times,
        "samples_per_dataset": {name: int(c) for name, c in zip(table.datasets, ds_counts)},
        "timing": timing,
    }


def read_lengths_file(path: str | Path) -> SampleTable:
    """A ``--lengths`` file: one sample per line, ``length`` or ``length tiles``; '#' starts a comment."""
    rows: list[list[int]] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            body = line.split("#", 1)[0].split()
            if not body:
                continue
            if len(body) > 2 or not all(x.isdigit() for x in body):
                raise ConfigError(f"{path}:{lineno}", f"expected `length [tiles]` as integers, got {line.strip()!r}",
                                  "write one sample per line: a token count, optionally a tile count")
            rows.append([int(body[0]), int(body[1]) if len(body) == 2 else 0])
    if not rows:
        raise ConfigError(str(path), "no sample lengths found", "write one token count per line")
    arr = np.asarray(rows, dtype=np.int64)
    if arr[:, 0].min() < 1:
        bad = int(np.argmin(arr[:, 0]))
        raise ConfigError(f"{path}", f"sample {bad} has length {int(arr[bad, 0])}", "lengths must be >= 1")
    return SampleTable(arr[:, 0], arr[:, 1], None, [Path(path).name])


def format_table(plans: list[Plan]) -> str:
    """A short human-readable summary, one row per plan."""
    head = ("packer", "L", "DP", "CP", "k", "samples", "dropped", "tail", "packs", "steps", "fill", "imbal", "imb p99",
            "step s", "plan s")
    rows = [head]
    for p in plans:
        s = p.stats
        rows.append((p.spec.packer, str(p.spec.seq_len), str(p.spec.dp), str(p.spec.cp), str(p.spec.micro_batches),
                     str(s["samples"]), str(s["dropped"]), str(s["dropped_tail"]), str(s["packs"]), str(s["steps"]),
                     f"{s['fill_ratio']:.4f}", _fmt(s["imbalance"], 4), _fmt(s["imbalance_p99"], 3),
                     _fmt(s["step_time_s"], 3), f"{s['timing']['plan_s']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def _fmt(x: float | None, nd: int) -> str:
    return "-" if x is None else f"{x:.{nd}f}"
