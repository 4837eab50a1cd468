"""Training throughput: our megatron-core step against a plain-PyTorch HF baseline.

Both sides train on the same synthetic mixed image/video/text packs (:mod:`.packs`), on the same
card, in one run:

- **ours** (:mod:`.ours`): ``EagleModel`` (bf16) in megatron-core DDP + DistributedOptimizer built
  by the trainer's setup, one micro-batch per step through ``training.step.forward_backward`` and
  ``guarded_optimizer_step``, exactly as the trainer runs it;
- **hf-strong** (:mod:`.hf_strong`): the same transformers classes as a careful user runs them:
  flash varlen attention over ``cu_seqlens``, Liger's RoPE/RMSNorm/SwiGLU, the loss on supervised
  positions only, fused AdamW (``+fp32-master``: fp32 master weights and Adam state; ``+gc``:
  gradient checkpointing; ``+flce``: Liger's fused linear cross-entropy);
- **hf** (:mod:`.baselines`, ``hf-naive`` in records): transformers' SigLIP + Qwen2 in plain
  PyTorch with SDPA and fused AdamW (``hf``: block-diagonal mask; ``hf+nomask``: one causal
  sequence per pack; ``hf+gc``: gradient checkpointing).

Reported per variant: tokens/s, MFU against 989 TFLOP/s and against the bf16 matmul peak
measured in the same run (8192^3), peak memory, and the step split into ViT, LLM forward,
LLM backward, loss and optimizer (:mod:`.timing`: CUDA events from module/tensor hooks; means
over the timed steps). Model FLOPs are ``training.flops.step_flops`` (the trainer's count: LM head
on supervised tokens only, attention within sub-samples) for both sides. A side that runs out of
memory is recorded with ``null`` numbers. JSON records carry the ``commit`` of the checkout and
each variant's resolved options as ``config``.

    # one GPU, the whole sweep
    python benchmarks/train_throughput.py --preset eagle2.5-2b --seq-len 8192 \\
        --variants hf hf+nomask ours ours+rc-vit --out benchmarks/results/train_throughput.json
    # several GPUs (torchrun per layout), ours only
    python benchmarks/train_throughput.py --preset eagle2.5-2b --seq-len 8192 --layouts 1x1 2x1 2x2 \\
        --variants ours+rc-vit
    # CPU smoke test
    python benchmarks/train_throughput.py --preset tiny --seq-len 256 --steps 2 --warmup 1

Variants (:mod:`.variants`) are ``ours`` or ``hf`` followed by ``+option`` tokens. ``ours``:
``rc-vit`` (full ViT recompute), ``rc-llm`` (full LLM recompute), ``rc-llm-sel`` (selective: core
attention), ``rc-llm-N`` (recompute N LLM layers, block method), ``swiglu`` / ``no-swiglu``
(megatron's fused SwiGLU, torch.compile; the default on GPUs), ``cudnn-attn`` / ``flash-attn``
(the LLM's packed attention on cuDNN's fused SDPA / on FlashAttention-2), ``offload-vit`` (ViT
activations saved on the CPU, ``model.offload_vision``), ``rc-auto`` (``recompute: auto``),
``grad-bf16`` (bf16 grad buffers), ``no-flat-adam`` (megatron's
per-parameter AdamW step instead of the flat fused one), ``no-overlap-grad`` (the grad
reduce-scatter after the backward instead of during it), ``overlap`` (also overlap the param
all-gather with the forward), ``sp`` (sequence parallelism when TP > 1), ``prof`` (one extra step
under torch.profiler). ``hf``: ``nomask``, ``gc``. ``hf-strong``: ``fp32-master``, ``gc``, ``flce``. On both sides ``mbN`` accumulates gradients
over N packs per optimizer step (the per-module phases are then not reported).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

from benchmarks.records import REPO, append_json, git_commit
from benchmarks.train.baselines import HFSide
from benchmarks.train.hf_strong import HFStrongSide
from benchmarks.train.ours import OursSide, check_attention
from benchmarks.train.packs import Pack, flops_of, make_pack
from benchmarks.train.report import kernel_lines, markdown, median_table, pair_runs, summary_line
from benchmarks.train.timing import matmul_peak_tflops, profile_step
from megatron_eagle.training import flat_adamw
from benchmarks.train.variants import parse_variant

DATASHEET_TFLOPS = 989.0
ENTRY = REPO / "benchmarks" / "train_throughput.py"  # what torchrun starts per layout


def measure(side_factory, packs: list[Pack], cfg, warmup: int, steps: int, device: torch.device,
            n_gpus: int, dp: int, peak: Optional[float]) -> dict:
    """Build a side, run warmup + timed steps; numbers or an OOM record. ``config`` is the side's
    resolved options (what the variant's tokens and the defaults made of it)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    side, res, config, pred = None, {}, None, {}
    t_build = time.perf_counter()
    try:
        side = side_factory()
        build_s = time.perf_counter() - t_build
        config = side.config()
        mem = getattr(side, "memory", None)
        if mem is not None:  # ours: the memory model's prediction for this variant and these packs
            pred = dict(predicted_peak_gib=mem.total / 2 ** 30,
                        predicted_terms_gib={k: round(b / 2 ** 30, 3) for k, b in mem.terms.items()})
        n_micro = side.v.micro_batches
        groups = [[packs[(i * n_micro + j) % len(packs)] for j in range(n_micro)] for i in range(warmup + steps)]
        step_s, phases, losses = [], [], []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            losses.append(side.step(groups[i]))
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            if i >= warmup:
                ph = side.marks.phases()
                if n_micro > 1:  # the per-module marks see only the first micro-batch
                    ph = {n: (t if n in ("total", "optimizer") else None) for n, t in ph.items()}
                step_s.append((ph["total"] / 1e3) if ph["total"] is not None else wall)
                phases.append(ph)
        timed = [p for g in groups[warmup:] for p in g]
        total_t = sum(step_s)
        flops = sum(flops_of(cfg, p) for p in timed)
        tokens = sum(sum(p.lens) for p in timed)
        res = dict(status="ok", step_s=total_t / steps, step_s_all=step_s, tokens_per_s=tokens * dp / total_t,
                   tokens_per_s_per_gpu=tokens * dp / total_t / n_gpus,
                   mfu=flops * dp / (total_t * n_gpus * DATASHEET_TFLOPS * 1e12),
                   mfu_measured_peak=(flops * dp / (total_t * n_gpus * peak * 1e12)) if peak else None,
                   achieved_tflops_per_gpu=flops * dp / total_t / n_gpus / 1e12,
                   phases_ms={k: (statistics.mean([p[k] for p in phases if p[k] is not None])
                                  if any(p[k] is not None for p in phases) else None) for k in phases[0]},
                   losses=losses, build_s=build_s)
        if isinstance(getattr(side, "params", None), int):  # ours: this rank's parameters, and whether the
            res["params"] = side.params                        # flat AdamW step is still bound (not fallen back)
            parts = getattr(side.optimizer, "chained_optimizers", [side.optimizer])
            res["flat_adamw_active"] = any(flat_adamw.installed(p) is not None for p in parts)
        if cuda and getattr(getattr(side, "v", None), "profile", False):
            res["kernels"] = profile_step(side, groups[0])
    except torch.OutOfMemoryError as e:
        res = dict(status="oom", error=str(e).splitlines()[0][:300])
    except Exception as e:  # noqa: BLE001 - record and go on with the next variant
        res = dict(status="error", error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-3000:])
    if config is not None:
        res["config"] = config
    res.update(pred)
    if cuda:
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if res["status"] == "ok" else None
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2 ** 30
    else:
        res["peak_gib"] = None
    if side is not None:
        side.close()
    del side
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        res["leaked_gib"] = (torch.cuda.memory_allocated() - base_alloc) / 2 ** 30
    return res


