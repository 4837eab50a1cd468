"""Runtime selection in one place: device, backend, and distributed init.

:func:`init_distributed` is the runtime start: it installs the library's patches of megatron-core
and torch (:func:`megatron_eagle.patches.install_all`, once) before anything else runs.
NCCL + CUDA where GPUs exist, gloo + CPU otherwise. Rank/world come from torchrun
(``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or SLURM (``SLURM_PROCID``/``SLURM_NTASKS``/
``SLURM_LOCALID``); a single process with neither runs as world size 1.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Runtime:
    device: torch.device
    backend: str
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if n in os.environ and os.environ[n] != "":
            return int(os.environ[n])
    return default


def launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or SLURM variables."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return (_env_int("RANK", default=0), _env_int("WORLD_SIZE", default=1),
                _env_int("LOCAL_RANK", default=0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return (_env_int("SLURM_PROCID", default=0), _env_int("SLURM_NTASKS", default=1),
                _env_int("SLURM_LOCALID", default=0))
    return 0, 1, 0


def _slurm_master_addr() -> str | None:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")[0]


def init_distributed(timeout_s: int = 600) -> Runtime:
    """Install the patches, pick device/backend and initialise torch.distributed (idempotent)."""
    from megatron_eagle.patches import install_all

    install_all()  # the CPU bridge first where CUDA is absent
    cuda = torch.cuda.is_available()
    rank, world, local_rank = launch_env()
    backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr() or "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            job = _env_int("SLURM_JOB_ID", default=0)
            os.environ["MASTER_PORT"] = str(20000 + job % 20000) if job else "29500"
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Runtime(device=device, backend=backend, rank=rank, world_size=world, local_rank=local_rank)


def init_model_parallel(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234) -> None:
    """Create megatron-core process groups (TP/PP/CP/DP) and seed the RNG trackers."""
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


_REPLICA_GROUPS: dict[tuple, dict[int, object]] = {}


def replica_group(dp_rank: int):
    """The process group of this rank's data-parallel replica: every rank (TP x CP x PP) with the same
    DP rank, i.e. every rank that trains on this rank's packs. A collective over the world: each rank
    passes its DP rank (``parallel_state.get_data_parallel_rank()``); cached per layout."""
    dps: list = [None] * dist.get_world_size()
    dist.all_gather_object(dps, int(dp_rank))
    key = (id(dist.group.WORLD), tuple(dps))
    if key not in _REPLICA_GROUPS:  # every rank creates every replica's group, in the same order
        _REPLICA_GROUPS[key] = {d: dist.new_group([r for r, x in enumerate(dps) if x == d]) for d in sorted(set(dps))}
    return _REPLICA_GROUPS[key][int(dp_rank)]


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        _REPLICA_GROUPS.clear()
        dist.destroy_process_group()
