"""Attention backends on CPU: the cuDNN packed path's pure-Python layout and its fallback wiring.

The cuDNN kernels themselves need a Hopper GPU: ``benchmarks/attention_kernels.py`` checks them there.
"""

import warnings

import pytest
import torch

from megatron_eagle.kernels import cudnn_packed
from megatron_eagle.kernels.cudnn_graphs import CudnnGraphs, CudnnUnsupported
from megatron_eagle.kernels.dispatch import AttentionKernels
from megatron_eagle.kernels.reference import segment_sdpa
from megatron_eagle.models import attention


def test_buckets():
    assert [cudnn_packed.batch_bucket(n) for n in (0, 1, 31, 32, 33, 64, 65, 300)] == \
        [32, 32, 32, 32, 64, 64, 128, 512]
    assert [cudnn_packed.token_bucket(t) for t in (0, 1, 1024, 1025, 8192, 8193, 32768, 32769, 131072)] == \
        [1024, 1024, 1024, 2048, 8192, 16384, 32768, 65536, 131072]
    assert cudnn_packed.token_bucket(100_000) == 131072  # multiples of 32K above 32K, not 2^17


def test_ragged_layout_with_empty_segments_and_padding_rows():
    cu = torch.tensor([0, 5, 5, 12, 20, 20], dtype=torch.int32)  # segments 5, 0, 7, 8, 0
    lay = cudnn_packed.ragged_layout(cu, batch=8, hq=4, hkv=2, d=8)
    assert lay.seq_len.shape == (8, 1, 1, 1) and lay.seq_len.dtype == torch.int32
    assert lay.seq_len.flatten().tolist() == [5, 0, 7, 8, 0, 0, 0, 0]
    starts = [0, 5, 5, 12, 20, 20, 20, 20, 20]  # padding rows start where the pack ends
    for t, per_token in ((lay.off_q, 32), (lay.off_kv, 16), (lay.off_stats, 4)):
        assert t.shape == (9, 1, 1, 1) and t.dtype == torch.int64
        assert t.flatten().tolist() == [s * per_token for s in starts]


def test_ragged_layout_offset_base_and_too_many_segments():
    # A pack that does not start at token 0 (its offsets are absolute element offsets).
    lay = cudnn_packed.ragged_layout(torch.tensor([3, 4, 10]), batch=2, hq=1, hkv=1, d=2)
    assert lay.seq_len.flatten().tolist() == [1, 6]
    assert lay.off_q.flatten().tolist() == [6, 8, 20]
    with pytest.raises(ValueError):
        cudnn_packed.ragged_layout(torch.tensor([0, 1, 2, 3]), batch=2, hq=1, hkv=1, d=2)


def test_unusable_reasons_on_cpu(monkeypatch):
    q, k, v = torch.zeros(4, 4, 8, dtype=torch.bfloat16), torch.zeros(4, 2, 8, dtype=torch.bfloat16), \
        torch.zeros(4, 2, 8, dtype=torch.bfloat16)
    packed = cudnn_packed.CudnnPacked(CudnnGraphs())
    assert "CUDA" in packed.unusable_reason(q, k, v)
    with pytest.raises(CudnnUnsupported, match="CUDA"):
        packed(q, k, v, torch.tensor([0, 4]), True, 0.5)
    # A failing import is reported, not raised as ImportError.
    monkeypatch.setitem(__import__("sys").modules, "cudnn", None)
    with pytest.raises(CudnnUnsupported, match="cannot use the cudnn frontend package"):
        CudnnGraphs().module()


def _core(backend: str):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            kv_channels=16, context_parallel_size=1, attention_dropout=0.0)
    return attention.PackedCoreAttention(cfg, 1, AttnMaskType.causal, "self", kernels=AttentionKernels(backend))


def _packed(seed=0, t=29, hq=4, hkv=2, d=16):
    from megatron.core.packed_seq_params import PackedSeqParams

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(t, h, d, generator=g).requires_grad_() for h in (hq, hkv, hkv))
    cu = torch.tensor([0, 9, 9, 22, 29], dtype=torch.int32)  # includes an empty segment
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=13, max_seqlen_kv=13)
    return q, k, v, cu, psp


def _run(core, q, k, v, psp):
    out = core(q, k, v, None, packed_seq_params=psp)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v))
    return out, grads


def test_cudnn_backend_on_cpu_falls_back_to_exact_and_warns_once():
    core = _core("cudnn")
    q, k, v, cu, psp = _packed()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out, grads = _run(core, q, k, v, psp)
        _run(core, q, k, v, psp)
    msgs = [str(w.message) for w in seen if "cuDNN packed attention" in str(w.message)]
    assert len(msgs) == 1 and "not on a CUDA device" in msgs[0]
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ref = segment_sdpa(q2, k2, v2, cu, True, 16 ** -0.5).reshape(out.shape)
    rgrads = torch.autograd.grad((ref * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum(), (q2, k2, v2))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b)


def test_cudnn_backend_uses_cudnn_kernel_and_falls_back_on_unsupported_graph(monkeypatch):
    """GPU-free wiring check: PackedCoreAttention calls the cuDNN path with the pack's boundaries."""
    calls = []

    def fake(q, k, v, cu, causal, scale, buckets=None):
        calls.append((tuple(cu.tolist()), causal, scale))
        return segment_sdpa(q, k, v, cu, causal, scale)

    def core_with(backend, kernel):
        core = _core(backend)
        monkeypatch.setattr(core.kernels, "cudnn_packed", kernel)
        return core

    q, k, v, cu, psp = _packed(seed=1)
    ref, rgrads = _run(_core("sdpa"), q, k, v, psp)
    out, grads = _run(core_with("cudnn", fake), q, k, v, psp)
    assert calls == [((0, 9, 9, 22, 29), True, 0.25)]
    torch.testing.assert_close(out, ref)
    _run(core_with("auto", fake), q, k, v, psp)  # auto tries cuDNN on GPUs only (these are CPU tensors)
    assert len(calls) == 1

    def unsupported(*a, **kw):
        raise CudnnUnsupported("cuDNN fwd graph unsupported for B=32 (test)")

    with pytest.warns(UserWarning, match="graph unsupported for B=32"):
        out, grads = _run(core_with("cudnn", unsupported), q, k, v, psp)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b)


def test_config_accepts_cudnn_backend():
    from megatron_eagle.config import ModelConfig

    assert "cudnn" in ModelConfig.__dataclass_fields__["attention_backend"].type
