"""Parity of our model against the transformers reference on random inputs.

Cases: one tile, several tiles, several video frames, text only, and a pack mixing all
of them (the reference runs each sub-sample alone). The difference reported is the max
absolute logit difference and that divided by the reference's max |logit|.

The reference of a checkpoint is built from its own ``config.json`` with transformers' classes:
``SiglipVisionModel`` (SigLIP or fixed-resolution SigLIP2), ``Qwen2ForCausalLM`` or
``Qwen3ForCausalLM``, features at ``select_layer`` as the official modeling takes them.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_eagle.config import ModelConfig
from megatron_eagle.convert import hf_io, hf_mapping
from megatron_eagle.inference.forward import forward_logits, inference_batch

Sample = tuple[torch.Tensor, Optional[torch.Tensor]]


def _text(gen: torch.Generator, cfg: ModelConfig, n: int) -> torch.Tensor:
    ids = torch.randint(0, cfg.llm.vocab_size, (n,), generator=gen)
    return torch.where(ids == cfg.image_token_id, (ids + 1) % cfg.llm.vocab_size, ids)


def _media(cfg: ModelConfig, tiles: int, start_id: int, end_id: int) -> torch.Tensor:
    return torch.cat([torch.tensor([start_id]), torch.full((tiles * cfg.tokens_per_tile,), cfg.image_token_id),
                      torch.tensor([end_id])])


def random_cases(cfg: ModelConfig, seed: int = 0, img_start_id: Optional[int] = None,
                 img_end_id: Optional[int] = None) -> dict[str, list[Sample]]:
    """Named lists of samples ``(input_ids, tiles)`` with random tokens and pixels."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    start = img_start_id if img_start_id is not None else int(_text(g, cfg, 1))
    end = img_end_id if img_end_id is not None else int(_text(g, cfg, 1))

    def pixels(n: int) -> torch.Tensor:
        return torch.rand(n, 3, s, s, generator=g) * 2 - 1  # normalised range [-1, 1]

    one = (torch.cat([_text(g, cfg, 6), _media(cfg, 1, start, end), _text(g, cfg, 9)]), pixels(1))
    multi = (torch.cat([_text(g, cfg, 4), _media(cfg, 3, start, end), _text(g, cfg, 7)]), pixels(3))
    frames = [torch.cat([_text(g, cfg, 5), _media(cfg, 1, start, end)]) for _ in range(4)]
    video = (torch.cat([_text(g, cfg, 3), *frames, _text(g, cfg, 8)]), pixels(4))
    text = (_text(g, cfg, 23), None)
    return {"one_tile": [one], "multi_tile": [multi], "video_frames": [video], "text_only": [text],
            "mixed_pack": [multi, text, video, one]}


def diff(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |ours - ref|, that / max |ref|)."""
    a = (ours.float() - ref.float()).abs().max().item()
    return a, a / max(ref.float().abs().max().item(), 1e-30)


def model_logits(model, samples: list[Sample], tile_size: int) -> Optional[torch.Tensor]:
    """Our logits for the pack of ``samples`` (all model-parallel ranks call this)."""
    logits = forward_logits(model, inference_batch(samples, tile_size))
    if logits is None:
        return None
    return logits[: sum(int(ids.numel()) for ids, _ in samples)].cpu()


def verify(model, ref, cfg: ModelConfig, seed: int = 0, reporter: bool = True,
           img_start_id: Optional[int] = None, img_end_id: Optional[int] = None) -> dict[str, tuple[float, float]]:
    """Max abs/rel logit difference per case. Every rank runs our model; ``ref`` (the
    transformers reference) is needed only where ``reporter`` is true and logits exist."""
    out = {}
    for name, samples in random_cases(cfg, seed, img_start_id, img_end_id).items():
        ours = model_logits(model, samples, cfg.vision.image_size)
        if ours is not None and reporter:
            out[name] = diff(ours, torch.cat([ref.sample_logits(ids, pv) for ids, pv in samples], dim=0))
    return out


def _pixel_shuffle_internvl(x: torch.Tensor, scale: float) -> torch.Tensor:
    """InternVL's view/permute pixel shuffle (v2), as the official modeling writes it:
    [n, w, h, c] -> [n, w*s, h*s, c/s²]."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


