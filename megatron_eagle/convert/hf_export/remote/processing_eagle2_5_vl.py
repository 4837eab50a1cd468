"""Eagle 2.5 processor: chat prompt with media placeholders -> token ids and tiles.

Placeholders ``<image-k>`` / ``<video-k>`` (what the chat template writes for list content; bare
``<image>`` / ``<video>`` are numbered in order) expand to the Eagle 2.5 training layout:

- one image: ``<img>`` + ``<IMG_CONTEXT>`` x (tiles x tokens_per_tile) + ``</img>\\n``;
- several images: each prefixed ``<image k>``;
- a video: ``The first video of 5.00 seconds at 2.00 fps: Frame 1: <img>...</img>Frame 2: ...\\n``,
  one tile per frame.
"""

import re

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
PLACEHOLDER = re.compile(r"<(image|video)(?:-(\d+))?>")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


def _ordinal(k):
    return ORDINALS[k] if k < len(ORDINALS) else str(k + 1)


def _is_image(x):
    return hasattr(x, "size") and hasattr(x, "mode") or getattr(x, "ndim", 0) == 3


def _is_video(x):
    """One video: frames as a [T, H, W, C] array/tensor or a list of images."""
    if getattr(x, "ndim", 0) == 4:
        return True
    return isinstance(x, (list, tuple)) and bool(x) and _is_image(x[0])


def _images_for(images, n):
    """One list of images per text (a flat list or a single image belongs to a single text)."""
    if images is None:
        return [[] for _ in range(n)]
    if n == 1:
        return [list(images) if isinstance(images, (list, tuple)) else [images]]
    if len(images) != n:
        raise ValueError(f"{len(images)} image lists for {n} texts")
    return [list(i) if isinstance(i, (list, tuple)) else [i] for i in images]


def _videos_for(videos, n):
    """One list of videos per text."""
    if videos is None:
        return [[] for _ in range(n)]
    if n == 1:
        return [[videos] if _is_video(videos) else list(videos)]
    if len(videos) != n:
        raise ValueError(f"{len(videos)} video lists for {n} texts")
    return [[v] if _is_video(v) else list(v) for v in videos]


class Eagle2_5_VLProcessor(ProcessorMixin):
    """Wraps ``Eagle2_5_VLImageProcessorFast`` and the tokenizer."""

    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if chat_template is None and tokenizer is not None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def tokens_per_tile(self):
        return int(self.image_processor.tokens_per_tile)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """The tokenizer's template (it accepts string and list content); text by default."""
        kwargs.setdefault("tokenize", False)
        return self.tokenizer.apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def _image_text(self, n_tiles):
        return IMG_START + IMG_CONTEXT * (n_tiles * self.tokens_per_tile) + IMG_END

    def expand(self, text, images=(), videos=(), video_fps=None, video_duration=None):
        """(prompt text in the Eagle 2.5 layout, tiles in prompt order) for one sample."""
        counters = {"image": 0, "video": 0}
        tiles = []

        def repl(m):
            kind = m.group(1)
            k = int(m.group(2)) - 1 if m.group(2) else counters[kind]
            counters[kind] += 1
            if kind == "image":
                if k >= len(images):
                    raise ValueError(f"prompt refers to image {k + 1} but {len(images)} images were given")
                t, _ = self.image_processor.image_tiles(images[k])
                tiles.append(t)
                tag = f"<image {k + 1}>" if len(images) > 1 else ""
                return f"{tag}{self._image_text(t.shape[0])}\n"
            if k >= len(videos):
                raise ValueError(f"prompt refers to video {k + 1} but {len(videos)} videos were given")
            frames = videos[k]
            t = self.image_processor.frame_tiles(frames)
            tiles.append(t)
            fps = video_fps[k] if isinstance(video_fps, (list, tuple)) else (video_fps or 2.0)
            dur = video_duration[k] if isinstance(video_duration, (list, tuple)) else video_duration
            dur = float(dur) if dur is not None else t.shape[0] / float(fps)
            body = "".join(f"Frame {i + 1}: {self._image_text(1)}" for i in range(t.shape[0]))
            return f"The {_ordinal(k)} video of {dur:.2f} seconds at {float(fps):.2f} fps: {body}\n"

        text = PLACEHOLDER.sub(repl, text)
        return text, tiles

    def __call__(self, text=None, images=None, videos=None, video_fps=None, video_duration=None,
                 return_tensors="pt", padding=True, **kwargs):
        """``input_ids``, ``attention_mask`` (left-padded) and ``pixel_values`` of all tiles, in prompt order."""
        texts = [text] if isinstance(text, str) else list(text)
        per_images = _images_for(images, len(texts))
        per_videos = _videos_for(videos, len(texts))
        expanded, tiles = [], []
        for t, ims, vids in zip(texts, per_images, per_videos):
            e, ti = self.expand(t, ims, vids, video_fps, video_duration)
            expanded.append(e)
            tiles.extend(ti)
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(expanded, add_special_tokens=False, padding=padding, return_tensors=return_tensors)
        finally:
            self.tokenizer.padding_side = side
        data = dict(enc)
        if tiles:
            data["pixel_values"] = torch.cat(tiles)
        return BatchFeature(data)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["Eagle2_5_VLProcessor"]
