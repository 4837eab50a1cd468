"""models/attention.py on CPU: the packed flash dispatch (GQA heads, the aten kernel's fallback)."""

from __future__ import annotations

import pytest
import torch


def _qkv(t=40, h=4, kv=2, d=16, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, n, d, generator=g, dtype=torch.float32).to(dtype) for n in (h, kv, kv)]


def test_varlen_flash_passes_gqa_heads_unrepeated(monkeypatch):
    from megatron_eagle.kernels import flash
    from megatron_eagle.kernels.reference import segment_sdpa

    q, k, v = _qkv()
    cu = torch.tensor([0, 7, 8, 30, 40], dtype=torch.int32)
    seen = []

    def fake(q_, k_, v_, cu_q, cu_k, max_q, max_k, causal, scale):
        seen.append((k_.shape[1], v_.shape[1], cu_q.dtype, max_q, causal))
        return segment_sdpa(q_, k_, v_, cu_q, causal, scale), None, None, None, None

    monkeypatch.setattr(flash, "_flash_device", lambda t: True)
    monkeypatch.setattr(flash, "_aten_forward", fake)
    ref = segment_sdpa(q, k, v, cu, True, 0.25)
    out = flash.FlashVarlen().packed(q, k, v, cu, 22, True, 0.25)
    assert seen[-1] == (2, 2, torch.int32, 22, True)  # K/V heads not repeated
    torch.testing.assert_close(out, ref)


def test_varlen_flash_falls_back_when_aten_kernel_refuses(monkeypatch):
    from megatron_eagle.kernels import flash
    from megatron_eagle.kernels.reference import segment_sdpa

    q, k, v = _qkv()
    cu = torch.tensor([0, 20, 40], dtype=torch.int32)
    calls = []

    def refuse(*a, **k):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    def varlen(q_, k_, v_, cq, ck, mq, mk, scale=None, window_size=(-1, -1)):
        calls.append((k_.shape[1], window_size))
        return segment_sdpa(q_, k_, v_, cq, window_size == (-1, 0), scale)

    monkeypatch.setattr(flash, "_flash_device", lambda t: True)
    monkeypatch.setattr(flash, "_aten_forward", refuse)
    monkeypatch.setattr(flash, "_varlen_attn", varlen)
    kernel = flash.FlashVarlen()
    with pytest.warns(UserWarning):
        out = kernel.packed(q, k, v, cu, 20, True, 0.25)
    assert kernel.error is not None and "Ampere" in kernel.status() and calls == [(4, (-1, 0))]
    torch.testing.assert_close(out, segment_sdpa(q, k, v, cu, True, 0.25))
