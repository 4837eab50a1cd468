"""A run: the `megatron-eagle train` config (model, curriculum, data, init, optimizer, loop) and its
curriculum, loaded and checked once by :func:`load_run`.

:class:`EagleConfig` with :func:`load_config` is the smaller model + parallel + loss config
(a model YAML, e.g. for a cost model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from megatron_eagle.config.curriculum import Curriculum, Stage, load_curriculum
from megatron_eagle.config.errors import ConfigError
from megatron_eagle.config.io import apply_overrides, from_dict, merge_preset, read_yaml
from megatron_eagle.config.model import ModelConfig
from megatron_eagle.config.optim import LossConfig, OptimSection
from megatron_eagle.config.parallel import ParallelConfig
from megatron_eagle.config.validate import check_layout


@dataclass
class EagleConfig:
    """Model, parallel layout and loss: the config of one model on one layout."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 1234


@dataclass
class InitConfig:
    """Where the weights of the first stage come from (at most one of hf / vision+llm / checkpoint)."""

    hf: Optional[str] = None          # an Eagle 2.5 HF directory
    vision: Optional[str] = None      # a SigLIP HF directory (with `llm`: the usual stage-1 start)
    llm: Optional[str] = None         # a Qwen2.5 HF directory
    checkpoint: Optional[str] = None  # a training checkpoint (weights only)


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls=EagleConfig):
    """Load a config from YAML (safe loader) plus overrides, expand presets; an EagleConfig is checked."""
    data: dict[str, Any] = read_yaml(path, "write `key: value` pairs") if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    if "model" in {f.name for f in dataclasses.fields(cls)}:
        data = merge_preset(data)
    cfg = from_dict(cls, data)
    if isinstance(cfg, EagleConfig):
        validate(cfg)
    return cfg


def validate(cfg: EagleConfig, world_size: Optional[int] = None) -> None:
    """Check that the model fits the parallel layout (and ``world_size``); raise ConfigError naming the fix."""
    check_layout(cfg.model, cfg.parallel, world_size=world_size)


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
    _check_run_config(cfg)
    return cfg


def _check_run_config(cfg: RunConfig) -> None:
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


@dataclass
class Run:
    """A run config and its curriculum, both checked: every stage fits the run's model."""

    config: RunConfig
    curriculum: Curriculum

    def check_world(self, stage: Stage, world_size: Optional[int] = None, *, nodes: Optional[int] = None,
                    tasks: Optional[int] = None) -> tuple[int, int]:
        """(dp, micro_batches) of ``stage`` on a world known only now (``submit``'s nodes x tasks)."""
        return check_layout(self.config.model, stage.parallel, stage=stage.name, seq_len=stage.seq_len,
                            world_size=world_size, nodes=nodes, tasks=tasks, packs_per_step=stage.packs_per_step)


def load_run(path: str | Path, overrides: list[str] | None = None, world_size: Optional[int] = None) -> Run:
    """Load and check a run YAML with ``--set`` overrides and its curriculum, once.

    Every stage's layout must fit the run's model; with ``world_size`` also the world (only the
    stage of ``train.only_stage`` when it is set).
    """
    cfg = load_run_config(path, overrides)
    only = cfg.train.only_stage
    cur = load_curriculum(cfg.curriculum, world_size, model=cfg.model, only=only)
    names = [s.name for s in cur.stages]
    if only and only not in names:
        raise ConfigError("train.only_stage", f"no stage named {only!r}", f"use one of {names}")
    return Run(cfg, cur)
