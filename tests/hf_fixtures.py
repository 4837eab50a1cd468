"""Shared, cached fixtures for the HF conversion tests: tiny random checkpoints written with
transformers modules, and one distributed run per (tp, pp) layout that loads, exports and
checks parity (cached so several test files share it)."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest

import torch

from tests.dist import run_distributed

_ROOT: list[Path] = []


def root() -> Path:
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="megatron_eagle_hf_tests_")))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    return _ROOT[0]


@functools.lru_cache(maxsize=None)
def tokenizer_dir() -> Path:
    from megatron_eagle.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(root() / "tokenizer")


@functools.lru_cache(maxsize=None)
def tiny_checkpoint(tied: bool = False, seed: int = 0) -> Path:
    """A random tiny Eagle HF dir, sharded (256 KB shards) so reading goes through the index."""
    from megatron_eagle.convert.reference import make_random_hf_checkpoint
    from tests.model_fixtures import tiny_model_config

    return make_random_hf_checkpoint(root() / f"eagle_tied{int(tied)}_s{seed}", tiny_model_config(tie=tied),
                                     tokenizer_dir(), seed=seed, max_shard_size="256KB")


def read_all(hf_dir: Path) -> dict[str, torch.Tensor]:
    from megatron_eagle.convert.hf_io import SafetensorsReader

    r = SafetensorsReader(hf_dir)
    return {k: r.get(k) for k in r.stored_names()}


def split_eagle_dir(src: Path, vis: Path, llm: Path, siglip_text_tower: bool = False) -> tuple[Path, Path]:
    """An Eagle HF dir split like the usual stage-1 start: a ``SiglipModel``-style dir (vision keys
    ``vision_model.*``; with ``siglip_text_tower`` also a text tower the import must ignore) and a
    plain Qwen2/Qwen3 dir with the tokenizer files."""
    from safetensors.torch import save_file

    cfg = json.loads((src / "config.json").read_text())
    tensors = read_all(src)
    vis.mkdir(exist_ok=True)
    llm.mkdir(exist_ok=True)
    eagle = "vision_model.vision_model."
    v = {"vision_model." + k[len(eagle):]: t for k, t in tensors.items() if k.startswith(eagle)}
    vis_cfg = {"model_type": "siglip", "vision_config": cfg["vision_config"]}
    if siglip_text_tower:
        v["text_model.embeddings.token_embedding.weight"] = torch.zeros(7, 4)
        v["logit_scale"] = torch.zeros(1)
        vis_cfg["text_config"] = {"model_type": "siglip_text_model"}
    save_file(v, str(vis / "model.safetensors"))
    (vis / "config.json").write_text(json.dumps(vis_cfg))
    q = {k[len("language_model."):]: t for k, t in tensors.items() if k.startswith("language_model.")}
    save_file(q, str(llm / "model.safetensors"))
    (llm / "config.json").write_text(json.dumps(cfg["text_config"]))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens", "vocab", "merges", "added_tokens")):
            shutil.copy(f, llm / f.name)
    return vis, llm


@functools.lru_cache(maxsize=None)
def separate_dirs(tied: bool = False) -> tuple[Path, Path]:
    """The tiny checkpoint split into a full ``SiglipModel`` dir and a Qwen2 dir."""
    return split_eagle_dir(tiny_checkpoint(tied), root() / f"siglip_tied{int(tied)}",
                           root() / f"qwen2_tied{int(tied)}", siglip_text_tower=True)


def _layout_worker(rank, world, hf_dir, out_dir, tp, pp, separate):
    import torch.distributed as dist

    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.convert.load import build_model_from_hf, export_model_to_hf
    from megatron_eagle.convert.reference import EagleHFReference
    from megatron_eagle.convert.sharding import iter_full_parameters
    from megatron_eagle.convert.verify import model_logits, random_cases, verify
    from megatron_eagle.runtime.distributed import init_model_parallel

    init_model_parallel(tp, pp, 1)
    model, report = build_model_from_hf(hf_dir, ParallelConfig(tp=tp, pp=pp))
    index = export_model_to_hf(model, out_dir, tokenizer_dir=hf_dir, max_shard_size="200KB")
    reporter = rank == world - 1
    ref = EagleHFReference.from_pretrained(hf_dir) if reporter else None
    out = {"reporter": reporter, "index": index, "unused": report.unused_hf, "read": sorted(report.read_hf)}
    out["diffs"] = verify(model, ref, model.model_cfg, seed=1, reporter=reporter)
    # A pack must equal its sub-samples run alone (through our model only).
    samples = random_cases(model.model_cfg, seed=2)["mixed_pack"]
    pack = model_logits(model, samples, model.model_cfg.vision.image_size)
    alone = [model_logits(model, [s], model.model_cfg.vision.image_size) for s in samples]
    if pack is not None:
        alone = torch.cat(alone)
        out["pack_vs_alone"] = ((pack - alone).abs().max().item(), alone.abs().max().item())
    if separate is not None:  # stage-1 start: separate SigLIP + Qwen2 dirs, connector left at init
        full = dict(iter_full_parameters(model))
        torch.manual_seed(1234)
        sep, sep_report = build_model_from_hf(tuple(separate), ParallelConfig(tp=tp, pp=pp))
        sep_full = dict(iter_full_parameters(sep))
        out["separate"] = {
            "initialised": sep_report.initialised, "unused": sep_report.unused_hf,
            "equal": sorted(k for k in full if torch.equal(full[k], sep_full[k])),
            "different": sorted(k for k in full if not torch.equal(full[k], sep_full[k])),
        }
    dist.barrier()
    return out


@functools.lru_cache(maxsize=None)
def layout_run(tp: int, pp: int, tied: bool) -> dict:
    """Load the tiny checkpoint at (tp, pp), export it, check parity (and at tp = pp = 1 load
    the separate SigLIP + Qwen2 dirs too); merged results."""
    hf = tiny_checkpoint(tied)
    out = root() / f"export_tp{tp}_pp{pp}_tied{int(tied)}"
    separate = [str(p) for p in separate_dirs(tied)] if tp == pp == 1 else None
    results = run_distributed(_layout_worker, tp * pp, str(hf), str(out), tp, pp, separate)
    merged = dict(next(r for r in results if r["reporter"]))
    merged["index"] = results[0]["index"]
    merged["per_rank_read"] = [r["read"] for r in results]
    merged["out"] = out
    merged["src"] = hf
    return merged


def write_media() -> tuple[Path, Path]:
    import av
    import numpy as np
    from PIL import Image

    img_path, vid_path = root() / "gen_image.png", root() / "gen_video.mp4"
    a = np.zeros((150, 200, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, 200, dtype=np.uint8)[None]
    a[..., 1] = np.linspace(0, 255, 150, dtype=np.uint8)[:, None]
    Image.fromarray(a).save(img_path)
    with av.open(str(vid_path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            f = np.zeros((48, 64, 3), np.uint8)
            f[..., 0] = 12 * i
            f[:, (3 * i) % 64, 1] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return img_path, vid_path


@pytest.fixture(scope="module")
def media():
    return write_media()
