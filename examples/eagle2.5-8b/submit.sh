#!/usr/bin/env bash
# Train Eagle 2.5-8B on a Slurm cluster of 8x H100 80GB nodes: the five stages of
# curriculum.yaml as a chain of five jobs (afterok), each with its own node count and layout.
#
#   examples/eagle2.5-8b/submit.sh --dry-run      # print the five sbatch scripts, submit nothing
#   PARTITION=batch ACCOUNT=myproj IMAGE=/lustre/images/megatron-eagle.sqsh examples/eagle2.5-8b/submit.sh
#
# Extra arguments go to `megatron-eagle submit` (e.g. --sbatch=--exclusive, --qos high).
# Each job requeues itself when its time limit comes (SIGTERM --signal-lead seconds before it: the
# tasks save, the job runs `scontrol requeue`, the new run resumes from `latest`) or when it is
# preempted, so a stage may span many jobs of --time each. Follow it with
#   megatron-eagle status /checkpoints/eagle2.5-8b
#
# ---------------------------------------------------------------------------------------------
# Why these node counts (8.06B parameters: Qwen2.5-7B 7.62B + SigLIP-so400m 0.41B + connector 0.03B)
#
# Model state per GPU (bf16 weights 2 B + fp32 grads 4 B per trainable parameter; fp32 master
# weights + Adam m and v, 12 B, sharded over DP by megatron's distributed optimizer):
#   stage 1    TP1, only the connector trains: 16.1 GB frozen bf16 weights + 0.5 GB connector state
#   1.5 - 4    TP2, full model: (2+4) B x 8.06B / 2 = 24.2 GB, + 48.4 GB / DP of optimizer shard
#              (0.4 GB at DP 128, 1.5 GB at DP 32). Without the sharding it would be +48 GB: no room
#              for activations. TP1 for the full model would need 48 GB before the optimizer.
#
# Activations per GPU (estimates from the layer shapes, bf16, flash attention; each GPU holds
# seq_len / CP tokens of a pack, so stages 2, 3 and 4 all hold 32K tokens per GPU):
#   LLM  without recompute ~ 46 B x 3584 hidden x 28 layers = 4.6 MB per token at TP1
#        (~2.5 MB at TP2): 4K tokens ~ 19 GB (stage 1), 8K at TP2 ~ 20 GB (stage 1.5),
#        32K at TP2 ~ 80 GB -> too much: stages 2-4 use model.recompute_llm=full, which keeps only
#        each layer's input (0.2 MB per token: 6.6 GB at 32K) plus one layer being recomputed.
#   ViT  1024 patch tokens per 448px tile (256 LLM tokens after pixel shuffle), ~1.4 MB per patch
#        token without recompute: from stage 1.5 on (ViT trains) model.recompute_vision=full.
#        In stage 1 the ViT is frozen and keeps no activations.
#   Peak estimate: stage 1 ~36 GB, stage 1.5 ~47 GB, stages 2-4 ~45 GB of 80 GB (leaves room
#   for fragmentation and NCCL buffers). Check peak_mem_gib in metrics.jsonl on the first steps.
#
# So memory alone fits every stage on one node (stage 4's TP2 x CP4 = 8 GPUs is the minimum);
# the node counts below are for wall time, and must give a DP that divides the packs per step
# (global_batch_tokens / seq_len; `submit` refuses a count that does not):
#   stage    seq_len  layout        nodes  GPUs  DP   packs/step  micro-batches per GPU
#   1        4K       TP1           16     128   128  1024        8    (connector only: half the nodes)
#   1.5      8K       TP2           32     256   128  1024        8
#   2        32K      TP2           32     256   128  256         2
#   3        64K      TP2 CP2       32     256   64   128         2
#   4        128K     TP2 CP4       32     256   32   128         4
# More nodes for stage 2: 64 (DP 256, 1 micro-batch). For stages 3-4, double CP before DP.
# ---------------------------------------------------------------------------------------------
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ME=${MEGATRON_EAGLE:-megatron-eagle}   # e.g. "python -m megatron_eagle.cli" without the console script

# Cluster placeholders (CHANGE-ME): partition, account, per-job time limit, and the container image
# built from the repo's Dockerfile (docker build -t megatron-eagle . && enroot import dockerd://megatron-eagle).
PARTITION=${PARTITION:-batch}
ACCOUNT=${ACCOUNT:-CHANGE-ME}
TIME=${TIME:-04:00:00}
IMAGE=${IMAGE:-/lustre/images/megatron-eagle.sqsh}
MOUNTS=${MOUNTS:-/data:/data,/models:/models,/checkpoints:/checkpoints}

# One command submits the chain. Per stage: its node count (--stage-nodes), its recompute settings
# (--stage-set); its layout comes from curriculum.yaml. To (re)submit only some stages, add e.g.
#   --stages stage3,stage4                      (the run dir's latest checkpoint must end stage 2)
#   --stages stage3,stage4 --after JOBID        (wait for the job that trains stage 2)
$ME submit --config "$HERE/run.yaml" \
    --nodes 32 --gpus-per-node 8 --cpus-per-task 16 \
    --stage-nodes stage1=16 \
    --stage-set stage1.5:model.recompute_vision=full \
    --stage-set stage2:model.recompute_vision=full --stage-set stage2:model.recompute_llm=full \
    --stage-set stage3:model.recompute_vision=full --stage-set stage3:model.recompute_llm=full \
    --stage-set stage4:model.recompute_vision=full --stage-set stage4:model.recompute_llm=full \
    --partition "$PARTITION" --account "$ACCOUNT" --time "$TIME" --signal-lead 600 \
    --container-image "$IMAGE" --container-mounts "$MOUNTS" \
    --env CUDA_DEVICE_MAX_CONNECTIONS=1 --env NCCL_ASYNC_ERROR_HANDLING=1 \
    --sbatch=--exclusive \
    "$@"
