"""The model reads data-dependent counts (visual slots, supervised positions) from the batch's host
copy, so a GPU step has no device syncs mid-forward: same loss and gradients as reading them from
the device tensors, and the host copy is really what is read."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist import run_distributed


def _case(rank, world):
    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.batch import IGNORE_INDEX
    from megatron_eagle.models.eagle import EagleModel
    from megatron_eagle.runtime.distributed import init_model_parallel
    from tests.model_fixtures import mixed_pack, tiny_model_config

    init_model_parallel()
    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = EagleModel(cfg, ParallelConfig())
    batch = mixed_pack(cfg)
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    out = {"host_set": moved.host is batch and batch.host is None}

    def run(b):
        model.zero_grad(set_to_none=True)
        loss = model(b)
        loss.backward()
        return float(loss), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    out["device"], out["host"] = run(batch), run(moved)
    # The host copy is what is read: one supervised token fewer there changes the loss ...
    labels = batch.labels.clone()
    first = int((labels >= 0).nonzero()[0])
    labels[first] = IGNORE_INDEX
    out["dropped"] = run(dataclasses.replace(moved, host=dataclasses.replace(batch, labels=labels)))[0]
    # ... and a slot count that disagrees with the tiles is caught from it
    tokens = batch.tokens.clone()
    tokens[tokens == cfg.image_token_id] = 0
    try:
        model(dataclasses.replace(moved, host=dataclasses.replace(batch, tokens=tokens)))
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = str(e)
    # a host copy of another shape (a CP-split batch keeps it) is ignored
    short = dataclasses.replace(batch, tokens=batch.tokens[:-1])
    out["ignored"] = dataclasses.replace(moved, host=short).host_view() is None
    return out


def test_host_counts_equal_device_counts_and_are_used():
    r = run_distributed(_case, 1, timeout=240)[0]
    assert r["host_set"] and r["ignored"]
    (l_dev, g_dev), (l_host, g_host) = r["device"], r["host"]
    assert l_host == pytest.approx(l_dev, rel=1e-6)
    assert g_dev.keys() == g_host.keys()
    for k in g_dev:
        torch.testing.assert_close(g_host[k], g_dev[k], rtol=1e-5, atol=1e-7, msg=k)
    assert r["dropped"] != pytest.approx(l_dev, rel=1e-6)
    assert r["mismatch"] is not None and "<IMG_CONTEXT>" in r["mismatch"]
