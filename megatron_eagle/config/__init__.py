"""One config package: model, parallel layout, curriculum stages, optimizer and run, loaded and
checked once (:func:`load_run`); :func:`check_layout` is the one check of a parallel layout."""

from megatron_eagle.config.curriculum import (Curriculum, DatasetRef, LRSchedule, Stage, check_curriculum,
                                              load_curriculum)
from megatron_eagle.config.errors import ConfigError
from megatron_eagle.config.io import apply_overrides, from_dict, merge_preset, read_yaml, to_dict
from megatron_eagle.config.model import (PRESETS, SIGLIP_SO400M_448, FreezeConfig, LLMConfig, ModelConfig,
                                         VisionConfig, preset_model_config)
from megatron_eagle.config.optim import LossConfig, OptimSection
from megatron_eagle.config.parallel import CP_VARIANTS, ParallelConfig, ulysses_degree
from megatron_eagle.config.run import (EagleConfig, InitConfig, Run, RunConfig, TrainSection, load_config, load_run,
                                       load_run_config, validate)
from megatron_eagle.config.validate import check_layout

__all__ = [
    "CP_VARIANTS", "PRESETS", "SIGLIP_SO400M_448", "ConfigError", "Curriculum", "DatasetRef", "EagleConfig",
    "FreezeConfig", "InitConfig", "LLMConfig", "LRSchedule", "LossConfig", "ModelConfig", "OptimSection",
    "ParallelConfig", "Run", "RunConfig", "Stage", "TrainSection", "VisionConfig", "apply_overrides",
    "check_curriculum", "check_layout", "from_dict", "load_config", "load_curriculum", "load_run",
    "load_run_config", "merge_preset", "preset_model_config", "read_yaml", "to_dict", "ulysses_degree",
    "validate",
]
