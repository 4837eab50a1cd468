"""Eagle 2.5 VL configuration: a SigLIP vision tower, a Qwen2/Qwen3 LLM, and the connector settings."""

from transformers import AutoConfig, PretrainedConfig, SiglipVisionConfig
from transformers.models.auto import CONFIG_MAPPING

TEXT_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


def _text_config(d):
    if isinstance(d, PretrainedConfig):
        return d
    d = dict(d or {"model_type": "qwen2"})
    kind = d.get("model_type") or TEXT_ARCHITECTURES.get((d.get("architectures") or [""])[0], "qwen2")
    if kind not in CONFIG_MAPPING:
        raise ValueError(f"text_config.model_type {kind!r} is not a transformers model type")
    d.pop("model_type", None)
    return CONFIG_MAPPING[kind](**d)


def _vision_config(d):
    if isinstance(d, PretrainedConfig):
        return d
    d = dict(d or {})
    kind = d.pop("model_type", "siglip_vision_model")
    if kind != "siglip_vision_model":
        raise ValueError(f"vision_config.model_type {kind!r} unsupported (a fixed-resolution SigLIP/SigLIP2 "
                         "tower has model_type siglip_vision_model)")
    return SiglipVisionConfig(**d)


class Eagle2_5_VLConfig(PretrainedConfig):
    """Configuration of :class:`Eagle2_5_VLForConditionalGeneration`.

    ``select_layer``: ViT layer whose output feeds the connector (-1: the last, after the
    post-layernorm; otherwise ``hidden_states[select_layer]``). ``image_token_index``: id of
    ``<IMG_CONTEXT>`` in the tokenizer. ``min/max_dynamic_tiles`` (and the ``*_dynamic_patch``
    aliases vLLM reads) bound the tile grid of one image.
    """

    model_type = "eagle_2_5_vl"
    is_composition = True
    sub_configs = {"vision_config": SiglipVisionConfig, "text_config": AutoConfig}

    def __init__(self, vision_config=None, text_config=None, select_layer=-1, force_image_size=None,
                 downsample_ratio=0.5, template="qwen2-chat", dynamic_image_size=True, use_thumbnail=True,
                 min_dynamic_tiles=1, max_dynamic_tiles=12, min_dynamic_patch=None, max_dynamic_patch=None,
                 image_token_index=None, use_pixel_shuffle=True, ps_version="v2", mlp_connector_layers=2,
                 pad2square=False, loss_version="v1", use_backbone_lora=0, use_llm_lora=0, mlp_checkpoint=False,
                 **kwargs):
        self.vision_config = _vision_config(vision_config)
        self.text_config = _text_config(text_config)
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.min_dynamic_tiles = min_dynamic_tiles
        self.max_dynamic_tiles = max_dynamic_tiles
        self.min_dynamic_patch = min_dynamic_tiles if min_dynamic_patch is None else min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_tiles if max_dynamic_patch is None else max_dynamic_patch
        self.image_token_index = image_token_index
        self.use_pixel_shuffle = use_pixel_shuffle
        self.ps_version = ps_version
        self.mlp_connector_layers = mlp_connector_layers
        self.pad2square = pad2square
        self.loss_version = loss_version
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.mlp_checkpoint = mlp_checkpoint
        kwargs["tie_word_embeddings"] = self.text_config.tie_word_embeddings
        super().__init__(**kwargs)

    def get_text_config(self, *args, **kwargs):
        return self.text_config
