"""A transformers Eagle 2.5 for parity checks and test weights: the exported model class itself.

``EagleHFReference`` is the remote-code ``Eagle2_5_VLForConditionalGeneration`` that every
export carries (``SiglipVisionModel`` -> InternVL pixel shuffle -> ``mlp1`` =
``nn.Sequential(LayerNorm, Linear, GELU, Linear)`` -> ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``),
built from our ModelConfig. Its ``state_dict`` keys are exactly the published HF layout
(``vision_model.vision_model.*``, ``mlp1.{0,1,3}.*``, ``language_model.*``), so it can both load
and *make* HF checkpoints: :func:`make_random_hf_checkpoint` writes a seeded random Eagle
checkpoint (our stand-in for downloaded weights). It shares no model code with
:mod:`megatron_eagle.models`, so parity with it checks our model and the export at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_eagle.config import ModelConfig
from megatron_eagle.convert import hf_io, hf_mapping
from megatron_eagle.convert.hf_export import config as hf_export_config
from megatron_eagle.convert.hf_export.remote.configuration_eagle2_5_vl import Eagle2_5_VLConfig
from megatron_eagle.convert.hf_export.remote.modeling_eagle2_5_vl import Eagle2_5_VLForConditionalGeneration
from megatron_eagle.convert.hf_export.remote.modeling_eagle2_5_vl import pixel_shuffle as pixel_shuffle_internvl
from megatron_eagle.convert.hf_export.writer import write_processor_files


def hf_model_config(cfg: ModelConfig, attn_implementation: str = "eager") -> Eagle2_5_VLConfig:
    """The exported ``config.json`` of ``cfg`` as a config object, with one attention kernel everywhere."""
    hf = Eagle2_5_VLConfig(**{k: v for k, v in hf_export_config.hf_config(cfg).items()
                              if k not in ("auto_map", "architectures", "model_type", "torch_dtype")})
    for c in (hf, hf.vision_config, hf.text_config):
        c._attn_implementation = attn_implementation
    return hf


class EagleHFReference(Eagle2_5_VLForConditionalGeneration):
    """The exported Eagle 2.5 model (fp32 eager attention by default) with per-sample helpers."""

    def __init__(self, cfg: ModelConfig, attn_implementation: str = "eager"):
        super().__init__(hf_model_config(cfg, attn_implementation))
        self.cfg = cfg

    @classmethod
    def from_pretrained(cls, hf_dir: str | Path, attn_implementation: str = "eager") -> "EagleHFReference":
        cfg = hf_mapping.model_config_from_hf(hf_io.read_config(hf_dir))
        model = cls(cfg, attn_implementation)
        reader = hf_io.SafetensorsReader(hf_dir)
        state = {k: reader.get(k) for k in reader.stored_names() if not hf_mapping.is_ignored_hf(k)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        allowed = {hf_mapping.HF_LM_HEAD} if cfg.llm.tie_embeddings else set()
        if set(missing) - allowed or unexpected:
            raise KeyError(f"reference load: missing {sorted(set(missing) - allowed)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        if cfg.llm.tie_embeddings:
            model.language_model.lm_head.weight = model.language_model.get_input_embeddings().weight
        return model.float().eval()

    def _init_weights(self, module) -> None:
        """Nothing: SigLIP and Qwen keep transformers' own init, ``mlp1`` PyTorch's (random test weights)."""

    def pixel_shuffle(self, x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        return pixel_shuffle_internvl(x, scale_factor)  # module-level, so a test can swap it

    # -- forward -----------------------------------------------------------------------
    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] tiles -> [n * tokens_per_tile, H]."""
        return self.extract_feature(pixel_values).reshape(-1, self.cfg.llm.hidden_size)

    def input_embeds(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor]) -> torch.Tensor:
        """[L] ids (+ tiles) -> [1, L, H] with visual tokens in the <IMG_CONTEXT> slots."""
        ids = input_ids.reshape(1, -1)
        if (pixel_values is None or not pixel_values.shape[0]) and bool((ids == self.cfg.image_token_id).any()):
            raise ValueError("prompt has <IMG_CONTEXT> tokens but no pixel values")
        self.config.image_token_index = self.cfg.image_token_id
        return self.embed_inputs(ids, pixel_values)

    @torch.no_grad()
    def sample_logits(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [L, V] of one sample run alone."""
        emb = self.input_embeds(input_ids, pixel_values)
        return self.language_model(inputs_embeds=emb, use_cache=False).logits[0]

    @torch.no_grad()
    def greedy(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor], max_new_tokens: int,
               eos_id: Optional[int]) -> list[int]:
        """transformers' own greedy ``generate`` (with its KV cache) on the embedded prompt."""
        emb = self.input_embeds(input_ids, pixel_values)
        mask = torch.ones(emb.shape[:2], dtype=torch.long)
        out = self.language_model.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=max_new_tokens,
                                           do_sample=False, eos_token_id=eos_id,
                                           pad_token_id=eos_id if eos_id is not None else 0)
        return out[0].tolist()


def reference_logits(ref: EagleHFReference, samples: Sequence[tuple[torch.Tensor, Optional[torch.Tensor]]]
                     ) -> torch.Tensor:
    """Concatenated per-sample logits [Σ L, V]: what a pack of these samples must produce."""
    return torch.cat([ref.sample_logits(ids, pv) for ids, pv in samples], dim=0)


@torch.no_grad()
def make_random_hf_checkpoint(out_dir: str | Path, cfg: ModelConfig, tokenizer_dir: Optional[str | Path] = None,
                              seed: int = 0, max_shard_size: str | int = "5GB",
                              dtype: torch.dtype = torch.float32) -> Path:
    """Write a seeded random Eagle 2.5 HF checkpoint (weights, index, config, tokenizer).

    transformers' own init leaves norms at 1 and biases at 0; both are perturbed so a
    mapping that mixes them up cannot pass a parity test.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = None
    if tokenizer_dir is not None:
        tok = hf_io.save_tokenizer(tokenizer_dir, out)
        from megatron_eagle.tokenizer import special_token_ids
        cfg.image_token_id = special_token_ids(tok)["img_context"]
    torch.manual_seed(seed)
    model = EagleHFReference(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    writer = hf_io.ShardedWriter(out, max_shard_size, tag="random", dtype=dtype)
    state = model.state_dict()
    for name in hf_mapping.expected_hf_names(cfg):
        writer.add(name, state[name])
    hf_io.finalize_shards(out, [writer.close()])
    eos = pad = None
    if tok is not None:
        from megatron_eagle.tokenizer import special_token_ids
        eos, pad = special_token_ids(tok)["eos"], tok.pad_token_id
    hf_io.write_json(out / "config.json", hf_export_config.hf_config(cfg, str(dtype).replace("torch.", ""), eos))
    write_processor_files(out, cfg, eos, pad)
    return out
