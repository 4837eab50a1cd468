"""SigLIP vision tower on megatron-core: patch embedding, learned positions, TransformerBlock."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_eagle.config import VisionConfig
from megatron_eagle.kernels.dispatch import AttentionKernels
from megatron_eagle.models.specs import vit_block_spec
from megatron_eagle.pixels import normalize

def normalize_pixels(pixel_values: torch.Tensor) -> torch.Tensor:
    """uint8 RGB tiles -> the normalised float32 tiles the ViT takes (bit-identical to the loader's
    float32 path); float tiles (already normalised) pass unchanged. The loader may ship raw bytes
    (4x fewer to move); they are normalised here, on the model's device."""
    if pixel_values.dtype != torch.uint8:
        return pixel_values
    return normalize(pixel_values)


class SiglipVisionModel(MegatronModule):
    """Tiles [n, 3, S, S] (normalised floats, or uint8 RGB) -> patch features [n, (S/p)^2, C] of the
    layer ``select_layer`` (-1: after the post-layernorm).

    Patch and position embeddings are small and replicated across TP ranks; the
    transformer layers are tensor-parallel (and sequence-parallel when enabled).
    """

    def __init__(self, config: TransformerConfig, vision: VisionConfig, kernels: AttentionKernels):
        super().__init__(config=config)
        self.vision = vision
        c = vision.hidden_size
        self.patch_embedding = torch.nn.Conv2d(3, c, kernel_size=vision.patch_size, stride=vision.patch_size,
                                               dtype=config.params_dtype)
        self.num_patches = vision.patches_per_side ** 2
        self.position_embedding = torch.nn.Embedding(self.num_patches, c, dtype=config.params_dtype)
        # The block's final norm is SigLIP's post-layernorm (HF applies it to ``last_hidden_state``
        # only: none for an intermediate ``select_layer``).
        spec = vit_block_spec(config, kernels, post_layernorm=vision.post_layernorm)
        self.encoder = TransformerBlock(config=config, spec=spec, pre_process=True, post_process=True)
        std = config.init_method_std
        for p in (self.patch_embedding.weight, self.position_embedding.weight):
            torch.nn.init.normal_(p, std=std)
        torch.nn.init.zeros_(self.patch_embedding.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixels = normalize_pixels(pixel_values).to(self.patch_embedding.weight.dtype)
        x = self.patch_embedding(pixels)  # [n, C, g, g]
        x = x.flatten(2).transpose(1, 2) + self.position_embedding.weight  # [n, g*g, C], row-major patches
        x = x.transpose(0, 1).contiguous()  # [s, b, C] for megatron
        if self.config.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x)
        x = self.encoder(hidden_states=x, attention_mask=None)
        if self.config.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        return x.transpose(0, 1)  # [n, g*g, C]
