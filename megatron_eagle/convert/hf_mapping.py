"""Pure mapping between the published Eagle 2.5 HF layout and our full parameter layout.

HF side (``Eagle2_5_VLForConditionalGeneration`` state dict):
- ``vision_model.vision_model.*``: a ``SiglipVisionModel`` (no pooling head): SigLIP, or a
  fixed-resolution SigLIP2, which has the same layout;
- ``mlp1.{0,1,3}.*``: LayerNorm(4C), Linear(4C, H), [GELU], Linear(H, H);
- ``language_model.model.*`` and ``language_model.lm_head.weight``: a ``Qwen2ForCausalLM`` or a
  ``Qwen3ForCausalLM`` (no qkv bias, ``self_attn.{q,k}_norm``).

The vocabulary tensors are padded in our model (TP); export strips the padding to the true
``vocab_size``. With ``select_layer`` != -1 the ViT layers after the selected one and the
post-layernorm are not part of our model: import skips them, export does not write them.

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
    "self_attention.q_layernorm": "self_attn.q_norm",
    "self_attention.k_layernorm": "self_attn.k_norm",
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


VOCAB_TENSORS = ("language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight")


def to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs for our full tensor ``name`` (vocabulary padding stripped)."""
    if name == "language_model.output_layer.weight" and cfg.llm.tie_embeddings:
        return  # tied: HF keeps only embed_tokens
    if name in VOCAB_TENSORS:
        tensor = tensor[: cfg.llm.vocab_size]
    rule = rule_for(name, cfg)
    pieces = rule.split(tensor) if rule.split else (tensor,)
    yield from zip(rule.hf_names, pieces)


def our_full_names(cfg: ModelConfig) -> Iterator[str]:
    """Every full-layout parameter name of the whole model (all stages), in model order."""
    v, l = cfg.vision, cfg.llm
    yield from ("vision_model.patch_embedding.weight", "vision_model.patch_embedding.bias",
                "vision_model.position_embedding.weight")
    for i in range(v.layers_used):
        for mod in ("input_layernorm", "self_attention.linear_proj", "self_attention.linear_qkv",
                    "pre_mlp_layernorm", "mlp.linear_fc1", "mlp.linear_fc2"):
            for p in ("weight", "bias"):
                yield f"vision_model.encoder.layers.{i}.{mod}.{p}"
    if v.post_layernorm:
        yield from ("vision_model.encoder.final_layernorm.weight", "vision_model.encoder.final_layernorm.bias")
    yield from (f"connector.{m}.{p}" for m in ("norm", "fc1", "fc2") for p in ("weight", "bias"))
    yield "language_model.embedding.word_embeddings.weight"
    for i in range(l.num_layers):
        pre = f"language_model.decoder.layers.{i}."
        yield from (pre + "input_layernorm.weight", pre + "self_attention.linear_proj.weight",
                    pre + "self_attention.linear_qkv.weight")
        if l.qkv_bias:
            yield pre + "self_attention.linear_qkv.bias"
        if l.qk_layernorm:
            yield from (pre + "self_attention.q_layernorm.weight", pre + "self_attention.k_layernorm.weight")
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


_HF_VIT_LAYER = re.compile(r"^vision_model\.vision_model\.encoder\.layers\.(\d+)\.")


def is_skipped_hf(name: str, cfg: ModelConfig) -> bool:
    """HF tensors our model deliberately leaves out: with ``select_layer`` != -1 the ViT layers after
    the selected one and the post-layernorm (they feed nothing)."""
    v = cfg.vision
    if v.post_layernorm:
        return False
    if name.startswith(HF_VISION + "post_layernorm."):
        return True
    m = _HF_VIT_LAYER.match(name)
    return bool(m) and int(m.group(1)) >= v.layers_used


# ----------------------------------------------------------------------------- config.json

# transformers' defaults for keys that saved configs may omit (they save only non-defaults).
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                        num_channels=3)
_QWEN2_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0,
                       tie_word_embeddings=False, head_dim=None)
_QWEN3_DEFAULTS = dict(_QWEN2_DEFAULTS, head_dim=128)
# The official Eagle2_5_VLConfig's default when a config.json omits select_layer.
OFFICIAL_SELECT_LAYER = -4


class HFConfigError(ValueError):
    """A config.json we cannot convert: names the file (when known), the field and the reason."""

    def __init__(self, problem: str, field: Optional[str] = None, source: Optional[str] = None):
        self.problem, self.field, self.source = problem, field, source
        where = ": ".join(x for x in (source, field) if x)
        super().__init__(f"{where}: {problem}" if where else problem)

    def located(self, source: str, prefix: str = "") -> "HFConfigError":
        """The same error, named with its file and the field's path inside it."""
        field = f"{prefix}{self.field}" if self.field else prefix.rstrip(".") or None
        return HFConfigError(self.problem, field, self.source or source)


