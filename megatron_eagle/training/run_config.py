"""The `megatron-eagle train` config: model, curriculum, data, init, optimizer, loop options."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from megatron_eagle.config import ConfigError, EagleConfig, LossConfig, ModelConfig, load_config, validate


@dataclass
class InitConfig:
    """Where the weights of the first stage come from (at most one of hf / vision+llm / checkpoint)."""

    hf: Optional[str] = None          # an Eagle 2.5 HF directory
    vision: Optional[str] = None      # a SigLIP HF directory (with `llm`: the usual stage-1 start)
    llm: Optional[str] = None         # a Qwen2.5 HF directory
    checkpoint: Optional[str] = None  # a training checkpoint (weights only)


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
class TrainSection:
    save_every_steps: int = 100
    save_every_minutes: float = 30.0
    keep_last: int = 3
    log_every: int = 10               # console; metrics.jsonl gets every step
    max_consecutive_skips: int = 10
    num_workers: int = 2
    prefetch: int = 2
    tp_data_mode: Literal["duplicate", "broadcast"] = "duplicate"
    peak_tflops: float = 989.0        # per GPU, for MFU (H100 SXM dense bf16)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 params on GPU, fp32 on CPU
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    # Stop cleanly (save, exit 0) after this many steps in this launch: time-boxed jobs, tests.
    stop_after_steps: Optional[int] = None
    # Train only this stage (one job of a Slurm chain): it must be the run's next stage; exit 0 after it.
    only_stage: Optional[str] = None
    # Testing aid: make the loss non-finite at these global steps (exercises the skip guard).
    inject_nonfinite_steps: list[int] = field(default_factory=list)


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    curriculum: str = ""              # curriculum YAML (stages, data, layouts); relative to this file
    tokenizer: str = ""               # HF tokenizer directory
    data: dict = field(default_factory=dict)  # optional dataset name -> prepared dir overrides
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainSection = field(default_factory=TrainSection)
    seed: int = 1234


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a run YAML (safe loader) with ``--set`` overrides; paths resolve against its folder."""
    cfg = load_config(path, overrides, cls=RunConfig)
    base = Path(path).resolve().parent
    for owner, name in ((cfg, "curriculum"), (cfg, "tokenizer"), (cfg, "run_dir"), (cfg.init, "hf"),
                        (cfg.init, "vision"), (cfg.init, "llm"), (cfg.init, "checkpoint")):
        value = getattr(owner, name)
        if value and "://" not in value and not Path(value).is_absolute():
            setattr(owner, name, str(base / value))
    cfg.data = {k: (v if "://" in v or Path(v).is_absolute() else str(base / v)) for k, v in cfg.data.items()}
    check_run_config(cfg)
    return cfg


def check_run_config(cfg: RunConfig) -> None:
    if not cfg.curriculum:
        raise ConfigError("curriculum", "missing", "name a curriculum YAML with the stages to train")
    if not cfg.tokenizer:
        raise ConfigError("tokenizer", "missing", "name an HF tokenizer directory")
    init = cfg.init
    if init.hf and (init.vision or init.llm or init.checkpoint) or (init.checkpoint and (init.vision or init.llm)):
        raise ConfigError("init", "several weight sources given", "set only one of hf, vision+llm, checkpoint")
    if bool(init.vision) != bool(init.llm):
        raise ConfigError("init.vision" if not init.vision else "init.llm", "given without its partner",
                          "set both init.vision (SigLIP dir) and init.llm (Qwen2.5 dir)")
    if cfg.train.max_consecutive_skips < 1:
        raise ConfigError("train.max_consecutive_skips", "must be >= 1", "use e.g. 10")


def check_stage_layout(cfg: RunConfig, stage, world_size: int) -> None:
    """Refuse a stage whose layout cannot fit the model or the world, naming the fix."""
    try:
        validate(EagleConfig(model=cfg.model, parallel=stage.parallel, loss=cfg.loss), world_size)
    except ConfigError as e:
        raise ConfigError(f"stages[{stage.name}].{e.field}".replace(".model.", ".model."), str(e).split(": ", 1)[1]
                          .split(". Fix: ")[0], str(e).split(". Fix: ")[-1]) from None
    if cfg.model.llm.max_position_embeddings < stage.seq_len:
        raise ConfigError(f"stages[{stage.name}].seq_len",
                          f"{stage.seq_len} exceeds model.llm.max_position_embeddings="
                          f"{cfg.model.llm.max_position_embeddings}",
                          "lower seq_len or raise model.llm.max_position_embeddings")
