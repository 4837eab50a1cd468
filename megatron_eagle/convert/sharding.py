"""Move parameters between a full (TP=1, PP=1) layout and any TP/PP rank of our model.

The full layout uses our model's parameter names with *global* layer indices. Sharding
follows megatron-core's own attributes (``tensor_model_parallel``, ``partition_dim``);
the special cases are the SwiGLU ``linear_fc1`` whose [gate; up] halves are split
separately, and the embedding / output layer, padded with zero rows from the true vocabulary to
the model's padded one on load. Everything streams one tensor at a time, so an 8B model is never held twice.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

TIED_EMBEDDING = "language_model.embedding.word_embeddings.weight"
VOCAB_TENSORS = (TIED_EMBEDDING, "language_model.output_layer.weight")


def pad_vocab_rows(name: str, full: torch.Tensor, rows: int) -> torch.Tensor:
    """The embedding / output layer of the true vocabulary padded with zero rows to the model's
    padded vocabulary (``rows``); other tensors unchanged."""
    if name not in VOCAB_TENSORS or full.shape[0] >= rows:
        return full
    return torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])], dim=0)


def _layer_offsets(model: torch.nn.Module) -> dict[str, int]:
    """Per TransformerBlock prefix: global index of its first local layer."""
    offsets = {}
    for name, module in model.named_modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and hasattr(layers[0], "layer_number"):
            offsets[f"{name}.layers." if name else "layers."] = layers[0].layer_number - 1
    return offsets


def global_name(name: str, offsets: dict[str, int]) -> str:
    """Local parameter name -> name with global layer index."""
    for prefix, off in offsets.items():
        if name.startswith(prefix):
            rest = name[len(prefix):]
            idx, tail = rest.split(".", 1)
            return f"{prefix}{int(idx) + off}.{tail}"
    return name


def _is_glu_fc1(name: str, param: torch.Tensor, model: torch.nn.Module) -> bool:
    return name.endswith("mlp.linear_fc1.weight") and name.startswith("language_model.") \
        and getattr(model.config, "gated_linear_unit", False)


def shard(name: str, param: torch.Tensor, full: torch.Tensor, model: torch.nn.Module,
          tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of ``full`` for parameter ``param``."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim = param.partition_dim
    if _is_glu_fc1(name, param, model):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], 0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def unshard(name: str, param: torch.Tensor, model: torch.nn.Module, tp_group) -> torch.Tensor:
    """Gather the full tensor of a TP-sharded parameter (on every rank of the TP group)."""
    local = param.detach()
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(tp_size)]
    dist.all_gather(parts, local.contiguous(), group=tp_group)
    if _is_glu_fc1(name, param, model):
        halves = [p.chunk(2, 0) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves], 0), torch.cat([h[1] for h in halves], 0)], 0)
    return torch.cat(parts, dim=param.partition_dim)


def _named_params(model: torch.nn.Module):
    # Tied output weight on a last stage aliases nothing locally; skip duplicates by identity.
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        yield name, p


def iter_full_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (global name, full tensor) for this pipeline stage's parameters, gathering TP."""
    offsets = _layer_offsets(model)
    tp_group = ps.get_tensor_model_parallel_group() if ps.model_parallel_is_initialized() else None
    tied = getattr(getattr(model, "language_model", None), "share_embeddings_and_output_weights", False)
    for name, p in _named_params(model):
        if tied and name.endswith("output_layer.weight"):
            continue  # the full layout keeps only the embedding (first stage)
        yield global_name(name, offsets), unshard(name, p, model, tp_group)


@torch.no_grad()
def load_full_parameters(model: torch.nn.Module, get: Callable[[str], torch.Tensor | None],
                         strict: bool = True) -> list[str]:
    """Fill this rank's parameters from full tensors ``get(global_name)``. Returns missing names."""
    offsets = _layer_offsets(model)
    tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    tp_size = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    missing = []
    for name, p in _named_params(model):
        full = get(global_name(name, offsets))
        if full is None and name.endswith("output_layer.weight"):
            full = get(TIED_EMBEDDING)  # tied embeddings on a last pipeline stage
        if full is None:
            missing.append(name)
            continue
        sharded = getattr(p, "tensor_model_parallel", False) and tp_size > 1 and p.partition_dim == 0
        full = pad_vocab_rows(global_name(name, offsets), full, p.shape[0] * (tp_size if sharded else 1))
        local = shard(name, p, full, model, tp_rank, tp_size)
        if local.shape != p.shape:
            raise ValueError(f"{name}: checkpoint shard {tuple(local.shape)} != parameter {tuple(p.shape)}")
        p.copy_(local.to(p.dtype))
    if strict and missing:
        raise KeyError(f"missing parameters: {missing[:8]}{'...' if len(missing) > 8 else ''}")
    return missing
