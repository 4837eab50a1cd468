"""The training-throughput benchmark end to end on the tiny preset, plus the pieces of
the GPU path it measures that also run on a CPU: packed GQA dispatch, the LM-head GEMM dtype,
sync-free packed RoPE, foreach grad norm/clip, and the fused-AdamW switch."""

from __future__ import annotations

import json

import pytest
import torch

from tests.dist import run_distributed


OPTIMIZATIONS_OFF = "ours+rc-vit+rc-llm+foreach-adam+no-bias-gemm+no-fused-rope"  # switches off, in one variant


def _bench(rank, world, out):
    from benchmarks.train_throughput import main

    main(["--preset", "tiny", "--seq-len", "192", "--steps", "1", "--warmup", "1", "--packs", "2",
          "--variants", "hf", "hf+nomask", "ours",
          OPTIMIZATIONS_OFF,
          "--out", str(out), "--raw-out", str(out) + ".raw", "--date", "2026-11-26"])
    return json.loads(open(out).read()), json.loads(open(str(out) + ".raw").read())


def test_benchmark_smoke_tiny(tmp_path):
    out = tmp_path / "tt.json"
    runs, raw = run_distributed(_bench, 1, out, timeout=240)[0]
    assert [r["ours_variant"] for r in runs] == ["ours", OPTIMIZATIONS_OFF]
    for r in runs:
        for key in ("device", "date", "preset", "seq_len", "ours_tokens_per_s", "hf_tokens_per_s", "ours_mfu",
                    "hf_mfu", "ours_peak_gib", "hf_peak_gib"):
            assert key in r, key
        assert r["date"] == "2026-11-26" and r["preset"] == "tiny" and r["seq_len"] == 192
        assert r["ours_status"] == r["hf_status"] == "ok", r
        assert r["ours_tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0 and r["hf_nomask_tokens_per_s"] > 0
        assert r["ours_mfu"] > 0 and r["speedup_vs_hf"] > 0
        ph = r["ours_phases_ms"]
        assert all(ph[k] is not None and ph[k] >= 0 for k in ("vit_fwd", "llm_fwd", "llm_bwd", "optimizer"))
        assert abs(sum(v for k, v in ph.items() if k != "total") - ph["total"]) < 1e-6 * max(ph["total"], 1)
    assert {r["variant"] for r in raw} == {"hf", "hf+nomask", "ours", OPTIMIZATIONS_OFF}
    for r in raw:  # same packs, random init: every side starts near ln(vocab)
        assert all(abs(x - torch.log(torch.tensor(512.0)).item()) < 1.5 for x in r["losses"]), r["losses"]


def _bench_repeat(rank, world, tmp):
    from benchmarks.train_throughput import main

    main(["--preset", "tiny", "--seq-len", "128", "--steps", "1", "--warmup", "0", "--packs", "1", "--repeat", "2",
          "--variants", "ours", "ours+no-bias-gemm", "--raw-out", f"{tmp}/raw.json", "--md-out", f"{tmp}/t.md"])
    return [r["variant"] for r in json.loads(open(f"{tmp}/raw.json").read())], open(f"{tmp}/t.md").read()


def test_benchmark_repeat_runs_round_robin_and_reports_medians(tmp_path):
    variants, md = run_distributed(_bench_repeat, 1, str(tmp_path), timeout=240)[0]
    assert variants == ["ours", "ours+no-bias-gemm", "ours", "ours+no-bias-gemm"]
    rows = [line for line in md.splitlines() if line.startswith("| ours")]
    medians = [line for line in rows if line.count("|") == 9]  # the median table's 8 columns
    assert len(rows) == 6 and len(medians) == 2 and all("| 2 |" in line for line in medians), md


def test_make_pack_is_exact_and_consistent():
    from benchmarks.train_throughput import make_pack
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
    from benchmarks.train_throughput import parse_variant

    v = parse_variant("ours+rc-vit+rc-llm-12+swiglu+foreach-adam")
    assert (v.recompute_vision, v.recompute_llm, v.recompute_llm_layers, v.swiglu, v.fused_adam) == \
        ("full", "full", 12, True, False)
    assert not parse_variant("hf+nomask").doc_mask
    assert parse_variant("ours+mb4").micro_batches == parse_variant("hf+gc+mb4").micro_batches == 4
    assert parse_variant("ours").micro_batches == 1 and not parse_variant("ours+no-flat-adam").flat_adam
    for bad in ("ours+warp-speed", "hf+rc-vit", "ours+nomask", "ours+rc-llm-x", "ours+mb0", "hf+mbx"):
        with pytest.raises(ValueError):
            parse_variant(bad)
    from benchmarks.train_throughput import HF_TOKENS, OURS_TOKENS

    for side, table in (("ours", OURS_TOKENS), ("hf", HF_TOKENS)):
        for token, (field, value) in table.items():  # every token sets the field it names
            assert getattr(parse_variant(f"{side}+{token}"), field) == value, token


def test_gpu_idle_finds_the_gaps_between_kernels():
    from types import SimpleNamespace

    from benchmarks.train_throughput import gpu_idle

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


# ----------------------------------------------------------------------------- GPU-path pieces on CPU

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


def _chunk_ce_cases(rank, world):
    import torch.nn.functional as F

    from megatron_eagle.models import loss
    from megatron_eagle.runtime.distributed import init_model_parallel

    init_model_parallel()
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(64, 32, generator=g), torch.randn(100, 32, generator=g) * 0.3
    y = torch.randint(0, 100, (64,), generator=g)
    hb, wb = h.bfloat16(), w.bfloat16()
    out = dict(ref=F.cross_entropy(h.double() @ w.double().t(), y, reduction="none"),
               fp32=loss._chunk_ce(h, w, y), bf16=loss._chunk_ce(hb, wb, y),
               bf16_ref=F.cross_entropy((hb @ wb.t()).float(), y, reduction="none"))
    out["rope"] = _rope_cases()
    return out


def _rope_cases():
    """Sync-free packed RoPE against megatron's per-segment loop (needs a CP group of size 1): the
    cos/sin-once path (twice: the second call reads the cache) and, not fused, megatron's ops."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_eagle.models import rope

    installed = rope_utils._apply_rotary_pos_emb_thd  # the runtime start installed the patch
    assert isinstance(installed, rope.PackedRope)
    original = installed.original
    fused, eager = rope.PackedRope(original), rope.PackedRope(original, fused=False)
    g = torch.Generator().manual_seed(1)
    cp = ps.get_context_parallel_group()
    cases = []
    for rot_pct in (1.0, 0.5):
        emb = RotaryEmbedding(kv_channels=16, rotary_percent=rot_pct, rotary_base=10000)
        for lens in ([5, 1, 17, 9], [32], [1, 1, 1], [7, 25]):
            cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
            for dtype in (torch.float32, torch.bfloat16):
                t = torch.randn(sum(lens), 3, 16, generator=g).to(dtype)
                for max_len in (max(lens), sum(lens)):  # megatron's "exact" case when freqs cover every position
                    freqs = emb(max_len, packed_seq=True)
                    want = original(t, cu, freqs, cp_group=cp)
                    for _ in range(2):
                        cases.append((fused(t, cu, freqs, cp_group=cp), want))
                    cases.append((eager(t, cu, freqs, cp_group=cp), want))
    pos = rope.packed_positions(torch.tensor([0, 3, 4, 9], dtype=torch.int32), 9)
    return cases, pos.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_expression_equals_megatron(dtype):
    """``rope.rotate_cos_sin`` (what is torch.compile'd on GPUs) is megatron's bshd rotation op for
    op: same outputs and input gradients, with partial rotary dims and mscale."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_eagle.models import rope

    g = torch.Generator().manual_seed(0)
    for d, rot, mscale in ((16, 16, 1.0), (16, 8, 0.7)):
        t = torch.randn(11, 1, 3, d, generator=g).to(dtype).requires_grad_()
        freqs = torch.randn(11, 1, 1, rot, generator=g)
        w = torch.randn(11, 1, 3, d, generator=g).to(dtype)
        cos, sin = ((f(freqs) * mscale).to(dtype) for f in (torch.cos, torch.sin))
        out = rope.rotate_cos_sin(t, cos, sin)
        ref = rope_utils._apply_rotary_pos_emb_bshd(t, freqs, mscale=mscale)
        assert torch.equal(out, ref)
        (ga,), (gb,) = (torch.autograd.grad((o.float() * w.float()).sum(), t) for o in (out, ref))
        assert torch.equal(ga, gb)


def test_packed_cos_sin_cache_hits_and_misses():
    """cos/sin are computed once per (freqs, cu_seqlens) pair; another pack, an in-place change or
    another dtype recomputes them."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_eagle.models import rope

    packed = rope.PackedRope(rope_utils._apply_rotary_pos_emb_thd)
    freqs = torch.randn(16, 1, 1, 8)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    a = packed.cos_sin(freqs, cu, 12, torch.float32, 1.0)
    assert packed.cos_sin(freqs, cu, 12, torch.float32, 1.0)[0] is a[0]
    pos = rope.packed_positions(cu, 12)
    torch.testing.assert_close(a[0], torch.cos(freqs[pos]).reshape(12, 1, 8), rtol=0, atol=0)
    cu2 = torch.tensor([0, 5, 12], dtype=torch.int32)  # equal values, another pack
    assert packed.cos_sin(freqs, cu2, 12, torch.float32, 1.0)[0] is not a[0]
    b = packed.cos_sin(freqs, cu2, 12, torch.bfloat16, 1.0)
    assert b[0].dtype == torch.bfloat16
    freqs.mul_(2)  # in place: the version moves
    c = packed.cos_sin(freqs, cu2, 12, torch.bfloat16, 1.0)
    assert c[0] is not b[0] and not torch.equal(c[0], b[0])


def test_chunk_ce_gemm_dtype():
    """fp32 weights: the exact fp32 GEMM as before; bf16 weights: bf16 GEMM, fp32 cross-entropy."""
    r = run_distributed(_chunk_ce_cases, 1, timeout=120)[0]
    assert r["fp32"].dtype == r["bf16"].dtype == torch.float32
    torch.testing.assert_close(r["fp32"].double(), r["ref"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r["bf16"], r["bf16_ref"])
    assert float((r["bf16"].double() - r["ref"]).abs().max()) < 0.1
    cases, pos = r["rope"]
    assert pos == [0, 1, 2, 0, 0, 1, 2, 3, 4]
    for got, want in cases:
        torch.testing.assert_close(got, want, rtol=0, atol=0)


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


def _fused_vs_foreach(rank, world):
    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.models.eagle import build_model
    from megatron_eagle.runtime.distributed import init_model_parallel
    from megatron_eagle.training.optimizer import OptimConfig, build_optimizer, use_fused_adamw, wrap_ddp
    from tests.model_fixtures import mixed_pack, tiny_model_config
    from megatron.core.distributed import finalize_model_grads
    from megatron_eagle.training.step import forward_backward, guarded_optimizer_step

    out = {}
    for fused in (False, True):
        init_model_parallel(seed=7)
        cfg = tiny_model_config()
        model = build_model(cfg, ParallelConfig())
        optim = OptimConfig(lr=1e-2, fused_adam=fused)
        ddp = wrap_ddp(model, optim, bf16=False)
        ddp.config.finalize_model_grads_func = finalize_model_grads
        opt = build_optimizer([ddp], optim, bf16=False)  # on CPU the default leaves torch's foreach path
        inner = [p.optimizer for p in getattr(opt, "chained_optimizers", [opt])]
        assert all(not g.get("fused") for o in inner for g in o.param_groups)
        if fused:
            assert use_fused_adamw(opt, require_cuda=False) >= 1
            assert all(g["fused"] and not g["foreach"] for o in inner for g in o.param_groups)
        for step in range(3):
            ddp.zero_grad_buffer()
            opt.zero_grad()
            forward_backward(ddp, [mixed_pack(cfg, seed=step)], torch.device("cpu"))
            assert guarded_optimizer_step(opt, 1.0)[0]
        out[fused] = {k: v.detach().clone() for k, v in model.state_dict().items() if v is not None
                      and torch.is_tensor(v)}
    return out


def test_fused_adamw_switch_matches_foreach():
    out = run_distributed(_fused_vs_foreach, 1, timeout=240)[0]
    assert out[False].keys() == out[True].keys()
    for k in out[False]:
        torch.testing.assert_close(out[True][k], out[False][k], rtol=1e-4, atol=2e-5, msg=k)  # rounding order


def _fused_vs_unfused(rank, world):
    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.models import transformer_configs
    from megatron_eagle.models.eagle import EagleModel
    from megatron_eagle.runtime.distributed import init_model_parallel
    from tests.model_fixtures import mixed_pack, tiny_model_config

    init_model_parallel()
    cfg = tiny_model_config()
    batch = mixed_pack(cfg)
    out = {}
    for fuse in (False, True):
        transformer_configs._fuse_elementwise = lambda fuse=fuse: fuse  # what a GPU gets
        torch.manual_seed(0)
        model = EagleModel(cfg, ParallelConfig())
        vit = model.vision_model.config
        out[f"cfg{fuse}"] = (vit.bias_activation_fusion, vit.bias_dropout_fusion, vit.activation_func,
                             model.language_model.config.bias_dropout_fusion)
        loss = model(batch)
        loss = loss.sum() if loss.dim() else loss
        loss.backward()
        out[fuse] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return out


def test_fused_elementwise_path_equals_unfused():
    """The GPU default (megatron's fused bias+GELU(tanh), bias+residual add and SwiGLU) computes the
    same loss and gradients as the unfused CPU path: run both on the CPU (TorchScript) and compare."""
    import torch.nn.functional as F

    out = run_distributed(_fused_vs_unfused, 1, timeout=180)[0]
    assert out["cfgTrue"][:2] == (True, True) and out["cfgTrue"][2] is F.gelu and out["cfgTrue"][3] is False
    assert out["cfgFalse"][:2] == (False, False) and out["cfgFalse"][2] is not F.gelu
    (l0, g0), (l1, g1) = out[False], out[True]
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys() and any("vision_model" in k for k in g0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)


def _wgrad_fusion_case(rank, world, tp):
    from megatron.core.distributed import finalize_model_grads  # noqa: F401  (megatron import order)

    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.models.eagle import EagleModel
    from megatron_eagle.runtime.distributed import init_model_parallel
    from megatron_eagle.training.optimizer import OptimConfig, enable_wgrad_fusion, wrap_ddp
    from tests.model_fixtures import mixed_pack, tiny_model_config

    init_model_parallel(tp=tp)
    cfg = tiny_model_config()
    batch = mixed_pack(cfg, pad_to_multiple=tp)
    out = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = EagleModel(cfg, ParallelConfig(tp=tp, sp=tp > 1))
        ddp = wrap_ddp(model, OptimConfig(), bf16=False)
        n = enable_wgrad_fusion(model, fused)
        ddp.zero_grad_buffer()
        for _ in range(2):  # two micro-batches: the buffer accumulates
            loss = ddp(batch)
            (loss.sum() if loss.dim() else loss).backward()
        out[fused] = (n, {name: p.main_grad.clone() for name, p in model.named_parameters() if p.requires_grad})
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_wgrad_fusion_accumulates_like_ddp_hooks(tp):
    """Weight gradients written by the GEMM into main_grad (gradient_accumulation_fusion with the
    torch-native stand-in for apex) equal DDP's separate accumulation, over two micro-batches,
    with TP and sequence parallelism."""
    out = run_distributed(_wgrad_fusion_case, tp, tp, timeout=240)
    for r in out:
        (n0, g0), (n1, g1) = r[False], r[True]
        assert n1 == n0 > 0
        assert g0.keys() == g1.keys()
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)
        assert any(float(g.abs().sum()) > 0 for k, g in g1.items() if "linear_fc1.weight" in k)


def test_context_parallel_benchmark_smoke(tmp_path):
    """benchmarks/context_parallel.py end to end on 2 gloo processes: CP=1 and two CP variants, the
    attention check and the attention-alone benchmark, with the FLOP-normalised columns."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "cp.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "context_parallel.py"
    cmd = [sys.executable, str(script), "--nproc", "2", "--preset", "tiny", "--seq-len", "512",
           "--steps", "1", "--warmup", "0", "--variants", "cp1", "ring", "allgather", "--check", "--attn-bench",
           "--attn-seq-len", "256", "--out", str(out), "--md-out", str(tmp_path / "cp.md"), "--date", "2026-11-26"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = json.loads(out.read_text())
    assert [x["config"] for x in recs] == ["cp1", "ring", "allgather"] and all(x["status"] == "ok" for x in recs)
    assert all(x["tflops_per_gpu"] > 0 and x["model_flops_per_token"] > 0 for x in recs)
    assert len({round(x["first_loss"], 4) for x in recs}) == 1  # same pack, same weights: same loss
    check, attn = recs[1]["check"], recs[1]["attention"][0]
    assert max(v for k in ("ring", "allgather", "ulysses") for v in check[k].values()) < 1e-4  # fp32 CPU path
    assert attn["seq_len"] == 256 and {"ring", "allgather", "ulysses"} <= set(attn)
    assert all(attn[v]["efficiency"] > 0 for v in ("ring", "allgather", "ulysses"))
    table = (tmp_path / "cp.md").read_text()
    assert "FLOP/s vs CP=1 @ shortest" in table and "efficiency vs 1-GPU flash" in table
