"""Parity of our model against the transformers reference on random inputs.

Cases: one tile, several tiles, several video frames, text only, and a pack mixing all
of them (the reference runs each sub-sample alone). The difference reported is the max
absolute logit difference and that divided by the reference's max |logit|.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_eagle.config import ModelConfig
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
    from megatron_eagle.convert.reference import reference_logits

    out = {}
    for name, samples in random_cases(cfg, seed, img_start_id, img_end_id).items():
        ours = model_logits(model, samples, cfg.vision.image_size)
        if ours is not None and reporter:
            out[name] = diff(ours, reference_logits(ref, samples))
    return out
