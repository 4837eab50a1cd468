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


def check_tokenizer_fits(tokenizer_dir: str | Path, cfg: ModelConfig, config_file: str | Path,
                         vocab_field: str = "text_config.vocab_size") -> None:
    """Every id of the tokenizer (Eagle's tokens included) must have an embedding row; else a
    ValueError naming the tokenizer file, the checkpoint's config file and its vocab field."""
    from megatron_eagle.tokenizer import load_tokenizer, special_token_ids

    tok = load_tokenizer(tokenizer_dir)
    tok_file = next((Path(tokenizer_dir) / f for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")
                     if (Path(tokenizer_dir) / f).exists()), Path(tokenizer_dir))
    if len(tok) > cfg.llm.vocab_size:
        raise ValueError(f"{tok_file}: the tokenizer holds {len(tok)} tokens but {config_file} field {vocab_field} "
                         f"is {cfg.llm.vocab_size}: ids >= {cfg.llm.vocab_size} have no embedding row. Use the "
                         "checkpoint's own tokenizer, or resize the embeddings first")
    img = special_token_ids(tok)["img_context"]
    if img != cfg.image_token_id:
        raise ValueError(f"{tok_file}: <IMG_CONTEXT> is id {img} but {config_file} field image_token_index is "
                         f"{cfg.image_token_id}: this tokenizer does not belong to the checkpoint")


def model_config_from_source(source: Source, params_dtype: str = "float32",
                             tokenizer_dir: Optional[str | Path] = None) -> ModelConfig:
    """ModelConfig of an Eagle HF dir, or of a (SigLIP dir, Qwen2/Qwen3 dir) pair.

    For a pair the ``<IMG_CONTEXT>`` id comes from the tokenizer (``tokenizer_dir``, else
    the LLM dir), which gets Eagle's image tokens added if it lacks them. A tokenizer that does not
    fit the checkpoint's vocabulary is refused, naming both files.
    """
    hf_dir, pair = _split_source(source)
    if hf_dir is not None:
        config_file = Path(hf_dir) / "config.json"
        raw = hf_io.read_config(hf_dir)
        cfg = hf_mapping.model_config_from_hf(raw, params_dtype, source=str(config_file))
        tok = tokenizer_dir or (hf_dir if (Path(hf_dir) / "tokenizer_config.json").exists() else None)
        if raw.get("image_token_index") is None:  # the official config class's default is None
            if tok is None:
                raise hf_mapping.HFConfigError("missing, and no tokenizer beside it to read <IMG_CONTEXT> from",
                                               "image_token_index", str(config_file))
            cfg.image_token_id = image_token_id_from_tokenizer(tok)
        if tok is not None:
            check_tokenizer_fits(tok, cfg, config_file)
        return cfg
    vision_dir, llm_dir = pair
    img_id = image_token_id_from_tokenizer(tokenizer_dir or llm_dir)
    try:
        cfg = hf_mapping.model_config_from_parts(hf_io.siglip_vision_config(vision_dir),
                                                 hf_io.read_config(llm_dir), 0.5, img_id, params_dtype)
    except hf_mapping.HFConfigError as e:
        where = vision_dir if (e.field or "").startswith("vision_config") else llm_dir
        field = (e.field or "").replace("text_config.", "").replace("vision_config.", "") or None
        raise hf_mapping.HFConfigError(e.problem, field, str(Path(where) / "config.json")) from None
    check_tokenizer_fits(tokenizer_dir or llm_dir, cfg, Path(llm_dir) / "config.json", "vocab_size")
    return cfg


@dataclasses.dataclass
class LoadReport:
    loaded: int                 # parameters of this rank filled from the checkpoint
    initialised: list[str]      # parameters left at their init (connector from separate dirs)
    unused_hf: list[str]        # HF tensors of the checkpoint nothing maps to (whole model)
    read_hf: set[str] = dataclasses.field(default_factory=set)  # HF tensors this rank read (stored names)


