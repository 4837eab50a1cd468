"""Pure mapping between the published Eagle 2.5 HF layout and our full parameter layout.

HF side (``Eagle2_5_VLForConditionalGeneration`` state dict):
- ``vision_model.vision_model.*``: a ``SiglipVisionModel`` (no pooling head);
- ``mlp1.{0,1,3}.*``: LayerNorm(4C), Linear(4C, H), [GELU], Linear(H, H);
- ``language_model.model.*`` and ``language_model.lm_head.weight``: a ``Qwen2ForCausalLM``.

Our side is the "full layout" of :mod:`megatron_eagle.convert.sharding`: our parameter
names with global layer indices, unsharded. Megatron fuses q/k/v into ``linear_qkv``
(group-major: for each query group, its query heads then its key head then its value
head) and the SwiGLU gate/up into ``linear_fc1`` = [gate; up].

Everything works one tensor at a time: :func:`hf_sources` says which HF tensors make one
of our tensors (import), :func:`to_hf` splits one of our tensors into HF tensors (export).
The ``config.json`` of the HF layout is parsed here (``hf_export.config`` writes it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from megatron_eagle.config import PRESETS, LLMConfig, ModelConfig, VisionConfig, preset_model_config

HF_VISION = "vision_model.vision_model."
HF_MLP = "mlp1."
HF_LLM = "language_model.model."
HF_LM_HEAD = "language_model.lm_head.weight"

OUR_VISION = "vision_model."
OUR_LLM = "language_model."

# HF keys that exist in some checkpoints but have no counterpart in our model.
IGNORED_HF = (
    re.compile(r"^vision_model\.vision_model\.head\."),            # SigLIP attention-pooling head
    re.compile(r"^vision_model\.vision_model\.embeddings\.position_ids$"),
    re.compile(r"\.rotary_emb\.inv_freq$"),
)


# ----------------------------------------------------------------------------- tensor surgery

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """HF q/k/v projections (weights [n*d, H] or biases [n*d]) -> megatron group-major linear_qkv."""
    d = q.shape[0] // num_heads
    per = num_heads // num_groups
    tail = q.shape[1:]
    parts = [q.reshape(num_groups, per * d, *tail), k.reshape(num_groups, d, *tail), v.reshape(num_groups, d, *tail)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: megatron linear_qkv -> (q, k, v) in HF layout."""
    per = num_heads // num_groups
    d = qkv.shape[0] // (num_groups * (per + 2))
    tail = qkv.shape[1:]
    grouped = qkv.reshape(num_groups, (per + 2) * d, *tail)
    q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
    return (q.reshape(-1, *tail).contiguous(), k.reshape(-1, *tail).contiguous(), v.reshape(-1, *tail).contiguous())


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


# ----------------------------------------------------------------------------- name rules

@dataclass(frozen=True)
class Rule:
    """One of our tensors <-> one or more HF tensors."""

    hf_names: tuple[str, ...]
    fuse: Optional[Callable[..., torch.Tensor]] = None      # HF tensors -> ours (None: identity)
    split: Optional[Callable[[torch.Tensor], tuple]] = None  # ours -> HF tensors (None: identity)


_VIT_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_LLM_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(.+)$")

_VIT_SIMPLE = {
    "input_layernorm": "layer_norm1",
    "pre_mlp_layernorm": "layer_norm2",
    "self_attention.linear_proj": "self_attn.out_proj",
    "mlp.linear_fc1": "mlp.fc1",
    "mlp.linear_fc2": "mlp.fc2",
}
_LLM_SIMPLE = {
    "input_layernorm": "input_layernorm",
    "pre_mlp_layernorm": "post_attention_layernorm",
    "self_attention.linear_proj": "self_attn.o_proj",
    "mlp.linear_fc2": "mlp.down_proj",
}
_TOP = {
    "vision_model.patch_embedding.weight": HF_VISION + "embeddings.patch_embedding.weight",
    "vision_model.patch_embedding.bias": HF_VISION + "embeddings.patch_embedding.bias",
    "vision_model.position_embedding.weight": HF_VISION + "embeddings.position_embedding.weight",
    "vision_model.encoder.final_layernorm.weight": HF_VISION + "post_layernorm.weight",
    "vision_model.encoder.final_layernorm.bias": HF_VISION + "post_layernorm.bias",
    "connector.norm.weight": HF_MLP + "0.weight",
    "connector.norm.bias": HF_MLP + "0.bias",
    "connector.fc1.weight": HF_MLP + "1.weight",
    "connector.fc1.bias": HF_MLP + "1.bias",
    "connector.fc2.weight": HF_MLP + "3.weight",
    "connector.fc2.bias": HF_MLP + "3.bias",
    "language_model.embedding.word_embeddings.weight": HF_LLM + "embed_tokens.weight",
    "language_model.decoder.final_layernorm.weight": HF_LLM + "norm.weight",
    "language_model.output_layer.weight": HF_LM_HEAD,
}


