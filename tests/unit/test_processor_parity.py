"""The exported HF processor and chat template build exactly the prompt training builds.

An Eagle dir is exported with the real Qwen2.5-layout tokenizer; for one image, two images and a
video, AutoProcessor (remote code loaded from that dir) must give the same ``input_ids`` and the same
pixel tiles as the training pipeline (``data/media``, ``prompt_format: eagle2.5``) with a generation prompt.
"""

from __future__ import annotations

import io

import pytest
import torch

from megatron_eagle.config import preset_model_config
from megatron_eagle.convert import hf_io
from megatron_eagle.convert.hf_export.writer import write_processor_files
from megatron_eagle.data.media.ads import ImagePlan, VideoPlan
from megatron_eagle.data.media.image import decode_image, frames_to_tiles, image_to_tiles
from megatron_eagle.data.media.prompt import EAGLE_SYSTEM_PROMPT, tokenize_conversation
from megatron_eagle.data.media.tiling import choose_grid
from megatron_eagle.data.media.video import decode_frames, probe_video
from megatron_eagle.tokenizer import special_token_ids
from tests.media_factory import encode_video
from tests.tokenizer_fixtures import unpack_tokenizer
from tests.unit.test_hf_export import _image


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(training tokenizer, AutoProcessor of an exported dir, ModelConfig)."""
    from transformers import AutoProcessor

    root = tmp_path_factory.mktemp("parity")
    cfg = preset_model_config("tiny")
    tok = hf_io.save_tokenizer(unpack_tokenizer("qwen2_5_tokenizer", root / "src"), root / "hf")
    write_processor_files(root / "hf", cfg, special_token_ids(tok)["eos"], tok.pad_token_id)
    return tok, AutoProcessor.from_pretrained(root / "hf", trust_remote_code=True), cfg


def _training_tiles(img, cfg) -> tuple[torch.Tensor, ImagePlan]:
    """The loader's tiles and plan for one image (encoded and decoded as a dataset stores it)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    pil = decode_image(buf.getvalue())
    grid = choose_grid(pil.width, pil.height, 12, "iap", cfg.vision.image_size)
    return image_to_tiles(pil, grid, cfg.vision.image_size), ImagePlan(tuple(grid))


def test_exported_processor_builds_the_training_prompt(exported, tmp_path):
    tok, proc, cfg = exported
    tpt, size = proc.image_processor.tokens_per_tile, cfg.vision.image_size
    wide, tall = _image(300, 120), _image(90, 200, 1)
    path = encode_video(tmp_path / "v.mp4", seconds=1.5, fps=4, width=64, height=48)
    meta = probe_video(str(path))
    idx = [0, 2, 4, 5]
    frames, _ = decode_frames(str(path), idx)
    duration, rate = meta["duration"], len(idx) / meta["duration"]
    (w_tiles, w_plan), (t_tiles, t_plan) = _training_tiles(wide, cfg), _training_tiles(tall, cfg)
    cases = {  # name: (training text, plan, training tiles, processor content, processor media)
        "one image": ("<image-1>\nWhat is in it? ", [w_plan], [w_tiles],
                      [{"type": "image"}, {"type": "text", "text": "\nWhat is in it? "}], dict(images=[wide])),
        "two images": ("<image-1><image-2>Same?", [w_plan, t_plan], [w_tiles, t_tiles],
                       [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}],
                       dict(images=[wide, tall])),
        "video": ("<video-1>What moves?", [VideoPlan(tuple(idx), tuple(i / meta["fps"] for i in idx), duration,
                                                     rate)], [frames_to_tiles(frames, size)],
                  [{"type": "video"}, {"type": "text", "text": "What moves?"}],
                  dict(videos=[frames], video_fps=rate, video_duration=duration)),
    }
    for name, (text, plan, tiles, content, media) in cases.items():
        want, _ = tokenize_conversation(tok, [{"from": "human", "value": text}], plan, tpt,
                                        add_generation_prompt=True, fmt="eagle2.5")
        prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        assert prompt.startswith(f"<|im_start|>system\n{EAGLE_SYSTEM_PROMPT}<|im_end|>\n"), (name, prompt[:120])
        enc = proc(text=prompt, **media)
        assert enc["input_ids"][0].tolist() == want, (name, tok.decode(want)[:300], prompt[:300])
        assert torch.equal(enc["pixel_values"], torch.cat(tiles)), name
    # a system prompt of one's own is kept as written, in both
    own = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "<image-1>Hi"}]
    want, _ = tokenize_conversation(tok, [{"from": "system", "value": " Be brief. "},
                                          {"from": "human", "value": "<image-1>Hi"}], [w_plan], tpt,
                                    add_generation_prompt=True, fmt="eagle2.5")
    enc = proc(text=proc.apply_chat_template(own, add_generation_prompt=True), images=[wide])
    assert enc["input_ids"][0].tolist() == want and EAGLE_SYSTEM_PROMPT not in tok.decode(want)