def check_shards(directory: str | Path) -> None:
    """Every shard ``model.safetensors.index.json`` names must exist (FileNotFoundError naming the
    index, the field and the missing files)."""
    index = Path(directory) / hf_io.INDEX_NAME
    if not index.exists():
        return
    import json

    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    missing = [f for f in files if not (Path(directory) / f).exists()]
    if missing:
        raise FileNotFoundError(f"{index}: weight_map names {len(missing)} shard(s) missing from {directory}: "
                                f"{missing[:4]}{' ...' if len(missing) > 4 else ''}; download them again")


def _open_readers(source: Source):
    hf_dir, pair = _split_source(source)
    for d in ([hf_dir] if hf_dir is not None else pair):
        check_shards(d)
    if hf_dir is not None:
        return [hf_io.SafetensorsReader(hf_dir)]
    return [hf_io.siglip_reader(pair[0]), hf_io.qwen2_reader(pair[1])]


_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def declared_dtype(source: Source) -> dict[int, tuple[torch.dtype, Path]]:
    """Per reader position: (dtype its config.json declares in ``torch_dtype``/``dtype``, that file)."""
    hf_dir, pair = _split_source(source)
    out = {}
    for i, d in enumerate([hf_dir] if hf_dir is not None else pair):
        cfg = hf_io.read_config(d)
        name = cfg.get("torch_dtype") or cfg.get("dtype")
        if isinstance(name, str) and name in _DTYPE_NAMES:
            out[i] = (_DTYPE_NAMES[name], Path(d) / "config.json")
    return out


def check_feature_layer(source: Source, cfg: ModelConfig) -> None:
    """An Eagle dir's ``select_layer`` must be the model's: every layer loads either way, so a
    mismatch would silently change which ViT features the connector sees."""
    hf_dir, _ = _split_source(source)
    if hf_dir is None:
        return
    raw = hf_io.read_config(hf_dir)
    select = raw.get("select_layer")
    select = hf_mapping.OFFICIAL_SELECT_LAYER if select is None else int(select)
    if select != cfg.vision.select_layer:
        raise ValueError(f"{Path(hf_dir) / 'config.json'}: field select_layer is {select}"
                         f"{' (absent: the official default)' if raw.get('select_layer') is None else ''} but "
                         f"model.vision.select_layer is {cfg.vision.select_layer}; set "
                         f"model.vision.select_layer={select} to load this checkpoint as trained")


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
    check_feature_layer(source, cfg)
    readers = _open_readers(source)
    separate = len(readers) == 2
    declared = declared_dtype(source)

    def read(hf_name: str) -> Optional[torch.Tensor]:
        for i, r in enumerate(readers):
            t = r.get(hf_name)
            if t is not None:
                if i in declared and t.is_floating_point() and t.dtype != declared[i][0]:
                    stored = r.rename(hf_name)
                    raise TypeError(f"{r.dir / r._where[stored]}: tensor {stored} is {str(t.dtype)[6:]} but "
                                    f"{declared[i][1]} field torch_dtype says {str(declared[i][0])[6:]}; "
                                    "fix torch_dtype or re-save the weights in that dtype")
                return t
        return None

    def get(name: str) -> Optional[torch.Tensor]:
        if separate and name.startswith("connector."):
            return None
        t = hf_mapping.from_hf(name, cfg, read)
        if t is not None and name in hf_mapping.VOCAB_TENSORS and t.shape[0] != cfg.llm.vocab_size:
            raise ValueError(f"{hf_mapping.hf_sources(name, cfg)[0]} has {t.shape[0]} rows but the model's "
                             f"llm.vocab_size is {cfg.llm.vocab_size}: set model.llm.vocab_size to the "
                             "checkpoint's (text_config.vocab_size)")
        return t

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
                    and not hf_mapping.is_skipped_hf(n, cfg)
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