def _get(d: dict, key: str, defaults: dict) -> Any:
    return d[key] if d.get(key) is not None else defaults[key]


def vision_config_from_hf(d: dict, select_layer: int = -1) -> VisionConfig:
    """Our VisionConfig from a SigLIP / fixed-resolution SigLIP2 vision config dict
    (``siglip_vision_model``). NaFlex SigLIP2 (``siglip2_vision_model``) is refused."""
    kind = d.get("model_type")
    if kind == "siglip2_vision_model" or d.get("num_patches") is not None:
        raise HFConfigError(f"{kind or 'a config with num_patches'} is NaFlex SigLIP2 (variable resolution), "
                            "which is not supported; use a fixed-resolution SigLIP2 (e.g. "
                            "google/siglip2-so400m-patch16-512, model_type siglip_vision_model)", "model_type")
    if kind not in (None, "siglip_vision_model"):
        raise HFConfigError(f"vision model_type {kind!r} is not SigLIP (supported: siglip_vision_model)",
                            "model_type")
    act = _get(d, "hidden_act", _SIGLIP_DEFAULTS)
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise HFConfigError(f"SigLIP hidden_act {act!r} unsupported (our ViT uses GELU-tanh)", "hidden_act")
    # Fixed-resolution SigLIP2 checkpoints share SigLIP's model_type; their name tells them apart.
    family = "siglip2" if "siglip2" in str(d.get("_name_or_path", "")).lower() else "siglip"
    cfg = VisionConfig(num_layers=_get(d, "num_hidden_layers", _SIGLIP_DEFAULTS),
                       hidden_size=_get(d, "hidden_size", _SIGLIP_DEFAULTS),
                       num_heads=_get(d, "num_attention_heads", _SIGLIP_DEFAULTS),
                       ffn_hidden_size=_get(d, "intermediate_size", _SIGLIP_DEFAULTS),
                       patch_size=_get(d, "patch_size", _SIGLIP_DEFAULTS),
                       image_size=_get(d, "image_size", _SIGLIP_DEFAULTS),
                       layernorm_eps=float(_get(d, "layer_norm_eps", _SIGLIP_DEFAULTS)),
                       family=family, select_layer=int(select_layer))
    try:
        cfg.layers_used
    except ValueError:
        raise HFConfigError(f"{select_layer} selects no encoder layer of the {cfg.num_layers}; use -1 (the last, "
                            f"after the post-layernorm) to -{cfg.num_layers}", "select_layer") from None
    return cfg


def _rope_theta(d: dict, defaults: dict) -> float:
    rp = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    kind = rp.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise HFConfigError(f"rope type {kind!r} unsupported (only plain RoPE)", "rope_scaling")
    return float(rp.get("rope_theta") or d.get("rope_theta") or defaults["rope_theta"])


def llm_config_from_hf(d: dict) -> LLMConfig:
    """Our LLMConfig from a Qwen2 / Qwen2.5 (``qwen2``) or Qwen3 (``qwen3``) text config dict."""
    kind = d.get("model_type") or "qwen2"
    if kind not in ("qwen2", "qwen3"):
        raise HFConfigError(f"text model_type {kind!r} unsupported (supported: qwen2, qwen3)", "model_type")
    qwen3 = kind == "qwen3"
    defaults = _QWEN3_DEFAULTS if qwen3 else _QWEN2_DEFAULTS
    if _get(d, "hidden_act", defaults) != "silu":
        raise HFConfigError(f"hidden_act {d.get('hidden_act')!r} unsupported (SwiGLU needs silu)", "hidden_act")
    if d.get("use_sliding_window"):
        raise HFConfigError("sliding-window attention unsupported", "use_sliding_window")
    heads = _get(d, "num_attention_heads", defaults)
    hidden = _get(d, "hidden_size", defaults)
    head_dim = d.get("head_dim") or defaults["head_dim"]
    return LLMConfig(num_layers=_get(d, "num_hidden_layers", defaults), hidden_size=hidden, num_heads=heads,
                     num_kv_heads=d.get("num_key_value_heads") or heads,
                     ffn_hidden_size=_get(d, "intermediate_size", defaults),
                     vocab_size=_get(d, "vocab_size", defaults), rope_theta=_rope_theta(d, defaults),
                     rms_eps=float(_get(d, "rms_norm_eps", defaults)),
                     # Qwen2 always has q/k/v biases; Qwen3 has them only with attention_bias.
                     qkv_bias=bool(d.get("attention_bias", False)) if qwen3 else True,
                     tie_embeddings=bool(_get(d, "tie_word_embeddings", defaults)),
                     max_position_embeddings=_get(d, "max_position_embeddings", defaults),
                     family=kind, qk_layernorm=qwen3,
                     head_dim=_head_dim(head_dim, hidden, heads, qwen3))


