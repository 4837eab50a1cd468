"""Benchmark variants: ``ours``, ``hf-strong`` or ``hf`` (the naive HF baseline, labelled
``hf-naive`` in records) followed by ``+option`` tokens (``ours+rc-vit+mb4``, ``hf-strong+fp32-master+gc``).

Every ``ours`` option is a setting a user of the trainer has (model recompute and attention
backend, optimizer section of the run config, parallel layout) or a measurement switch
(``prof``); every ``hf``/``hf-strong`` option is a setting of that baseline.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    side: str  # "ours" | "hf" (naive) | "hf-strong"
    micro_batches: int = 1  # packs per optimizer step (gradient accumulation), both sides
    # ours
    recompute_vision: str = "none"  # model.recompute_vision
    recompute_llm: str = "none"  # model.recompute_llm
    recompute_llm_layers: int = 0  # >0: recompute only this many LLM layers (megatron's block method)
    recompute_auto: bool = False  # both modules "auto": the memory model picks (training/memory.py)
    swiglu: Optional[bool] = None  # megatron's fused SwiGLU; None: the model's default (fused on GPUs)
    attention: Optional[str] = None  # model.attention_backend; None: the preset's
    offload_vit: bool = False  # ViT activations saved in (pinned) host memory
    grad_bf16: bool = False  # optim.grad_reduce_in_fp32 false
    flat_adam: bool = True  # optim.flat_adamw
    overlap_grad: bool = True  # optim.overlap_grad_reduce
    overlap: bool = False  # also overlap the param all-gather with the forward (megatron DDP)
    sp: bool = False  # sequence parallelism when TP > 1
    profile: bool = False  # one extra step under torch.profiler: GPU time per kernel category
    # hf
    doc_mask: bool = True  # position_ids restart per sub-sample: block-diagonal causal mask
    grad_ckpt: bool = False  # transformers' gradient checkpointing (hf and hf-strong)
    # hf-strong
    master_fp32: bool = False  # fp32 master weights and fp32 Adam state (else AdamW on the bf16 params)
    fused_linear_ce: bool = False  # Liger's fused linear cross-entropy (torch CE where Liger is absent)

    def options(self) -> dict:
        """This variant's options for its side, as a JSON-ready dict (the record's ``config``)."""
        mine = {"hf": HF_FIELDS, "hf-strong": STRONG_FIELDS}.get(self.side, OURS_FIELDS)
        return {f: getattr(self, f) for f in ("side", "micro_batches", *mine)}


HF_FIELDS = ("doc_mask", "grad_ckpt")
STRONG_FIELDS = ("grad_ckpt", "master_fp32", "fused_linear_ce")
OURS_FIELDS = tuple(f.name for f in dataclasses.fields(Variant)
                    if f.name not in ("name", "side", "micro_batches", *HF_FIELDS, *STRONG_FIELDS))
SIDES = ("ours", "hf", "hf-strong")

# Variant tokens that set one field; ``rc-llm-N`` and ``mbN`` are parsed apart.
OURS_TOKENS = {
    "rc-vit": ("recompute_vision", "full"), "rc-llm": ("recompute_llm", "full"),
    "rc-llm-sel": ("recompute_llm", "selective"), "rc-auto": ("recompute_auto", True), "swiglu": ("swiglu", True), "no-swiglu": ("swiglu", False),
    "cudnn-attn": ("attention", "cudnn"), "flash-attn": ("attention", "flash"),
    "offload-vit": ("offload_vit", True), "grad-bf16": ("grad_bf16", True), "no-flat-adam": ("flat_adam", False),
    "no-overlap-grad": ("overlap_grad", False), "overlap": ("overlap", True), "sp": ("sp", True),
    "prof": ("profile", True),
}
HF_TOKENS = {"nomask": ("doc_mask", False), "gc": ("grad_ckpt", True)}
STRONG_TOKENS = {"gc": ("grad_ckpt", True), "fp32-master": ("master_fp32", True), "flce": ("fused_linear_ce", True)}


def baseline_label(side: str) -> str:
    """The ``baseline`` name a side's records carry."""
    return "hf-naive" if side == "hf" else side


def parse_variant(name: str) -> Variant:
    """``side+token+token...`` -> :class:`Variant`; ValueError names the unknown token."""
    side, *tokens = name.split("+")
    if side not in SIDES:
        raise ValueError(f"variant {name!r}: must start with one of {', '.join(SIDES)}")
    table = {"ours": OURS_TOKENS, "hf": HF_TOKENS, "hf-strong": STRONG_TOKENS}[side]
    kw: dict = {}
    for t in tokens:
        if t in table:
            field, value = table[t]
            kw[field] = value
        elif side == "ours" and t.startswith("rc-llm-") and t[7:].isdigit():
            kw["recompute_llm"], kw["recompute_llm_layers"] = "full", int(t[7:])
        elif t.startswith("mb") and t[2:].isdigit() and int(t[2:]) >= 1:
            kw["micro_batches"] = int(t[2:])
        else:
            raise ValueError(f"variant {name!r}: unknown {side} option {t!r} "
                             f"({', '.join([*table, *(['rc-llm-N'] if side == 'ours' else []), 'mbN'])})")
    return Variant(name=name, side=side, **kw)
