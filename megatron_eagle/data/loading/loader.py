"""The resumable training loader: a stage's pack plan -> this DP rank's micro-batches, step by step.

Every rank plans the stage itself (same curriculum + seed + world size = same plan; no
communication) and reads only the samples of its own packs. Iterating a :class:`StageLoader`
yields, per optimizer step, the list of ``micro_batches`` :class:`LoaderBatch` es of this DP rank
(feed them to megatron's ``forward_backward_func`` as ``data_iterator=iter(batches)``).

Determinism and resume. Item (step, micro) of an epoch is a pure function of its plan entry:
ADS, decoding and tokenization involve no randomness and no state, so the stream does not depend
on the number of workers, and a resumed run (``start_step`` or ``load_state_dict``) yields exactly
the batches the uninterrupted run would have. The state is ``{"stage", "step"}`` (plus the DP size
and a plan fingerprint, for checks). A new stage starts at step 0 with its own plan and layout,
so DP may change between stages; a DP change in the middle of a stage is refused (the plan's
step composition depends on DP).

Epochs. When a stage runs longer than its plan, epoch e > 0 is re-planned with seed + e (every
sample at most once per epoch; samples left out of one epoch's tail get a fresh chance in the next).

Workers. ``num_workers`` = 0 builds packs inline; otherwise a torch DataLoader (fork, in-order)
over this rank's items of the epoch, ``prefetch`` packs in flight per worker. A worker that stops
delivering for ``worker_timeout_s`` is replaced and the stream continues from the same item.

TP/CP ranks of one DP rank need the same token side: ``tp_mode="duplicate"`` (default) has each rank
build it (deterministic, no communication, TP x CP x the tokenization); ``"broadcast"`` builds on
the TP group's first rank and broadcasts over TP (:mod:`.broadcast`). With CP > 1 each CP
rank (``cp_rank``) decodes only its share of the pack's tiles, so the CPU decoding, host memory and
host-to-device copies of pixels are split CP ways; under ``broadcast`` each CP rank's TP source
builds that CP rank's share. Pipeline stages: the first stage decodes media; the others need
tokens/labels/cu_seqlens only (``media=False``, no decoding).

Bad data. ``row_status`` of each batch says which plan rows were left out or blanked on this rank;
the trainer agrees on the union over the replica (:mod:`megatron_eagle.training.agreement`) and
hands the agreed batches to :meth:`StageLoader.settle`, so ``metrics()["loader_errors"]`` counts
each rejection once for the replica (not once per rank that saw it) and ``["rejected"]`` names it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from megatron_eagle.config import ConfigError, ModelConfig, ParallelConfig, load_curriculum
from megatron_eagle.data.loading.pack_builder import (ROW_USED, LoaderBatch, PackBuilder, PackConfig, PackInfo,
                                                      pack_config)
from megatron_eagle.data.loading.sources import DataSource, open_source
from megatron_eagle.data.packing.plan import Plan

log = logging.getLogger("megatron_eagle.loader")
REJECTED_NAMES_KEPT = 1000  # names of rejected samples kept in metrics() between resets
PlanSource = Union[Plan, Callable[[int], Plan]]


def needs_data(pp_rank: int, pp_size: int) -> bool:
    """Whether this pipeline stage consumes batch content: the first (tokens, pixels) and the last
    (labels, loss weights). Middle stages still need ``cu_seqlens``/``max_seqlen`` for packed
    attention; build their loader with ``media=False`` (tokenization only, no decoding)."""
    return pp_rank == 0 or pp_rank == pp_size - 1


def needs_media(pp_rank: int, pp_size: int) -> bool:
    """Only the first pipeline stage embeds images, so only it decodes media."""
    return pp_rank == 0


# ----------------------------------------------------------------------------- plan -> this rank

def plan_sources(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """(dataset id, index in dataset) of every plan row; a plan without ``source_*`` is one dataset."""
    if plan.source_dataset is not None:
        return np.asarray(plan.source_dataset, np.int64), np.asarray(plan.source_index, np.int64)
    n = int(plan.packs.samples.max()) + 1 if len(plan.packs.samples) else 0
    if len(plan.datasets) > 1:
        raise ValueError("the plan spans several datasets but has no source_dataset/source_index mapping")
    return np.zeros(n, np.int64), np.arange(n, dtype=np.int64)


@dataclass
class RankSchedule:
    """One DP rank's packs of one epoch in (step, micro) order, as CSR over (dataset, index) rows."""

    steps: int
    micro: int
    offsets: np.ndarray
    dataset: np.ndarray
    index: np.ndarray

    def rows(self, item: int) -> list[tuple[int, int]]:
        a, b = self.offsets[item], self.offsets[item + 1]
        return list(zip(self.dataset[a:b].tolist(), self.index[a:b].tolist()))