def device_label(device: torch.device, n: int) -> str:
    """``cpu (N cores)`` or ``Nx <GPU name>``."""
    if device.type != "cuda":
        return f"cpu ({os.cpu_count()} cores)"
    return f"{n}x {torch.cuda.get_device_name(device)}"


def worker(args) -> list[dict]:
    """Run every (seq_len, variant) in this process (all ranks of one layout)."""
    from megatron.core import parallel_state as ps

    from megatron_eagle.config import preset_model_config
    from megatron_eagle.runtime.distributed import init_distributed, init_model_parallel, shutdown

    rt = init_distributed()
    tp = args.tp
    init_model_parallel(tp=tp, seed=1234)
    dp = rt.world_size // tp
    dp_rank = ps.get_data_parallel_rank()
    device = rt.device
    if args.mem_cap_gib and device.type == "cuda":  # emulate a smaller card (an 80 GB H100 on an H200)
        total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib / total), device)
    cfg = preset_model_config(args.preset)
    cfg.params_dtype = "bfloat16" if device.type == "cuda" or args.bf16_cpu else "float32"
    if args.llm_layers:  # the preset's shapes with a shorter LLM (an 8B-shaped model on one GPU)
        cfg.llm.num_layers = args.llm_layers
    variants = [parse_variant(v) for v in args.variants]
    t_start = time.time()
    peak = matmul_peak_tflops(device) if rt.rank == 0 or device.type == "cuda" else None
    attn = check_attention(device) if args.check_attention else {}
    log = (lambda *a: print(*a, flush=True)) if rt.rank == 0 else (lambda *a: None)
    log(f"# device {device_label(device, rt.world_size)}  torch {torch.__version__}  matmul peak "
        f"{peak and round(peak, 1)} TFLOP/s  attention check {attn}")
    meta = dict(device=device_label(device, rt.world_size), torch=torch.__version__, matmul_peak_tflops=peak,
                attention_check=attn, mem_cap_gib=args.mem_cap_gib or None)
    results = []
    for seq_len in args.seq_len:
        # Same packs on every DP rank by default: synthetic packs differ in cost by up to 1.5x, and the
        # slowest rank sets the step, so distinct packs measure their imbalance rather than the
        # parallel overhead (the loader balances real packs across ranks).
        rank_seed = 1000 * dp_rank if args.rank_packs == "distinct" else 0
        packs = [make_pack(cfg, seq_len, seed=rank_seed + i) for i in range(args.packs)]
        if device.type == "cuda":
            packs = [dataclasses.replace(p, batch=p.batch.to(device)) for p in packs]
        desc = dict(tiles=[p.tiles for p in packs], subsamples=[len(p.lens) for p in packs],
                    supervised=[p.supervised for p in packs], kinds=[p.kinds for p in packs],
                    gflop=[round(flops_of(cfg, p) / 1e9, 1) for p in packs])
        log(f"# seq {seq_len}: packs {desc}")
        for v in variants:
            if v.side != "ours" and rt.world_size > 1:
                continue
            if args.time_budget_s and time.time() - t_start > args.time_budget_s:
                res = dict(status="skipped", error="time budget")
            elif v.side != "ours":
                make = HFStrongSide if v.side == "hf-strong" else HFSide
                res = measure(lambda: make(cfg, v, device), packs, cfg, args.warmup, args.steps, device,
                              rt.world_size, dp, peak)
            else:
                tiles = max(p.tiles for p in packs)
                res = measure(lambda: OursSide(cfg, v, tp, device, seq_len, tiles), packs, cfg, args.warmup,
                              args.steps, device, rt.world_size, dp, peak)
            res.setdefault("config", v.options())  # no side built: the variant's own options
            res.update(variant=v.name, side=v.side, seq_len=seq_len, preset=args.preset, world=rt.world_size,
                       tp=tp, dp=dp, packs=desc, **meta)
            results.append(res)
            if args.worker_out is not None:  # every rank keeps its own record: a failing rank ends the launch
                Path(f"{args.worker_out}.rank{rt.rank}").write_text(json.dumps(results))
                if res["status"] not in ("ok", "skipped") and rt.world_size > 1:
                    print(f"rank {rt.rank}: {v.name} {res['status']}: {res.get('error')}", flush=True)
                    os._exit(3)
            log(summary_line(res))
            if "kernels" in res:
                for line in kernel_lines(res["kernels"]):
                    log(line)
    shutdown()
    return results if rt.rank == 0 else []


