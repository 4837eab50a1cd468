"""Eagle 2.5 on megatron-core: SigLIP ViT -> pixel shuffle -> MLP connector -> Qwen2.5 / Qwen3.

The whole path from a packed batch to the loss is :meth:`EagleModel.forward`:
this rank's layout of the pack -> tiles -> ViT -> pixel shuffle -> connector -> replace
<IMG_CONTEXT> embeddings -> Qwen2 decoder (packed causal attention, RoPE restarting per
sub-sample) -> weighted chunked cross-entropy -> summed over CP. Without context parallelism
the layout is the identity; with it, each CP rank holds a zigzag share of the pack and the
visual tokens its slots need (:mod:`megatron_eagle.parallel.layout`). With PP the ViT and
connector live on the first stage and the loss on the last; ``set_input_tensor`` feeds the
middle stages.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import torch
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule

from megatron_eagle.batch import PackedBatch
from megatron_eagle.config import FreezeConfig, ModelConfig, ParallelConfig
from megatron_eagle.kernels.dispatch import AttentionKernels
from megatron_eagle.models.connector import MLPConnector, pixel_shuffle
from megatron_eagle.models.loss import chunked_weighted_ce, full_logits
from megatron_eagle.models.specs import llm_block_spec
from megatron_eagle.models.transformer_configs import llm_transformer_config, vision_transformer_config
from megatron_eagle.models.vision import SiglipVisionModel
from megatron_eagle.parallel.groups import build_cp_context
from megatron_eagle.parallel.layout import PackLayout, layout_pack


class EagleModel(MegatronModule):
    """The Eagle 2.5 VLM for one pipeline stage."""

    def __init__(self, model: ModelConfig, parallel: ParallelConfig, pre_process: bool = True,
                 post_process: bool = True, chunk_tokens: int = 2048):
        llm_cfg = llm_transformer_config(model.llm, model, parallel)
        super().__init__(config=llm_cfg)
        self.model_cfg = model
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.pre_process, self.post_process = pre_process, post_process
        self.chunk_tokens = chunk_tokens
        # One attention dispatcher (``attention_backend``) for every layer, ViT and LLM.
        self.attention_kernels = AttentionKernels(model.attention_backend)
        if pre_process:
            vit_cfg = vision_transformer_config(model.vision, model, parallel)
            self.vision_model = SiglipVisionModel(vit_cfg, model.vision, self.attention_kernels)
            shuffled = int(model.vision.hidden_size / model.downsample_ratio ** 2)
            self.connector = MLPConnector(llm_cfg, shuffled, model.llm.hidden_size)
        self.language_model = GPTModel(
            config=llm_cfg, transformer_layer_spec=llm_block_spec(llm_cfg, self.attention_kernels),
            vocab_size=model.llm.padded_vocab_size(parallel.tp), max_sequence_length=model.llm.max_position_embeddings, pre_process=pre_process,
            post_process=post_process, share_embeddings_and_output_weights=model.llm.tie_embeddings,
            position_embedding_type="rope", rotary_base=model.llm.rope_theta,
            scatter_embedding_sequence_parallel=False)
        # Context parallelism (cp > 1): zigzag split, CP attention, vision DP inside the CP group.
        self.cp_ctx = build_cp_context(parallel, model.llm.num_heads) if parallel.cp > 1 else None

    # -- pipeline plumbing -------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    # megatron's finalize_model_grads syncs tied embedding grads across PP stages through these.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.language_model.shared_embedding_or_output_weight()

    # -- forward -----------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [n, 3, S, S] -> LLM-space visual tokens [n * tokens_per_tile, H]."""
        feats = self.vision_model(pixel_values)  # [n, g*g, C]
        n, _, c = feats.shape
        g = self.model_cfg.vision.patches_per_side
        feats = pixel_shuffle(feats.reshape(n, g, g, c), self.model_cfg.downsample_ratio)
        return self.connector(feats.reshape(-1, feats.shape[-1]))

    def _visual_parameters(self) -> Iterator[torch.nn.Parameter]:
        return itertools.chain(self.vision_model.parameters(), self.connector.parameters())

    def embed(self, layout: PackLayout) -> torch.Tensor:
        """Embeddings of ``layout.tokens`` with visual tokens in the <IMG_CONTEXT> slots: [t, 1, H]
        (SP-scattered)."""
        tokens = layout.tokens
        emb = self.language_model.embedding(input_ids=tokens.unsqueeze(0), position_ids=None)  # [t, 1, H]
        cfg = self.model_cfg
        vis = layout.visual_tokens(self.encode_images, cfg.image_token_id, cfg.tokens_per_tile, emb,
                                   keepalive=self._visual_parameters())
        if vis is not None:
            slots = tokens == cfg.image_token_id
            emb = emb.masked_scatter(slots.view(-1, 1, 1), vis.to(emb.dtype).unsqueeze(1))
        if self.config.sequence_parallel:
            if emb.shape[0] % self.config.tensor_model_parallel_size:
                raise ValueError(f"pack length {emb.shape[0]} is not a multiple of tp="
                                 f"{self.config.tensor_model_parallel_size}; pad packs (pad_to_multiple)")
            emb = scatter_to_sequence_parallel_region(emb)
        return emb

    def forward(self, batch: PackedBatch, return_hidden: bool = False) -> torch.Tensor:
        """Loss Σ w·CE on the last stage (or final hidden [T, H] if ``return_hidden``);
        the activations for the next stage elsewhere."""
        layout = layout_pack(batch, self.cp_ctx, self.model_cfg.image_token_id)  # identity without CP
        decoder_input = self.embed(layout) if self.pre_process else None
        rotary = self.language_model.rotary_pos_emb(layout.max_seqlen, packed_seq=True)
        hidden = self.language_model.decoder(hidden_states=decoder_input, attention_mask=None,
                                             rotary_pos_emb=rotary, packed_seq_params=layout.packed_seq_params())
        if not self.post_process:
            return hidden
        hidden = self._full_sequence(hidden).squeeze(1)
        if return_hidden:
            return layout.gather_full(hidden)
        loss = chunked_weighted_ce(hidden, self.output_weight(), layout.labels, layout.loss_weights,
                                   self.chunk_tokens, supervised=layout.supervised_positions(hidden.device),
                                   vocab_size=self.model_cfg.llm.vocab_size)
        return layout.reduce_loss(loss)

    def _full_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        # Each TP rank projects onto its vocab shard, so d(hidden) must be summed across TP.
        if self.config.sequence_parallel:
            return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
        return copy_to_tensor_model_parallel_region(hidden)

    def output_weight(self) -> torch.Tensor:
        lm = self.language_model
        return lm.shared_embedding_or_output_weight() if lm.share_embeddings_and_output_weights \
            else lm.output_layer.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [T, V] over the true vocabulary (the padded rows sliced off) from final hidden states
        (inference)."""
        return full_logits(hidden, self.output_weight())[..., : self.model_cfg.llm.vocab_size]


def apply_freeze(model: EagleModel, freeze: FreezeConfig) -> None:
    """Freeze modules by name (stage 1 of the recipe trains the connector only)."""
    parts = {"vision": getattr(model, "vision_model", None), "connector": getattr(model, "connector", None),
             "llm": model.language_model}
    for name, module in parts.items():
        if module is not None:
            for p in module.parameters():
                p.requires_grad_(not getattr(freeze, name))


def build_model(model: ModelConfig, parallel: ParallelConfig, chunk_tokens: int = 2048) -> EagleModel:
    """Build this rank's pipeline stage of the model (process groups must exist)."""
    from megatron.core import parallel_state as ps

    pre = ps.is_pipeline_first_stage(ignore_virtual=True)
    post = ps.is_pipeline_last_stage(ignore_virtual=True)
    m = EagleModel(model, parallel, pre_process=pre, post_process=post, chunk_tokens=chunk_tokens)
    if torch.cuda.is_available():
        m = m.cuda()
    apply_freeze(m, model.freeze)
    return m
