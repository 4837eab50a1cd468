"""Training checkpoints <-> HF Eagle 2.5 directories.

``checkpoint_to_hf``: a dist checkpoint of any TP/PP/DP layout -> HF dir (sharded safetensors
with an index, tokenizer, preprocessor config). megatron's dist_checkpointing reshards on load,
so the export runs at whatever layout it is launched with (one process by default), streaming
tensor by tensor. ``hf_to_checkpoint``: an HF dir (or SigLIP + Qwen2.5 dirs) -> a checkpoint
that ``train`` can start from (``init.checkpoint``) at any layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_eagle.config import ModelConfig, ParallelConfig, from_dict


def _model_config(meta: dict) -> ModelConfig:
    cfg = from_dict(ModelConfig, meta["model"])
    cfg.freeze = from_dict(type(cfg.freeze), {})
    return cfg


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir / checkpoints root holding a ``latest`` pointer."""
    from megatron_eagle.training.checkpoint import latest_checkpoint

    p = Path(path)
    if (p / "meta.json").exists():
        return p
    for root in (p, p / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"{path}: no checkpoint (no meta.json and no `latest` pointer)")


def write_preprocessor_config(out: Path, cfg: ModelConfig, max_tiles: int = 12) -> None:
    """The image processor's settings (the released model's keys, our tiling and normalisation)."""
    from megatron_eagle.convert.hf_export.config import hf_preprocessor_config

    (out / "preprocessor_config.json").write_text(json.dumps(hf_preprocessor_config(cfg, max_tiles), indent=2) + "\n")


def check_tokenizer_fits(tokenizer_dir: str | Path, cfg: ModelConfig) -> None:
    """The tokenizer an export ships must index the model's vocabulary and name its <IMG_CONTEXT> id."""
    from megatron_eagle.tokenizer import load_tokenizer, special_token_ids

    tok = load_tokenizer(tokenizer_dir)
    if len(tok) > cfg.llm.vocab_size:
        raise ValueError(f"{tokenizer_dir}: tokenizer has {len(tok)} ids but the checkpoint's model.llm.vocab_size "
                         f"is {cfg.llm.vocab_size}; pass the tokenizer the run trained with (--tokenizer)")
    img = special_token_ids(tok)["img_context"]
    if img != cfg.image_token_id:
        raise ValueError(f"{tokenizer_dir}: <IMG_CONTEXT> is id {img} but the checkpoint's model.image_token_id is "
                         f"{cfg.image_token_id}; pass the tokenizer the run trained with (--tokenizer)")


def checkpoint_to_hf(ckpt: str | Path, out_dir: str | Path, tokenizer_dir: Optional[str | Path] = None,
                     max_shard_size: str = "5GB", dtype: Optional[str] = None, tp: int = 1, pp: int = 1,
                     max_tiles: int = 12) -> Path:
    """Export a training checkpoint to a self-contained HF Eagle 2.5 dir (every rank calls it).

    Everything is written into a temporary sibling that replaces ``out_dir`` only once complete,
    so a failure leaves no half-written directory behind.
    """
    import shutil

    from megatron_eagle.convert.hf_export.config import DEFAULT_MAX_TILES
    from megatron_eagle.convert.hf_export.writer import partial_dir, publish
    from megatron_eagle.convert.load import export_model_to_hf, init_process_groups
    from megatron_eagle.models.eagle import build_model
    from megatron_eagle.training.checkpoint import load_checkpoint, read_meta

    path = resolve_checkpoint(ckpt)
    meta = read_meta(path)
    cfg = _model_config(meta)
    tok = tokenizer_dir or meta.get("tokenizer")
    if tok is None:
        raise ValueError(f"{path}/meta.json names no tokenizer: pass --tokenizer DIR")
    check_tokenizer_fits(tok, cfg)
    init_process_groups(tp, pp)
    rank0 = dist.get_rank() == 0
    tmp = partial_dir(out_dir)
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    failed = torch.zeros(1)
    try:
        model = build_model(cfg, ParallelConfig(tp=tp, pp=pp))
        load_checkpoint(path, [model], None, load_optimizer=False)
        export_model_to_hf(model, tmp, tok, max_shard_size=max_shard_size, dtype=dtype, cfg=cfg)
        if rank0 and max_tiles != DEFAULT_MAX_TILES:
            write_preprocessor_config(tmp, cfg, max_tiles)
            conf = json.loads((tmp / "config.json").read_text())
            conf["max_dynamic_tiles"] = conf["max_dynamic_patch"] = max_tiles
            (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    except BaseException:
        failed.fill_(1)
        raise
    finally:
        if dist.get_world_size() > 1:
            dist.all_reduce(failed)
        if rank0:
            if failed.item():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                publish(tmp, out_dir)
        if dist.get_world_size() > 1 and not failed.item():
            dist.barrier()
    return Path(out_dir)


def hf_to_checkpoint(source, out_root: str | Path, tp: int = 1, pp: int = 1,
                     params_dtype: str = "float32") -> Path:
    """Write an HF Eagle dir (or (siglip_dir, qwen2_dir)) as a checkpoint `train` can start from."""
    from megatron_eagle.convert.load import init_process_groups, load_hf_into_model, model_config_from_source
    from megatron_eagle.models.eagle import build_model
    from megatron_eagle.training.checkpoint import save_checkpoint

    cfg = model_config_from_source(source, params_dtype=params_dtype)
    init_process_groups(tp, pp)
    model = build_model(cfg, ParallelConfig(tp=tp, pp=pp))
    load_hf_into_model(model, source, cfg)
    import dataclasses

    tok = source if isinstance(source, (str, Path)) else source[1]
    meta = dict(stage_index=-1, stage="from-hf", step_in_stage=0, stage_done=True, global_step=0,
                skipped_total=0, consecutive_skips=0, model=dataclasses.asdict(cfg), tokenizer=str(tok))
    with torch.no_grad():
        return save_checkpoint(out_root, 0, [model], None, meta, keep_last=0)
