"""The one check of a parallel layout: does it fit the model, the stage's length and the world?

Every caller (the config loader, the curriculum, the run loader, `submit`) asks
:func:`check_layout`; each error names the field and the fix.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional

from megatron_eagle.config.errors import ConfigError
from megatron_eagle.config.model import ModelConfig
from megatron_eagle.config.parallel import ParallelConfig, ulysses_degree


def check_layout(model: Optional[ModelConfig], parallel: ParallelConfig, *, stage: Optional[str] = None,
                 seq_len: Optional[int] = None, world_size: Optional[int] = None, nodes: Optional[int] = None,
                 tasks: Optional[int] = None, packs_per_step: Optional[int] = None) -> Optional[tuple[int, int]]:
    """Refuse a layout that cannot run, naming the field and the fix.

    ``model``: the heads, layers and widths must divide over TP/PP/CP (None: not checked).
    ``stage``: the curriculum stage the layout belongs to (fields become ``stages[NAME].…``);
    ``seq_len``: its pack length. The world is ``world_size`` processes, or ``nodes`` x ``tasks``
    at submission; with ``packs_per_step`` the packs of a step must split over the DP ranks.
    Returns (dp, micro-batches per DP rank) when the world and ``packs_per_step`` are given.
    """
    where = f"stages[{stage}]" if stage is not None else ""
    with _under(where):
        for name in ("tp", "pp", "cp"):
            if getattr(parallel, name) < 1:
                raise ConfigError(f"parallel.{name}", "must be >= 1", f"set parallel.{name}=1 or more")
        if model is not None:
            _check_model_fits(model, parallel)
    if seq_len is not None:
        _check_length(model, parallel, where, seq_len)
    if nodes is not None and tasks is not None:
        world_size = _check_nodes(parallel, stage or "", nodes, tasks)
    if world_size is None:
        return None
    mp = parallel.model_parallel
    if world_size < 1 or world_size % mp:
        if not where:
            raise ConfigError("parallel", f"world size {world_size} is not divisible by tp*pp*cp={mp}",
                              f"launch a multiple of {mp} processes or change parallel.tp/pp/cp")
        raise ConfigError(f"{where}.parallel", f"world size {world_size} is not a multiple of tp*pp*cp={mp}",
                          f"run on a multiple of {mp} GPUs or change tp/pp/cp")
    dp = world_size // mp
    if packs_per_step is None:
        return None
    if packs_per_step % dp:
        ok = [d for d in range(1, packs_per_step + 1) if packs_per_step % d == 0]
        raise ConfigError(f"{where}.global_batch_tokens",
                          f"{packs_per_step} packs per step do not split over dp={dp} ranks",
                          f"make dp one of {ok[-8:]} (world size = dp*{mp}) or change global_batch_tokens")
    return dp, packs_per_step // dp


@contextmanager
def _under(where: str) -> Iterator[None]:
    """Name the fields of a stage's layout ``stages[NAME].…``."""
    try:
        yield
    except ConfigError as e:
        if not where:
            raise
        raise ConfigError(f"{where}.{e.field}", e.problem, e.fix) from None


def _check_model_fits(m: ModelConfig, p: ParallelConfig) -> None:
    if m.vision.image_size % m.vision.patch_size:
        raise ConfigError("model.vision.image_size", "not a multiple of patch_size",
                          f"use a multiple of {m.vision.patch_size}")
    side = m.vision.patches_per_side
    if abs(side * m.downsample_ratio - round(side * m.downsample_ratio)) > 1e-9:
        raise ConfigError("model.downsample_ratio", f"{side} patches per side do not shuffle evenly",
                          "use 0.5 with an even patch grid")
    checks = [
        ("model.llm.num_heads", m.llm.num_heads, p.tp),
        ("model.llm.num_kv_heads", m.llm.num_kv_heads, p.tp),
        ("model.vision.num_heads", m.vision.num_heads, p.tp),
        ("model.llm.ffn_hidden_size", m.llm.ffn_hidden_size, p.tp),
        ("model.vision.ffn_hidden_size", m.vision.ffn_hidden_size, p.tp),
    ]
    for fname, value, div in checks:
        if value % div:
            raise ConfigError(fname, f"{value} is not divisible by parallel.tp={div}",
                              f"choose parallel.tp from {[d for d in range(1, value + 1) if value % d == 0 and d <= 8]}")
    m.vision.layers_used  # raises ConfigError naming model.vision.select_layer
    if m.llm.family == "qwen3" and not m.llm.qk_layernorm:
        raise ConfigError("model.llm.qk_layernorm", "Qwen3 normalises each query and key head",
                          "set model.llm.qk_layernorm=true")
    if m.llm.num_heads % m.llm.num_kv_heads:
        raise ConfigError("model.llm.num_kv_heads", "does not divide num_heads", "use a divisor of num_heads")
    if m.llm.num_layers % p.pp:
        raise ConfigError("model.llm.num_layers", f"{m.llm.num_layers} layers not divisible by parallel.pp={p.pp}",
                          f"choose parallel.pp from {[d for d in range(1, m.llm.num_layers + 1) if m.llm.num_layers % d == 0]}")
    if p.cp > 1:
        ulysses_degree(p, m.llm.num_heads)  # raises ConfigError naming the fix
    if p.sp and p.tp == 1:
        raise ConfigError("parallel.sp", "sequence parallel needs tp > 1", "set parallel.sp=false or parallel.tp>1")
    if m.llm.hidden_size % m.llm.num_heads:
        raise ConfigError("model.llm.hidden_size", "not divisible by num_heads", "use a multiple of num_heads")
    if not math.isfinite(m.init_std) or m.init_std <= 0:
        raise ConfigError("model.init_std", "must be a positive number", "use e.g. 0.02")


def _check_length(m: Optional[ModelConfig], p: ParallelConfig, where: str, seq_len: int) -> None:
    if p.cp > 1 and seq_len % (2 * p.cp):  # each CP rank holds two mirrored chunks
        raise ConfigError(f"{where}.seq_len", f"{seq_len} is not a multiple of 2*cp={2 * p.cp}",
                          "use a power-of-two length or a smaller cp")
    if m is not None and m.llm.max_position_embeddings < seq_len:
        raise ConfigError(f"{where}.seq_len",
                          f"{seq_len} exceeds model.llm.max_position_embeddings={m.llm.max_position_embeddings}",
                          "lower seq_len or raise model.llm.max_position_embeddings")


def _check_nodes(p: ParallelConfig, stage: str, nodes: int, tasks: int) -> int:
    """nodes x tasks processes at submission; the fix names a node count that works."""
    mp, world = p.model_parallel, nodes * tasks
    if world % mp:
        good = next(n for n in range(nodes, nodes + mp + 1) if (n * tasks) % mp == 0)
        raise ConfigError(f"stages[{stage}].parallel",
                          f"{nodes} nodes x {tasks} tasks = {world} processes is not divisible by "
                          f"tp*pp*cp={p.tp}*{p.pp}*{p.cp}={mp}",
                          f"submit stage {stage} on a multiple of {mp} processes, e.g. "
                          f"--stage-nodes {stage}={good}, or change its parallel layout")
    return world
