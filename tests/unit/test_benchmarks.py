"""Every benchmark in ``benchmarks/`` on a CPU: the training-throughput benchmark on the tiny
preset (in process, and as a script through torchrun), context parallelism on 2 gloo processes,
the CPU-capable scripts on tiny inputs, the GPU-only ones up to their device check, and the sweep
scripts' syntax and variant names. Every JSON record carries ``commit`` and ``config``."""

from __future__ import annotations

import pytest
import torch

from tests.bench_fixtures import BENCH, SCRIPTS


def test_make_pack_is_exact_and_consistent():
    from benchmarks.train.packs import make_pack
    from megatron_eagle.config import preset_model_config

    for preset, seq in (("tiny", 256), ("eagle2.5-2b", 8192), ("eagle2.5-2b", 32768)):
        cfg = preset_model_config(preset)
        for seed in range(3):
            p = make_pack(cfg, seq, seed)
            b = p.batch
            assert b.num_tokens == seq == sum(p.lens) and b.cu_seqlens[-1] == seq
            assert [int(x) for x in b.cu_seqlens[1:] - b.cu_seqlens[:-1]] == p.lens
            assert int((b.tokens == cfg.image_token_id).sum()) == p.tiles * cfg.tokens_per_tile
            assert b.pixel_values.shape[0] == p.tiles
            assert 0 < p.supervised < seq and not bool((b.labels == cfg.image_token_id).any())
            assert abs(float(b.loss_weights.sum()) - 1.0) < 1e-4


def test_parse_variant():
    from benchmarks.train.variants import HF_TOKENS, OURS_TOKENS, parse_variant

    v = parse_variant("ours+rc-vit+rc-llm-12+swiglu+no-flat-adam")
    assert (v.recompute_vision, v.recompute_llm, v.recompute_llm_layers, v.swiglu, v.flat_adam) == \
        ("full", "full", 12, True, False)
    assert not parse_variant("hf+nomask").doc_mask
    assert parse_variant("ours+mb4").micro_batches == parse_variant("hf+gc+mb4").micro_batches == 4
    assert parse_variant("ours").micro_batches == 1 and not parse_variant("ours+no-flat-adam").flat_adam
    for bad in ("ours+warp-speed", "hf+rc-vit", "ours+nomask", "ours+rc-llm-x", "ours+mb0", "hf+mbx",
                "ours+foreach-adam", "ours+no-bias-gemm", "ours+overlap-grad"):
        with pytest.raises(ValueError):
            parse_variant(bad)
    for side, table in (("ours", OURS_TOKENS), ("hf", HF_TOKENS)):
        for token, (field, value) in table.items():  # every token sets the field it names
            v = parse_variant(f"{side}+{token}")
            assert getattr(v, field) == value and v.options()[field] == value, token
    assert set(parse_variant("hf").options()) == {"side", "micro_batches", "doc_mask", "grad_ckpt"}
    assert "doc_mask" not in parse_variant("ours").options()


def test_parse_hf_strong_variant():
    from benchmarks.train.variants import STRONG_TOKENS, baseline_label, parse_variant

    v = parse_variant("hf-strong+fp32-master+gc+flce+mb2")
    assert (v.side, v.master_fp32, v.grad_ckpt, v.fused_linear_ce, v.micro_batches) == ("hf-strong", True, True,
                                                                                         True, 2)
    assert set(v.options()) == {"side", "micro_batches", "grad_ckpt", "master_fp32", "fused_linear_ce"}
    for token, (field, value) in STRONG_TOKENS.items():
        assert getattr(parse_variant(f"hf-strong+{token}"), field) == value
    for bad in ("hf-strong+nomask", "hf-strong+rc-vit", "hf-weak"):
        with pytest.raises(ValueError):
            parse_variant(bad)
    assert "master_fp32" not in parse_variant("ours").options() and "master_fp32" not in parse_variant("hf").options()
    assert (baseline_label("hf"), baseline_label("hf-strong")) == ("hf-naive", "hf-strong")


def test_gpu_idle_finds_the_gaps_between_kernels():
    from types import SimpleNamespace

    from benchmarks.train.timing import gpu_idle

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, a, b, dev=cuda):  # times in us, as the profiler reports them
        return SimpleNamespace(name=name, device_type=dev, time_range=SimpleNamespace(start=a, end=b))

    events = [ev("k0", 0, 100), ev("k1", 90, 300),  # overlapping kernels: no gap
              ev("host op", 300, 5000, cpu),  # host events do not count
              ev("k2", 310, 400),  # a 10 us gap: under the 20 us threshold
              ev("## annotation ##", 400, 900), ev("k3", 900, 1000)]  # 500 us gap (annotations skipped)
    idle = gpu_idle(SimpleNamespace(events=lambda: events))
    assert idle["gaps"] == 1 and idle["span_ms"] == pytest.approx(1.0)
    assert idle["idle_ms"] == pytest.approx(0.5)
    assert idle["largest"][0][:4] == (0.5, 0.4, "k2", "k3")
    assert idle["idle_by_tenth_ms"][4] == pytest.approx(0.5) and sum(idle["idle_by_tenth_ms"]) == pytest.approx(0.5)
    assert gpu_idle(SimpleNamespace(events=lambda: [ev("host", 0, 1, cpu)])) == {}


