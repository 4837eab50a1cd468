"""Distributed checkpoints: atomic, resharding, with optimizer/scheduler/RNG/loader state.

Layout under ``RUN_DIR/checkpoints``::

    iter_0000100/          megatron dist_checkpointing dir (model + optimizer, any layout)
    iter_0000100/meta.json step, stage, scheduler, loader and curriculum state, layout
    iter_0000100/rng/rank_00000.pt   per-rank RNG (restored only when the layout is unchanged)
    latest                 name of the newest complete checkpoint, written last

A save goes to ``iter_X.tmp`` and is renamed when every rank has finished, so a crash
mid-save leaves the previous checkpoint (and ``latest``) intact. Nothing is unpickled:
RNG tensors load with ``weights_only=True`` and metadata is JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _layout() -> dict[str, int]:
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(), "dp": ps.get_data_parallel_world_size(),
            "world": dist.get_world_size()}


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)  # DDP wrapper -> model: keys without "module."


def _sharded_state(chunks, optimizer, is_loading: bool) -> dict[str, Any]:
    model_sd = {}
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        model_sd[key] = _unwrap(chunk).sharded_state_dict()
    state = dict(model_sd)
    if optimizer is not None:
        if is_loading:
            _ensure_optimizer_state(optimizer)
        flat = {}
        for v in model_sd.values():
            flat.update(v)
        state["optimizer"] = optimizer.sharded_state_dict(flat, is_loading=is_loading, metadata=OPTIM_METADATA)
    return state


def _ensure_optimizer_state(optimizer) -> None:
    # A fresh optimizer has no Adam state to load into; megatron fills it with dummies
    # (which the load then overwrites, together with the model weights).
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not inner.optimizer.state and hasattr(inner, "_init_optimizer_states_with_dummy_values"):
            inner._init_optimizer_states_with_dummy_values()


def _rng_state() -> dict[str, torch.Tensor]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(),
             "numpy": torch.tensor(np.frombuffer(json.dumps(_np_state()).encode(), dtype=np.uint8).copy()),
             "python": torch.tensor(np.frombuffer(json.dumps(random.getstate()).encode(), dtype=np.uint8).copy())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, st in get_cuda_rng_tracker().get_states().items():
        state[f"tracker.{name}"] = st
    return state


def _np_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = json.loads(bytes(state["numpy"].tolist()).decode())
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = {k[len("tracker."):]: v for k, v in state.items() if k.startswith("tracker.")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The checkpoint named by ``latest`` (None if absent or incomplete)."""
    root = Path(ckpt_root)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "meta.json").exists() else None


def _shield_writer_queue() -> None:
    """Start megatron's checkpoint-writer results queue with SIGTERM/SIGUSR1 blocked.

    The queue lives in a ``spawn`` Manager process created on the first save. Under Slurm the
    preemption / time-limit signal goes to every process of the job step; that process would die
    of it (default handler) and break this and every later save. A blocked signal mask survives
    fork+exec, so the Manager never sees them; the trainer gets any signal that arrives meanwhile
    as soon as the mask is restored.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is not None or not hasattr(signal, "pthread_sigmask"):
        return
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # starting it later would unblock SIGTERM in this process
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
    try:
        filesystem_async._get_write_results_queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def save_checkpoint(ckpt_root: str | Path, step: int, chunks, optimizer, meta: dict[str, Any],
                    keep_last: int = 3) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    root = Path(ckpt_root)
    final = root / checkpoint_name(step)
    tmp = root / (checkpoint_name(step) + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    _shield_writer_queue()
    dist_checkpointing.save(_sharded_state(chunks, optimizer, is_loading=False), str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        full_meta = dict(meta, step=step, layout=_layout())
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = root / "latest.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, root / "latest")  # the pointer is written last
        _prune(root, keep_last)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    latest = (root / "latest").read_text().strip()
    for old in done[:-keep_last] if keep_last > 0 else []:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("iter_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "meta.json").read_text())


def load_checkpoint(path: str | Path, chunks, optimizer, load_optimizer: bool = True) -> dict[str, Any]:
    """Load model (and optimizer) into the current layout, resharding as needed.

    RNG state is restored only when the layout matches the one saved. Returns meta.json.
    """
    path = Path(path)
    meta = read_meta(path)
    state = _sharded_state(chunks, optimizer if load_optimizer else None, is_loading=True)
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if load_optimizer and optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if meta.get("layout") == _layout() and rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return meta
