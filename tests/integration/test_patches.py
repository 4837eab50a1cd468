"""The library's patches of megatron-core and torch: importing patches nothing, ``install_all`` installs
every one, each target exists, and an unsupported megatron-core version is refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Every attribute a patch may replace. Listed here, not taken from the patch modules, so the values
# are read before anything of megatron_eagle is imported; the test checks the list covers TARGETS.
WATCHED = [
    "megatron.core.models.common.embeddings.rope_utils:_apply_rotary_pos_emb_thd",
    "megatron.core.models.common.embeddings.rope_utils:_apply_rotary_pos_emb_bshd",
    "megatron.core.transformer.attention:SplitAlongDim",
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._set_main_param_and_optimizer_states",
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict",
    "megatron.core.utils:local_multi_tensor_l2_norm",
    "megatron.core.utils:local_multi_tensor_scale",
    "megatron.core.optimizer.clip_grads:l2_norm_impl",
    "megatron.core.optimizer.clip_grads:multi_tensor_scale_impl",
    "megatron.core.optimizer.optimizer:multi_tensor_scale_impl",
    "megatron.core.tensor_parallel.layers:_grad_accum_fusion_available",
    "megatron.core.tensor_parallel.layers:LinearWithGradAccumulationAndAsyncCommunication",
    "megatron.core.tensor_parallel.random:_set_cuda_rng_state",
    "megatron.core.tensor_parallel.random:_get_cuda_rng_state",
    "torch:Tensor.cuda",
    "torch:Tensor.type",
] + [f"torch.cuda:{n}" for n in (
    "current_device", "device_count", "set_device", "synchronize", "empty_cache", "Stream", "Event", "current_stream",
    "default_stream", "stream", "get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all", "memory_allocated",
    "max_memory_allocated", "memory_reserved", "max_memory_reserved", "reset_peak_memory_stats", "memory_stats",
    "is_current_stream_capturing")] + ["torch.cuda.random:get_rng_state", "torch.cuda.random:set_rng_state"]

# Runs in a fresh interpreter: record every watched attribute, import every module of megatron_eagle
# (optionally install the patches), report which attributes changed.
_PROBE = r"""
import importlib, json, os, pkgutil, sys, warnings
warnings.simplefilter("ignore")
import torch

def resolve(target):
    module, _, path = target.partition(":")
    owner = importlib.import_module(module)
    *parents, attr = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    return owner, attr

watched = json.loads(sys.argv[1])
before = {t: getattr(*resolve(t)) for t in watched}
modes = len(torch.overrides._get_current_function_mode_stack())
import megatron_eagle
names = sorted(m.name for m in pkgutil.walk_packages(megatron_eagle.__path__, "megatron_eagle."))
for name in names:
    importlib.import_module(name)
if os.environ.get("PROBE_INSTALL"):
    from megatron_eagle.patches import install_all
    install_all()
    install_all()  # idempotent
changed = [t for t in watched if getattr(*resolve(t)) is not before[t]]
from megatron_eagle import patches
declared = sorted({t for p in patches.PATCHES for t in p.TARGETS})
print(json.dumps({"modules": names, "changed": changed, "declared": declared,
                  "shim": "fused_weight_gradient_mlp_cuda" in sys.modules,
                  "modes": len(torch.overrides._get_current_function_mode_stack()) - modes}))
"""


def _probe(install: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("PROBE_INSTALL", None)
    if install:
        env["PROBE_INSTALL"] = "1"
    r = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(WATCHED)], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def imported_only() -> dict:
    return _probe(install=False)


def test_importing_every_module_patches_nothing(imported_only):
    r = imported_only
    assert len(r["modules"]) > 50 and "megatron_eagle.patches.rope_thd" in r["modules"]
    assert r["changed"] == [], f"importing megatron_eagle replaced {r['changed']}"
    assert not r["shim"] and r["modes"] == 0
    assert set(r["declared"]) <= set(WATCHED), sorted(set(r["declared"]) - set(WATCHED))


def test_install_all_replaces_the_targets_once():
    """The probe sees a patch when there is one: install_all changes the watched attributes."""
    import torch

    r = _probe(install=True)
    changed = set(r["changed"])
    for target in ("megatron.core.models.common.embeddings.rope_utils:_apply_rotary_pos_emb_thd",
                   "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict",
                   "megatron.core.optimizer.clip_grads:l2_norm_impl",
                   "megatron.core.transformer.attention:SplitAlongDim"):  # no transformer-engine here
        assert target in changed, target
    assert r["shim"]
    if not torch.cuda.is_available():
        assert "torch.cuda:current_device" in changed and r["modes"] == 1  # the CPU bridge, entered once
