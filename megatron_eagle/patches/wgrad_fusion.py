"""Weight gradients accumulated straight into megatron's fp32 ``main_grad`` (torch-native).

megatron-core's ``gradient_accumulation_fusion`` needs apex's ``fused_weight_gradient_mlp_cuda``:
the weight-gradient GEMM of every Column/RowParallelLinear then adds into the DDP grad buffer in
its epilogue (cuBLAS beta=1, bf16 inputs, fp32 output). Without it each linear writes a bf16
weight gradient that DDP's hook adds into the fp32 buffer in a separate pass. torch's
``addmm(..., out_dtype=float32, out=main_grad)`` does what apex's kernel does; :func:`install`
registers it as apex's ``fused_weight_gradient_mlp_cuda`` (where apex is absent) and
``training.optimizer.wrap_ddp`` turns the fusion on for the linears of a DDP-wrapped model (only
there do ``main_grad`` buffers exist).
"""

from __future__ import annotations

import sys
import types

import torch
from megatron.core.tensor_parallel import layers

from megatron_eagle.patches.targets import require

TARGETS = ("megatron.core.tensor_parallel.layers:_grad_accum_fusion_available",
           "megatron.core.tensor_parallel.layers:LinearWithGradAccumulationAndAsyncCommunication")
MODULE = "fused_weight_gradient_mlp_cuda"


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad (fp32, [out, in]) += grad_outputᵀ · total_input, in one GEMM on CUDA."""
    x, g = _as_2d(total_input), _as_2d(grad_output)
    if main_grad.is_cuda:
        torch.ops.aten.addmm.dtype_out(main_grad, g.t(), x, torch.float32, out=main_grad)
    else:  # CPU (tests): the same sum, unfused
        main_grad.add_(g.t().float() @ x.float())


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """The same for bf16/fp16 grad buffers (``grad_reduce_in_fp32: false``)."""
    main_grad.addmm_(_as_2d(grad_output).t(), _as_2d(total_input))


def available(device: torch.device) -> bool:
    """Whether the fused GEMM exists here (CUDA builds of torch with ``addmm.dtype_out``)."""
    return device.type == "cuda" and hasattr(torch.ops.aten.addmm, "dtype_out")


def check() -> None:
    require(*TARGETS)


def installed() -> bool:
    """Whether megatron's linears can accumulate weight gradients into ``main_grad`` (apex or this shim)."""
    return bool(layers._grad_accum_fusion_available) and hasattr(layers, MODULE)


def install() -> None:
    if installed():
        return  # apex is installed (keep its kernels), or the shim is
    shim = types.ModuleType(MODULE)
    shim.wgrad_gemm_accum_fp32 = wgrad_gemm_accum_fp32
    shim.wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp16
    sys.modules.setdefault(MODULE, shim)
    setattr(layers, MODULE, sys.modules[MODULE])
    layers._grad_accum_fusion_available = True
