"""Scaled-down random Eagle 2.5 HF checkpoints in the released and the official current layouts,
written with transformers' own config and model classes (the stand-in for downloaded weights).

- ``released``: fixed-resolution SigLIP2 patch16 (``siglip_vision_model``, as the released
  Eagle2.5-8B stores it) + Qwen2.5, ``select_layer`` -1;
- ``qwen3``: SigLIP2 patch14 + Qwen3 (no qkv bias, q/k RMSNorm, head_dim != hidden/heads), an odd
  vocabulary no TP divides, tied embeddings, and no ``select_layer`` in config.json (the official
  class default -4 applies).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import torch

from tests.hf_fixtures import root, tokenizer_dir


def _vision(patch: int, image: int, layers: int, name: str) -> dict:
    from transformers import SiglipVisionConfig

    d = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                           image_size=image, patch_size=patch, layer_norm_eps=1e-6).to_dict()
    d["_name_or_path"] = name
    return d


def _text(family: str, vocab: int, tied: bool) -> dict:
    from transformers import Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=tied)
    if family == "qwen3":
        d = Qwen3Config(head_dim=24, **common).to_dict()
        d["architectures"] = ["Qwen3ForCausalLM"]
    else:
        d = Qwen2Config(**common).to_dict()
        d["architectures"] = ["Qwen2ForCausalLM"]
    return d


LAYOUTS = {
    "released": dict(vision=("google/siglip2-so400m-patch16-512", 16, 128, 2), family="qwen2", vocab=512,
                     tied=False, select_layer=-1),
    "qwen3": dict(vision=("google/siglip2-so400m-patch14-448", 14, 112, 5), family="qwen3", vocab=509,
                  tied=True, select_layer=None),
}


def eagle_config(layout: str, image_token_id: int, dtype: str = "float32") -> dict:
    spec = LAYOUTS[layout]
    name, patch, image, layers = spec["vision"]
    d = {"architectures": ["Eagle2_5_VLForConditionalGeneration"], "model_type": "eagle_2_5_vl",
         "vision_config": _vision(patch, image, layers, name), "text_config": _text(spec["family"], spec["vocab"],
                                                                                     spec["tied"]),
         "downsample_ratio": 0.5, "image_token_index": image_token_id, "force_image_size": image,
         "use_pixel_shuffle": True, "mlp_connector_layers": 2, "tie_word_embeddings": spec["tied"],
         "torch_dtype": dtype}
    if spec["select_layer"] is not None:
        d["select_layer"] = spec["select_layer"]
    return d


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
    img = special_token_ids(load_tokenizer(tok))["img_context"]
    return write_checkpoint(root() / f"layout_{layout}", eagle_config(layout, img), tok)
