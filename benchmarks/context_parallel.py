#!/usr/bin/env python
"""Context parallelism: tokens/s and peak memory per CP variant against CP=1.

For each packed length (default 32K, 64K, 128K) and each configuration on the same N GPUs:

- ``cp1``: CP=1, the N GPUs data-parallel (one pack of L tokens per GPU per step) — the baseline,
  recorded as ``oom`` where a pack of L does not fit one GPU;
- ``ring``, ``allgather``, ``ulysses``, ``hybrid`` (U = ``--hybrid-ulysses``, default N/2): CP=N, one
  pack of L tokens per step over the N GPUs.

Every configuration is one ``torchrun`` launch (an out-of-memory rank ends only its launch) doing
the trainer's step: megatron DDP + DistributedOptimizer built by the trainer's setup
(``training.setup.build_training_state``), ``training.step.forward_backward``, guarded AdamW
step, bf16, full LLM and ViT recompute by default (``--recompute``). Packs are
long-context mixes: one long video (~70% of the pack, 256+6 tokens per frame) plus images and text.
All configurations see the same first pack and initial weights, so the first-step losses
should agree (bf16 round-off) — printed as a cross-check. ``--check`` first compares each CP
variant's attention (flash kernels, NCCL) with single-GPU attention on this machine. Each JSON
record names its ``variant``, the ``commit`` of the checkout and the resolved options as ``config``.

    # 2 GPUs, everything (one run; ~10-20 min); 4 GPUs: --nproc 4
    python benchmarks/context_parallel.py --nproc 2 --check --out benchmarks/results/context_parallel.json \\
        --md-out benchmarks/results/context_parallel_2gpu.md
    # a subset (e.g. to fit a 10-minute window), appending to the same JSON
    python benchmarks/context_parallel.py --nproc 4 --seq-len 131072 --variants cp1 allgather ring \\
        --out benchmarks/results/context_parallel.json
    # CPU smoke test (gloo)
    python benchmarks/context_parallel.py --nproc 2 --preset tiny --seq-len 1024 --steps 1 --warmup 0
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.records import append_json, git_commit  # noqa: E402
from benchmarks.train.timing import median_seconds  # noqa: E402

CONFIGS = ("cp1", "ring", "allgather", "ulysses", "hybrid")
IGNORE = -100


# ----------------------------------------------------------------------------- packs

def long_pack(cfg, seq_len: int, seed: int, video_share: float = 0.7):
    """Exactly ``seq_len`` tokens: one long video (frames of tokens_per_tile + 6 wrapper tokens), then
    images (1-7 tiles) and text samples; only answers (40% of each sample's text) are supervised."""
    from megatron_eagle.batch import pack_samples

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    tpt, img, vocab, size = cfg.tokens_per_tile, cfg.image_token_id, cfg.llm.vocab_size, cfg.vision.image_size

    def ids(n: int) -> torch.Tensor:
        x = torch.randint(10, vocab, (n,), generator=g)
        return torch.where(x == img, x + 1, x)

    samples, pixels, remaining, first = [], [], seq_len, True
    while remaining > 0:
        text = min(remaining, max(16, int(rng.lognormvariate(math.log(300 * tpt / 256), 0.8))))
        if first:  # the long video: frames of one tile, 6 wrapper tokens each
            video, n = True, max(1, int(video_share * seq_len) // (tpt + 6))
        else:  # an image of 1-7 tiles (2 wrapper tokens) or text only
            video, n = False, (rng.randint(1, 7) if rng.random() < 0.5 else 0)
        visual = (lambda m: m * (tpt + 6) if video else (m * tpt + 2 if m else 0))  # noqa: E731
        while n and visual(n) + text > remaining:
            n -= 1
        if remaining - visual(n) - text < 32:  # too little left for another sample: fill the pack
            text = remaining - visual(n)
        first = False
        prompt = text * 6 // 10
        parts = [ids(prompt)]
        if video:
            for _ in range(n):
                parts += [ids(5), torch.full((tpt,), img), ids(1)]
        elif n:
            parts += [ids(1), torch.full((n * tpt,), img), ids(1)]
        parts.append(ids(text - prompt))
        x = torch.cat(parts)
        lab = torch.full_like(x, IGNORE)
        if text - prompt:
            lab[-(text - prompt):] = x[-(text - prompt):]
        samples.append((x, lab))
        pixels.append(torch.randn(n, 3, size, size, generator=g))
        remaining -= x.numel()
    batch = pack_samples(samples, pixels, (3, size, size))
    assert batch.num_tokens == seq_len, (batch.num_tokens, seq_len)
    return batch


# ----------------------------------------------------------------------------- GPU checks

def check_cp_attention(world: int, device: torch.device, hybrid_u: int) -> dict:
    """Each CP variant (flash blocks, NCCL) vs single-GPU packed attention: relative L2 errors (bf16)."""
    import torch.distributed as dist

    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.kernels.dispatch import AttentionKernels
    from megatron_eagle.parallel.cp_attention import cp_attention
    from megatron_eagle.parallel.cp_split import split_batch
    from megatron_eagle.parallel.groups import build_cp_context
    from megatron_eagle.runtime.distributed import init_model_parallel
    from megatron_eagle.batch import pack_samples

    init_model_parallel(1, 1, world)
    kernels = AttentionKernels()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hq, hk, d = 12, 2, 128
    lens = [4097, 1, 300, 12000, 77, 2]  # 1-token, odd and long sub-samples
    if device.type != "cuda":  # the exact CPU path materialises each sub-sample's scores
        lens = [257, 1, 30, 700, 7, 2]
    batch = pack_samples([(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)) for n in lens], [],
                         (3, 1, 1)).to(device)
    T = batch.num_tokens
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, h, d, generator=g).to(device, dtype) for h in (hq, hk, hk))
    w = torch.randn(T, hq, d, generator=g).to(device, dtype)
    scale = d ** -0.5
    cu = batch.cu_seqlens.to(device)
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = kernels.varlen(*ref_in, cu, cu, batch.max_seqlen, batch.max_seqlen, True, scale)
    (ref.float() * w.float()).sum().backward()
    out = {"kernel": kernels.flash.status()}
    for variant in ("ring", "allgather", "ulysses", "hybrid"):
        if variant == "hybrid" and not (1 < hybrid_u < world):
            continue
        par = ParallelConfig(cp=world, cp_variant=variant, cp_ulysses=hybrid_u if variant == "hybrid" else 0)
        layout = split_batch(batch, build_cp_context(par, hq))
        Tp = int(layout.cu_global[-1])
        leaves = []
        for x in (q, k, v):
            p = torch.zeros(Tp, *x.shape[1:], device=device, dtype=dtype)
            p[layout.dst] = x
            leaves.append(p.requires_grad_())
        wp = torch.zeros(Tp, hq, d, device=device, dtype=dtype)
        wp[layout.dst] = w
        o = cp_attention(*(x[layout.positions] for x in leaves), layout, scale, kernels)
        (o.float() * wp[layout.positions].float()).sum().backward()
        full = layout.gather_full(o.detach())
        rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
        res = {"out": rel(full, ref.detach())}
        for name, leaf, r in zip(("dq", "dk", "dv"), leaves, ref_in):
            grad = leaf.grad.float()
            dist.all_reduce(grad, group=layout.ctx.group)
            res[name] = rel(grad[layout.dst], r.grad)
        out[variant] = {k2: float(f"{v2:.3g}") for k2, v2 in res.items()}
    out["kernel_after"] = kernels.flash.status()
    return out


