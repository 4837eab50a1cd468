"""Eagle 2.5 VL for transformers: SigLIP -> pixel shuffle -> MLP connector -> Qwen2/Qwen3.

The state dict has the released layout: ``vision_model.vision_model.*`` (SigLIP),
``mlp1.{0,1,3}.*`` (LayerNorm, Linear, GELU, Linear) and ``language_model.*`` (a
``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM``). Visual tokens replace the
``<IMG_CONTEXT>`` (``config.image_token_index``) embeddings of the prompt.
"""

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, SiglipVisionModel
from transformers.generation import GenerationMixin

from .configuration_eagle2_5_vl import Eagle2_5_VLConfig


def pixel_shuffle(x, scale_factor=0.5):
    """InternVL's pixel shuffle (ps_version v2): [n, w, h, c] -> [n, w*s, h*s, c/s^2]."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


class _Nest(nn.Module):
    """Holds a SigLIP tower under ``.vision_model`` where transformers' own class does not nest it."""

    def __init__(self, tower):
        super().__init__()
        self.vision_model = tower

    def forward(self, *args, **kwargs):
        return self.vision_model(*args, **kwargs)


class Eagle2_5_VLPreTrainedModel(PreTrainedModel):
    config_class = Eagle2_5_VLConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "Qwen3DecoderLayer", "SiglipEncoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    _supports_flash_attn_2 = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_cache_class = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


class Eagle2_5_VLForConditionalGeneration(Eagle2_5_VLPreTrainedModel, GenerationMixin):
    """Eagle 2.5: ``forward`` gives the LLM's outputs (logits, cache); ``generate`` decodes
    from the prompt with its images and returns the new tokens (as the released model does)."""

    def __init__(self, config: Eagle2_5_VLConfig):
        super().__init__(config)
        vision = config.vision_config
        vision.vision_use_head = False
        tower = SiglipVisionModel(vision)
        # transformers 4 nests the transformer under SiglipVisionModel.vision_model; 5 does not
        self.vision_model = tower if hasattr(tower, "vision_model") else _Nest(tower)
        self.select_layer = config.select_layer
        self.downsample_ratio = config.downsample_ratio
        image_size = config.force_image_size or vision.image_size
        self.num_image_token = int((image_size // vision.patch_size) ** 2 * config.downsample_ratio ** 2)
        c = vision.hidden_size * int(round(1 / config.downsample_ratio)) ** 2
        h = config.text_config.hidden_size
        self.mlp1 = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, h), nn.GELU(), nn.Linear(h, h))
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.image_token_index = config.image_token_index
        self.post_init()

    # -- embeddings ----------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    # -- vision --------------------------------------------------------------------------
    def extract_feature(self, pixel_values):
        """[n, 3, S, S] tiles -> [n, tokens_per_tile, H] visual tokens."""
        tower = self.vision_model
        if self.select_layer == -1:
            vit = tower(pixel_values=pixel_values).last_hidden_state
        else:
            vit = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
        n, p, c = vit.shape
        g = int(round(p ** 0.5))
        vit = self.pixel_shuffle(vit.reshape(n, g, g, c).contiguous(), self.downsample_ratio)
        return self.mlp1(vit.reshape(n, -1, vit.shape[-1]))

    def pixel_shuffle(self, x, scale_factor=0.5):
        return pixel_shuffle(x, scale_factor)

    def embed_inputs(self, input_ids, pixel_values=None):
        """Token embeddings with the visual tokens written into the <IMG_CONTEXT> slots."""
        embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None or pixel_values.shape[0] == 0:
            return embeds
        dtype = next(self.vision_model.parameters()).dtype
        visual = self.extract_feature(pixel_values.to(dtype)).reshape(-1, embeds.shape[-1])
        slots = input_ids == self.config.image_token_index
        if int(slots.sum()) != visual.shape[0]:
            raise ValueError(f"{int(slots.sum())} image tokens in the prompt but {visual.shape[0]} visual tokens "
                             f"from {pixel_values.shape[0]} tiles")
        return embeds.masked_scatter(slots.unsqueeze(-1).to(embeds.device), visual.to(embeds.dtype))

    # -- forward / generate ---------------------------------------------------------------
    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None, image_flags=None,
                **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values)
        if past_key_values is not None:  # passed only when given: newer transformers rename it
            kwargs["past_key_values"] = past_key_values
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, labels=labels, use_cache=use_cache, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, **generate_kwargs):
        """Decode after the prompt; returns only the new tokens [batch, new]."""
        generate_kwargs.pop("image_flags", None)
        generate_kwargs.pop("num_tiles", None)
        inputs_embeds = self.embed_inputs(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        return self.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                            **generate_kwargs)


__all__ = ["Eagle2_5_VLPreTrainedModel", "Eagle2_5_VLForConditionalGeneration"]
