"""An independent Eagle 2.5 built from transformers modules, for parity checks and test weights.

``EagleHFReference`` is ``SiglipVisionModel`` -> InternVL pixel shuffle -> ``mlp1`` =
``nn.Sequential(LayerNorm, Linear, GELU, Linear)`` -> ``Qwen2ForCausalLM``. Its
``state_dict`` keys are exactly the published HF layout (``vision_model.vision_model.*``,
``mlp1.{0,1,3}.*``, ``language_model.*``), so it can both load and *make* HF checkpoints:
:func:`make_random_hf_checkpoint` writes a seeded random Eagle checkpoint (our stand-in
for downloaded weights). It shares no model code with :mod:`megatron_eagle.models`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from megatron_eagle.config import ModelConfig
from megatron_eagle.convert import hf_io, hf_mapping
from megatron_eagle.convert.hf_export import config as hf_export_config
from megatron_eagle.convert.hf_export.writer import write_processor_files


def pixel_shuffle_internvl(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVL's view/permute pixel shuffle (ps_version v2): [n, w, h, c] -> [n, w*s, h*s, c/s²]."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


class EagleHFReference(nn.Module):
    """Eagle 2.5 from transformers' SigLIP and Qwen2 (fp32, eager attention)."""

    def __init__(self, cfg: ModelConfig, attn_implementation: str = "eager"):
        super().__init__()
        from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

        vcfg = SiglipVisionConfig(**{k: v for k, v in hf_export_config.hf_vision_config(cfg).items()
                                     if k not in ("model_type", "architectures")})
        tcfg = Qwen2Config(**{k: v for k, v in hf_export_config.hf_text_config(cfg).items()
                              if k not in ("model_type", "architectures")})
        for c in (vcfg, tcfg):
            c._attn_implementation = attn_implementation
        self.cfg = cfg
        # Eagle's checkpoints nest the tower once more (``vision_model.vision_model.*``: the
        # transformers-4 SiglipVisionModel layout); transformers 5 flattened the class itself.
        self.vision_model = nn.Module()
        self.vision_model.vision_model = SiglipVisionModel(vcfg)
        c = cfg.vision.hidden_size * int(round(1 / cfg.downsample_ratio)) ** 2
        h = cfg.llm.hidden_size
        self.mlp1 = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, h), nn.GELU(), nn.Linear(h, h))
        self.language_model = Qwen2ForCausalLM(tcfg)

    @classmethod
    def from_pretrained(cls, hf_dir: str | Path, attn_implementation: str = "eager") -> "EagleHFReference":
        cfg = hf_mapping.model_config_from_hf(hf_io.read_config(hf_dir))
        model = cls(cfg, attn_implementation)
        reader = hf_io.SafetensorsReader(hf_dir)
        state = {k: reader.get(k) for k in reader.stored_names() if not hf_mapping.is_ignored_hf(k)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        allowed = {hf_mapping.HF_LM_HEAD} if cfg.llm.tie_embeddings else set()
        if set(missing) - allowed or unexpected:
            raise KeyError(f"reference load: missing {sorted(set(missing) - allowed)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        return model.float().eval()

    # -- forward -----------------------------------------------------------------------
    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] tiles -> [n * tokens_per_tile, H]."""
        vit = self.vision_model.vision_model(pixel_values=pixel_values).last_hidden_state  # select_layer -1
        n, p, c = vit.shape
        g = int(math.isqrt(p))
        vit = pixel_shuffle_internvl(vit.reshape(n, g, g, c), self.cfg.downsample_ratio)
        vit = vit.reshape(n, -1, vit.shape[-1])
        return self.mlp1(vit).reshape(-1, self.cfg.llm.hidden_size)

    def input_embeds(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor]) -> torch.Tensor:
        """[L] ids (+ tiles) -> [1, L, H] with visual tokens in the <IMG_CONTEXT> slots."""
        emb = self.language_model.get_input_embeddings()(input_ids.reshape(1, -1))
        slots = input_ids.reshape(-1) == self.cfg.image_token_id
        if pixel_values is not None and pixel_values.shape[0]:
            vis = self.visual_tokens(pixel_values)
            if vis.shape[0] != int(slots.sum()):
                raise ValueError(f"{int(slots.sum())} <IMG_CONTEXT> tokens but {vis.shape[0]} visual tokens")
            emb = emb.clone()
            emb[0, slots] = vis.to(emb.dtype)
        elif slots.any():
            raise ValueError("prompt has <IMG_CONTEXT> tokens but no pixel values")
        return emb

    @torch.no_grad()
    def sample_logits(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [L, V] of one sample run alone."""
        emb = self.input_embeds(input_ids, pixel_values)
        return self.language_model(inputs_embeds=emb, use_cache=False).logits[0]

    @torch.no_grad()
    def greedy(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor], max_new_tokens: int,
               eos_id: Optional[int]) -> list[int]:
        """transformers' own greedy ``generate`` (with its KV cache) on the embedded prompt."""
        emb = self.input_embeds(input_ids, pixel_values)
        mask = torch.ones(emb.shape[:2], dtype=torch.long)
        out = self.language_model.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=max_new_tokens,
                                           do_sample=False, eos_token_id=eos_id,
                                           pad_token_id=eos_id if eos_id is not None else 0)
        return out[0].tolist()


def reference_logits(ref: EagleHFReference, samples: Sequence[tuple[torch.Tensor, Optional[torch.Tensor]]]
                     ) -> torch.Tensor:
    """Concatenated per-sample logits [Σ L, V]: what a pack of these samples must produce."""
    return torch.cat([ref.sample_logits(ids, pv) for ids, pv in samples], dim=0)


@torch.no_grad()
def make_random_hf_checkpoint(out_dir: str | Path, cfg: ModelConfig, tokenizer_dir: Optional[str | Path] = None,
                              seed: int = 0, max_shard_size: str | int = "5GB",
                              dtype: torch.dtype = torch.float32) -> Path:
    """Write a seeded random Eagle 2.5 HF checkpoint (weights, index, config, tokenizer).

    transformers' own init leaves norms at 1 and biases at 0; both are perturbed so a
    mapping that mixes them up cannot pass a parity test.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = None
    if tokenizer_dir is not None:
        tok = hf_io.save_tokenizer(tokenizer_dir, out)
        from megatron_eagle.tokenizer import special_token_ids
        cfg.image_token_id = special_token_ids(tok)["img_context"]
    torch.manual_seed(seed)
    model = EagleHFReference(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    writer = hf_io.ShardedWriter(out, max_shard_size, tag="random", dtype=dtype)
    state = model.state_dict()
    for name in hf_mapping.expected_hf_names(cfg):
        writer.add(name, state[name])
    hf_io.finalize_shards(out, [writer.close()])
    eos = pad = None
    if tok is not None:
        from megatron_eagle.tokenizer import special_token_ids
        eos, pad = special_token_ids(tok)["eos"], tok.pad_token_id
    hf_io.write_json(out / "config.json", hf_export_config.hf_config(cfg, str(dtype).replace("torch.", ""), eos))
    write_processor_files(out, cfg, eos, pad)
    return out