def _split_module_param(rest: str) -> tuple[str, str]:
    module, _, param = rest.rpartition(".")
    return module, param


def rule_for(name: str, cfg: ModelConfig) -> Rule:
    """The conversion rule of one of our full-layout parameter names."""
    if name in _TOP:
        return Rule((_TOP[name],))
    m = _VIT_LAYER.match(name)
    if m:
        idx, rest = m.groups()
        module, param = _split_module_param(rest)
        base = f"{HF_VISION}encoder.layers.{idx}."
        if module == "self_attention.linear_qkv":
            nh = cfg.vision.num_heads
            return Rule(tuple(f"{base}self_attn.{p}_proj.{param}" for p in "qkv"),
                        fuse=lambda q, k, v: fuse_qkv(q, k, v, nh, nh), split=lambda t: split_qkv(t, nh, nh))
        if module in _VIT_SIMPLE:
            return Rule((f"{base}{_VIT_SIMPLE[module]}.{param}",))
    m = _LLM_LAYER.match(name)
    if m:
        idx, rest = m.groups()
        module, param = _split_module_param(rest)
        base = f"{HF_LLM}layers.{idx}."
        if module == "self_attention.linear_qkv":
            nh, ng = cfg.llm.num_heads, cfg.llm.num_kv_heads
            return Rule(tuple(f"{base}self_attn.{p}_proj.{param}" for p in "qkv"),
                        fuse=lambda q, k, v: fuse_qkv(q, k, v, nh, ng), split=lambda t: split_qkv(t, nh, ng))
        if module == "mlp.linear_fc1":
            return Rule((f"{base}mlp.gate_proj.{param}", f"{base}mlp.up_proj.{param}"),
                        fuse=fuse_gate_up, split=split_gate_up)
        if module in _LLM_SIMPLE:
            return Rule((f"{base}{_LLM_SIMPLE[module]}.{param}",))
    raise KeyError(f"no HF mapping for parameter {name!r}; extend megatron_eagle/convert/hf_mapping.py")


def hf_sources(name: str, cfg: ModelConfig) -> tuple[str, ...]:
    """HF tensor names that make our tensor ``name``."""
    return rule_for(name, cfg).hf_names


