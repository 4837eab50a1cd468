"""Forward-only passes of a (possibly pipeline-parallel) EagleModel for inference and checks."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_eagle.batch import IGNORE_INDEX, PackedBatch, pack_samples


def inference_batch(samples: Sequence[tuple[torch.Tensor, Optional[torch.Tensor]]], tile_size: int,
                    pad_to_multiple: int = 1) -> PackedBatch:
    """A pack of unsupervised samples ``(input_ids [L], tiles [n, 3, S, S] or None)``."""
    packed, tiles = [], []
    for ids, pv in samples:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        packed.append((ids, torch.full_like(ids, IGNORE_INDEX)))
        tiles.append(pv if pv is not None else torch.zeros(0, 3, tile_size, tile_size))
    return pack_samples(packed, tiles, (3, tile_size, tile_size), pad_to_multiple=pad_to_multiple)


def _pp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


@torch.no_grad()
def forward_hidden(model, batch: PackedBatch) -> Optional[torch.Tensor]:
    """Final hidden states [T, H] on the last pipeline stage, None on other stages.

    Every rank of the model-parallel group must call this with the same batch.
    """
    device = next(model.parameters()).device
    batch = batch.to(device)
    if _pp_size() == 1:
        return model(batch, return_hidden=True)
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    captured: list[torch.Tensor] = []

    def step(data_iter, m):
        out = m(next(data_iter), return_hidden=True)

        def keep(hidden):
            captured.append(hidden.detach().clone())
            return hidden.sum() * 0.0, {}
        return out, keep

    seq = batch.num_tokens // (model.config.tensor_model_parallel_size if model.config.sequence_parallel else 1)
    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([batch]), model=[model],
                                num_microbatches=1, seq_length=seq, micro_batch_size=1, forward_only=True)
    return captured[0] if ps.is_pipeline_last_stage() else None


@torch.no_grad()
def forward_logits(model, batch: PackedBatch) -> Optional[torch.Tensor]:
    """Full-vocabulary fp32 logits [T, V] on the last pipeline stage, None elsewhere."""
    hidden = forward_hidden(model, batch)
    return None if hidden is None else model.logits(hidden).float()
