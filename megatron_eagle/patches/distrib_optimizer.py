"""Two fixes to megatron-core's ``DistributedOptimizer`` when it steps torch's AdamW.

Without apex/transformer-engine, megatron falls back to ``torch.optim.AdamW`` whose state
has a per-parameter ``step`` tensor:
1. The ``fully_reshardable`` DistributedOptimizer load skips ``step`` (restored from the
   param groups later) but then copies *every* destination key, raising ``KeyError: 'step'``.
   Here only the keys the checkpoint provides are copied.
2. ``load_state_dict`` gives every parameter the *same* ``step`` tensor; AdamW increments
   each parameter's step in place, so after a resume the shared counter advanced once per
   parameter per step and the bias correction went wrong (found by the resume-equality test).
   Here each parameter gets its own copy.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_eagle.patches.targets import require

TARGETS = ("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._set_main_param_and_optimizer_states",
           "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict")


_ORIGINAL_SET_STATES = DistributedOptimizer._set_main_param_and_optimizer_states
_ORIGINAL_LOAD = DistributedOptimizer.load_state_dict


def _set_main_param_and_optimizer_states(self, model_param, tensors):
    if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return _ORIGINAL_SET_STATES(self, model_param, tensors)
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    dst = {"param": main_param, **self.optimizer.state[main_param]}
    for key, value in tensors.items():
        dst[key].copy_(value)


def _load_state_dict(self, state_dict):
    _ORIGINAL_LOAD(self, state_dict)
    for state in self.optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def check() -> None:
    require(*TARGETS)


def install() -> None:
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    DistributedOptimizer.load_state_dict = _load_state_dict