# script -> (arguments, exit status, text in its output, JSON it writes or None); GPU-only scripts
# run up to their device check


def test_every_benchmark_has_a_smoke_test():
    smoked = set(SCRIPTS) | {"train_throughput.py", "context_parallel.py", "records.py", "__init__.py"}
    assert {p.name for p in BENCH.glob("*.py")} == smoked
    assert {p.name for p in BENCH.glob("*.sh")} == {"ab_checkouts.sh", "context_parallel_sweep.sh",
                                                     "gpu_train_smoke.sh", "train_throughput_sweep.sh"}


def test_hf_strong_packed_attention_equals_each_subsample_alone():
    """hf-strong's LLM over a pack (varlen attention over cu_seqlens, no mask built) gives the hidden
    states of running every sub-sample alone with SDPA."""
    from benchmarks.train.hf_strong import ATTN_NAME, HFStrongSide
    from benchmarks.train.packs import make_pack
    from benchmarks.train.variants import parse_variant
    from megatron_eagle.config import preset_model_config

    cfg = preset_model_config("tiny")
    side = HFStrongSide(cfg, parse_variant("hf-strong"), torch.device("cpu"))
    pack = next(p for p in (make_pack(cfg, 384, s) for s in range(10)) if len(p.lens) >= 3)
    b, lm = pack.batch, side.ref.language_model
    with torch.no_grad():
        emb = side.ref.input_embeds(b.tokens, b.pixel_values)
        cu = b.cu_seqlens.to(torch.int32)
        packed = lm.model(inputs_embeds=emb, position_ids=b.position_ids.unsqueeze(0), use_cache=False,
                          attention_mask={"full_attention": None}, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                          max_length_q=max(pack.lens), max_length_k=max(pack.lens)).last_hidden_state[0]
        lm.config._attn_implementation = "sdpa"
        alone = torch.cat([lm.model(inputs_embeds=emb[:, a:z], use_cache=False).last_hidden_state[0]
                           for a, z in zip(cu[:-1].tolist(), cu[1:].tolist())])
    lm.config._attn_implementation = ATTN_NAME
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    side.close()


def test_scale_projection_fit_and_projection():
    """The cost-model fit recovers known per-pack costs (held-out error ~0), and with the same cost
    model on both stacks the balanced packer's straggler is no slower than the Eagle 2 knapsack's."""
    import argparse
    import sys

    import numpy as np

    sys.path.insert(0, str(BENCH))
    from scale_projection import fit, project

    rng = np.random.default_rng(0)
    true = np.array([0.05, 2e-5, 1e-12, 3e-3])  # s, s/token, s/len^2, s/tile
    samples = []
    for stack in ("hf-strong", "ours"):
        for _ in range(12):
            lens = rng.integers(100, 8000, rng.integers(2, 9)).tolist()
            tiles = int(rng.integers(0, 100))
            a = np.asarray(lens, float)
            t = float(true @ [1, a.sum(), (a * a).sum(), tiles]) * (1.3 if stack == "hf-strong" else 1.0)
            samples.append(dict(stack=stack, lens=lens, tiles=tiles, seconds=t, status="ok"))
    fits = fit(samples)
    assert set(fits) == {"hf-strong", "ours"}
    assert all(f["heldout_mean_abs_err"] < 1e-3 and f["n"] == 12 for f in fits.values()), fits
    args = argparse.Namespace(preset="eagle2.5-2b", seq_lens=[32768], project_samples=40000, seed=0, bus_gbs=1e9,
                              cost_model="eagle2.5-2b")
    rows = project(args, fits)  # (almost) free all-reduce: the stack's 1.3x and the packers' imbalance
    ours = {r["dp"]: r for r in rows if r["stack"] == "ours"}
    hf = {r["dp"]: r for r in rows if r["stack"] == "hf-strong"}
    assert set(ours) == set(hf) == {64, 256, 512} and all(r["planner"] == "balanced" for r in ours.values())
    for dp in ours:
        assert ours[dp]["imbalance"] <= hf[dp]["imbalance"] and ours[dp]["speedup_vs_hf_strong"] >= 1.3, (ours, hf)
    args.bus_gbs = 50.0  # the same all-reduce on both sides dilutes the speedup
    slow = {r["dp"]: r for r in project(args, fits) if r["stack"] == "ours"}
    assert all(1.0 < slow[dp]["speedup_vs_hf_strong"] < ours[dp]["speedup_vs_hf_strong"] for dp in ours)
    assert all(r["allreduce_s"] > 0 and r["tokens_per_s_per_gpu"] > 0 for r in slow.values())
