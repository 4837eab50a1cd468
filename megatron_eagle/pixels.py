"""Pixel normalisation of the SigLIP tower, shared by the loader, the ViT and generation.

Dependency-free (works on any tensor with ``.float()``), so that data/ can use it without
importing megatron-core. One formula everywhere keeps the loader's float32 tiles bit-identical
to uint8 tiles normalised on the device.
"""

from __future__ import annotations

from typing import Any

# SigLIP's preprocessing: pixels in [0, 1], then mean = std = 0.5 per channel.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def normalize(chw_uint8: Any) -> Any:
    """uint8 RGB tensor (CHW or NCHW) -> float32 in [-1, 1] with SigLIP's mean and std."""
    return (chw_uint8.float() / 255.0 - IMAGE_MEAN[0]) / IMAGE_STD[0]
