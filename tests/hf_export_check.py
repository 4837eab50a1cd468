"""Load an exported Eagle 2.5 dir with transformers only (any version) and report what it computes.

    python tests/hf_export_check.py EXPORT_DIR INPUTS.pt OUT.pt

INPUTS.pt holds ``input_ids`` [L], ``pixel_values`` [n, 3, S, S], ``max_new_tokens`` and optionally
``image`` (uint8 [H, W, 3]) and ``video`` (uint8 [T, H, W, 3]); OUT.pt gets
the logits, the greedy tokens of ``model.generate``, the tokenizer ids of a probe text under the fast
and the slow tokenizer, and the processor's ids / tiles for a one-image chat message. Run by the
export tests under transformers 5.x and, in a second virtualenv, 4.51; it imports nothing from
megatron_eagle.
"""

from __future__ import annotations

import sys

import torch

PROBE = "<img><IMG_CONTEXT></img> Describe <box>[1, 2]</box> the 3 cats, 中文 ok?<|im_end|>"


def main(export_dir: str, inputs_path: str, out_path: str) -> None:
    import transformers
    from transformers import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer

    inputs = torch.load(inputs_path)
    config = AutoConfig.from_pretrained(export_dir, trust_remote_code=True)
    model = AutoModel.from_pretrained(export_dir, trust_remote_code=True, attn_implementation="eager")
    model = model.float().eval()
    ids, pv = inputs["input_ids"].reshape(1, -1), inputs["pixel_values"]
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pv).logits[0]
        greedy = model.generate(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids),
                                max_new_tokens=int(inputs["max_new_tokens"]), do_sample=False)[0]
    fast = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
    out = {"transformers": transformers.__version__, "config_class": type(config).__name__,
           "model_class": type(model).__name__, "logits": logits, "greedy": greedy.tolist(),
           "fast_ids": fast(PROBE, add_special_tokens=False)["input_ids"], "fast_class": type(fast).__name__,
           "fast_len": len(fast)}
    if fast.__class__.__name__.startswith("Qwen2"):
        slow = AutoTokenizer.from_pretrained(export_dir, use_fast=False, trust_remote_code=True)
        out.update(slow_ids=slow(PROBE, add_special_tokens=False)["input_ids"], slow_class=type(slow).__name__,
                   slow_len=len(slow))
    if "image" in inputs:
        proc = AutoProcessor.from_pretrained(export_dir, trust_remote_code=True)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True)
        from PIL import Image

        image = Image.fromarray(inputs["image"].numpy())  # uint8 [H, W, 3]
        enc = proc(text=text, images=[image], return_tensors="pt")
        with torch.no_grad():
            new = model.generate(**enc, max_new_tokens=3, do_sample=False)
        out.update(processor_class=type(proc).__name__, image_processor_class=type(proc.image_processor).__name__,
                   processor_text=text, processor_ids=enc["input_ids"][0].tolist(),
                   processor_pixels=enc["pixel_values"], processor_generated=new[0].tolist())
        # several images, then a short video: AutoProcessor -> generate runs end to end
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]
        enc = proc(text=proc.apply_chat_template(msgs, add_generation_prompt=True), images=[image, image.rotate(90)])
        frames = [Image.fromarray(f.numpy()) for f in inputs["video"]]
        vmsgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]
        venc = proc(text=proc.apply_chat_template(vmsgs, add_generation_prompt=True), videos=[frames], video_fps=2.0)
        with torch.no_grad():
            out["multi_image_generated"] = model.generate(**enc, max_new_tokens=3, do_sample=False)[0].tolist()
            out["video_generated"] = model.generate(**venc, max_new_tokens=3, do_sample=False)[0].tolist()
        out["multi_image_tiles"], out["video_tiles"] = enc["pixel_values"].shape[0], venc["pixel_values"].shape[0]
    torch.save(out, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