class TransformersReference(torch.nn.Module):
    """Eagle 2.5 assembled from transformers' classes for an Eagle ``config.json`` dict:
    ``SiglipVisionModel`` (SigLIP or fixed-resolution SigLIP2), InternVL pixel shuffle, ``mlp1``, and
    the text config's own ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``. Features are
    ``last_hidden_state`` for ``select_layer`` -1, else ``hidden_states[select_layer]`` (no
    post-layernorm), as the official Eagle 2.5 modeling takes them. Its state-dict keys are the HF
    layout's. It shares no code with :mod:`megatron_eagle.models`."""

    def __init__(self, hf_cfg: dict, attn_implementation: str = "eager"):
        super().__init__()
        from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig
        from transformers import SiglipVisionModel

        self.cfg = hf_mapping.model_config_from_hf(hf_cfg)
        text = dict(hf_cfg["text_config"])
        text.setdefault("tie_word_embeddings", hf_cfg.get("tie_word_embeddings", False))
        qwen3 = text.get("model_type") == "qwen3"
        tcfg = (Qwen3Config if qwen3 else Qwen2Config).from_dict(text)
        vcfg = SiglipVisionConfig.from_dict(dict(hf_cfg["vision_config"]))
        for c in (vcfg, tcfg):
            c._attn_implementation = attn_implementation
        self.vision_model = torch.nn.Module()
        self.vision_model.vision_model = SiglipVisionModel(vcfg)
        c = vcfg.hidden_size * int(round(1 / self.cfg.downsample_ratio)) ** 2
        h = tcfg.hidden_size
        self.mlp1 = torch.nn.Sequential(torch.nn.LayerNorm(c), torch.nn.Linear(c, h), torch.nn.GELU(),
                                        torch.nn.Linear(h, h))
        self.language_model = (Qwen3ForCausalLM if qwen3 else Qwen2ForCausalLM)(tcfg)
        if tcfg.tie_word_embeddings:
            self.language_model.lm_head.weight = self.language_model.model.embed_tokens.weight

    @classmethod
    def from_pretrained(cls, hf_dir, attn_implementation: str = "eager") -> "TransformersReference":
        model = cls(hf_io.read_config(hf_dir), attn_implementation)
        reader = hf_io.SafetensorsReader(hf_dir)
        state = {k: reader.get(k) for k in reader.stored_names()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        allowed = {hf_mapping.HF_LM_HEAD} if model.cfg.llm.tie_embeddings else set()
        missing = [k for k in missing if not hf_mapping.is_ignored_hf(k)]  # e.g. a pooling head not stored
        unexpected = [k for k in unexpected if not hf_mapping.is_ignored_hf(k)]
        if set(missing) - allowed or unexpected:
            raise KeyError(f"reference load of {hf_dir}: missing {sorted(set(missing) - allowed)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        return model.float().eval()

    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] tiles -> [n * tokens_per_tile, H]."""
        select = self.cfg.vision.select_layer
        out = self.vision_model.vision_model(pixel_values=pixel_values, output_hidden_states=select != -1)
        vit = (out.last_hidden_state if select == -1 else out.hidden_states[select]).contiguous()
        n, p, c = vit.shape
        g = int(round(p ** 0.5))
        vit = _pixel_shuffle_internvl(vit.reshape(n, g, g, c), self.cfg.downsample_ratio)
        return self.mlp1(vit.reshape(n, -1, vit.shape[-1])).reshape(-1, self.cfg.llm.hidden_size)

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
        return self.language_model(inputs_embeds=self.input_embeds(input_ids, pixel_values), use_cache=False).logits[0]
