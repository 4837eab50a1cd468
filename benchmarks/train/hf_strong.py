"""The ``hf-strong`` baseline: the HF stack a careful user of the official Eagle 2.5 code runs.

- our transformers reference classes (``EagleHFReference``: SigLIP + pixel shuffle + ``mlp1`` +
  ``Qwen2ForCausalLM``), bf16;
- the LLM's attention varlen over each pack's ``cu_seqlens``: ``flash_attn.flash_attn_varlen_func``
  when importable, else ``torch.ops.aten._flash_attention_forward`` (GPU), else exact per-segment
  SDPA (CPU fallback); no mask is built (the mask mapping is handed in already made);
- Liger kernels (``apply_liger_kernel_to_qwen2``: RoPE, RMSNorm, SwiGLU) when importable;
- the LM head and cross-entropy on the supervised positions only; with ``flce`` Liger's fused
  linear cross-entropy (token mean, as the official code uses it), else torch's CE;
- fused AdamW, on the bf16 parameters (``bf16`` Adam state), or with ``fp32-master`` on fp32
  master weights with fp32 Adam state (what DeepSpeed's bf16 mode keeps; the gradients are
  upcast into fp32 master gradients before the step, and the bf16 weights copied back after);
- ``gc``: transformers' gradient checkpointing on the ViT and the LLM.

``config()`` says which of these paths actually ran (``attention``, ``liger``, ``loss``), so a
CPU run, where flash and Liger are absent, is labelled with its torch fallbacks. Liger patches
``transformers.models.qwen2`` module-wide: ``hf`` (naive) variants listed after an ``hf-strong``
one in the same run get Liger's RoPE/RMSNorm/SwiGLU too, so list them first.
"""

from __future__ import annotations

import torch

from benchmarks.train.baselines import build_reference
from benchmarks.train.packs import IGNORE, Pack
from benchmarks.train.timing import Marks, instrument
from benchmarks.train.variants import Variant

ATTN_NAME = "eagle_bench_varlen"


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - not installed / no CUDA build
        return None


def attention_path(device: torch.device) -> str:
    """Which varlen kernel the LLM's attention takes on ``device``."""
    if device.type != "cuda":
        return "segment-sdpa (cpu fallback)"
    return "flash-attn" if _flash_attn_varlen() is not None else "aten-flash-varlen"


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: [1, h, L, d] q/k/v -> ([1, L, hq, d], None), causal within
    each sub-sample of ``kwargs['cu_seq_lens_q']``."""
    from megatron_eagle.kernels.reference import segment_sdpa

    cu, max_len = kwargs["cu_seq_lens_q"], int(kwargs["max_length_q"])
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # [L, h, d]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if q.is_cuda:
        fa = _flash_attn_varlen()
        if fa is not None:
            out = fa(q, k, v, cu, cu, max_len, max_len, dropout_p=0.0, softmax_scale=scale, causal=True)
        else:
            out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False,
                                                          scale=scale)[0]
    else:
        out = segment_sdpa(q, k, v, cu, True, scale)
    return out.unsqueeze(0), None


def _register_attention() -> None:
    """The attention function, and no mask for it: where a transformers version builds masks
    despite the prepared (empty) mask mapping, it asks the mask interface of this name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, varlen_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # pragma: no cover - versions without a mask interface build none
        return
    AttentionMaskInterface.register(ATTN_NAME, lambda *args, **kwargs: None)


def _apply_liger(lm) -> bool:
    """Liger's RoPE, RMSNorm and SwiGLU on the Qwen2 LM (GPU only); False when not importable."""
    if not next(lm.parameters()).is_cuda:
        return False
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2
    except Exception:  # noqa: BLE001 - not installed
        return False
    apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=lm)
    return True


def _liger_flce():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="mean")
    except Exception:  # noqa: BLE001 - not installed
        return None


