#!/usr/bin/env bash
# The `train` command end to end on 2 GPUs (NCCL): `megatron-eagle demo` (stage 1 DP=2, stage 2 TP=2,
# export to HF, generate), then the demo's full stage again at CP=2 (ring attention, ViT split over
# CP). From the repo root: benchmarks/gpu_train_smoke.sh OUTDIR. Writes OUTDIR/smoke.txt and the
# metrics of both runs. SKIP_DEMO=1: only the CP=2 run (on the demo's data).
set -euo pipefail
out=$1; mkdir -p "$out"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1} PYTHONUNBUFFERED=1
if [ "${SKIP_DEMO:-0}" = 1 ]; then  # only the demo's data and HF init, then the CP=2 run below
  python3 -c "from pathlib import Path; from megatron_eagle.data.prepare.synthetic import make_synthetic_dataset as m; \
m(Path('runs/demo/data'), num_samples=320, video_fraction=0.2, seed=0)" 2>&1 | tee "$out/smoke.txt"
  python3 -m megatron_eagle.cli convert make-tiny --out runs/demo/hf-init 2>&1 | tee -a "$out/smoke.txt"
  python3 -m megatron_eagle.cli prepare --input runs/demo/data/train.jsonl --media-root runs/demo/data/media \
      --output runs/demo/data/shards --tokenizer runs/demo/hf-init --shard-size 512KiB --workers 8 2>&1 | tee -a "$out/smoke.txt"
else
  python3 -m megatron_eagle.cli demo 2>&1 | tee "$out/smoke.txt"
  cp runs/demo/run/metrics.jsonl "$out/demo_metrics.jsonl"
fi
# Stage "full" alone, CP=2 instead of TP=2, from the demo's HF init (configs under runs/demo/cp2/).
python3 - <<'PY'
import os, yaml
d = "runs/demo/cp2"
os.makedirs(d, exist_ok=True)
cur = yaml.safe_load(open("examples/tiny/curriculum.yaml"))
stage = dict(cur["stages"][1], steps=60, parallel={"tp": 1, "pp": 1, "cp": 2})
stage["datasets"] = [dict(x, path="../data/shards") for x in stage["datasets"]]
cur["stages"] = [stage]
yaml.safe_dump(cur, open(f"{d}/curriculum.yaml", "w"))
run = yaml.safe_load(open("examples/tiny/run.yaml"))
run.update(run_dir="../run_cp2", curriculum="curriculum.yaml", tokenizer="../hf-init", init={"hf": "../hf-init"})
yaml.safe_dump(run, open(f"{d}/run.yaml", "w"))
PY
python3 -m torch.distributed.run --standalone --nproc_per_node=2 -m megatron_eagle.cli train \
    --config runs/demo/cp2/run.yaml 2>&1 | tee -a "$out/smoke.txt"
cp runs/demo/run_cp2/metrics.jsonl "$out/cp2_metrics.jsonl"
python3 - "$out" <<'PY'
import json, math, sys
import os
for name in ("demo", "cp2"):
    if not os.path.exists(f"{sys.argv[1]}/{name}_metrics.jsonl"):
        continue
    rows = [json.loads(l) for l in open(f"{sys.argv[1]}/{name}_metrics.jsonl") if l.strip()]
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses), name
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"{name}: {len(rows)} steps, loss {first:.3f} (first 5) -> {last:.3f} (last 5)")
    assert last < first, f"{name}: loss did not fall"
PY