def rank_schedule(plan: Plan, dp_rank: int) -> RankSchedule:
    spec = plan.spec
    if not 0 <= dp_rank < spec.dp:
        raise ConfigError("dp_rank", f"{dp_rank} is outside the plan's dp={spec.dp}", "pass this rank's DP rank")
    sel = np.flatnonzero(plan.rank == dp_rank)
    sel = sel[np.lexsort((plan.micro[sel], plan.step[sel]))]
    steps = int(plan.stats.get("steps", int(plan.step.max()) + 1 if len(plan.step) else 0))
    if len(sel) != steps * spec.micro_batches:
        raise ValueError(f"rank {dp_rank} has {len(sel)} packs, expected {steps} x {spec.micro_batches}")
    sizes = np.diff(plan.packs.offsets)[sel]
    offsets = np.zeros(len(sel) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    rows = plan.packs.select(sel).samples
    ds, idx = plan_sources(plan)
    return RankSchedule(steps, spec.micro_batches, offsets, ds[rows], idx[rows])


def plan_fingerprint(plan: Plan) -> str:
    """Short hash of what decides the stream: spec, packs and their (step, micro, rank)."""
    h = hashlib.sha1(json.dumps(asdict(plan.spec), sort_keys=True).encode())
    for a in (plan.packs.samples, plan.packs.offsets, plan.step, plan.micro, plan.rank):
        h.update(np.ascontiguousarray(a, np.int64).tobytes())
    if plan.source_dataset is not None:
        h.update(np.ascontiguousarray(plan.source_index, np.int64).tobytes())
    return h.hexdigest()[:16]


class _PackDataset(torch.utils.data.Dataset):
    """Items [start, end) of one rank's epoch: item j = step * micro + m -> (LoaderBatch, PackInfo)."""

    def __init__(self, builder: PackBuilder, sched: RankSchedule, start: int, end: int):
        self.builder, self.sched, self.start, self.end = builder, sched, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i: int) -> tuple[LoaderBatch, PackInfo]:
        return self.builder.build(self.sched.rows(self.start + i))


def _identity(x: Any) -> Any:
    return x


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- the loader

