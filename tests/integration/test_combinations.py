"""Every combination of the step's options runs one step or is refused before step 1.

Tiny preset on 2 gloo processes, one spawn for the whole matrix: recompute (none / selective /
full, ViT and LLM) x ViT activation offload x overlapped gradient reduction x micro-batches (1, 2)
x layout (DP 2; CP 2 with each CP variant). megatron's overlapped reduce-scatter is forced on
here (the trainer turns it on only on GPUs) together with the weight-gradient fusion the GPUs
run, so that the GPU's hook path is the one tested (ViT offload with both fails at step 1 with
``param.grad being None is not safe when overlap_grad_reduce is True`` unless the offloaded ViT's
weight gradients are written unfused). A combination either finishes its step with
a finite loss, or ``build_training_state`` refuses it with a ConfigError that names the field
and the fix. On the CP variants other than allgather, a covering subset runs (the recompute,
offload and overlap paths do not depend on the variant's attention).
"""

from __future__ import annotations

import itertools

from tests.dist import run_distributed

MODES = ("none", "selective", "full")


def _combos(full: bool):
    for rv, rl, off, ov, mb in itertools.product(MODES, MODES, (False, True), (False, True), (1, 2)):
        if full or (rv == rl and (mb == 2) == ov):
            yield rv, rl, off, ov, mb


def _matrix(rank, world):
    import dataclasses
    import math

    import torch

    from megatron_eagle.config import ConfigError, ParallelConfig, preset_model_config
    from megatron_eagle.runtime.distributed import init_model_parallel
    from megatron_eagle.training import optimizer as O
    from megatron_eagle.training.optimizer import OptimConfig
    from megatron_eagle.training.setup import build_training_state
    from megatron_eagle.training.step import forward_backward, guarded_optimizer_step
    from tests.model_fixtures import mixed_pack

    made = O.DistributedDataParallelConfig  # the overlap as on GPUs (wrap_ddp keeps it off on CPUs)
    overlap = {"on": False}
    O.DistributedDataParallelConfig = lambda **k: made(**dict(k, overlap_grad_reduce=overlap["on"]))
    O.wgrad_fusion.available = lambda device: True  # and the weight-gradient fusion (its CPU path)
    base = preset_model_config("tiny")
    pack = mixed_pack(base, pad_to_multiple=4)
    results = {}
    for cp, variant in ((1, "allgather"), (2, "allgather"), (2, "ring"), (2, "ulysses"), (2, "hybrid")):
        init_model_parallel(tp=1, cp=cp, seed=1)
        par = ParallelConfig(cp=cp, cp_variant=variant)
        for rv, rl, off, ov, mb in _combos(full=variant == "allgather"):
            cfg = dataclasses.replace(base, recompute_vision=rv, recompute_llm=rl, offload_vision=off)
            optim = OptimConfig(overlap_grad_reduce=ov)
            overlap["on"] = ov
            key = (cp, variant, rv, rl, off, ov, mb)
            try:
                st = build_training_state(cfg, par, optim, seq_len=pack.num_tokens)
            except ConfigError as e:
                results[key] = ("refused", e.field, e.fix)
                continue
            st.ddp.zero_grad_buffer()
            st.optimizer.zero_grad()
            try:
                losses = forward_backward(st.ddp, [pack] * mb, torch.device("cpu"))
                guarded_optimizer_step(st.optimizer, 1.0)
                loss = float(losses[0]) if losses else float("nan")
                results[key] = ("ran", math.isfinite(loss))
            except Exception as e:  # noqa: BLE001 - a combination that neither runs nor is refused
                results[key] = ("crashed", f"{type(e).__name__}: {e}"[:300])
    return results


def test_every_combination_runs_or_is_refused_naming_the_fix():
    results = run_distributed(_matrix, 2, timeout=600)[0]
    expected = len(list(_combos(True))) * 2 + len(list(_combos(False))) * 3
    assert len(results) == expected
    crashed = {k: v for k, v in results.items() if v[0] == "crashed"}
    assert not crashed, crashed
    assert all(v[1] for v in results.values() if v[0] == "ran"), "a step gave a non-finite loss"
    refused = {k: v for k, v in results.items() if v[0] == "refused"}
    for v in refused.values():  # a refusal names the field and the fix
        assert v[1].startswith(("model.", "optim.", "parallel.")) and v[2], v
    # every combination of the matrix runs, ViT offload with the overlapped reduction included
    assert not refused and sum(v[0] == "ran" for v in results.values()) == expected
