"""The memory model (training/memory.py): parameter counts, monotonic growth, the recompute choice
of ``auto``, and its predictions against peaks measured on an H200."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_eagle.config import ParallelConfig, preset_model_config
from megatron_eagle.training.memory import GIB, estimate, param_counts, resolve_recompute, static_bytes
from megatron_eagle.training.optimizer import OptimConfig


def _cfg(preset="eagle2.5-2b"):
    c = preset_model_config(preset)
    c.params_dtype = "bfloat16"
    return c


def test_param_counts_of_the_presets():
    # eagle2.5-2b: 1.96 B parameters (SigLIP-so400m + connector + Qwen2.5-1.5B, tied embeddings)
    assert sum(param_counts(_cfg()).values()) == 1_966_490_864
    assert param_counts(_cfg())["vision"] == 413_327_088
    big = param_counts(_cfg("eagle2.5-8b"))  # Qwen2.5-7B's shapes; its ViT depends on the preset's tower
    assert big["llm"] == 7_615_616_512 and abs(sum(big.values()) / 8.058e9 - 1) < 1e-3
    tp2 = param_counts(_cfg(), ParallelConfig(tp=2))
    assert sum(tp2.values()) < 0.55 * sum(param_counts(_cfg()).values())


def test_static_terms_by_precision_and_sharding():
    c = _cfg()
    n = sum(param_counts(c).values())
    s = static_bytes(c, ParallelConfig(), OptimConfig())
    assert (s["params"], s["grads"], s["optimizer"]) == (2 * n, 4 * n, 12 * n)
    s = static_bytes(c, ParallelConfig(), OptimConfig(grad_reduce_in_fp32=False), dp=4)
    assert (s["grads"], s["optimizer"]) == (2 * n, 3 * n)
    frozen = dataclasses.replace(c, freeze=dataclasses.replace(c.freeze, vision=True))
    s = static_bytes(frozen, ParallelConfig(), OptimConfig())
    assert s["params"] == 2 * n and s["grads"] == 4 * (n - param_counts(c)["vision"])


@pytest.mark.parametrize("rv,rl", [("none", "none"), ("full", "none"), ("none", "full"), ("full", "full"),
                                   ("selective", "selective")])
def test_predictions_grow_monotonically_with_length_and_tiles(rv, rl):
    c = _cfg()
    kw = dict(recompute_vision=rv, recompute_llm=rl)
    by_len = [estimate(c, ParallelConfig(), OptimConfig(), L, **kw).total for L in (2048, 4096, 8192, 32768, 65536)]
    assert all(a < b for a, b in zip(by_len, by_len[1:])), by_len
    by_tiles = [estimate(c, ParallelConfig(), OptimConfig(), 32768, t, **kw).total for t in (0, 10, 60, 128)]
    assert all(a < b for a, b in zip(by_tiles, by_tiles[1:])), by_tiles


def test_recompute_and_offload_and_parallelism_save_memory():
    c = _cfg()
    est = lambda **k: estimate(c, k.pop("par", ParallelConfig()), OptimConfig(), 32768, 116, **k).total  # noqa: E731
    none = est(recompute_vision="none", recompute_llm="none")
    assert est(recompute_vision="full", recompute_llm="none") < none
    assert est(recompute_vision="none", recompute_llm="full") < none
    assert est(recompute_vision="full", recompute_llm="full") < est(recompute_vision="full", recompute_llm="none")
    assert est(recompute_vision="none", recompute_llm="none", offload_vit=True) < none
    assert est(recompute_vision="none", recompute_llm="full", llm_recompute_layers=14) < none
    assert est(recompute_vision="none", recompute_llm="none", par=ParallelConfig(cp=2)) < none
    with pytest.raises(ValueError, match="resolve"):
        estimate(c, ParallelConfig(), OptimConfig(), 8192)  # the preset's recompute is auto


# (L, tiles of the largest pack, recompute vision, llm, measured peak GiB) on one H200/H100, eagle2.5-2b,
# benchmarks/train_throughput.py (BENCHMARKS.md, hf-strong comparison rows)
MEASURED = [(8192, 27, "none", "none", 74.9), (32768, 116, "full", "full", 48.5), (65536, 232, "full", "full", 63.1),
            (32768, 116, "full", "selective", 109.0)]


@pytest.mark.parametrize("L,tiles,rv,rl,gib", MEASURED)
def test_predictions_match_measured_peaks_within_10_percent(L, tiles, rv, rl, gib):
    e = estimate(_cfg(), ParallelConfig(), OptimConfig(), L, tiles, recompute_vision=rv, recompute_llm=rl)
    assert abs(e.total / GIB / gib - 1) < 0.10, e.table()


def test_auto_picks_the_cheapest_setting_that_fits():
    c = _cfg()
    h200, h100 = 139.8 * GIB, 79.18 * GIB
    pick = lambda L, cap, cfg=c: (lambda e: (e.recompute_vision, e.recompute_llm))(  # noqa: E731
        resolve_recompute(cfg, ParallelConfig(), OptimConfig(), L, cap))
    assert pick(8192, h200) == ("none", "none")
    assert pick(32768, h200) == ("full", "none")
    assert pick(65536, h200) == ("full", "full")
    assert pick(32768, h100) == ("full", "full")
    assert pick(65536, None) == ("none", "none")  # no GPU: nothing to fit
    fixed = dataclasses.replace(c, recompute_llm="none")  # an explicit setting is kept
    assert pick(32768, h100, fixed) == ("full", "none")
    for L in (8192, 32768, 65536):  # what auto picks fits with the margin, on both cards
        for cap in (h200, h100):
            assert resolve_recompute(c, ParallelConfig(), OptimConfig(), L, cap).total <= 0.9 * cap


def test_plan_memory_and_train_dry_run_print_the_breakdown(capsys):
    from pathlib import Path

    from megatron_eagle.cli import main

    assert main(["plan", "--memory", "eagle2.5-2b", "--seq-len", "32768", "--gpu-gib", "139.8"]) == 0
    out = capsys.readouterr().out
    assert "auto picks: vision full, llm none" in out and "GPU 139.8 GiB" in out
    for term in ("params", "grads", "optimizer", "activations:vit", "activations:llm", "transient", "predicted peak"):
        assert term in out, term
    assert main(["plan", "--memory", "eagle2.5-2b", "--seq-len", "65536"]) == 0  # an H100 80GB by default
    assert "auto picks: vision full, llm full" in capsys.readouterr().out
    assert main(["plan", "--memory", "eagle2.5-2b"]) == 2  # no length: refused, naming the flag
    assert "--seq-len" in capsys.readouterr().out
    run_yaml = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "run.yaml"
    assert main(["train", "--config", str(run_yaml), "--dry-run", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("auto picks") == 2 and "stage connector: L=512" in out and "stage full: L=1024 TP=2" in out


def test_max_llm_layers_is_the_most_that_fits():
    from megatron_eagle.training.memory import max_llm_layers

    c = _cfg("eagle2.5-8b")
    cap = 139.8 * GIB
    n = max_llm_layers(c, ParallelConfig(), OptimConfig(), 32768, cap)
    assert 0 < n < c.llm.num_layers
    at = lambda k: estimate(dataclasses.replace(c, llm=dataclasses.replace(c.llm, num_layers=k)),  # noqa: E731
                            ParallelConfig(), OptimConfig(), 32768, recompute_vision="full", recompute_llm="full").total
    assert at(n) <= 0.9 * cap < at(n + 1)
    assert max_llm_layers(c, ParallelConfig(), OptimConfig(), 8192, cap) >= n  # shorter packs: at least as many
