"""Load HF Eagle 2.5 weights into our model at any TP/PP layout, and export back.

Import: every rank reads, lazily and tensor by tensor, only the HF tensors of its own
pipeline stage, fuses them into our full layout and keeps its TP shard.
Export: each stage gathers its TP shards one tensor at a time; one writer per stage
(TP rank 0, DP rank 0, CP rank 0) streams them into bounded-size shards; global rank 0
then names the shards, writes the index, ``config.json`` and the tokenizer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron_eagle.config import ModelConfig
from megatron_eagle.convert import hf_io, hf_mapping
from megatron_eagle.convert.hf_export.config import hf_config
from megatron_eagle.convert.hf_export.writer import write_processor_files
from megatron_eagle.convert.sharding import iter_full_parameters, load_full_parameters

Source = Union[str, Path, Sequence[Union[str, Path]]]


def _split_source(source: Source) -> tuple[Optional[Path], Optional[tuple[Path, Path]]]:
    if isinstance(source, (str, Path)):
        return Path(source), None
    vision, llm = source
    return None, (Path(vision), Path(llm))


def image_token_id_from_tokenizer(tokenizer_dir: str | Path) -> int:
    from megatron_eagle.tokenizer import load_tokenizer, special_token_ids

    return special_token_ids(load_tokenizer(tokenizer_dir))["img_context"]


def model_config_from_source(source: Source, params_dtype: str = "float32",
                             tokenizer_dir: Optional[str | Path] = None) -> ModelConfig:
    """ModelConfig of an Eagle HF dir, or of a (SigLIP dir, Qwen2 dir) pair.

    For a pair the ``<IMG_CONTEXT>`` id comes from the tokenizer (``tokenizer_dir``, else
    the Qwen2 dir), which gets Eagle's image tokens added if it lacks them.
    """
    hf_dir, pair = _split_source(source)
    if hf_dir is not None:
        return hf_mapping.model_config_from_hf(hf_io.read_config(hf_dir), params_dtype)
    vision_dir, llm_dir = pair
    img_id = image_token_id_from_tokenizer(tokenizer_dir or llm_dir)
    cfg = hf_mapping.model_config_from_parts(hf_io.siglip_vision_config(vision_dir), hf_io.read_config(llm_dir),
                                             0.5, img_id, params_dtype)
    if img_id >= cfg.llm.vocab_size:
        raise ValueError(f"<IMG_CONTEXT> id {img_id} is outside the LLM vocabulary ({cfg.llm.vocab_size}); "
                         "resize the embeddings first")
    return cfg


@dataclasses.dataclass
class LoadReport:
    loaded: int                 # parameters of this rank filled from the checkpoint
    initialised: list[str]      # parameters left at their init (connector from separate dirs)
    unused_hf: list[str]        # HF tensors of the checkpoint nothing maps to (whole model)
    read_hf: set[str] = dataclasses.field(default_factory=set)  # HF tensors this rank read (stored names)


def _open_readers(source: Source):
    hf_dir, pair = _split_source(source)
    if hf_dir is not None:
        return [hf_io.SafetensorsReader(hf_dir)]
    return [hf_io.siglip_reader(pair[0]), hf_io.qwen2_reader(pair[1])]


def _stored_as_eagle(readers) -> set[str]:
    """Stored tensor names, seen through Eagle's names, for the unused-tensor check."""
    if len(readers) == 1:
        return set(readers[0].stored_names())
    vis, llm = readers
    nested = any(n.startswith("vision_model.") for n in vis.stored_names())
    names = {"vision_model.vision_model." + (n[len("vision_model."):] if nested else n)
             for n in vis.stored_names() if n.startswith("vision_model.") or not nested}
    names |= {"language_model." + n for n in llm.stored_names()}
    return names


@torch.no_grad()
def load_hf_into_model(model: torch.nn.Module, source: Source, cfg: Optional[ModelConfig] = None) -> LoadReport:
    """Fill this rank's parameters from an HF Eagle dir or a (SigLIP dir, Qwen2 dir) pair.

    Call on every rank after :func:`build_model`. With separate dirs the connector keeps
    its fresh initialisation (stage-1 start); anything else missing raises ``KeyError``.
    """
    cfg = cfg or model.model_cfg
    readers = _open_readers(source)
    separate = len(readers) == 2

    def read(hf_name: str) -> Optional[torch.Tensor]:
        for r in readers:
            t = r.get(hf_name)
            if t is not None:
                return t
        return None

    def get(name: str) -> Optional[torch.Tensor]:
        if separate and name.startswith("connector."):
            return None
        return hf_mapping.from_hf(name, cfg, read)

    missing = load_full_parameters(model, get, strict=False)
    initialised = [n for n in missing if separate and n.startswith("connector.")]
    really_missing = [n for n in missing if n not in initialised]
    if really_missing:
        from megatron_eagle.convert.sharding import _layer_offsets, global_name

        first = global_name(really_missing[0], _layer_offsets(model))
        raise KeyError(f"HF checkpoint lacks tensors for {len(really_missing)} parameters, e.g. {first} "
                       f"(HF {list(hf_mapping.hf_sources(first, cfg))})")
    expected = set(hf_mapping.expected_hf_names(cfg))
    unused = sorted(n for n in _stored_as_eagle(readers) if n not in expected and not hf_mapping.is_ignored_hf(n)
                    and not (n == hf_mapping.HF_LM_HEAD and cfg.llm.tie_embeddings)
                    and not (separate and not n.startswith(("vision_model.", "language_model."))))
    read_hf = set().union(*(r.requested for r in readers))
    for r in readers:
        r.close()
    loaded = sum(1 for _ in model.parameters()) - len(missing)
    return LoadReport(loaded=loaded, initialised=initialised, unused_hf=unused, read_hf=read_hf)