def from_hf(name: str, cfg: ModelConfig, get: Callable[[str], Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """Our full tensor ``name`` from HF tensors read with ``get`` (None if any source is absent).

    With tied embeddings the output layer (a copy on the last pipeline stage) is read from
    ``embed_tokens``; an ``lm_head`` in such a checkpoint is ignored.
    """
    if name == "language_model.output_layer.weight" and cfg.llm.tie_embeddings:
        name = "language_model.embedding.word_embeddings.weight"
    rule = rule_for(name, cfg)
    parts = [get(h) for h in rule.hf_names]
    if any(p is None for p in parts):
        return None
    return rule.fuse(*parts) if rule.fuse else parts[0]


def to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs for our full tensor ``name``."""
    if name == "language_model.output_layer.weight" and cfg.llm.tie_embeddings:
        return  # tied: HF keeps only embed_tokens
    rule = rule_for(name, cfg)
    pieces = rule.split(tensor) if rule.split else (tensor,)
    yield from zip(rule.hf_names, pieces)


def our_full_names(cfg: ModelConfig) -> Iterator[str]:
    """Every full-layout parameter name of the whole model (all stages), in model order."""
    v, l = cfg.vision, cfg.llm
    yield from ("vision_model.patch_embedding.weight", "vision_model.patch_embedding.bias",
                "vision_model.position_embedding.weight")
    for i in range(v.num_layers):
        for mod in ("input_layernorm", "self_attention.linear_proj", "self_attention.linear_qkv",
                    "pre_mlp_layernorm", "mlp.linear_fc1", "mlp.linear_fc2"):
            for p in ("weight", "bias"):
                yield f"vision_model.encoder.layers.{i}.{mod}.{p}"
    yield from ("vision_model.encoder.final_layernorm.weight", "vision_model.encoder.final_layernorm.bias")
    yield from (f"connector.{m}.{p}" for m in ("norm", "fc1", "fc2") for p in ("weight", "bias"))
    yield "language_model.embedding.word_embeddings.weight"
    for i in range(l.num_layers):
        pre = f"language_model.decoder.layers.{i}."
        yield from (pre + "input_layernorm.weight", pre + "self_attention.linear_proj.weight",
                    pre + "self_attention.linear_qkv.weight")
        if l.qkv_bias:
            yield pre + "self_attention.linear_qkv.bias"
        yield from (pre + "pre_mlp_layernorm.weight", pre + "mlp.linear_fc1.weight", pre + "mlp.linear_fc2.weight")
    yield "language_model.decoder.final_layernorm.weight"
    if not l.tie_embeddings:
        yield "language_model.output_layer.weight"


def expected_hf_names(cfg: ModelConfig) -> list[str]:
    """Every HF tensor name a checkpoint of this config holds (what export writes)."""
    return [h for n in our_full_names(cfg) for h in rule_for(n, cfg).hf_names
            if not (n == "language_model.output_layer.weight" and cfg.llm.tie_embeddings)]


def is_ignored_hf(name: str) -> bool:
    return any(p.search(name) for p in IGNORED_HF)


# ----------------------------------------------------------------------------- config.json

# transformers' defaults for keys that saved configs may omit (they save only non-defaults).
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                        num_channels=3)
_QWEN2_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0,
                       tie_word_embeddings=False)


class HFConfigError(ValueError):
    pass


def _get(d: dict, key: str, defaults: dict) -> Any:
    return d[key] if d.get(key) is not None else defaults[key]


def vision_config_from_hf(d: dict) -> VisionConfig:
    """Our VisionConfig from a SigLIP vision config dict (``siglip_vision_model``)."""
    if d.get("model_type") not in (None, "siglip_vision_model", "siglip2_vision_model"):
        raise HFConfigError(f"vision model_type {d.get('model_type')!r} is not SigLIP")
    if d.get("model_type") == "siglip2_vision_model" or d.get("num_patches") is not None:
        raise HFConfigError("SigLIP2 (NaFlex) vision towers are not supported; use a fixed-resolution SigLIP")
    act = _get(d, "hidden_act", _SIGLIP_DEFAULTS)
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise HFConfigError(f"SigLIP hidden_act {act!r} unsupported (our ViT uses GELU-tanh)")
    return VisionConfig(num_layers=_get(d, "num_hidden_layers", _SIGLIP_DEFAULTS),
                        hidden_size=_get(d, "hidden_size", _SIGLIP_DEFAULTS),
                        num_heads=_get(d, "num_attention_heads", _SIGLIP_DEFAULTS),
                        ffn_hidden_size=_get(d, "intermediate_size", _SIGLIP_DEFAULTS),
                        patch_size=_get(d, "patch_size", _SIGLIP_DEFAULTS),
                        image_size=_get(d, "image_size", _SIGLIP_DEFAULTS),
                        layernorm_eps=float(_get(d, "layer_norm_eps", _SIGLIP_DEFAULTS)))


def _rope_theta(d: dict) -> float:
    rp = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    kind = rp.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise HFConfigError(f"rope type {kind!r} unsupported (only plain RoPE)")
    return float(rp.get("rope_theta") or d.get("rope_theta") or _QWEN2_DEFAULTS["rope_theta"])


def llm_config_from_hf(d: dict) -> LLMConfig:
    """Our LLMConfig from a Qwen2 text config dict."""
    if d.get("model_type") not in (None, "qwen2"):
        raise HFConfigError(f"text model_type {d.get('model_type')!r} unsupported (only qwen2)")
    if _get(d, "hidden_act", _QWEN2_DEFAULTS) != "silu":
        raise HFConfigError(f"Qwen2 hidden_act {d.get('hidden_act')!r} unsupported (SwiGLU needs silu)")
    heads = _get(d, "num_attention_heads", _QWEN2_DEFAULTS)
    return LLMConfig(num_layers=_get(d, "num_hidden_layers", _QWEN2_DEFAULTS),
                     hidden_size=_get(d, "hidden_size", _QWEN2_DEFAULTS), num_heads=heads,
                     num_kv_heads=d.get("num_key_value_heads") or heads,
                     ffn_hidden_size=_get(d, "intermediate_size", _QWEN2_DEFAULTS),
                     vocab_size=_get(d, "vocab_size", _QWEN2_DEFAULTS), rope_theta=_rope_theta(d),
                     rms_eps=float(_get(d, "rms_norm_eps", _QWEN2_DEFAULTS)), qkv_bias=True,
                     tie_embeddings=bool(_get(d, "tie_word_embeddings", _QWEN2_DEFAULTS)),
                     max_position_embeddings=_get(d, "max_position_embeddings", _QWEN2_DEFAULTS))


def _match_preset(cfg: ModelConfig) -> str:
    """Name of the preset with these dimensions, else "custom"."""
    from dataclasses import asdict

    def dims(d: dict) -> dict:
        return {k: v for k, v in d.items() if k != "max_position_embeddings"}

    for name in PRESETS:
        p = preset_model_config(name)
        if asdict(cfg.vision) == asdict(p.vision) and dims(asdict(cfg.llm)) == dims(asdict(p.llm)):
            return name
    return "custom"


def model_config_from_parts(vision: dict, text: dict, downsample_ratio: float = 0.5,
                            image_token_id: Optional[int] = None, params_dtype: str = "float32") -> ModelConfig:
    cfg = ModelConfig(vision=vision_config_from_hf(vision), llm=llm_config_from_hf(text),
                      downsample_ratio=float(downsample_ratio), params_dtype=params_dtype)
    if image_token_id is not None:
        cfg.image_token_id = int(image_token_id)
    cfg.preset = _match_preset(cfg)
    return cfg


def model_config_from_hf(d: dict, params_dtype: str = "float32") -> ModelConfig:
    """Our ModelConfig from an Eagle 2.5 ``config.json`` dict."""
    if d.get("model_type") not in ("eagle_2_5_vl", None):
        raise HFConfigError(f"model_type {d.get('model_type')!r} is not eagle_2_5_vl")
    for key in ("vision_config", "text_config"):
        if key not in d:
            raise HFConfigError(f"config.json has no {key}")
    if d.get("select_layer", -1) != -1:
        raise HFConfigError(f"select_layer {d['select_layer']} unsupported (features come from the last ViT layer)")
    if d.get("mlp_connector_layers", 2) != 2:
        raise HFConfigError("only the 2-layer MLP connector (mlp1.{0,1,3}) is supported")
    if d.get("use_pixel_shuffle") is False:
        raise HFConfigError("use_pixel_shuffle=false unsupported")
    text = dict(d["text_config"])
    if "tie_word_embeddings" in d and "tie_word_embeddings" not in text:
        text["tie_word_embeddings"] = d["tie_word_embeddings"]
    vision = dict(d["vision_config"])
    force = d.get("force_image_size")
    if force and force != vision.get("image_size", _SIGLIP_DEFAULTS["image_size"]):
        raise HFConfigError(f"force_image_size {force} != vision_config.image_size {vision.get('image_size')}: "
                            "resize the position embeddings first")
    return model_config_from_parts(vision, text, d.get("downsample_ratio", 0.5), d.get("image_token_index"),
                                   params_dtype)
