"""Scaled-down random Eagle 2.5 HF checkpoints in the released and the official current layouts,
written with transformers' own config and model classes (the stand-in for downloaded weights).

- ``released``: fixed-resolution SigLIP2 patch16 (``siglip_vision_model``, as the released
  Eagle2.5-8B stores it) + Qwen2.5, ``select_layer`` -1;
- ``qwen3``: SigLIP2 patch14 + Qwen3 (no qkv bias, q/k RMSNorm, head_dim != hidden/heads), an odd
  vocabulary no TP divides, tied embeddings, and no ``select_layer`` in config.json (the official
  class default -4 applies);
- ``qwen3-preset``: the same without tying and with ``select_layer`` -1; ``siglip``: SigLIP + Qwen2.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import torch

from tests.hf_fixtures import root, split_eagle_dir, tokenizer_dir


def eagle_config(cfg, write_select_layer: bool = True, dtype: str = "float32") -> dict:
    """The config.json of ``cfg`` (a ModelConfig) as transformers' own config classes write it:
    ``SiglipVisionConfig`` (named after the SigLIP2 checkpoint for the siglip2 family) and
    ``Qwen2Config`` / ``Qwen3Config``."""
    from transformers import Qwen2Config, Qwen3Config, SiglipVisionConfig

    v, l = cfg.vision, cfg.llm
    vision = SiglipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size,
                                num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                                image_size=v.image_size, patch_size=v.patch_size,
                                layer_norm_eps=v.layernorm_eps).to_dict()
    vision["_name_or_path"] = (f"google/siglip2-so400m-patch{v.patch_size}-{v.image_size}"
                               if v.family == "siglip2" else f"google/siglip-so400m-patch{v.patch_size}-384")
    common = dict(vocab_size=l.vocab_size, hidden_size=l.hidden_size, intermediate_size=l.ffn_hidden_size,
                  num_hidden_layers=l.num_layers, num_attention_heads=l.num_heads,
                  num_key_value_heads=l.num_kv_heads, max_position_embeddings=l.max_position_embeddings,
                  rms_norm_eps=l.rms_eps, rope_theta=l.rope_theta, tie_word_embeddings=l.tie_embeddings)
    if l.family == "qwen3":
        text = Qwen3Config(head_dim=l.kv_channels, attention_bias=l.qkv_bias, **common).to_dict()
        text["architectures"] = ["Qwen3ForCausalLM"]
    else:
        text = Qwen2Config(**common).to_dict()
        text["architectures"] = ["Qwen2ForCausalLM"]
    d = {"architectures": ["Eagle2_5_VLForConditionalGeneration"], "model_type": "eagle_2_5_vl",
         "vision_config": vision, "text_config": text, "downsample_ratio": cfg.downsample_ratio,
         "image_token_index": cfg.image_token_id, "force_image_size": v.image_size, "use_pixel_shuffle": True,
         "mlp_connector_layers": 2, "tie_word_embeddings": l.tie_embeddings, "torch_dtype": dtype}
    if write_select_layer:
        d["select_layer"] = v.select_layer
    return d


def layout_model_config(layout: str):
    """``released``: the tiny-eagle2.5-8b preset. ``qwen3``: the tiny-eagle2.5-qwen3-8b preset with tied
    embeddings and the official default feature layer (-4, not written). ``qwen3-preset``: the
    tiny-eagle2.5-qwen3-8b preset as it is. ``siglip``: the tiny preset (SigLIP + Qwen2)."""
    from megatron_eagle.config import preset_model_config

    name = {"released": "tiny-eagle2.5-8b", "qwen3": "tiny-eagle2.5-qwen3-8b",
            "qwen3-preset": "tiny-eagle2.5-qwen3-8b", "siglip": "tiny"}[layout]
    cfg = preset_model_config(name)
    if layout == "qwen3":
        cfg.llm.tie_embeddings = True
        cfg.vision.select_layer = -4
    return cfg


def write_checkpoint(out: Path, hf_cfg: dict, tok_dir: Optional[Path], seed: int = 0,
                     max_shard_size: str = "100KB") -> Path:
    """Random weights of the transformers reference for ``hf_cfg`` (norms and biases perturbed, so a
    mapping that mixes them up cannot pass), sharded, with config.json and the tokenizer."""
    from megatron_eagle.convert import hf_io, hf_mapping
    from megatron_eagle.convert.verify import TransformersReference

    out.mkdir(parents=True, exist_ok=True)
    if tok_dir is not None:
        hf_io.save_tokenizer(tok_dir, out)
    torch.manual_seed(seed)
    model = TransformersReference(hf_cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    state = model.state_dict()
    if hf_cfg.get("tie_word_embeddings"):
        state.pop(hf_mapping.HF_LM_HEAD)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[hf_cfg.get("torch_dtype", "float32")]
    writer = hf_io.ShardedWriter(out, max_shard_size, tag="random", dtype=dtype)
    for k in sorted(state):
        writer.add(k, state[k])
    hf_io.finalize_shards(out, [writer.close()])
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return out


@functools.lru_cache(maxsize=None)
def layout_checkpoint(layout: str) -> Path:
    """The tiny random checkpoint of ``layout`` (cached for the session)."""
    from megatron_eagle.tokenizer import load_tokenizer, special_token_ids

    tok = tokenizer_dir()
    cfg = layout_model_config(layout)
    cfg.image_token_id = special_token_ids(load_tokenizer(tok))["img_context"]
    hf_cfg = eagle_config(cfg, write_select_layer=layout != "qwen3")
    return write_checkpoint(root() / f"layout_{layout}", hf_cfg, tok)


@functools.lru_cache(maxsize=None)
def split_checkpoint(layout: str) -> tuple[Path, Path]:
    """The layout's checkpoint as a stage-1 start: a ``SiglipModel``-style dir and a plain
    Qwen2/Qwen3 dir with the tokenizer."""
    return split_eagle_dir(layout_checkpoint(layout), root() / f"split_{layout}_vision",
                           root() / f"split_{layout}_llm")
