"""`megatron-eagle generate`: greedy decoding from an HF Eagle 2.5 directory.

    megatron-eagle generate --hf DIR --prompt "Describe <image>." --image a.jpg --max-new-tokens 64 [--json]

Runs as a single process (TP = PP = 1) on GPU if present, else CPU; under torchrun
``--tp/--pp`` split the model and rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import sys


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `megatron-eagle generate`."""
    p.add_argument("--hf", required=True, help="HF Eagle 2.5 directory (weights, config.json, tokenizer)")
    p.add_argument("--prompt", required=True, help="user text; <image>/<video> mark where media go")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file (repeatable)")
    p.add_argument("--num-frames", type=int, default=8, help="frames sampled per video (default 8)")
    p.add_argument("--prompt-format", choices=["eagle2.5", "frame-times"], default="eagle2.5",
                   help="prompt layout of the training data (default eagle2.5, the released models' layout)")
    p.add_argument("--max-tiles", type=int, default=12, help="max tiles per image (default 12)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameter dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object: input_ids, generated_ids, text")


def run(args) -> int:
    _quiet_transformers()
    import torch

    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.convert.load import build_model_from_hf, init_process_groups
    from megatron_eagle.inference.generate import greedy_generate
    from megatron_eagle.inference.media import build_inputs, load_image, load_video
    from megatron_eagle.runtime.distributed import shutdown
    from megatron_eagle.tokenizer import load_tokenizer, special_token_ids

    rt = init_process_groups(args.tp, args.pp)
    try:
        dtype = args.dtype or ("bfloat16" if rt.is_cuda else "float32")
        model, _ = build_model_from_hf(args.hf, ParallelConfig(tp=args.tp, pp=args.pp), dtype)
        cfg = model.model_cfg
        tok = load_tokenizer(args.hf)
        ids_ = special_token_ids(tok)
        if ids_["img_context"] != cfg.image_token_id:
            print(f"error: tokenizer <IMG_CONTEXT> id {ids_['img_context']} != config image_token_index "
                  f"{cfg.image_token_id}", file=sys.stderr)
            return 2
        size = cfg.vision.image_size
        images = [load_image(p, size, args.max_tiles) for p in args.image]
        videos = [load_video(p, size, args.num_frames, args.prompt_format) for p in args.video]
        input_ids, pixels = build_inputs(tok, args.prompt, images, videos, cfg.tokens_per_tile, size,
                                         args.prompt_format)
        eos = {ids_["eos"]} | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
        new = greedy_generate(model, input_ids, pixels.to(torch.float32), args.max_new_tokens, eos)
        text = tok.decode(new, skip_special_tokens=True)
        if rt.rank == 0:
            if args.json:
                print(json.dumps({"input_ids": input_ids.tolist(), "generated_ids": new, "text": text}))
            else:
                print(text)
        return 0
    finally:
        shutdown()
