#!/usr/bin/env bash
# GPU sweeps of benchmarks/context_parallel.py on 4 GPUs (BENCHMARKS.md#context-parallelism). From the repo root:
#   benchmarks/context_parallel_sweep.sh a OUTDIR  # eagle2.5-2b CP=1 @32K; eagle2.5-8b @128K (CP=4); attention alone
#                                                  # vs 1-GPU flash; eagle2.5-2b every CP=4 variant @128K
#   benchmarks/context_parallel_sweep.sh b OUTDIR  # eagle2.5-8b TP2xCP2 @128K; eagle2.5-2b CP=4 @64K
# On cards with more than 80 GB each process is capped at 79.18 GiB (what torch gets on an H100 80GB).
set -uo pipefail
mode=$1; out=$2; mkdir -p "$out"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
cap=$(python3 -c "import torch; print(79.18 if torch.cuda.get_device_properties(0).total_memory > 90 * 2**30 else 0)")
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
B="python3 benchmarks/context_parallel.py --nproc $n --mem-cap-gib $cap --out $out/cp.json --date ${DATE:-$(date +%F)}"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
if [ "$mode" = a ]; then
  $B --preset eagle2.5-2b --seq-len 32768 --variants cp1 --steps 2 --warmup 1 --launch-timeout-s 150 2>&1 | tee "$out/log.txt"
  $B --preset eagle2.5-8b --seq-len 131072 --variants allgather --grad-bf16 --steps 2 --warmup 1 \
     --launch-timeout-s 220 2>&1 | tee -a "$out/log.txt"
  $B --preset eagle2.5-2b --seq-len 131072 --variants ring allgather ulysses hybrid --check --attn-bench \
     --steps 2 --warmup 1 --launch-timeout-s 150 --time-budget-s $(( ${LIMIT:-570} - SECONDS - 60 )) 2>&1 | tee -a "$out/log.txt"
elif [ "$mode" = b ]; then
  $B --preset eagle2.5-8b --seq-len 131072 --variants ring --tp 2 --grad-bf16 --steps 2 --warmup 1 \
     --launch-timeout-s 200 2>&1 | tee -a "$out/log.txt"
  $B --preset eagle2.5-2b --seq-len 65536 --variants cp1 allgather ring --steps 2 --warmup 1 --launch-timeout-s 120 \
     --time-budget-s $(( ${LIMIT:-560} - SECONDS - 120 )) 2>&1 | tee -a "$out/log.txt"
fi
python3 -c "
import json, sys; sys.path.insert(0, '.')
from benchmarks.context_parallel import markdown, attention_markdown
r = json.load(open('$out/cp.json'))
open('$out/cp.md', 'w').write(markdown(r) + ''.join('\n' + attention_markdown(x['attention']) for x in r if 'attention' in x))
"
echo "sweep done after ${SECONDS}s"
