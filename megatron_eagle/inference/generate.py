"""Greedy decoding with our EagleModel.

There is no KV cache yet: every step re-runs the whole prompt plus the tokens generated
so far through the packed forward (one sub-sample), ViT included. That is exact and
simple, and costs O(n²) in the number of generated tokens, which is fine for checks and
short answers but not for serving.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_eagle.inference.forward import forward_logits, inference_batch


def _last_stage_src() -> Optional[int]:
    """Global rank of the last pipeline stage in this rank's pipeline, when PP > 1."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return None
    return ps.get_pipeline_model_parallel_last_rank()


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor], max_new_tokens: int,
                    eos_id: Optional[int | Iterable[int]] = None) -> list[int]:
    """Generate up to ``max_new_tokens`` ids greedily (argmax), stopping after an eos id.

    ``input_ids`` [L] is the full prompt (with its ``<IMG_CONTEXT>`` runs) and
    ``pixel_values`` [n, 3, S, S] its tiles. Returns the new ids, the eos included when
    reached. All ranks of the model-parallel group call this; with PP the last stage's
    choice is broadcast to the other stages.
    """
    eos = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    tile = model.model_cfg.vision.image_size
    ids = input_ids.reshape(-1).tolist()
    src = _last_stage_src()
    device = next(model.parameters()).device
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = forward_logits(model, inference_batch([(torch.tensor(ids), pixel_values)], tile))
        nxt = torch.zeros(1, dtype=torch.long, device=device)
        if logits is not None:
            nxt[0] = int(torch.argmax(logits[-1]))
        if src is not None:
            from megatron.core import parallel_state as ps

            dist.broadcast(nxt, src=src, group=ps.get_pipeline_model_parallel_group())
        token = int(nxt[0])
        out.append(token)
        ids.append(token)
        if token in eos:
            break
    return out
