#!/usr/bin/env bash
# A/B of two checkouts on one GPU: the training-throughput benchmark of each, in alternating
# processes (A B A B ...), so that host noise hits both alike. Usage, from the repo root:
#   benchmarks/ab_checkouts.sh A_DIR B_DIR OUTDIR [ROUNDS] [VARIANT] [SEQ_LEN]
# e.g. a checkout of the base commit (git worktree add /tmp/base <sha>, or an exported tree with its
# SHA in a COMMIT file) against this one:
#   benchmarks/ab_checkouts.sh /tmp/base . out 3 ours 8192
# Each side appends to OUTDIR/<side>.json; rounds stop once LIMIT seconds (default 540) would be
# passed, judged from the longest round so far. PRESET, STEPS and WARMUP override the defaults
# (eagle2.5-2b, 8, 3).
set -uo pipefail
a=$1; b=$2; out=$(realpath -m "$3"); rounds=${4:-3}; variant=${5:-ours}; seq=${6:-8192}
mkdir -p "$out"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee "$out/gpu.txt"
fi
run_side() {  # side dir
  (cd "$2" && { cat COMMIT 2>/dev/null || git rev-parse HEAD; } | tee -a "$out/$1.commit"
   python3 benchmarks/train_throughput.py --preset "${PRESET:-eagle2.5-2b}" --seq-len "$seq" \
     --steps "${STEPS:-8}" --warmup "${WARMUP:-3}" \
     --variants "$variant" --out "$out/$1.json") 2>&1 | tee -a "$out/$1.log" | grep -E "tok/s|Error|error" | tail -3
}
longest=0
for ((r = 1; r <= rounds; r++)); do
  start=$SECONDS
  if (( r > 1 && SECONDS + longest > ${LIMIT:-540} )); then echo "stopping before round $r (time)"; break; fi
  echo "== round $r: A"; run_side A "$a"
  echo "== round $r: B"; run_side B "$b"
  (( SECONDS - start > longest )) && longest=$(( SECONDS - start ))
done
python3 - "$out" <<'EOF'
import json, statistics, sys
out = sys.argv[1]
for side in ("A", "B"):
    try:
        recs = json.load(open(f"{out}/{side}.json"))
    except (OSError, ValueError):
        print(side, "no records"); continue
    tps = [r["ours_tokens_per_s"] for r in recs if r.get("ours_tokens_per_s")]
    mfu = [r["ours_mfu"] for r in recs if r.get("ours_mfu")]
    mem = [r["ours_peak_gib"] for r in recs if r.get("ours_peak_gib")]
    if tps:
        peak = f"{max(mem):.1f} GiB" if mem else "-"
        print(f"{side}: tokens/s median {statistics.median(tps):.0f} (min {min(tps):.0f}, max {max(tps):.0f}, "
              f"n={len(tps)}); MFU median {statistics.median(mfu) if mfu else 0:.3f}; peak {peak}")
EOF
