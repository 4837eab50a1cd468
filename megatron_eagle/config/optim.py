"""Optimizer and loss sections of a run: AdamW settings, gradient reduction, loss weighting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class OptimSection:
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # fp32 gradient buffers and DP reduction; false halves their memory (eagle2.5-8b at 32K on
    # 80 GB cards needs it: BENCHMARKS.md#eagle25-8b-at-32k-on-80-gb-cards)
    grad_reduce_in_fp32: bool = True
    # one fused AdamW + clip + bf16-param pass per DDP bucket shard (training/flat_adamw.py); false:
    # megatron's per-parameter step (same arithmetic, ~1.6x the optimizer's memory traffic)
    flat_adamw: bool = True
    # GPUs: each DDP bucket's gradient reduce-scatter starts while the backward still runs (megatron
    # DDP); DP-2 scaling at 8K goes from 94% to 99.5% (BENCHMARKS.md#multi-gpu-scaling). CPU/gloo: off.
    overlap_grad_reduce: bool = True


@dataclass
class LossConfig:
    # "sqrt": Eagle 2.5 per-sub-sample weights w = (1/sqrt n_i) / sum_j sqrt n_j per pack.
    # "token": plain mean over supervised tokens.
    weighting: Literal["sqrt", "token"] = "sqrt"
    chunk_tokens: int = 2048  # tokens per chunk of the chunked cross-entropy