def bench_cp_attention(world: int, device: torch.device, preset: str, seq_lens: list[int], hybrid_u: int,
                       iters: int = 5, warmup: int = 2) -> list[dict]:
    """Attention alone (forward + backward) on one causal sequence of L tokens: single-GPU flash on
    all L tokens vs each CP variant over ``world`` GPUs, with the preset's LLM head shapes.

    efficiency = t_flash(L) / world / t_cp(L): the CP kernel's per-GPU throughput relative to
    single-GPU flash on the whole sequence (ring-flash-attention's "theoretic flash_attn")."""
    import torch.distributed as dist

    from megatron_eagle.config import ParallelConfig, preset_model_config
    from megatron_eagle.batch import pack_samples
    from megatron_eagle.kernels.dispatch import AttentionKernels
    from megatron_eagle.parallel.cp_attention import cp_attention
    from megatron_eagle.parallel.cp_split import split_batch
    from megatron_eagle.parallel.groups import build_cp_context
    from megatron_eagle.runtime.distributed import init_model_parallel

    init_model_parallel(1, 1, world)
    kernels = AttentionKernels()
    llm = preset_model_config(preset).llm
    hq, hk, d = llm.num_heads, llm.num_kv_heads, llm.hidden_size // llm.num_heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scale = d ** -0.5
    out = []
    for L in seq_lens:
        batch = pack_samples([(torch.zeros(L, dtype=torch.long), torch.zeros(L, dtype=torch.long))], [],
                             (3, 1, 1)).to(device)
        cu = batch.cu_seqlens
        q, k, v = (torch.randn(L, h, d, device=device, dtype=dtype).requires_grad_() for h in (hq, hk, hk))
        dout = torch.randn(L, hq, d, device=device, dtype=dtype)

        def flash():
            kernels.varlen(q, k, v, cu, cu, L, L, True, scale).backward(dout)

        flops = 7.0 * L * L * hq * d  # causal: 2·L²·h·d forward, 2.5x that backward
        t1 = median_seconds(flash, iters, warmup, device)
        rec = {"seq_len": L, "heads": [hq, hk, d], "flash_1gpu_s": t1, "flash_1gpu_tflops": flops / t1 / 1e12,
               "kernel": kernels.flash.status()}
        q.grad = k.grad = v.grad = None
        for variant in ("ring", "allgather", "ulysses", "hybrid"):
            if variant == "hybrid" and not (1 < hybrid_u < world):
                continue
            par = ParallelConfig(cp=world, cp_variant=variant, cp_ulysses=hybrid_u if variant == "hybrid" else 0)
            layout = split_batch(batch, build_cp_context(par, hq))
            n = layout.num_local
            ql, kl, vl = (torch.randn(n, h, d, device=device, dtype=dtype).requires_grad_() for h in (hq, hk, hk))
            dl = torch.randn(n, hq, d, device=device, dtype=dtype)

            def run_cp():
                dist.barrier(group=layout.ctx.group)
                cp_attention(ql, kl, vl, layout, scale, kernels).backward(dl)

            t = torch.tensor([median_seconds(run_cp, iters, warmup, device)], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            tc = float(t[0])
            rec[variant] = {"s": tc, "tflops_per_gpu": flops / world / tc / 1e12,
                            "efficiency": t1 / world / tc, "layout": f"U{layout.ctx.ulysses}xR{layout.ctx.ring}"}
            del ql, kl, vl, dl, layout
        out.append(rec)
        del q, k, v, dout
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- one configuration

def worker(args) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_eagle.config import FreezeConfig, ParallelConfig, preset_model_config
    from megatron_eagle.runtime.distributed import init_distributed, init_model_parallel, shutdown
    from megatron_eagle.training.flops import step_flops
    from megatron_eagle.training.optimizer import OptimConfig
    from megatron_eagle.training.setup import build_training_state
    from megatron_eagle.training.step import forward_backward, guarded_optimizer_step

    rt = init_distributed()
    cuda = rt.device.type == "cuda"
    rec = dict(variant=args.config, seq_len=args.seq_len[0], preset=args.preset, world=rt.world_size,
               torch=torch.__version__, device=(f"{rt.world_size}x {torch.cuda.get_device_name(rt.device)}"
                                                if cuda else f"{rt.world_size}x cpu"))
    try:
        if cuda and args.mem_cap_gib:  # emulate a smaller card (an 80 GB H100 on an H200)
            total = torch.cuda.get_device_properties(rt.device).total_memory / 2 ** 30
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib / total), rt.device)
            rec["mem_cap_gib"] = args.mem_cap_gib
        if args.check:
            rec["check"] = check_cp_attention(rt.world_size, rt.device, args.hybrid_ulysses)
        if args.attn_bench:
            rec["attention"] = bench_cp_attention(rt.world_size, rt.device, args.preset, args.attn_seq_len,
                                                  args.hybrid_ulysses)
        tp = args.tp
        cp = 1 if args.config == "cp1" else rt.world_size // tp
        init_model_parallel(tp, 1, cp, seed=1234)
        cfg = preset_model_config(args.preset)
        cfg.params_dtype = "bfloat16" if cuda else "float32"
        cfg.recompute_llm = args.recompute
        cfg.recompute_vision = args.recompute_vit
        par = ParallelConfig(tp=tp, sp=tp > 1, cp=cp, cp_variant=args.config if cp > 1 else "allgather",
                             cp_ulysses=args.hybrid_ulysses if args.config == "hybrid" else 0)
        rec.update(tp=tp, cp=cp, dp=rt.world_size // (cp * tp),
                   ulysses=args.hybrid_ulysses if args.config == "hybrid" else None)
        optim = OptimConfig(lr=1e-5, grad_reduce_in_fp32=not args.grad_bf16)
        rec["config"] = dict(tp=tp, sp=par.sp, cp=cp, cp_variant=par.cp_variant, cp_ulysses=par.cp_ulysses,
                             recompute_llm=cfg.recompute_llm, recompute_vision=cfg.recompute_vision,
                             grad_reduce_in_fp32=optim.grad_reduce_in_fp32, params_dtype=cfg.params_dtype)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        state = build_training_state(cfg, par, optim, chunk_tokens=2048)
        model, ddp, optimizer = state.model, state.ddp, state.optimizer
        rec["cp_layout"] = (f"U{model.cp_ctx.ulysses}xR{model.cp_ctx.ring}" if model.cp_ctx is not None else None)
        dp_rank = ps.get_data_parallel_rank()
        packs = [long_pack(cfg, args.seq_len[0], seed=1000 * dp_rank + i).to(rt.device) for i in range(args.packs)]
        rec["tiles"] = [int(p.pixel_values.shape[0]) for p in packs]
        rec["subsamples"] = [int(p.cu_seqlens.numel() - 1) for p in packs]
        flops = [step_flops(cfg, FreezeConfig(), torch.diff(p.cu_seqlens).tolist(), int(p.pixel_values.shape[0]),
                            int((p.labels != IGNORE).sum())) for p in packs]
        times, losses = [], []
        for i in range(args.warmup + args.steps):
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            ls = forward_backward(ddp, [packs[i % len(packs)]], rt.device)
            guarded_optimizer_step(optimizer, 1.0)
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
            losses.append(float(ls[0]) if ls else None)
        t = torch.tensor([sum(times) / max(len(times), 1),
                          torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0], dtype=torch.float64,
                         device=rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's step, the largest peak
        step_s, peak = float(t[0]), float(t[1])
        replicas = rt.world_size // (cp * tp)
        tokens = args.seq_len[0] * replicas  # real tokens per step (CP padding not counted)
        # Model FLOPs of the step (this replica's packs stand for the others'): the attention share
        # grows with L, so TFLOP/s per GPU is the length-neutral measure of CP's cost.
        step_model_flops = sum(flops) / len(flops) * replicas
        rec.update(status="ok", step_s=step_s, tokens_per_s=tokens / step_s,
                   tflops_per_gpu=step_model_flops / step_s / rt.world_size / 1e12,
                   model_flops_per_token=step_model_flops / tokens,
                   tokens_per_s_per_gpu=tokens / step_s / rt.world_size, peak_gib=peak if cuda else None,
                   first_loss=losses[0], losses=losses)
    except torch.OutOfMemoryError as e:
        rec.update(status="oom", error=str(e).splitlines()[0][:300])
    except Exception as e:  # noqa: BLE001
        rec.update(status="error", error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-3000:])
    Path(f"{args.worker_out}.rank{rt.rank}").write_text(json.dumps(rec))
    if rec["status"] != "ok" and rt.world_size > 1:
        os._exit(3)  # peers may be stuck in a collective: end the launch
    shutdown()


