"""Images: probing under limits (prepare) and decode + tile + normalise (training).

Probing decodes the whole image so a corrupt file is rejected at prepare time, but checks the
header's pixel count against ``MediaLimits.max_image_pixels`` first so a decompression bomb is
rejected before any pixel buffer is allocated.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

from megatron_eagle.data.media.tiling import Grid
from megatron_eagle.pixels import normalize

# Member extension per PIL format; anything else decodable is stored as ".img".
IMAGE_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class MediaLimits:
    """Decoder limits for untrusted media; anything over a limit is rejected, never fatal."""

    max_image_pixels: int = 64_000_000
    max_video_seconds: float = 4 * 3600.0
    max_video_pixels: int = 4096 * 4096
    max_media_bytes: int = 4 << 30

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MediaError(Exception):
    """A media file cannot be used; ``reason`` is a rejects.jsonl category, ``detail`` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@contextlib.contextmanager
def _pil_pixel_limit(max_pixels: int) -> Iterator[None]:
    # PIL's own bomb check is global; align it with ours for the duration of one decode.
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _oriented_size(img) -> tuple[int, int]:
    w, h = img.size
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block must not reject an otherwise fine image
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def probe_image(data: bytes, limits: MediaLimits = MediaLimits()) -> dict[str, Any]:
    """Width/height (after EXIF rotation) and format of an encoded image; fully decodes it once.

    Raises MediaError("undecodable image" | "image too large").
    """
    from PIL import Image

    if not data:
        raise MediaError("undecodable image", "empty file")
    with _pil_pixel_limit(limits.max_image_pixels):
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise MediaError("image too large", str(e)) from None
        except Exception as e:
            raise MediaError("undecodable image", f"{type(e).__name__}: {e}") from None
        w, h = img.size
        if w <= 0 or h <= 0:
            raise MediaError("undecodable image", f"size {w}x{h}")
        if w * h > limits.max_image_pixels:
            raise MediaError("image too large", f"{w}x{h} exceeds {limits.max_image_pixels} pixels")
        fmt = img.format or "unknown"
        size = _oriented_size(img)
        try:
            img.load()
        except Exception as e:
            raise MediaError("undecodable image", f"{type(e).__name__}: {e}") from None
    return {"width": size[0], "height": size[1], "format": fmt.lower()}


def image_ext(fmt: str) -> str:
    """Member extension for a probed image format."""
    return IMAGE_EXT.get(fmt.upper(), "img")


def to_rgb_on_white(img):
    """RGB of a PIL image; transparent pixels are composited onto white (as Eagle 2.5's processor does)."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int = MediaLimits().max_image_pixels):
    """Decode encoded bytes to an RGB PIL image with EXIF orientation applied, alpha composited onto white."""
    from PIL import Image, ImageOps

    with _pil_pixel_limit(max_pixels):
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise MediaError("image too large", f"{img.width}x{img.height}")
        img = ImageOps.exif_transpose(img)
        return to_rgb_on_white(img)


def _pil_to_chw(img) -> Any:
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def image_to_tiles(pil_image, grid: Grid, tile_size: int):
    """Resize to (cols*S, rows*S), cut row-major into S x S tiles, append an S x S thumbnail when the
    grid has more than one tile; returns a normalised float tensor [n, 3, S, S]."""
    import torch
    from PIL import Image

    cols, rows = grid
    img = to_rgb_on_white(pil_image)
    big = img.resize((cols * tile_size, rows * tile_size), Image.BICUBIC)
    tiles = [big.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
             for r in range(rows) for c in range(cols)]
    if cols * rows > 1:
        tiles.append(img.resize((tile_size, tile_size), Image.BICUBIC))
    return normalize(torch.stack([_pil_to_chw(t) for t in tiles]))


def frames_to_tiles(frames: Sequence[Any], tile_size: int):
    """Video frames (HWC uint8 arrays or PIL images) -> normalised [n, 3, S, S], one tile per frame."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for f in frames:
        img = f if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f, dtype=np.uint8))
        if img.size != (tile_size, tile_size):
            img = img.convert("RGB").resize((tile_size, tile_size), Image.BICUBIC)
        out.append(_pil_to_chw(img.convert("RGB")))
    if not out:
        return torch.zeros(0, 3, tile_size, tile_size)
    return normalize(torch.stack(out))
