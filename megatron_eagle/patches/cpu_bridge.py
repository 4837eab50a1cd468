"""Bridge megatron-core's CUDA-only calls to CPU. Active only when CUDA is absent.

megatron-core assumes a GPU in a handful of places (``torch.cuda.current_device()``,
``device='cuda'`` factories, CUDA RNG state, streams, ``param.type()`` strings). On a
GPU-less box :func:`install` patches exactly those, in one place, so the real megatron-core code
runs on CPU with gloo. On machines with CUDA it does nothing.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import random as megatron_random
from torch.overrides import TorchFunctionMode

from megatron_eagle.patches.targets import require

TARGETS = ("torch.cuda:current_device", "torch.cuda:device_count", "torch.cuda:set_device", "torch.cuda:synchronize",
           "torch.cuda:empty_cache", "torch.cuda:Stream", "torch.cuda:Event", "torch.cuda:current_stream",
           "torch.cuda:default_stream", "torch.cuda:stream", "torch.cuda:get_rng_state", "torch.cuda:set_rng_state",
           "torch.cuda.random:get_rng_state", "torch.cuda.random:set_rng_state", "torch.cuda:manual_seed",
           "torch.cuda:manual_seed_all", "torch.cuda:memory_allocated", "torch.cuda:max_memory_allocated",
           "torch.cuda:memory_reserved", "torch.cuda:max_memory_reserved", "torch.cuda:reset_peak_memory_stats",
           "torch.cuda:memory_stats", "torch.cuda:is_current_stream_capturing", "torch:Tensor.cuda",
           "torch:Tensor.type", "megatron.core.tensor_parallel.random:_set_cuda_rng_state",
           "megatron.core.tensor_parallel.random:_get_cuda_rng_state")
_INSTALLED = False


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # megatron passes torch.cuda.current_device() ints
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device='cuda'`` (or a CUDA device index) in torch factories to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if _is_cuda_device(dev):
            kwargs = dict(kwargs, device="cpu")
        if func in (torch.Tensor.to,) and args:
            args = tuple("cpu" if (i > 0 and _is_cuda_device(a) and not isinstance(a, int)) else a
                         for i, a in enumerate(args))
        return func(*args, **kwargs)


class _FakeStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _FakeEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _FakeEvent(_FakeStream):
    def record(self, *a, **k):
        pass

    def elapsed_time(self, other):
        return 0.0


def _tensor_type_cpu(self, dtype=None, non_blocking=False, **kwargs):
    """``param.type()`` as megatron's optimizer expects it (``torch.cuda.FloatTensor``)."""
    if dtype is None:
        name = _ORIG_TENSOR_TYPE(self)
        return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
    return _ORIG_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


_ORIG_TENSOR_TYPE = torch.Tensor.type
_MODE: _CudaToCpuMode | None = None


def check() -> None:
    require(*TARGETS)


def install() -> bool:
    """Install the CPU bridge if CUDA is unavailable (idempotent). Returns True if it is active."""
    global _INSTALLED, _MODE
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.device_count = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.Stream = _FakeStream
    cuda.Event = _FakeEvent
    cuda.current_stream = lambda *a, **k: _FakeStream()
    cuda.default_stream = lambda *a, **k: _FakeStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.manual_seed = lambda seed: None
    cuda.manual_seed_all = lambda seed: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.memory_stats = lambda *a, **k: {}
    cuda.is_current_stream_capturing = lambda: False
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.type = _tensor_type_cpu
    # megatron's CUDA RNG tracker forks the CUDA generator; on CPU fork the CPU one.
    megatron_random._set_cuda_rng_state = _set_cpu_rng_state
    megatron_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _INSTALLED = True
    return True


def active() -> bool:
    return _INSTALLED
