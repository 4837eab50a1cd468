"""How this rank holds a pack for the model's forward: the whole pack (CP = 1) or its zigzag share.

``EagleModel.forward`` runs one path on either layout: word embeddings of ``layout.tokens`` with the
:meth:`visual_tokens` in the ``<IMG_CONTEXT>`` slots -> decoder with :meth:`packed_seq_params` ->
Σ w·CE on ``layout.labels`` / ``layout.loss_weights`` -> :meth:`reduce_loss`. :class:`LocalLayout` is
the identity (and reads data-dependent counts from the batch's host copy, so a GPU step has no
device syncs); :class:`SplitLayout` is this CP rank's share (:mod:`.cp_split`), with visual tokens
routed from the ranks that encoded them (:mod:`.vision_cp`) and the loss summed over CP.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_eagle.batch import PackedBatch
from megatron_eagle.parallel.comm import reduce_loss
from megatron_eagle.parallel.cp_split import CPLayout, CPPackedSeqParams, pad_token_for, split_batch
from megatron_eagle.parallel.groups import CPContext
from megatron_eagle.parallel.vision_cp import encode_and_route

Encode = Callable[[torch.Tensor], torch.Tensor]  # tiles [n, 3, S, S] -> visual tokens [n * tokens_per_tile, H]


class LocalLayout:
    """The whole pack on this rank (CP = 1): every step is the identity."""

    def __init__(self, batch: PackedBatch):
        self.batch = batch
        self.host = batch.host_view()  # data-dependent counts from the CPU copy: no device syncs mid-step
        self.tokens, self.labels, self.loss_weights = batch.tokens, batch.labels, batch.loss_weights
        self.max_seqlen = batch.max_seqlen

    def packed_seq_params(self) -> PackedSeqParams:
        cu = self.batch.cu_seqlens.to(torch.int32)
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)

    def visual_tokens(self, encode: Encode, image_token_id: int, tokens_per_tile: int, like: torch.Tensor,
                      keepalive: Iterable[torch.nn.Parameter] = ()) -> Optional[torch.Tensor]:
        """Visual tokens for the pack's ``<IMG_CONTEXT>`` slots, in order ([n_slots, H], ``like``'s hidden
        size); None for a pack without images."""
        pixels = self.batch.pixel_values
        tokens = self.host.tokens if self.host is not None else self.tokens
        n_slots = int((tokens == image_token_id).sum())
        if not (pixels.shape[0] or n_slots):
            return None
        vis = encode(pixels) if pixels.shape[0] else like.new_zeros(0, like.shape[-1])
        if vis.shape[0] != n_slots:
            raise ValueError(f"batch has {n_slots} <IMG_CONTEXT> tokens but its {pixels.shape[0]} tiles "
                             f"give {vis.shape[0]} visual tokens ({tokens_per_tile} per tile)")
        return vis

    def supervised_positions(self, device: torch.device) -> Optional[torch.Tensor]:
        """Positions with a label, from the host copy (None without one: found on the device)."""
        if self.host is None:
            return None
        return (self.host.labels >= 0).nonzero(as_tuple=True)[0].to(device, non_blocking=True)

    def gather_full(self, local: torch.Tensor) -> torch.Tensor:
        return local

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss


class SplitLayout:
    """This CP rank's zigzag share of the pack (:class:`~.cp_split.CPLayout`)."""

    def __init__(self, batch: PackedBatch, split: CPLayout):
        self.batch, self.split = batch, split
        self.tokens, self.labels, self.loss_weights = split.tokens, split.labels, split.loss_weights
        self.max_seqlen = split.max_seqlen

    def packed_seq_params(self) -> CPPackedSeqParams:
        return self.split.packed_seq_params()

    def visual_tokens(self, encode: Encode, image_token_id: int, tokens_per_tile: int, like: torch.Tensor,
                      keepalive: Iterable[torch.nn.Parameter] = ()) -> Optional[torch.Tensor]:
        """Visual tokens for this rank's local slots: each rank encodes its share of the tiles and one
        all-to-all sends every token to the rank holding its slot."""
        b = self.batch
        if not (b.pixel_values.shape[0] or bool((b.tokens == image_token_id).any())):
            return None
        vis = encode_and_route(encode, b.pixel_values, b.tokens, self.split, image_token_id, tokens_per_tile,
                               like.shape[-1], like.dtype, keepalive=list(keepalive), tile_offset=b.tile_offset)
        n_local = int((self.tokens == image_token_id).sum())
        if vis.shape[0] != n_local:  # routing bug guard: never scatter misaligned rows
            raise RuntimeError(f"CP rank {self.split.ctx.rank}: {n_local} local image slots, "
                               f"{vis.shape[0]} visual tokens routed here")
        return vis

    def supervised_positions(self, device: torch.device) -> Optional[torch.Tensor]:
        return None

    def gather_full(self, local: torch.Tensor) -> torch.Tensor:
        return self.split.gather_full(local)

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Σ over the CP group (value) with this rank's own gradient (see :func:`.comm.reduce_loss`)."""
        return reduce_loss(loss, self.split.ctx.group)


PackLayout = Union[LocalLayout, SplitLayout]


def layout_pack(batch: PackedBatch, ctx: Optional[CPContext], image_token_id: int) -> PackLayout:
    """The layout of ``batch`` on this rank: the identity without CP, else its zigzag share."""
    if ctx is None:
        return LocalLayout(batch)
    return SplitLayout(batch, split_batch(batch, ctx, pad_id=pad_token_for(image_token_id)))
