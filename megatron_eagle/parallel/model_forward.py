"""EagleModel's forward under context parallelism (``EagleModel.forward`` delegates here when cp > 1).

Same path as the CP=1 forward, on this rank's zigzag share: split the pack -> word embeddings
of local tokens + visual tokens routed from the ranks that encoded them -> SP scatter ->
decoder (CP attention, RoPE at global zigzag positions) -> local Σ w·CE -> summed over CP
(value) with local gradients (see :func:`comm.reduce_loss`).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region

from megatron_eagle.models.batch import PackedBatch
from megatron_eagle.models.loss import chunked_weighted_ce
from megatron_eagle.parallel.comm import reduce_loss
from megatron_eagle.parallel.cp_split import CPLayout, pad_token_for, split_batch
from megatron_eagle.parallel.vision_cp import encode_and_route


def cp_embed(model, batch: PackedBatch, layout: CPLayout) -> torch.Tensor:
    """Local decoder input [t_local(/tp under SP), 1, H]."""
    tokens = layout.tokens
    emb = model.language_model.embedding(input_ids=tokens.unsqueeze(0), position_ids=None)  # [t, 1, H]
    cfg = model.model_cfg
    slots = tokens == cfg.image_token_id
    if batch.pixel_values.shape[0] or bool((batch.tokens == cfg.image_token_id).any()):
        keep = list(model.vision_model.parameters()) + list(model.connector.parameters())
        vis = encode_and_route(model.encode_images, batch.pixel_values, batch.tokens, layout, cfg.image_token_id,
                               cfg.tokens_per_tile, emb.shape[-1], emb.dtype, keepalive=keep,
                               tile_offset=getattr(batch, "tile_offset", None))  # a loader batch: its CP share
        if vis.shape[0] != int(slots.sum()):  # routing bug guard: never scatter misaligned rows
            raise RuntimeError(f"CP rank {layout.ctx.rank}: {int(slots.sum())} local image slots, "
                               f"{vis.shape[0]} visual tokens routed here")
        emb = emb.masked_scatter(slots.view(-1, 1, 1), vis.unsqueeze(1))
    if model.config.sequence_parallel:
        emb = scatter_to_sequence_parallel_region(emb)
    return emb


def cp_forward(model, batch: PackedBatch, return_hidden: bool = False) -> torch.Tensor:
    ctx = model.cp_ctx
    layout = split_batch(batch, ctx, pad_id=pad_token_for(model.model_cfg.image_token_id))
    decoder_input = cp_embed(model, batch, layout) if model.pre_process else None
    rotary = model.language_model.rotary_pos_emb(layout.max_seqlen, packed_seq=True)
    hidden = model.language_model.decoder(hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary,
                                          packed_seq_params=layout.packed_seq_params())
    if not model.post_process:
        return hidden
    hidden = model._full_sequence(hidden).squeeze(1)  # [t_local, H]
    if return_hidden:
        return layout.gather_full(hidden)
    loss = chunked_weighted_ce(hidden, model.output_weight(), layout.labels, layout.loss_weights,
                               model.chunk_tokens)
    return reduce_loss(loss, ctx.group)