class StageLoader:
    """Iterates one curriculum stage for one DP rank: ``for batches in loader: ...`` (one step each).

    ``plan`` is the stage's (epoch-0) plan, or ``epoch -> Plan`` to also re-plan later epochs.
    ``sources`` are the stage's datasets in plan order (prepared dirs / URLs or DataSources).
    """

    def __init__(self, stage: str, plan: PlanSource, sources: Sequence[Union[str, Path, DataSource]], tokenizer,
                 model: ModelConfig, *, dp_rank: int, parallel: Optional[ParallelConfig] = None,
                 total_steps: Optional[int] = None, start_step: int = 0, num_workers: int = 2, prefetch: int = 2,
                 media: bool = True, weighting: Literal["sqrt", "token"] = "sqrt",
                 pixel_dtype: Literal["float32", "uint8"] = "float32", fixed_length: bool = False,
                 tp_mode: Literal["duplicate", "broadcast"] = "duplicate", tp_group: Any = None,
                 pin_memory: bool = False, worker_timeout_s: float = 600.0, cache_dir: Optional[str] = None,
                 cp_rank: Optional[int] = None):
        self.stage = stage
        self._plan_fn = plan if callable(plan) else None
        self._plans: dict[int, Plan] = {} if callable(plan) else {0: plan}
        p0 = self.epoch_plan(0)
        self.dp_size, self.micro_batches, self.seq_len = p0.spec.dp, p0.spec.micro_batches, p0.spec.seq_len
        self.dp_rank = dp_rank
        rank_schedule(p0, dp_rank)  # validates dp_rank
        self._epoch_steps: list[int] = [self._steps_of(p0)]
        if self._epoch_steps[0] < 1:
            raise ConfigError(f"stages[{stage}]", "the plan has no steps (too few samples for one global batch)",
                              "add data, lower global_batch_tokens, or use fewer DP ranks")
        self.total_steps = int(total_steps if total_steps is not None else self._epoch_steps[0])
        if self.total_steps > self._epoch_steps[0] and self._plan_fn is None:
            raise ConfigError("total_steps", f"{self.total_steps} steps but the plan has {self._epoch_steps[0]}",
                              "pass plan as a function epoch -> Plan so later epochs can be re-planned")
        parallel = parallel or ParallelConfig(tp=p0.spec.tp, pp=p0.spec.pp, cp=p0.spec.cp)
        if parallel.cp != p0.spec.cp:
            raise ConfigError("parallel.cp", f"{parallel.cp} but the plan was made for cp={p0.spec.cp}",
                              "plan with the layout you train with")
        self.sources = [s if isinstance(s, DataSource) else open_source(s, model, cache_dir=cache_dir)
                        for s in sources]
        if len(self.sources) != max(1, len(p0.datasets)):
            raise ConfigError("sources", f"{len(self.sources)} data sources for datasets {p0.datasets}",
                              "pass one prepared directory per dataset of the plan, in plan order")
        self.pack_cfg: PackConfig = pack_config(model, parallel, self.seq_len, tokenizer, weighting=weighting,
                                                decode_media=media, pixel_dtype=pixel_dtype, fixed_length=fixed_length,
                                                cp_rank=cp_rank if parallel.cp > 1 else None)
        self.builder = PackBuilder(self.sources, tokenizer, self.pack_cfg)
        self.num_workers, self.prefetch, self.pin_memory = num_workers, prefetch, pin_memory
        self.worker_timeout_s = worker_timeout_s
        self.tp_mode, self.tp_group = tp_mode, tp_group
        if tp_mode not in ("duplicate", "broadcast"):
            raise ConfigError("tp_mode", f"unknown {tp_mode!r}", "use duplicate or broadcast")
        self._src_rank, self._is_src = None, True
        if tp_mode == "broadcast":
            import torch.distributed as dist

            self._src_rank = dist.get_global_rank(tp_group, 0) if tp_group is not None else 0
            self._is_src = dist.get_rank() == self._src_rank
        self._step = 0
        self._fingerprint: Optional[str] = None
        self._metrics = self._zero_metrics()
        self._loader_errors = 0
        self._pending: list[tuple[list[tuple[int, int]], LoaderBatch]] = []  # the last step: (rows, batch as built)
        self._active: Optional[Iterator[Any]] = None
        self.seek(start_step)

    # -- plans and epochs --------------------------------------------------------------
    @staticmethod
    def _steps_of(plan: Plan) -> int:
        return int(plan.stats.get("steps", int(plan.step.max()) + 1 if len(plan.step) else 0))

    def epoch_plan(self, epoch: int) -> Plan:
        """The plan of ``epoch`` (cached: the current one and epoch 0)."""
        if epoch not in self._plans:
            plan = self._plan_fn(epoch)
            if 0 in self._plans and (plan.spec.dp, plan.spec.micro_batches) != (self.dp_size, self.micro_batches):
                raise ValueError(f"epoch {epoch} plan has another layout")
            self._plans = {k: v for k, v in self._plans.items() if k == 0}
            self._plans[epoch] = plan
        return self._plans[epoch]

    def _locate(self, step: int) -> tuple[int, int]:
        """(epoch, first step of that epoch) holding global ``step``."""
        start = 0
        for e in range(1 << 30):
            if e == len(self._epoch_steps):
                n = self._steps_of(self.epoch_plan(e))
                if n < 1:
                    raise ValueError(f"epoch {e} plan has no steps")
                self._epoch_steps.append(n)
            if step < start + self._epoch_steps[e]:
                return e, start
            start += self._epoch_steps[e]
        raise AssertionError

    # -- state ---------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Steps consumed so far: the next step this loader yields."""
        return self._step

    def __len__(self) -> int:
        """Steps left in the stage."""
        return self.total_steps - self._step

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = plan_fingerprint(self.epoch_plan(0))
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        """``{"stage", "step", "dp", "plan"}``; save it with the checkpoint of the step last yielded."""
        return {"stage": self.stage, "step": self._step, "dp": self.dp_size, "plan": self.fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state["step"]`` (before iterating). Raises on another stage or a mid-stage DP change."""
        if state.get("stage") != self.stage:
            raise ConfigError("loader state", f"is for stage {state.get('stage')!r}, this loader runs {self.stage!r}",
                              "build the loader of the checkpoint's stage (or start the next stage at step 0)")
        step = int(state["step"])
        dp = state.get("dp")
        if dp is not None and int(dp) != self.dp_size and 0 < step < self.total_steps:
            raise ConfigError("loader state", f"saved mid-stage at dp={dp}, resuming at dp={self.dp_size}",
                              f"resume stage {self.stage!r} with dp={dp} (change DP at a stage boundary)")
        if state.get("plan") and dp is not None and int(dp) == self.dp_size and state["plan"] != self.fingerprint():
            log.warning("loader: the stage plan differs from the checkpoint's (data, curriculum or seed changed); "
                        "resuming at step %d of the new plan", step)
        self.seek(step)

    def seek(self, step: int) -> None:
        if not 0 <= step <= self.total_steps:
            raise ValueError(f"step {step} outside the stage's 0..{self.total_steps}")
        self.close()
        self._step = int(step)

    # -- metrics -------------------------------------------------------------------------
    @staticmethod
    def _zero_metrics() -> dict[str, Any]:
        return dict(steps=0, packs=0, samples=0, tokens=0, real_tokens=0, tiles=0, decoded_tiles=0, frames=0,
                    media=0, loader_errors=0, rejected=collections.deque(maxlen=REJECTED_NAMES_KEPT),
                    wait_s=0.0, build_s=0.0)

    def metrics(self, reset: bool = False) -> dict[str, Any]:
        """Counters since the last reset: packs, samples (used sub-samples), tokens (padded / real),
        tiles (of the packs), decoded_tiles / frames / media (what this rank decoded: its CP share),
        ``loader_errors`` (sub-samples left out or blanked) with ``rejected`` naming them
        ("dataset: shard:key"; the last ``REJECTED_NAMES_KEPT`` of them, so a run that is never reset
        holds bounded memory; the counts stay exact, and every rejection is logged), ``wait_s`` (time the trainer waited on the loader) and ``build_s``
        (CPU time spent building those packs, summed over workers). After :meth:`settle` the
        rejections are the replica's agreed ones, each counted once."""
        m = dict(self._metrics, rejected=list(self._metrics["rejected"]))
        m["loader_errors_total"] = self._loader_errors
        if reset:
            self._metrics = self._zero_metrics()
        return m

    def _reject(self, rows: Sequence[tuple[int, int]], status: torch.Tensor, note: str = "") -> int:
        """Count and name the rows of one pack whose ``status`` marks them rejected."""
        bad = torch.nonzero(status.cpu() != ROW_USED).squeeze(1).tolist()
        for r in bad:
            name = self.builder.describe(*rows[r]) if r < len(rows) else f"row {r}"
            self._metrics["rejected"].append(name)
            if note:
                log.info("loader: %s %s", name, note)
        self._metrics["loader_errors"] += len(bad)
        self._metrics["samples"] -= len(bad)
        self._loader_errors += len(bad)
        return len(bad)

    def _account(self, batch: LoaderBatch, info: Optional[PackInfo], rows: Sequence[tuple[int, int]]) -> None:
        m = self._metrics
        status = batch.statuses()
        m["packs"] += 1
        m["samples"] += len(status)
        m["tokens"] += batch.num_tokens
        m["tiles"] += batch.total_tiles
        self._reject(rows, status)
        self._pending.append((list(rows), batch))
        if info is not None:
            m["real_tokens"] += info.real_tokens
            m["decoded_tiles"] += info.share_tiles
            m["frames"] += info.frames
            m["media"] += info.media
            m["build_s"] += info.build_s

    def settle(self, agreed: Sequence[LoaderBatch]) -> int:
        """Take the replica's agreed view of the last step's batches (``agree_on_batches``): rows
        rejected on another rank of the replica are counted and named here too, so every rank's
        metrics hold each of the replica's rejections exactly once. Returns how many were added."""
        if len(agreed) != len(self._pending):
            raise ValueError(f"settle: {len(agreed)} batches for a step of {len(self._pending)}")
        added = 0
        for b, (rows, local) in zip(agreed, self._pending):
            if b is local:  # agreement changed nothing
                continue
            new = (b.statuses().cpu() != ROW_USED) & (local.statuses().cpu() == ROW_USED)
            added += self._reject(rows, new.long(), "rejected by another rank of this replica")
        self._pending = []
        return added

    # -- iteration -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[LoaderBatch]]:
        while self._step < self.total_steps:
            epoch, start = self._locate(self._step)
            end = min(start + self._epoch_steps[epoch], self.total_steps)
            yield from self._run_epoch(epoch, start, end)

    def _run_epoch(self, epoch: int, start: int, end: int) -> Iterator[list[LoaderBatch]]:
        k = self.micro_batches
        items: Optional[Iterator[tuple[LoaderBatch, PackInfo]]] = None
        sched = rank_schedule(self.epoch_plan(epoch), self.dp_rank)
        if self._is_src:
            items = self._items(sched, (self._step - start) * k, (end - start) * k)
        while self._step < end:
            batches = []
            self._pending = []
            for m in range(k):
                t0 = time.perf_counter()
                batch, info = None, None
                if items is not None:
                    batch, info = next(items)
                if self.tp_mode == "broadcast":
                    from megatron_eagle.data.loading.broadcast import broadcast_batch

                    batch, _ = broadcast_batch(batch, self._src_rank, self.tp_group)
                self._metrics["wait_s"] += time.perf_counter() - t0
                self._account(batch, info, sched.rows((self._step - start) * k + m))
                batches.append(batch)
            self._step += 1  # before yielding: a checkpoint taken after this step resumes at the next
            self._metrics["steps"] += 1
            yield batches
        self.close()

    def _items(self, sched: RankSchedule, first: int, end: int) -> Iterator[tuple[LoaderBatch, PackInfo]]:
        """Items [first, end) of the epoch, in order; replaces stalled workers and continues."""
        pos, restarts = first, 0
        while pos < end:
            ds = _PackDataset(self.builder, sched, pos, end)
            if self.num_workers == 0:
                for i in range(len(ds)):
                    pos += 1
                    yield ds[i]
                return
            dl = torch.utils.data.DataLoader(
                ds, batch_size=None, shuffle=False, num_workers=self.num_workers, collate_fn=_identity,
                prefetch_factor=self.prefetch, persistent_workers=False, pin_memory=self.pin_memory,
                worker_init_fn=_worker_init, timeout=self.worker_timeout_s or 0)
            it = iter(dl)
            self._active = it
            try:
                while pos < end:
                    try:
                        item = next(it)
                    except RuntimeError as e:
                        if "timed out" not in str(e) or restarts >= 2:
                            raise
                        restarts += 1
                        log.error("loader: no pack from the workers in %.0f s (item %d); restarting them",
                                  self.worker_timeout_s, pos)
                        break
                    pos += 1
                    yield item
            finally:
                self._shutdown(it)

    @staticmethod
    def _shutdown(it: Any) -> None:
        fn = getattr(it, "_shutdown_workers", None)
        if fn is not None:
            fn()

    def close(self) -> None:
        """Stop worker processes (iteration can resume from ``step`` afterwards)."""
        if self._active is not None:
            self._shutdown(self._active)
            self._active = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------- from a curriculum

def _resolve(path: str, base: Optional[Union[str, Path]]) -> str:
    if "://" in path or Path(path).is_absolute() or base is None:
        return path
    return str(Path(base) / path)


def build_stage_loader(curriculum: Any, stage: str, tokenizer: Any, model: ModelConfig, *, world_size: int,
                       dp_rank: int, pp_rank: int = 0, state: Optional[Mapping[str, Any]] = None,
                       start_step: int = 0, data_dirs: Optional[Mapping[str, str]] = None,
                       base_dir: Optional[Union[str, Path]] = None, packer: str = "balanced",
                       **loader_kw: Any) -> StageLoader:
    """Plan ``stage`` of ``curriculum`` (a Curriculum or a YAML path) on ``world_size`` GPUs and
    return this rank's loader, positioned at ``state`` (a loader ``state_dict``) or ``start_step``.

    Dataset paths come from the curriculum (relative to ``base_dir``, default the YAML's folder) or
    ``data_dirs`` (name -> prepared dir / URL). ``tokenizer`` is a tokenizer or its directory.
    ``pp_rank``: stages after the first skip media decoding. Other keyword arguments go to
    :class:`StageLoader` (num_workers, prefetch, tp_mode, tp_group, pixel_dtype, fixed_length, ...);
    with ``cache_dir`` (shared by all ranks, e.g. the run directory) the ADS tables are computed by
    one process and read by the others (:mod:`.table_cache`), and remote indexes are mirrored there.
    """
    from megatron_eagle.data.loading.table_cache import cached_table
    from megatron_eagle.data.packing.blend import plan_stage
    from megatron_eagle.data.packing.plan_index import table_from_prepared
    from megatron_eagle.tokenizer import load_tokenizer

    if isinstance(curriculum, (str, Path)):
        base_dir = base_dir if base_dir is not None else Path(curriculum).parent
        curriculum = load_curriculum(curriculum, world_size)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    st = curriculum.stage(stage)
    paths = []
    for d in st.datasets:
        p = (data_dirs or {}).get(d.name) or d.path
        if not p:
            raise ConfigError(f"stages[{stage}].datasets[{d.name}].path", "missing", "give a prepared directory")
        p = _resolve(str(p), base_dir)
        if "://" not in p and not Path(p).is_dir():
            raise ConfigError(f"stages[{stage}].datasets[{d.name}].path", f"{p} is not a prepared directory",
                              "training needs data written by `megatron-eagle prepare` (lengths files only plan)")
        paths.append(p)
    cache_dir = loader_kw.get("cache_dir")
    if cache_dir is not None:
        tables = {d.name: cached_table(p, st.seq_len, model, Path(cache_dir) / "tables")[0]
                  for d, p in zip(st.datasets, paths)}
    else:
        # every rank computes these: one process each (the cached path computes once, in parallel)
        tables = {d.name: table_from_prepared([p], st.seq_len, model, workers=1)[0]
                  for d, p in zip(st.datasets, paths)}

    def plan_for(epoch: int) -> Plan:
        cur = curriculum if epoch == 0 else replace(curriculum, seed=curriculum.seed + epoch)
        return plan_stage(cur, stage, tables, world_size, packer)

    p0 = plan_for(0)
    total = st.steps
    if st.tokens is not None:
        total = math.ceil(st.tokens / st.global_batch_tokens)
    loader_kw.setdefault("media", pp_rank == 0)
    parallel = loader_kw.pop("parallel", None) or st.parallel
    sources = [open_source(p, model, name=d.name, cache_dir=loader_kw.get("cache_dir"))
               for d, p in zip(st.datasets, paths)]
    loader = StageLoader(stage, lambda e: p0 if e == 0 else plan_for(e), sources, tokenizer, model,
                         dp_rank=dp_rank, parallel=parallel, total_steps=total, start_step=start_step,
                         **loader_kw)
    if state is not None:
        loader.load_state_dict(state)
    return loader