class HFStrongSide:
    """hf-strong's model, optimizer (bf16 Adam or fp32 master) and phase hooks."""

    def __init__(self, cfg, v: Variant, device: torch.device):
        self.device, self.v, self.cfg = device, v, cfg
        cuda = device.type == "cuda"
        _register_attention()

        def varlen_attention(ref) -> None:
            ref.language_model.config._attn_implementation = ATTN_NAME
            ref.language_model.model.config._attn_implementation = ATTN_NAME

        self.ref = ref = build_reference(cfg, device, grad_ckpt=v.grad_ckpt, attention_hook=varlen_attention)
        self.liger = _apply_liger(ref.language_model) if cuda else False
        self.flce = _liger_flce() if (v.fused_linear_ce and cuda) else None
        self.params = [p for p in ref.parameters() if p.requires_grad]
        if v.master_fp32:  # fp32 master weights; the optimizer (and its state) lives on them
            self.master = [p.detach().float().clone() for p in self.params]
            opt_params = self.master
        else:
            self.master, opt_params = None, self.params
        self.opt = torch.optim.AdamW(opt_params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05,
                                     fused=cuda or None)
        self.marks = Marks(cuda)
        self.hooks = instrument(self.marks, ref.vision_model.vision_model, ref.mlp1, ref.language_model.model, None,
                                "inputs_embeds")

    def _loss(self, hidden: torch.Tensor, b) -> torch.Tensor:
        import torch.nn.functional as F

        host = b.host_view() if hasattr(b, "host_view") else None
        sel = ((host.labels if host is not None else b.labels) != IGNORE).nonzero().squeeze(1).to(hidden.device)
        h = hidden.index_select(0, sel)
        target = b.labels.index_select(0, sel)
        head = self.ref.language_model.lm_head
        if self.flce is not None:
            return self.flce(head.weight, h, target)
        ce = F.cross_entropy(head(h).float(), target, reduction="none")
        return (ce * b.loss_weights.index_select(0, sel)).sum()

    def step(self, group: list[Pack]) -> float:
        self.marks.reset()
        self.marks.mark("step_start")
        for p in self.params:
            p.grad = None
        losses = []
        for pack in group:  # gradient accumulation over the micro-batches
            b = pack.batch
            emb = self.ref.input_embeds(b.tokens, b.pixel_values)
            cu = b.cu_seqlens.to(device=emb.device, dtype=torch.int32)
            hidden = self.ref.language_model.model(
                inputs_embeds=emb, position_ids=b.position_ids.unsqueeze(0), use_cache=False,
                attention_mask={"full_attention": None}, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                max_length_q=max(pack.lens), max_length_k=max(pack.lens)).last_hidden_state[0]
            loss = self._loss(hidden, b)
            self.marks.mark("fwd_end")
            (loss / len(group)).backward()
            losses.append(loss.detach())
        self.marks.mark("bwd_end")
        if self.master is not None:
            for m, p in zip(self.master, self.params):
                m.grad = p.grad.float() if p.grad is not None else torch.zeros_like(m)
                p.grad = None
            torch.nn.utils.clip_grad_norm_(self.master, 1.0)
            self.opt.step()
            for m in self.master:
                m.grad = None
            for p, m in zip(self.params, self.master):  # back to the bf16 weights the model runs
                p.data.copy_(m)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
        self.marks.mark("opt_end")
        return float(losses[0])

    def config(self) -> dict:
        """The variant's options and the paths that ran."""
        loss = "liger-flce (token mean)" if self.flce is not None else "torch-ce on supervised positions"
        if self.v.fused_linear_ce and self.flce is None:
            loss += " (flce unavailable: torch fallback)"
        return {**self.v.options(), "baseline": "hf-strong",
                "baseline_precision": "fp32-master" if self.v.master_fp32 else "bf16-adam",
                "attention": attention_path(self.device), "vit_attention": "sdpa", "liger": self.liger,
                "loss": loss, "fused_adamw": self.device.type == "cuda",
                "recompute": "gradient-checkpointing (vit, llm)" if self.v.grad_ckpt else "none"}

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