# ----------------------------------------------------------------------------- driver

def launch(args, config: str, seq: int, check: bool, attn: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        wout = Path(tmp) / "worker.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               str(Path(__file__).resolve()), "--worker", "--config", config, "--seq-len", str(seq),
               "--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--packs", str(args.packs), "--recompute", args.recompute, "--recompute-vit", args.recompute_vit,
               "--hybrid-ulysses", str(args.hybrid_ulysses), "--worker-out", str(wout), "--tp", str(args.tp),
               "--mem-cap-gib", str(args.mem_cap_gib), "--attn-seq-len", *map(str, args.attn_seq_len)]
        cmd += ["--check"] * check + ["--attn-bench"] * attn + ["--grad-bf16"] * args.grad_bf16
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True", PYTHONUNBUFFERED="1",
                   PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        print(f"# launch {args.nproc} procs: {config} seq {seq}", flush=True)
        t0 = time.time()
        try:
            rc = subprocess.run(cmd, env=env, timeout=args.launch_timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        recs = {int(f.name.rsplit("rank", 1)[1]): json.loads(f.read_text())
                for f in Path(tmp).glob("worker.json.rank*")}
    bad = sorted((r["status"] != "oom", rank) for rank, r in recs.items() if r["status"] != "ok")
    if bad:
        return dict(recs[bad[0][1]], error=f"rank {bad[0][1]}: {recs[bad[0][1]].get('error')}")
    if 0 in recs:
        return recs[0]
    return dict(variant=config, seq_len=seq, preset=args.preset, world=args.nproc, tp=args.tp, status="error",
                error=f"launch exit {rc} after {time.time() - t0:.0f}s")


def markdown(results: list[dict]) -> str:
    """Throughput table; "vs CP=1" compares tokens/s at the same length, "FLOP/s vs CP=1 @ shortest"
    compares model TFLOP/s per GPU with CP=1 at the shortest length measured (attention-normalised)."""
    base = {(r["preset"], r["seq_len"]): r for r in results if r["variant"] == "cp1" and r["status"] == "ok"}
    short = {}
    for (preset, seq), r in sorted(base.items()):
        short.setdefault(preset, r)
    lines = ["| GPUs | preset | seq | config | layout | status | step s | tokens/s | tokens/s/GPU | vs CP=1 | "
             "TFLOP/s/GPU | FLOP/s vs CP=1 @ shortest | peak GiB | first loss |", "|" + "---|" * 14]
    f = lambda x, d=0: "-" if x is None else f"{x:,.{d}f}"  # noqa: E731
    for r in results:
        ok = r["status"] == "ok"
        b, s0 = base.get((r["preset"], r["seq_len"])), short.get(r["preset"])
        vs = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if ok and b and r["variant"] != "cp1" else "-"
        vs0 = (f"{r['tflops_per_gpu'] / s0['tflops_per_gpu']:.2f}x" if ok and s0 and r is not s0
               and r.get("tflops_per_gpu") and s0.get("tflops_per_gpu") else "-")
        layout = r.get("cp_layout") or "-"
        layout = (f"TP{r['tp']}x" if (r.get("tp") or 1) > 1 else "") + (
            f"DP{r.get('dp')}" if r["variant"] == "cp1" else layout)
        lines.append(f"| {r['world']} | {r['preset']} | {r['seq_len']} | {r['variant']} | {layout} | {r['status']} | "
                     f"{f(r.get('step_s'), 2) if ok else '-'} | {f(r.get('tokens_per_s')) if ok else '-'} | "
                     f"{f(r.get('tokens_per_s_per_gpu')) if ok else '-'} | {vs} | "
                     f"{f(r.get('tflops_per_gpu'), 1) if ok else '-'} | {vs0} | {f(r.get('peak_gib'), 1)} | "
                     f"{f(r.get('first_loss'), 4) if ok else '-'} |")
    return "\n".join(lines) + "\n"


def attention_markdown(recs: list[dict]) -> str:
    """Attention-only table: single-GPU flash vs each CP variant (efficiency = per-GPU throughput
    relative to single-GPU flash on the whole sequence)."""
    lines = ["| seq | variant | layout | fwd+bwd ms | TFLOP/s/GPU | efficiency vs 1-GPU flash |", "|---|---|---|---|---|---|"]
    for r in recs:
        lines.append(f"| {r['seq_len']} | flash, 1 GPU | - | {r['flash_1gpu_s'] * 1e3:.1f} | "
                     f"{r['flash_1gpu_tflops']:.0f} | 1.00 |")
        for v in ("ring", "allgather", "ulysses", "hybrid"):
            if v in r:
                x = r[v]
                lines.append(f"| {r['seq_len']} | {v} | {x['layout']} | {x['s'] * 1e3:.1f} | "
                             f"{x['tflops_per_gpu']:.0f} | {x['efficiency']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="GPUs (processes) per launch")
    ap.add_argument("--preset", default="eagle2.5-2b")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--variants", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--hybrid-ulysses", type=int, default=0, help="U of the hybrid variant (default nproc/2)")
    ap.add_argument("--recompute", default="full", choices=["none", "selective", "full"], help="LLM recompute")
    ap.add_argument("--recompute-vit", default="full", choices=["none", "selective", "full"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--packs", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="first check CP attention against single-GPU attention")
    ap.add_argument("--attn-bench", action="store_true",
                    help="first time CP attention alone against single-GPU flash (one causal sequence)")
    ap.add_argument("--attn-seq-len", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size (with SP); CP = nproc / tp")
    ap.add_argument("--grad-bf16", action="store_true", help="bf16 gradient buffers (grad_reduce_in_fp32 off)")
    ap.add_argument("--mem-cap-gib", type=float, default=0, help="cap each process's GPU memory (emulate 80 GB)")
    ap.add_argument("--launch-timeout-s", type=float, default=900)
    ap.add_argument("--time-budget-s", type=float, default=0, help="skip launches started after this")
    ap.add_argument("--out", type=Path, default=None, help="append records to this JSON list")
    ap.add_argument("--md-out", type=Path, default=None)
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default="cp1", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.hybrid_ulysses:
        cp_size = args.nproc // args.tp
        args.hybrid_ulysses = cp_size // 2 if cp_size >= 4 else cp_size
    if args.worker:
        worker(args)
        return 0
    command = "python benchmarks/context_parallel.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results, check, attn, commit = [], args.check, args.attn_bench, git_commit()
    t_start = time.time()
    cp_size = args.nproc // args.tp
    for seq in args.seq_len:
        for config in args.variants:
            if config == "hybrid" and not (1 < args.hybrid_ulysses < cp_size):
                continue  # U = CP is ulysses, U = 1 is ring: nothing new to measure
            if args.time_budget_s and time.time() - t_start > args.time_budget_s:
                print(f"# skip {config} seq {seq}: past --time-budget-s", flush=True)
                continue
            first_cp = config != "cp1"
            r = launch(args, config, seq, check and first_cp, attn and first_cp)
            check, attn = check and not first_cp, attn and not first_cp  # once, in the first CP launch
            r.update(date=args.date, command=command, commit=commit)
            results.append(r)
            print(f"# {config} seq {seq}: {r['status']} "
                  + (f"{r['tokens_per_s']:.0f} tok/s, peak {r.get('peak_gib')} GiB, loss {r['first_loss']}"
                     if r["status"] == "ok" else str(r.get("error"))) + (f"\n# check {r['check']}" if "check" in r
                                                                        else ""), flush=True)
            if "attention" in r:
                print(attention_markdown(r["attention"]), flush=True)
    table = markdown(results)
    table += "".join("\n" + attention_markdown(r["attention"]) for r in results if "attention" in r)
    print(table, flush=True)
    if args.out:
        append_json(args.out, results)
    if args.md_out:
        args.md_out.parent.mkdir(parents=True, exist_ok=True)
        args.md_out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