def _groups():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 0, 0, 0, 1
    return (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(),
            ps.get_context_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_pipeline_model_parallel_world_size())


def _dtype(name: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    if name is None or isinstance(name, torch.dtype):
        return name
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]


@torch.no_grad()
def export_model_to_hf(model: torch.nn.Module, out_dir: str | Path, tokenizer_dir: Optional[str | Path] = None,
                       max_shard_size: str | int = "5GB", dtype: Optional[str | torch.dtype] = None,
                       cfg: Optional[ModelConfig] = None) -> Optional[dict]:
    """Write the model (all ranks call this) as an HF Eagle 2.5 dir at ``out_dir``.

    Shards hold at most ``max_shard_size`` bytes and are flushed as they fill; ``dtype``
    (default: the parameters' own) is the stored dtype. Returns the index on global rank 0.
    """
    cfg = cfg or model.model_cfg
    out = Path(out_dir)
    tp_rank, dp_rank, cp_rank, pp_rank, pp_size = _groups()
    writer_rank = tp_rank == 0 and dp_rank == 0 and cp_rank == 0
    torch_dtype = _dtype(dtype)
    writer = hf_io.ShardedWriter(out, max_shard_size, tag=f"stage{pp_rank:03d}", dtype=torch_dtype) \
        if writer_rank else None
    for name, full in iter_full_parameters(model):  # TP collectives: every rank iterates
        if writer is not None:
            for hf_name, t in hf_mapping.to_hf(name, full, cfg):
                writer.add(hf_name, t)
        del full
    manifest = writer.close() if writer is not None else None

    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (pp_rank, manifest))
        manifests = [m for _, m in sorted((p, m) for p, m in gathered if m is not None)]
    else:
        manifests = [manifest]
    rank = dist.get_rank() if dist.is_initialized() else 0
    index = None
    if rank == 0:
        if len(manifests) != pp_size:
            raise RuntimeError(f"expected one writer per pipeline stage ({pp_size}), got {len(manifests)}")
        index = hf_io.finalize_shards(out, manifests)
        stored = next(iter(model.parameters())).dtype if torch_dtype is None else torch_dtype
        eos = pad = None
        if tokenizer_dir is not None:
            tok = hf_io.save_tokenizer(tokenizer_dir, out)
            pad = tok.pad_token_id
            from megatron_eagle.tokenizer import special_token_ids
            ids = special_token_ids(tok)
            if ids["img_context"] != cfg.image_token_id:
                raise ValueError(f"tokenizer's <IMG_CONTEXT> id {ids['img_context']} != model image_token_id "
                                 f"{cfg.image_token_id}")
            eos = ids["eos"]
        hf_io.write_json(out / "config.json", hf_config(cfg, str(stored).replace("torch.", ""), eos))
        write_processor_files(out, cfg, eos, pad)  # processor, generation config, remote code
        missing = set(hf_mapping.expected_hf_names(cfg)) - set(index["weight_map"])
        if missing:
            raise RuntimeError(f"export is missing {len(missing)} tensors, e.g. {sorted(missing)[:5]}")
    if world > 1:
        dist.barrier()
    return index


def build_model_from_hf(source: Source, parallel=None, params_dtype: str = "float32",
                        tokenizer_dir: Optional[str | Path] = None):
    """Build this rank's stage (process groups must exist) and load HF weights into it."""
    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.models.eagle import build_model

    cfg = model_config_from_source(source, params_dtype, tokenizer_dir)
    model = build_model(cfg, parallel or ParallelConfig())
    report = load_hf_into_model(model, source, cfg)
    model.eval()
    return model, report


def init_process_groups(tp: int = 1, pp: int = 1, seed: int = 1234):
    """torch.distributed + megatron groups for a CLI tool; works without torchrun (world 1)."""
    import os
    import socket

    from megatron_eagle.runtime.distributed import init_distributed, init_model_parallel

    if "WORLD_SIZE" not in os.environ and "SLURM_NTASKS" not in os.environ and "MASTER_PORT" not in os.environ:
        with socket.socket() as s:  # a lone process: any free port, so parallel runs don't collide
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    rt = init_distributed()
    init_model_parallel(tp, pp, 1, seed=seed)
    return rt
