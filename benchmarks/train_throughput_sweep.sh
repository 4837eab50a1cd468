#!/usr/bin/env bash
# GPU sweeps of benchmarks/train_throughput.py (BENCHMARKS.md#training-throughput, #multi-gpu-scaling). From the repo root:
#   benchmarks/train_throughput_sweep.sh single OUTDIR   # 1 GPU: HF vs ours at 8K, 32K, 64K; each option alone
#   benchmarks/train_throughput_sweep.sh multi OUTDIR    # 4 GPUs: DP/TP scaling at 8K; eagle2.5-8b at 32K on 4 ranks
#   benchmarks/train_throughput_sweep.sh mfu OUTDIR      # 1 GPU, 8K: the flat AdamW step, gradient accumulation
#                                                        # (mbN), a kernel profile (VARIANTS_8K, VARIANTS_32K override)
#   benchmarks/train_throughput_sweep.sh scale OUTDIR    # 4 GPUs, the defaults: eagle2.5-8b at 32K on 4 ranks,
#                                                        # then DP 1/2/4 at 8K (MEM_CAP=79.18 on H200s: an H100's memory)
#   benchmarks/train_throughput_sweep.sh kernels OUTDIR  # 1 GPU, 8K: sub-layer kernel candidates, then the step's
#                                                        # GPU kernel time (profiled) and wall time
#   benchmarks/train_throughput_sweep.sh dp2 OUTDIR      # 2 GPUs, 8K: 1 GPU vs DP 2 (reduce-scatter overlapped or
#                                                        # not, bf16 grads) vs TP 2 + SP, the same packs on both ranks
#   benchmarks/train_throughput_sweep.sh strong OUTDIR   # 1 GPU: ours vs hf-strong (both precisions) at 8K/32K/64K with
#                                                        # predicted and measured peaks; then the 8B-shaped model
#   benchmarks/train_throughput_sweep.sh projection OUTDIR  # 1 GPU: pack times of both planners on both stacks, the
#                                                        # cost-model fit and the projection at DP 64/256/512 (+ PNG)
# Each invocation appends to OUTDIR/{runs,raw}.json and writes markdown tables and logs. Later steps
# are skipped once the script has run LIMIT seconds (default 560: fits a 10-minute job limit).
set -uo pipefail
mode=$1; out=$2; mkdir -p "$out"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
B="python3 benchmarks/train_throughput.py --out $out/runs.json --raw-out $out/raw.json --date ${DATE:-$(date +%F)}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$out/gpu.txt"
if [ "$mode" = single ]; then
  # 8K: HF baselines; the defaults; each user option against them
  $B --preset eagle2.5-2b --seq-len 8192 --steps 6 --warmup 3 --check-attention --time-budget-s ${BUDGET_8K:-300} \
     --md-out "$out/t8k.md" --variants \
     hf hf+nomask hf+gc ours ours+rc-vit ours+no-swiglu ours+no-flat-adam ours+grad-bf16 ours+cudnn-attn \
     ours+flash-attn ours+rc-vit+rc-llm-sel ours+offload-vit 2>&1 | tee "$out/log8k.txt"
  $B --preset eagle2.5-2b --seq-len 32768 65536 --steps 3 --warmup 1 --time-budget-s $(( ${LIMIT:-560} - SECONDS - 60 )) \
     --md-out "$out/tlong.md" --variants \
     ours+rc-vit+rc-llm ours+rc-vit+rc-llm-16 hf+gc hf 2>&1 | tee "$out/loglong.txt"
elif [ "$mode" = strong ]; then
  $B --preset eagle2.5-2b --seq-len 8192 --steps 5 --warmup 2 --md-out "$out/t8k.md" --variants \
     hf-strong hf-strong+fp32-master hf-strong+fp32-master+flce ours 2>&1 | tee "$out/log8k.txt"
  $B --preset eagle2.5-2b --seq-len 32768 --steps 3 --warmup 2 --md-out "$out/t32k.md" --variants \
     hf-strong+fp32-master+gc hf-strong+gc ours+rc-auto ours+rc-vit+rc-llm 2>&1 | tee "$out/log32k.txt"
  $B --preset eagle2.5-2b --seq-len 65536 --steps 3 --warmup 2 --time-budget-s $(( ${LIMIT:-560} - SECONDS - 120 )) \
     --md-out "$out/t64k.md" --variants hf-strong+gc hf-strong+fp32-master+gc ours+rc-auto 2>&1 | tee "$out/log64k.txt"
  $B --preset eagle2.5-8b --llm-layers ${LLM_LAYERS_8B:-20} --seq-len 32768 --steps 3 --warmup 1 \
     --time-budget-s $(( ${LIMIT:-560} - SECONDS - 10 )) --md-out "$out/t8b.md" --variants \
     hf-strong+fp32-master+gc ours+rc-auto 2>&1 | tee "$out/log8b.txt"
