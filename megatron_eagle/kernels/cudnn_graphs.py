"""cuDNN fused-SDPA graphs through the cudnn-frontend Python API: what the packed (THD) and the strided
([s, b, h, d]) attention share.

:class:`CudnnGraphs` imports the package on first use, checks the device, keeps one cudnn handle per
device (running on torch's current stream), builds graphs once per key and remembers the keys that
failed (not retried), and executes a graph on tensors' data pointers. Without the package, a CUDA
device of compute capability >= 9.0 or cuDNN >= 9.6, :meth:`CudnnGraphs.unusable_reason` says why and
callers fall back; nothing here reads device values on the host (no synchronisation).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

MIN_CUDNN_VERSION = 90600  # ragged softmax stats and max_total_seq_len in the backward


class CudnnUnsupported(RuntimeError):
    """cuDNN cannot run these inputs (missing package, device, version or an unsupported graph)."""


@dataclass
class Graph:
    """A built graph and how to feed it."""

    graph: Any
    tensors: Dict[str, Any]  # name -> cudnn tensor handle
    workspace: int
    uids: Dict[str, int]  # name -> tensor uid, for executing without the frontend's dict rebuild


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


class CudnnGraphs:
    """Graph cache, handles and device checks (thread-safe); ``built`` / ``build_s`` count the builds."""

    def __init__(self):
        self._lock = threading.RLock()  # re-entered: get -> build -> handle
        self._module: Any = None
        self._import_error: Optional[str] = None
        self._handles: Dict[int, Any] = {}  # device index -> cudnn handle
        self._streams: Dict[int, int] = {}  # device index -> stream last set on its handle
        self._device_reason: Dict[int, Optional[str]] = {}  # why cuDNN cannot run there (None: it can)
        self.graphs: Dict[tuple, Graph] = {}
        self._unsupported: Dict[tuple, str] = {}  # key -> reason its build failed
        self.built = 0
        self.build_s = 0.0

    # ------------------------------------------------------------------ availability
    def module(self) -> Any:
        """The ``cudnn`` frontend module; raises :class:`CudnnUnsupported` naming why it cannot be used."""
        if self._module is None and self._import_error is None:
            try:
                import cudnn  # noqa: F401  (cudnn-frontend; dlopens torch's bundled libcudnn)

                cudnn.backend_version()  # fails here, not mid-step, when libcudnn is missing
                self._module = cudnn
            except Exception as e:  # ImportError, OSError, RuntimeError from the backend probe
                self._import_error = f"cannot use the cudnn frontend package ({type(e).__name__}: {e})"
        if self._module is None:
            raise CudnnUnsupported(self._import_error)
        return self._module

    def _device_check(self, device: torch.device) -> Optional[str]:
        idx = _index(device)
        if idx not in self._device_reason:
            major, minor = torch.cuda.get_device_capability(idx)
            reason = None
            if major < 9:
                reason = f"ragged (THD) cuDNN attention needs compute capability >= 9.0, device has {major}.{minor}"
            else:
                try:
                    cudnn = self.module()
                    if cudnn.backend_version() < MIN_CUDNN_VERSION:
                        reason = f"cuDNN {cudnn.backend_version_string()} < 9.6 (ragged softmax stats)"
                except CudnnUnsupported as e:
                    reason = str(e)
            self._device_reason[idx] = reason
        return self._device_reason[idx]

    def unusable_reason(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
        """Why cuDNN cannot take q [..., hq, d], k/v [..., hkv, d], or None if it may (graphs can still fail)."""
        if not (q.is_cuda and k.is_cuda and v.is_cuda):
            return "inputs are not on a CUDA device"
        if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
            return f"dtype {q.dtype} (cuDNN fused SDPA takes bf16/fp16)"
        if k.shape[-2] != v.shape[-2] or q.shape[-2] % k.shape[-2] or k.shape[-1] != q.shape[-1]:
            return f"shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}"
        return self._device_check(q.device)

    def handle(self, device: torch.device) -> Any:
        idx = _index(device)
        h = self._handles.get(idx)
        if h is None:
            cudnn = self.module()
            with self._lock:
                h = self._handles.get(idx)
                if h is None:
                    with torch.cuda.device(idx):
                        h = cudnn.create_handle()
                    self._handles[idx] = h
        return h

    # ------------------------------------------------------------------ building
    def new_graph(self, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any, Any]:
        """(graph, io data type, fp32 data type): bf16/fp16 in and out, fp32 intermediates and compute."""
        cudnn = self.module()
        io = cudnn.data_type.BFLOAT16 if dtype == torch.bfloat16 else cudnn.data_type.HALF
        f32 = cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32,
                          handle=self.handle(device))
        return g, io, f32

    @staticmethod
    def tensor(g, name: str, dims, strides, dtype) -> Any:
        return g.tensor(name=name, dim=list(dims), stride=list(strides), data_type=dtype)

    def mask_kwargs(self, causal: bool) -> dict:
        """Top-left diagonal, right bound 0: causal inside each row (rows have equal q/kv lengths)."""
        cudnn = self.module()
        return dict(diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_right_bound=0) if causal \
            else {}

    def finish(self, g, tensors: Dict[str, Any]) -> Graph:
        """Validate the graph, pick and build its execution plans."""
        cudnn = self.module()
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        return Graph(graph=g, tensors=tensors, workspace=int(g.get_workspace_size()),
                     uids={n: x.get_uid() for n, x in tensors.items()})

    def get(self, key: tuple, device: torch.device, build: Callable[["CudnnGraphs", tuple, torch.device], Graph]
            ) -> Graph:
        """The graph for ``key``, built by ``build(self, key, device)`` on first use; a failed build is
        remembered and raises :class:`CudnnUnsupported` (callers fall back)."""
        with self._lock:
            entry = self.graphs.get(key)
            if entry is not None:
                return entry
            if key in self._unsupported:
                raise CudnnUnsupported(self._unsupported[key])
            t0 = time.perf_counter()
            try:
                entry = build(self, key, device)
            except CudnnUnsupported:
                raise
            except Exception as e:  # cudnnGraphNotSupportedError or a frontend error: remember, fall back
                self._unsupported[key] = f"cuDNN graph {key} unsupported ({type(e).__name__}: {e})"
                raise CudnnUnsupported(self._unsupported[key]) from e
            self.built += 1
            self.build_s += time.perf_counter() - t0
            self.graphs[key] = entry
            return entry

    def execute(self, entry: Graph, device: torch.device, feeds: Dict[str, torch.Tensor]) -> None:
        """Run ``entry`` on torch's current stream, like every other kernel."""
        handle = self.handle(device)
        stream = torch.cuda.current_stream(device).cuda_stream
        idx = _index(device)
        if self._streams.get(idx) != stream:
            self.module().set_stream(handle=handle, stream=stream)
            self._streams[idx] = stream
        workspace = torch.empty(max(entry.workspace, 1), dtype=torch.uint8, device=device)
        entry.graph._execute({entry.uids[n]: x.data_ptr() for n, x in feeds.items()}, workspace.data_ptr(), handle)

    def clear(self) -> None:
        """Drop built graphs and remembered failures (benchmarks)."""
        with self._lock:
            self.graphs.clear()
            self._unsupported.clear()
            self.built, self.build_s = 0, 0.0
