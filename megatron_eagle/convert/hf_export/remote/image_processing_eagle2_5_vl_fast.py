"""Eagle 2.5 image processor: Image Area Preservation (IAP) tiling, a thumbnail, SigLIP normalisation.

An image is resized (PIL bicubic) to the ``cols x rows`` grid of ``size`` tiles that maximises
``min(kept_area, 0.6) * aspect_similarity`` over all grids of ``min..max_dynamic_tiles`` tiles (ties go
to the smaller grid), cut row-major into tiles, and followed by a ``size`` thumbnail when the grid has
more than one tile. Video frames are one resized tile each.
"""

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

IAP_AREA_CAP = 0.6


def candidate_grids(max_tiles, min_tiles=1):
    """(cols, rows) with min_tiles <= cols*rows <= max_tiles, smallest area first, then fewest cols."""
    grids = {(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles}
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0]))


def iap_score(width, height, grid, tile_size):
    cols, rows = grid
    area_ratio = (cols * rows * tile_size * tile_size) / float(width * height)
    r_orig, r_t = width / float(height), cols / float(rows)
    return min(area_ratio, IAP_AREA_CAP) * min(r_t / r_orig, r_orig / r_t)


def choose_grid(width, height, max_tiles, min_tiles, tile_size):
    grids = candidate_grids(max_tiles, min_tiles)
    best, best_score = grids[0], -1.0
    for g in grids:
        s = iap_score(width, height, g, tile_size)
        if s > best_score + 1e-12:
            best, best_score = g, s
    return best


def _to_pil(image):
    if isinstance(image, Image.Image):
        img = image
    else:
        arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)  # CHW -> HWC
        if arr.dtype != np.uint8:
            arr = np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "P") and ("transparency" in img.info or img.mode != "P"):
        rgba = img.convert("RGBA")  # alpha composited onto white
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


class Eagle2_5_VLImageProcessorFast(BaseImageProcessor):
    """Tiles images (IAP) and video frames into normalised ``pixel_values`` [n, 3, S, S]."""

    model_input_names = ["pixel_values"]

    def __init__(self, size=None, min_dynamic_tiles=1, max_dynamic_tiles=12, use_thumbnail=True,
                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), rescale_factor=1 / 255, resample=3,
                 do_convert_rgb=True, do_rescale=True, do_normalize=True, tokens_per_tile=256,
                 tiling_method="image_area_preservation", **kwargs):
        super().__init__(**kwargs)
        self.size = dict(size) if size else {"height": 448, "width": 448}
        self.min_dynamic_tiles = min_dynamic_tiles
        self.max_dynamic_tiles = max_dynamic_tiles
        self.use_thumbnail = use_thumbnail
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.rescale_factor = rescale_factor
        self.resample = resample
        self.do_convert_rgb = do_convert_rgb
        self.do_rescale = do_rescale
        self.do_normalize = do_normalize
        self.tokens_per_tile = tokens_per_tile
        self.tiling_method = tiling_method

    @property
    def tile_size(self):
        return int(self.size["height"])

    def _normalize(self, tiles):
        t = torch.from_numpy(np.stack([np.asarray(x, dtype=np.uint8) for x in tiles])).permute(0, 3, 1, 2).float()
        if self.do_rescale:
            scale = 1.0 / self.rescale_factor
            t = t / (float(round(scale)) if abs(scale - round(scale)) < 1e-6 else scale)
        if self.do_normalize:
            if len(set(self.image_mean)) == 1 and len(set(self.image_std)) == 1:
                t = (t - self.image_mean[0]) / self.image_std[0]
            else:
                mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
                std = torch.tensor(self.image_std).view(1, 3, 1, 1)
                t = (t - mean) / std
        return t

    def image_tiles(self, image, max_dynamic_tiles=None):
        """One image -> ([tiles, 3, S, S], (cols, rows))."""
        img = _to_pil(image)
        s = self.tile_size
        grid = choose_grid(img.width, img.height, max_dynamic_tiles or self.max_dynamic_tiles,
                           self.min_dynamic_tiles, s)
        cols, rows = grid
        big = img.resize((cols * s, rows * s), Image.Resampling(self.resample))
        tiles = [big.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
        if self.use_thumbnail and cols * rows > 1:
            tiles.append(img.resize((s, s), Image.Resampling(self.resample)))
        return self._normalize(tiles), grid

    def frame_tiles(self, frames):
        """Video frames (PIL images or HWC arrays) -> [frames, 3, S, S], one tile per frame."""
        s = self.tile_size
        out = []
        for f in frames:
            img = _to_pil(f)
            out.append(img if img.size == (s, s) else img.resize((s, s), Image.Resampling(self.resample)))
        return self._normalize(out)

    def preprocess(self, images, max_dynamic_tiles=None, return_tensors=None, **kwargs):
        """A list of images -> ``pixel_values`` (all tiles, in order) and ``num_tiles`` per image."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        tiles = [self.image_tiles(im, max_dynamic_tiles)[0] for im in images]
        pixel_values = torch.cat(tiles) if tiles else torch.zeros(0, 3, self.tile_size, self.tile_size)
        return BatchFeature({"pixel_values": pixel_values, "num_tiles": [t.shape[0] for t in tiles]})


__all__ = ["Eagle2_5_VLImageProcessorFast"]
