"""The HF Eagle 2.5 ``config.json`` and ``preprocessor_config.json`` for a ModelConfig.

Every field is written explicitly: the official config class has other defaults
(``select_layer`` -4, ``max_dynamic_tiles`` 6, ``use_thumbnail`` False, ``image_token_index``
151667), so a missing field would be read differently by the official code. Who reads each field
is listed in docs/conversion.md.
"""

from __future__ import annotations

from typing import Optional

from megatron_eagle.config import ModelConfig
from megatron_eagle.pixels import IMAGE_MEAN, IMAGE_STD

MODULES = {
    "configuration": "configuration_eagle2_5_vl",
    "modeling": "modeling_eagle2_5_vl",
    "processing": "processing_eagle2_5_vl",
    "image_processing": "image_processing_eagle2_5_vl_fast",
}
CONFIG_CLASS = f"{MODULES['configuration']}.Eagle2_5_VLConfig"
MODEL_CLASS = f"{MODULES['modeling']}.Eagle2_5_VLForConditionalGeneration"
PROCESSOR_CLASS = f"{MODULES['processing']}.Eagle2_5_VLProcessor"
IMAGE_PROCESSOR_CLASS = f"{MODULES['image_processing']}.Eagle2_5_VLImageProcessorFast"
AUTO_MAP = {
    "AutoConfig": CONFIG_CLASS,
    "AutoModel": MODEL_CLASS,
    "AutoModelForCausalLM": MODEL_CLASS,
    "AutoModelForImageTextToText": MODEL_CLASS,
    "AutoProcessor": PROCESSOR_CLASS,
}
DEFAULT_MAX_TILES = 12


def llm_family(cfg: ModelConfig) -> str:
    return getattr(cfg.llm, "family", "qwen2")


def llm_head_dim(cfg: ModelConfig) -> int:
    return getattr(cfg.llm, "head_dim", None) or cfg.llm.hidden_size // cfg.llm.num_heads


def select_layer(cfg: ModelConfig) -> int:
    return int(getattr(cfg.vision, "select_layer", -1))


def hf_vision_config(cfg: ModelConfig) -> dict:
    """A ``SiglipVisionModel`` config. SigLIP2 at fixed resolution has the same architecture."""
    v = cfg.vision
    return {"model_type": "siglip_vision_model", "architectures": ["SiglipVisionModel"],
            "hidden_size": v.hidden_size, "intermediate_size": v.ffn_hidden_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "num_channels": 3,
            "image_size": v.image_size, "patch_size": v.patch_size, "layer_norm_eps": v.layernorm_eps,
            "hidden_act": "gelu_pytorch_tanh", "attention_dropout": 0.0, "vision_use_head": False}


def hf_text_config(cfg: ModelConfig, eos_token_id: Optional[int] = None) -> dict:
    """A ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM`` config (``LLMConfig.family``)."""
    l = cfg.llm
    family = llm_family(cfg)
    d = {"model_type": family, "architectures": ["Qwen3ForCausalLM" if family == "qwen3" else "Qwen2ForCausalLM"],
         "vocab_size": l.vocab_size, "hidden_size": l.hidden_size, "intermediate_size": l.ffn_hidden_size,
         "num_hidden_layers": l.num_layers, "num_attention_heads": l.num_heads,
         "num_key_value_heads": l.num_kv_heads, "head_dim": llm_head_dim(cfg), "hidden_act": "silu",
         "max_position_embeddings": l.max_position_embeddings, "rms_norm_eps": l.rms_eps,
         "rope_theta": l.rope_theta, "rope_scaling": None, "tie_word_embeddings": l.tie_embeddings,
         "use_sliding_window": False, "sliding_window": None, "max_window_layers": l.num_layers,
         "attention_dropout": 0.0, "eos_token_id": eos_token_id, "initializer_range": cfg.init_std}
    if family == "qwen3":
        d["attention_bias"] = bool(l.qkv_bias)
    return d


def chat_template_name(cfg: ModelConfig) -> str:
    """The official ``template`` (conversation style) name for the LLM family."""
    return "qwen3-chat" if llm_family(cfg) == "qwen3" else "qwen2-chat"


def hf_config(cfg: ModelConfig, dtype: str = "float32", eos_token_id: Optional[int] = None,
              max_dynamic_tiles: int = DEFAULT_MAX_TILES) -> dict:
    """The Eagle 2.5 ``config.json`` dict for our ModelConfig."""
    return {
        "architectures": ["Eagle2_5_VLForConditionalGeneration"],
        "model_type": "eagle_2_5_vl",
        "auto_map": dict(AUTO_MAP),
        "vision_config": hf_vision_config(cfg),
        "text_config": hf_text_config(cfg, eos_token_id),
        "downsample_ratio": cfg.downsample_ratio,
        "image_token_index": cfg.image_token_id,
        "select_layer": select_layer(cfg),
        "force_image_size": cfg.vision.image_size,
        "use_pixel_shuffle": True,
        "ps_version": "v2",
        "mlp_connector_layers": 2,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_tiles": 1,
        "max_dynamic_tiles": max_dynamic_tiles,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": max_dynamic_tiles,
        "pad2square": False,
        "template": chat_template_name(cfg),
        "loss_version": "v1",
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "mlp_checkpoint": False,
        "tie_word_embeddings": cfg.llm.tie_embeddings,
        "eos_token_id": eos_token_id,
        "torch_dtype": dtype,
    }


def hf_preprocessor_config(cfg: ModelConfig, max_dynamic_tiles: int = DEFAULT_MAX_TILES) -> dict:
    """``preprocessor_config.json``: the released model's image-processor keys, with our tiling."""
    size = cfg.vision.image_size
    return {
        "auto_map": {"AutoImageProcessor": IMAGE_PROCESSOR_CLASS, "AutoProcessor": PROCESSOR_CLASS},
        "image_processor_type": "Eagle2_5_VLImageProcessorFast",
        "processor_class": "Eagle2_5_VLProcessor",
        "crop_size": None, "data_format": "channels_first", "default_to_square": False, "device": None,
        "do_center_crop": None, "do_convert_rgb": True, "do_normalize": True, "do_pad": False,
        "do_rescale": True, "do_resize": False, "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD),
        "input_data_format": None, "max_dynamic_tiles": max_dynamic_tiles, "min_dynamic_tiles": 1,
        "pad_during_tiling": False, "resample": 3, "rescale_factor": 1 / 255, "return_tensors": None,
        "size": {"height": size, "width": size}, "tokens_per_tile": cfg.tokens_per_tile, "use_thumbnail": True,
        "tiling_method": "image_area_preservation",
    }
