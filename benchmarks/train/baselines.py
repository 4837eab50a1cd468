"""The naive HF baseline (``hf`` variants, ``hf-naive`` in records): transformers' ``SiglipVisionModel`` + pixel shuffle + ``mlp1`` +
``Qwen2ForCausalLM`` (``EagleHFReference``) in plain PyTorch, trained the way a user of
transformers trains it.

bf16 params with SDPA attention, the full bf16 logits upcast to fp32 for the loss (what
``Qwen2ForCausalLM`` does), ``clip_grad_norm_`` and ``torch.optim.AdamW(fused=True)`` on the bf16
params. ``hf`` packs padding-free: ``position_ids`` restart per sub-sample, from which
transformers builds a block-diagonal causal mask for SDPA (exact packed semantics; SDPA then runs
a masked kernel over the whole pack). ``hf+nomask`` drops ``position_ids``: one causal sequence
per pack, so attention crosses sub-samples (wrong semantics, but SDPA's fastest path); ``hf+gc``
adds transformers' gradient checkpointing.
"""

from __future__ import annotations

import torch

from benchmarks.train.packs import IGNORE, Pack
from benchmarks.train.timing import Marks, instrument
from benchmarks.train.variants import Variant



def build_reference(cfg, device: torch.device, grad_ckpt: bool, attention_hook=None):
    """The transformers reference model in the config's dtype on ``device``, in train mode.

    ``attention_hook(ref)`` runs before the model moves to the device and before gradient
    checkpointing is enabled (hf-strong switches the LLM's attention implementation there).
    """
    from megatron_eagle.convert.reference import EagleHFReference

    dtype = torch.bfloat16 if cfg.params_dtype == "bfloat16" else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ref = EagleHFReference(cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(old)
    if attention_hook is not None:
        attention_hook(ref)
    ref.to(device=device, dtype=dtype).train()
    if grad_ckpt:
        kw = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        ref.language_model.gradient_checkpointing_enable(**kw)
        ref.vision_model.vision_model.gradient_checkpointing_enable(**kw)
    return ref


class HFSide:
    """The baseline model, its optimizer and the phase hooks; ``step`` trains one group of packs."""

    def __init__(self, cfg, v: Variant, device: torch.device):
        self.device, self.v, self.cfg = device, v, cfg
        self.ref = ref = build_reference(cfg, device, grad_ckpt=v.grad_ckpt)
        self.params = [p for p in ref.parameters() if p.requires_grad]
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05,
                                     fused=fused or None)
        self.marks = Marks(device.type == "cuda")
        self.hooks = instrument(self.marks, ref.vision_model.vision_model, ref.mlp1, ref.language_model.model, None,
                                "inputs_embeds")

    def step(self, group: list[Pack]) -> float:
        import torch.nn.functional as F

        self.marks.reset()
        self.marks.mark("step_start")
        self.opt.zero_grad(set_to_none=True)
        losses = []
        for pack in group:  # gradient accumulation over the micro-batches
            b = pack.batch
            emb = self.ref.input_embeds(b.tokens, b.pixel_values)
            pos = b.position_ids.unsqueeze(0) if self.v.doc_mask else None
            hidden = self.ref.language_model.model(inputs_embeds=emb, position_ids=pos,
                                                   use_cache=False).last_hidden_state
            logits = self.ref.language_model.lm_head(hidden)[0]
            ce = F.cross_entropy(logits.float(), b.labels, ignore_index=IGNORE, reduction="none")
            loss = (ce * b.loss_weights).sum()
            self.marks.mark("fwd_end")
            (loss / len(group)).backward()
            losses.append(float(loss.detach()))
        self.marks.mark("bwd_end")
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.marks.mark("opt_end")
        return losses[0]

    def config(self) -> dict:
        """The variant's options and the baseline's fixed choices."""
        return {**self.v.options(), "baseline": "hf-naive", "baseline_precision": "bf16-adam",
                "attn_implementation": "sdpa", "fused_adamw": self.device.type == "cuda",
                "recompute": "gradient-checkpointing (vit, llm)" if self.v.grad_ckpt else "none"}

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