def _head_dim(head_dim: Optional[int], hidden: int, heads: int, qwen3: bool) -> Optional[int]:
    """Qwen3 configs always carry ``head_dim`` (kept as written); a Qwen2 one equal to hidden / heads
    is the default (None)."""
    if head_dim is None or (not qwen3 and int(head_dim) == hidden // heads):
        return None
    return int(head_dim)


def _match_preset(cfg: ModelConfig) -> tuple[str, Optional[ModelConfig]]:
    """(name, config) of the preset with these dimensions, else ("custom", None). The vision family
    (a label: SigLIP and fixed-resolution SigLIP2 have the same layers) and the feature layer are
    not compared."""
    from dataclasses import asdict

    def dims(d: dict, skip: tuple) -> dict:
        return {k: v for k, v in d.items() if k not in skip}

    vis_skip, llm_skip = ("family", "select_layer"), ("max_position_embeddings", "head_dim")
    for name in PRESETS:
        p = preset_model_config(name)
        if dims(asdict(cfg.vision), vis_skip) == dims(asdict(p.vision), vis_skip) \
                and dims(asdict(cfg.llm), llm_skip) == dims(asdict(p.llm), llm_skip) \
                and cfg.llm.kv_channels == p.llm.kv_channels:
            return name, p
    return "custom", None


def model_config_from_parts(vision: dict, text: dict, downsample_ratio: float = 0.5,
                            image_token_id: Optional[int] = None, params_dtype: str = "float32",
                            select_layer: int = -1) -> ModelConfig:
    """Our ModelConfig from a vision and a text config dict (errors name the field inside each)."""
    try:
        v = vision_config_from_hf(vision, select_layer)
    except HFConfigError as e:
        raise e.located(None, "vision_config." if e.field != "select_layer" else "") from None
    try:
        l = llm_config_from_hf(text)
    except HFConfigError as e:
        raise e.located(None, "text_config.") from None
    cfg = ModelConfig(vision=v, llm=l, downsample_ratio=float(downsample_ratio), params_dtype=params_dtype)
    if image_token_id is not None:
        cfg.image_token_id = int(image_token_id)
    cfg.preset, preset = _match_preset(cfg)
    if preset is not None and preset.vision.family == "siglip2":
        cfg.vision.family = "siglip2"
    return cfg


def model_config_from_hf(d: dict, params_dtype: str = "float32", source: Optional[str] = None) -> ModelConfig:
    """Our ModelConfig from an Eagle 2.5 ``config.json`` dict (``source``: its path, for errors).

    A missing ``select_layer`` is read as the official config class's default, -4.
    """
    try:
        return _model_config_from_hf(d, params_dtype)
    except HFConfigError as e:
        raise e.located(source) if source else e from None


def _model_config_from_hf(d: dict, params_dtype: str) -> ModelConfig:
    if d.get("model_type") not in ("eagle_2_5_vl", None):
        raise HFConfigError(f"model_type {d.get('model_type')!r} is not eagle_2_5_vl", "model_type")
    for key in ("vision_config", "text_config"):
        if key not in d:
            raise HFConfigError("missing", key)
    if d.get("mlp_connector_layers", 2) != 2:
        raise HFConfigError("only the 2-layer MLP connector (mlp1.{0,1,3}) is supported", "mlp_connector_layers")
    if d.get("use_pixel_shuffle") is False:
        raise HFConfigError("false unsupported (the connector takes pixel-shuffled features)", "use_pixel_shuffle")
    text = dict(d["text_config"])
    if "tie_word_embeddings" in d and "tie_word_embeddings" not in text:
        text["tie_word_embeddings"] = d["tie_word_embeddings"]
    vision = dict(d["vision_config"])
    force = d.get("force_image_size")
    if force and force != vision.get("image_size", _SIGLIP_DEFAULTS["image_size"]):
        raise HFConfigError(f"{force} != vision_config.image_size {vision.get('image_size')}: "
                            "resize the position embeddings first", "force_image_size")
    select = d.get("select_layer")
    return model_config_from_parts(vision, text, d.get("downsample_ratio", 0.5), d.get("image_token_index"),
                                   params_dtype, OFFICIAL_SELECT_LAYER if select is None else int(select))
