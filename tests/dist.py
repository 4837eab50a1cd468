"""Run a function on N real gloo processes (torch.multiprocessing) and collect results."""

from __future__ import annotations

import io
import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        from megatron_eagle.runtime.distributed import init_distributed, shutdown

        init_distributed(timeout_s=120)
        result = fn(rank, world, *args)
        buf = io.BytesIO()  # plain bytes: tensors in shared memory die with this process
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
        shutdown()
    except BaseException:  # report, then let the parent fail the test
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(fn, world: int, *args, timeout: float = 300.0) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` processes; return results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
                break
            import torch

            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.terminate()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]
