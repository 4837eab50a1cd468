"""training/optimizer.py: the foreach grad-norm/scale stand-ins and the fused-AdamW switch."""

from __future__ import annotations

import torch


def test_foreach_multi_tensor_matches_megatron_fallback(monkeypatch):
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    from megatron_eagle.patches import foreach_multi_tensor as fmt

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, generator=g) for n in (3, 1000, 17)]
    norm, _ = fmt.foreach_l2_norm(0, torch.zeros(1, dtype=torch.int), [ts], False)
    torch.testing.assert_close(norm, torch.cat(ts).norm().reshape(1))
    dst = [torch.empty_like(t) for t in ts]
    fmt.foreach_scale(0, None, [ts, dst], 0.5)
    for a, b in zip(ts, dst):
        torch.testing.assert_close(b, a * 0.5)
    fmt.foreach_scale(0, None, [dst, dst], 2.0)
    for a, b in zip(ts, dst):
        torch.testing.assert_close(b, a)
    from megatron.core.optimizer import optimizer as megatron_optimizer

    # megatron's local fallbacks (what it runs without apex/TE), restored after the test
    monkeypatch.setattr(clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", utils.local_multi_tensor_scale)
    monkeypatch.setattr(megatron_optimizer, "multi_tensor_scale_impl", utils.local_multi_tensor_scale)
    fmt.install()
    assert clip_grads.l2_norm_impl is fmt.foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is megatron_optimizer.multi_tensor_scale_impl is fmt.foreach_scale