def launch(args, n: int, tp: int, seq: int, variants: list[str]) -> list[dict]:
    """One torchrun launch of ``n`` processes (TP ``tp``) running ``variants`` at ``seq``."""
    with tempfile.TemporaryDirectory() as tmp:
        wout = Path(tmp) / "worker.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               str(ENTRY), "--preset", args.preset, "--llm-layers", str(args.llm_layers), "--tp", str(tp), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--packs", str(args.packs), "--rank-packs", args.rank_packs,
               "--worker-out", str(wout),
               "--seq-len", str(seq), "--variants", *variants]
        if args.bf16_cpu:
            cmd.append("--bf16-cpu")
        if args.mem_cap_gib:
            cmd += ["--mem-cap-gib", str(args.mem_cap_gib)]
        print(f"# launch {n}x{tp} seq {seq}: {' '.join(variants)}", flush=True)
        t0 = time.time()
        try:
            rc = subprocess.run(cmd, timeout=args.launch_timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        return collect_launch(Path(tmp), n, tp, [seq], variants, args.preset,
                              f"launch exit {rc} after {time.time() - t0:.0f}s")


def collect_launch(tmp: Path, n: int, tp: int, seqs: list[int], variants: list[str], preset: str,
                   why: str) -> list[dict]:
    """One record per variant of a torchrun launch: rank 0's, unless some rank ran out of memory
    (then that rank's: the others only see a broken collective), or another rank's failure
    record, or the launch's exit status when no rank got to the variant."""
    per_rank = {}
    for f in tmp.glob("worker.json.rank*"):
        per_rank[int(f.name.rsplit("rank", 1)[1])] = json.loads(f.read_text())
    first = next(iter(per_rank.get(0, [])), None) or next((r for recs in per_rank.values() for r in recs), {})
    meta = {k: first[k] for k in ("device", "torch", "matmul_peak_tflops") if k in first}
    got = []
    for seq in seqs:
        for v in variants:
            recs = {rank: r for rank, rs in per_rank.items() for r in rs if r["seq_len"] == seq and r["variant"] == v}
            rec = recs.get(0)
            bad = sorted(recs.items(), key=lambda kv: (kv[1]["status"] != "oom", kv[0]))
            if bad and bad[0][1]["status"] == "oom":
                rec = dict(bad[0][1], error=f"rank {bad[0][0]}: {bad[0][1].get('error')}")
            elif rec is None and recs:
                rank, rec = min(recs.items())
                rec = dict(rec, error=f"rank {rank}: {rec.get('error')}")
            if rec is None:
                rec = dict(meta, variant=v, side="ours", seq_len=seq, preset=preset, world=n, tp=tp, dp=n // tp,
                           device=meta.get("device", f"{n} GPUs"), status="error", error=why,
                           config=parse_variant(v).options())
            got.append(rec)
    return got


def main(argv: Optional[list[str]] = None) -> int:
    """The command line (``python benchmarks/train_throughput.py --help``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="eagle2.5-2b")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[8192])
    ap.add_argument("--variants", nargs="+", default=["hf", "ours"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--packs", type=int, default=3, help="distinct packs per seq len, cycled")
    ap.add_argument("--rank-packs", choices=["same", "distinct"], default="same",
                    help="DP ranks train the same packs (default: scaling measures the parallel overhead) "
                         "or each its own (adds the synthetic packs' cost imbalance)")
    ap.add_argument("--layouts", nargs="+", default=None,
                    help="GPUSxTP per torchrun launch, e.g. 1x1 2x1 4x1 2x2 4x4 (default: this process only)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--llm-layers", type=int, default=0,
                    help="cut the preset's LLM to this many layers (training.memory.max_llm_layers: as many as "
                         "fit one GPU beside the full ViT)")
    ap.add_argument("--check-attention", action="store_true", help="check packed GQA flash attention first")
    ap.add_argument("--time-budget-s", type=float, default=0, help="skip variants started after this")
    ap.add_argument("--launch-timeout-s", type=float, default=600)
    ap.add_argument("--bf16-cpu", action="store_true", help="bf16 params on CPU too (smoke tests)")
    ap.add_argument("--mem-cap-gib", type=float, default=0,
                    help="cap each process's GPU memory (79.18 = what an H100 80GB gives torch)")
    ap.add_argument("--out", type=Path, default=None, help="append run records to this JSON list")
    ap.add_argument("--raw-out", type=Path, default=None, help="append per-variant results to this JSON list")
    ap.add_argument("--md-out", type=Path, default=None, help="write a markdown table")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the variant list this many times, round robin, and add a table of medians: "
                         "host stalls move single runs by several percent on shared hosts")
    ap.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for v in args.variants:
        parse_variant(v)
    args.variants = [v for _ in range(max(1, args.repeat)) for v in args.variants]
    command = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)

    if args.layouts:
        results, t_start = [], time.time()
        ours = [v for v in args.variants if v.startswith("ours")]
        for layout in args.layouts:
            n, tp = (int(x) for x in layout.split("x"))
            for seq in args.seq_len:
                todo = list(ours)
                while todo:  # a failed variant ends its launch: relaunch for the ones after it
                    if args.time_budget_s and time.time() - t_start > args.time_budget_s:
                        results += [dict(variant=v, side="ours", seq_len=seq, preset=args.preset, world=n, tp=tp,
                                         dp=n // tp, status="skipped", error="time budget", device=f"{n} GPUs",
                                         config=parse_variant(v).options()) for v in todo]
                        break
                    got = launch(args, n, tp, seq, todo)
                    tried = {r["variant"] for r in got if "launch exit" not in str(r.get("error"))}
                    if not tried:  # nothing ran: keep the launch's failure records, go on
                        results += got
                        break
                    results += [r for r in got if r["variant"] in tried]
                    todo = [v for v in todo if v not in tried]
    else:
        results = worker(args)
        if args.worker_out is not None:
            return 0

    table = markdown(results) + (("\n" + median_table(results)) if args.repeat > 1 else "")
    print(table, flush=True)
    commit = git_commit()
    if args.raw_out:
        append_json(args.raw_out, [dict(r, date=args.date, command=command, commit=commit) for r in results])
    if args.out:
        append_json(args.out, pair_runs(results, args.date, command, commit))
    if args.md_out:
        args.md_out.parent.mkdir(parents=True, exist_ok=True)
        args.md_out.write_text(table)
    return 0
