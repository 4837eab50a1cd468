"""The flat fused AdamW step (training/flat_adamw.py) equals megatron's per-parameter path."""

from __future__ import annotations

import pytest
import torch


def test_adamw_update_matches_torch_single_tensor():
    """The kernel's arithmetic alone, against torch.optim.AdamW(foreach=False), two groups."""
    from megatron_eagle.training.flat_adamw import adamw_update, pack_groups

    g = torch.Generator().manual_seed(0)
    n = 1000
    p = torch.randn(n, generator=g)
    ref_a, ref_b = p[:600].clone().requires_grad_(), p[600:].clone().requires_grad_()
    opt = torch.optim.AdamW([{"params": [ref_a], "lr": 1e-2, "weight_decay": 0.1},
                             {"params": [ref_b], "lr": 3e-3, "weight_decay": 0.0}],
                            betas=(0.9, 0.95), eps=1e-8, foreach=False)
    master, m, v = p.clone(), torch.zeros(n), torch.zeros(n)
    out = torch.empty(n, dtype=torch.bfloat16)
    groups = pack_groups(torch.cat([torch.zeros(600, dtype=torch.uint8), torch.ones(400, dtype=torch.uint8)]), 1)
    for step in range(1, 4):
        grad = torch.randn(n, generator=g)
        scale = 0.5 if step == 2 else 1.0
        ref_a.grad, ref_b.grad = grad[:600] * scale, grad[600:] * scale
        opt.step()
        lr_wd = torch.tensor([[1e-2, 3e-3], [0.1, 0.0]])
        scal = torch.tensor([scale, 1 - 0.9 ** step, (1 - 0.95 ** step) ** 0.5])
        adamw_update(master, grad, m, v, out, groups, lr_wd, scal,
                     0.9, 0.95, 1e-8, bits=1)
        torch.testing.assert_close(master, torch.cat([ref_a.detach(), ref_b.detach()]), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m, torch.cat([opt.state[ref_a]["exp_avg"], opt.state[ref_b]["exp_avg"]]))
        assert torch.equal(out, master.to(torch.bfloat16))


@pytest.mark.parametrize("groups", [1, 2, 3, 5, 17])
def test_packed_group_table_round_trips(groups):
    """Every element reads back its own group from the packed table (1, 2, 4 or 8 bits each)."""
    from megatron_eagle.training.flat_adamw import group_bits, pack_groups

    bits = group_bits(groups)
    assert 2 ** bits >= groups and (bits == 1 or 2 ** (bits // 2) < groups)
    gid = torch.randint(0, groups, (1003,), generator=torch.Generator().manual_seed(groups)).to(torch.uint8)
    packed = pack_groups(gid, bits)
    assert packed.numel() == -(-1003 // (8 // bits))
    idx, per_byte = torch.arange(1003), 8 // bits
    back = (packed[idx // per_byte].to(torch.int32) >> ((idx % per_byte) * bits).to(torch.int32)) & (2 ** bits - 1)
    assert torch.equal(back.to(torch.uint8), gid)


def test_eager_fallback_in_chunks_equals_one_call(monkeypatch):
    """The eager path (CPU, or CUDA when compiling fails) runs in bounded chunks: same result."""
    from megatron_eagle.training import flat_adamw as fa

    n = 10_007
    g = torch.Generator().manual_seed(1)
    master, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    m, v = torch.randn(n, generator=g) * 1e-2, torch.rand(n, generator=g) * 1e-4
    groups = fa.pack_groups((torch.arange(n) // 333 % 3).to(torch.uint8), 2)
    lr_wd, scal = torch.tensor([[1e-2, 2e-2, 3e-3], [0.1, 0.0, 0.05]]), torch.tensor([0.5, 0.1, 0.05])
    one = [t.clone() for t in (master, m, v)] + [torch.empty(n, dtype=torch.bfloat16)]
    fa.adamw_update(one[0], grad, one[1], one[2], one[3], groups, lr_wd, scal, 0.9, 0.95, 1e-8, bits=2)
    monkeypatch.setattr(fa, "EAGER_CHUNK", 1024)  # 10 chunks, the last one partial
    chunked = [t.clone() for t in (master, m, v)] + [torch.empty(n, dtype=torch.bfloat16)]
    fa._run_fused(chunked[0], grad, chunked[1], chunked[2], chunked[3], groups, 2, lr_wd, scal, 0.9, 0.95, 1e-8)
    for a, b in zip(one, chunked):
        assert torch.equal(a, b)
    assert not torch.equal(one[0], master)


def test_packed_group_table_from_ranges_in_chunks():
    """Built chunk by chunk from param ranges (no per-element temporaries of the whole segment):
    the same table as packing the full per-element group ids, for chunk edges inside ranges."""
    from megatron_eagle.training.flat_adamw import pack_groups, packed_group_table

    n = 5000
    ranges = [(0, 700, 1), (700, 701, 0), (760, 2100, 2), (2100, 4093, 1), (4096, 4999, 3)]
    gid = torch.zeros(n, dtype=torch.uint8)
    for a, b, g in ranges:
        gid[a:b] = g
    for bits in (2, 4, 8):
        want = pack_groups(gid, bits)
        for chunk in (64, 1000, 1 << 20):
            assert torch.equal(packed_group_table(n, ranges, bits, torch.device("cpu"), chunk=chunk), want)