elif [ "$mode" = projection ]; then
  python3 benchmarks/scale_projection.py --seq-lens 32768 65536 --packs-per-planner ${PACKS:-6} \
     --out "$out/scale_projection.json" --png "$out/scale_projection.png" 2>&1 | tee "$out/logproj.txt"
elif [ "$mode" = multi ]; then
  # no-swiglu: the scaling runs skip the per-process torch.compile of the fused SwiGLU (same scaling)
  V=ours+rc-vit+no-swiglu
  $B --preset eagle2.5-2b --seq-len 8192 --steps 6 --warmup 3 --launch-timeout-s 120 --layouts 1x1 2x1 4x1 \
     --md-out "$out/tdp.md" --variants $V 2>&1 | tee "$out/logdp.txt"
  $B --preset eagle2.5-8b --seq-len 32768 --steps 3 --warmup 1 --packs 2 --launch-timeout-s 200 --layouts 4x1 \
     --md-out "$out/t8b.md" --variants ours+rc-vit+rc-llm+grad-bf16+no-swiglu 2>&1 | tee "$out/log8b.txt"
  $B --preset eagle2.5-2b --seq-len 8192 --steps 6 --warmup 3 --launch-timeout-s 120 --layouts 4x1 \
     --time-budget-s $(( ${LIMIT:-560} - SECONDS - 75 )) --md-out "$out/tov.md" --variants $V+overlap \
     2>&1 | tee "$out/logov.txt"
  $B --preset eagle2.5-2b --seq-len 8192 --steps 6 --warmup 3 --launch-timeout-s 120 --layouts 2x2 4x2 \
     --time-budget-s $(( ${LIMIT:-560} - SECONDS - 75 )) --md-out "$out/ttp.md" --variants $V+sp \
     2>&1 | tee "$out/logtp.txt"
elif [ "$mode" = mfu ]; then
  python3 benchmarks/check_flat_adamw.py 2>&1 | tee "$out/flat_adamw.txt"
  V8=${VARIANTS_8K:-ours+prof ours+no-flat-adam ours ours+mb4 ours+no-flat-adam+mb4 hf+gc hf+gc+mb4}
  $B --preset eagle2.5-2b --seq-len 8192 --steps 6 --warmup 3 --check-attention --time-budget-s $(( ${LIMIT:-560} - SECONDS - ${RESERVE_32K:-30} )) \
     --md-out "$out/t8k.md" --variants $V8 2>&1 | tee "$out/log8k.txt"
  if [ -n "${VARIANTS_32K:-}" ]; then
    $B --preset eagle2.5-2b --seq-len 32768 --steps 3 --warmup ${WARMUP_32K:-1} --time-budget-s $(( ${LIMIT:-560} - SECONDS - 20 )) \
       --md-out "$out/t32k.md" --variants $VARIANTS_32K 2>&1 | tee "$out/log32k.txt"
  fi
elif [ "$mode" = scale ]; then
  CAP="--mem-cap-gib ${MEM_CAP:-0}"
  $B --preset eagle2.5-8b --seq-len 32768 --steps 3 --warmup 1 --packs 2 --launch-timeout-s 240 --layouts 4x1 $CAP \
     --md-out "$out/t8b.md" --variants ours+rc-vit+rc-llm+grad-bf16 2>&1 | tee "$out/log8b.txt"
  $B --preset eagle2.5-2b --seq-len 8192 --steps 6 --warmup 3 --launch-timeout-s 150 --layouts 1x1 2x1 4x1 $CAP \
     --time-budget-s $(( ${LIMIT:-560} - SECONDS - 60 )) --md-out "$out/tdp.md" --variants ours+rc-vit \
     2>&1 | tee "$out/logdp.txt"
elif [ "$mode" = kernels ]; then
  python3 benchmarks/layer_kernels.py --out "$out/layer_kernels.json" 2>&1 | tee "$out/layer_kernels.txt"
  BENCH_PROFILE_CPU=1 $B --preset eagle2.5-2b --seq-len 8192 --steps 6 --warmup 3 --repeat ${REPEAT:-1} \
     --time-budget-s $(( ${LIMIT:-560} - SECONDS - 30 )) --md-out "$out/t8k.md" --variants \
     ours+prof ours ours+mb4 hf+gc \
     2>&1 | tee "$out/log8k.txt"
elif [ "$mode" = dp2 ]; then
  $B --preset eagle2.5-2b --seq-len 8192 --steps 6 --warmup 3 --launch-timeout-s 150 --layouts 1x1 2x1 \
     --md-out "$out/tdp.md" --variants ours ours+no-overlap-grad ours+grad-bf16 2>&1 | tee "$out/logdp.txt"
  $B --preset eagle2.5-2b --seq-len 8192 --steps 6 --warmup 3 --launch-timeout-s 150 --layouts 2x2 \
     --time-budget-s $(( ${LIMIT:-560} - SECONDS - 60 )) --md-out "$out/ttp.md" --variants ours+sp \
     2>&1 | tee "$out/logtp.txt"
fi
echo "sweep done after ${SECONDS}s"
