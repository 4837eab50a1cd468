"""A per-rank memory model of one training step, and ``recompute: auto``.

Bytes per rank, by term:

- **static**: bf16 (or fp32) parameters; gradient buffers (fp32 with ``grad_reduce_in_fp32``);
  the distributed optimizer's fp32 master weights and two Adam moments, sharded over DP x CP.
  Frozen modules keep parameters only. Counted exactly from the model config (tests compare them
  with the built model's tensors).
- **activations**: what autograd keeps per token and layer for the ViT (SigLIP, per patch) and the
  LLM (per pack token), under each recompute choice: ``none`` / ``selective`` keep the layer's
  saved tensors (selective recomputes core attention, which flash attention does not store
  anyway), ``full`` keeps the layer's input and recomputes the rest. ``offload_vit`` keeps the
  ViT's saved tensors in host memory. TP shards the LLM's per-token terms with sequence
  parallelism; CP splits the pack's tokens and tiles.
- **transient**: the largest working set on top: one layer's activations and their gradients
  during its backward (a recomputed layer's, 1.2x), or the loss chunk's logits, whichever is larger.

The ViT side dominates at long context: a tile of 448 px is 1024 patches but 256 LLM tokens.
Predictions were checked against measured peaks (``benchmarks/train_throughput.py`` records
both); :func:`resolve_recompute` picks the cheapest recompute that fits the card with a margin.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_eagle.config import ModelConfig, ParallelConfig

GIB = 2 ** 30
# Choices ``auto`` considers, cheapest first by the forward FLOPs they repeat (selective saves
# nothing with flash attention: it is never picked).
MODES = ("none", "full")
# A recomputed layer's backward holds its recomputed activations plus ~20% more (gradients in
# flight): fitted to the measured peaks of eagle2.5-2b at 32K and 64K with full recompute.
RECOMPUTE_WORK = 1.2


@dataclasses.dataclass
class MemoryEstimate:
    """Predicted bytes per rank by term; ``total`` is the predicted peak."""

    terms: dict[str, float]
    recompute_vision: str
    recompute_llm: str
    seq_len: int
    tiles: int

    @property
    def static(self) -> float:
        return sum(v for k, v in self.terms.items() if k.split(":")[0] in ("params", "grads", "optimizer"))

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    def table(self) -> str:
        """The breakdown as a text table (GiB)."""
        lines = [f"memory per rank, L={self.seq_len}, {self.tiles} tiles, recompute vision={self.recompute_vision} "
                 f"llm={self.recompute_llm}"]
        lines += [f"  {k:28s} {v / GIB:9.2f} GiB" for k, v in self.terms.items()]
        lines.append(f"  {'predicted peak':28s} {self.total / GIB:9.2f} GiB")
        return "\n".join(lines)


def _llm_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(query width, key/value width, head dim) of the LLM's attention."""
    l = cfg.llm
    d = l.kv_channels
    return l.num_heads * d, l.num_kv_heads * d, d


def param_counts(cfg: ModelConfig, parallel: ParallelConfig = ParallelConfig()) -> dict[str, int]:
    """Parameters of this rank per module (``vision``, ``connector``, ``llm``) at TP ``parallel.tp``,
    on the first pipeline stage (which holds the ViT and the embedding)."""
    tp = parallel.tp
    v, l = cfg.vision, cfg.llm
    h, f = v.hidden_size, v.ffn_hidden_size
    vit_layer = (2 * h) * 2 + (3 * h * h + 3 * h + h * f + f + f * h) // tp + h * h // tp + h + h
    post_ln = 2 * h if v.post_layernorm else 0  # only after the last layer (select_layer -1)
    vision = 3 * v.patch_size ** 2 * h + h + v.patches_per_side ** 2 * h + v.layers_used * vit_layer + post_ln
    c = h * int(round(1 / cfg.downsample_ratio)) ** 2
    H = l.hidden_size
    connector = 2 * c + (c * H + H) // tp + H * H // tp + H
    qw, kvw, d = _llm_dims(cfg)
    qkv = H * (qw + 2 * kvw) + ((qw + 2 * kvw) if l.qkv_bias else 0)
    llm_layer = (2 * H + (2 * d if l.qk_layernorm else 0)
                 + (qkv + qw * H + H * 2 * l.ffn_hidden_size + l.ffn_hidden_size * H) // tp)
    layers = -(-l.num_layers // parallel.pp)
    rows = l.padded_vocab_size(tp) // tp
    llm = rows * H + layers * llm_layer + H + (0 if l.tie_embeddings and parallel.pp == 1 else rows * H)
    return dict(vision=vision, connector=connector, llm=llm)


def static_bytes(cfg: ModelConfig, parallel: ParallelConfig, optim, dp: int = 1) -> dict[str, float]:
    """Parameters, gradient buffers and optimizer state of this rank (bytes)."""
    counts = param_counts(cfg, parallel)
    frozen = cfg.freeze
    trainable = sum(n for m, n in counts.items() if not getattr(frozen, m))
    total = sum(counts.values())
    bf16 = cfg.params_dtype == "bfloat16"
    p_bytes = 2 if bf16 else 4
    g_bytes = 4 if optim.grad_reduce_in_fp32 else p_bytes
    # fp32 master weights (bf16 params only) + exp_avg + exp_avg_sq, sharded over the DP x CP group
    o_bytes = (4 if bf16 else 0) + 8
    shards = dp * parallel.cp if optim.use_distributed_optimizer else 1
    return {"params": total * p_bytes, "grads": trainable * g_bytes, "optimizer": trainable * o_bytes / shards}


def vit_bytes_per_patch(cfg: ModelConfig, parallel: ParallelConfig) -> float:
    """Saved bytes per ViT patch and layer without recompute: LayerNorm inputs and outputs, q/k/v,
    the attention output, fc1's output (bias+GELU backward) and fc2's input, bf16; LayerNorm stats."""
    h, f = cfg.vision.hidden_size, cfg.vision.ffn_hidden_size
    tp = parallel.tp
    return 2 * (4 * h + (3 * h + h + 2 * f) / tp) + 16


def llm_bytes_per_token(cfg: ModelConfig, parallel: ParallelConfig) -> float:
    """Saved bytes per LLM token and layer without recompute: both RMSNorms' inputs and outputs,
    q/k/v after RoPE, the attention output and its log-sum-exp (fp32), SwiGLU's input (fc1's
    output) and fc2's input, bf16. Sequence parallelism shards the norm terms over TP."""
    l = cfg.llm
    qw, kvw, _ = _llm_dims(cfg)
    tp = parallel.tp
    norm_div = tp if parallel.sp and tp > 1 else 1
    return 2 * (4 * l.hidden_size / norm_div + (2 * qw + 2 * kvw + 3 * l.ffn_hidden_size) / tp) + 4 * l.num_heads / tp


def estimate(cfg: ModelConfig, parallel: ParallelConfig, optim, seq_len: int, tiles: Optional[int] = None, *,
             dp: int = 1, recompute_vision: Optional[str] = None, recompute_llm: Optional[str] = None,
             offload_vit: bool = False, chunk_tokens: int = 2048,
             llm_recompute_layers: Optional[int] = None) -> MemoryEstimate:
    """Predicted peak bytes of one rank for packs of ``seq_len`` tokens holding ``tiles`` tiles
    (default: the most a pack can hold, every token visual). Recompute choices default to the
    config's; ``auto`` there must be resolved first (:func:`resolve_recompute`).
    ``llm_recompute_layers``: with full LLM recompute, only this many layers are recomputed."""
    offload_vit = offload_vit or cfg.offload_vision
    rv = recompute_vision or cfg.recompute_vision
    rl = recompute_llm or cfg.recompute_llm
    if "auto" in (rv, rl):
        raise ValueError("estimate: resolve recompute 'auto' first (resolve_recompute)")
    v, l = cfg.vision, cfg.llm
    tpt = cfg.tokens_per_tile
    if tiles is None:
        tiles = seq_len // tpt
    cp = parallel.cp
    tokens = seq_len / cp
    patches = tiles * v.patches_per_side ** 2 / cp
    act_dtype = 2 if cfg.params_dtype == "bfloat16" else 4
    scale = act_dtype / 2  # the per-layer terms are counted in bf16
    terms = static_bytes(cfg, parallel, optim, dp)

    vit_layer = vit_bytes_per_patch(cfg, parallel) * scale * patches
    vit_input = 2 * v.hidden_size * scale * patches  # a recomputed layer keeps its input
    pixels = 3 * v.patch_size ** 2 * act_dtype * patches  # the patch embedding's input
    c = v.hidden_size * int(round(1 / cfg.downsample_ratio)) ** 2
    visual = tiles * tpt / cp
    connector = (2 * c + 2 * l.hidden_size) * act_dtype * visual / parallel.tp
    vit_saved = v.layers_used * (vit_input if rv == "full" else vit_layer)
    if offload_vit:
        vit_saved, pixels = 0.0, 0.0
    terms["activations:vit"] = vit_saved + pixels + connector

    layers = -(-l.num_layers // parallel.pp)
    llm_layer = llm_bytes_per_token(cfg, parallel) * scale * tokens
    llm_input = 2 * l.hidden_size * scale * tokens / (parallel.tp if parallel.sp else 1)
    # the embedding output, the final norm's input and output
    n_rc = (min(layers, llm_recompute_layers) if llm_recompute_layers else layers) if rl == "full" else 0
    terms["activations:llm"] = n_rc * llm_input + (layers - n_rc) * llm_layer + 3 * llm_input

    rows = l.padded_vocab_size(parallel.tp) / parallel.tp
    loss_chunk = min(chunk_tokens, tokens) * rows * (act_dtype + 4 + 4)  # logits, fp32 softmax, its grad
    # one layer's backward: its saved tensors (recomputed ones on top of the layer inputs) and the
    # gradients flowing through it; RECOMPUTE_WORK was fitted to measured peaks (docs/performance.md)
    vit_work = vit_layer * (RECOMPUTE_WORK if rv == "full" else 1.0) * (0.0 if offload_vit and rv != "full" else 1.0)
    llm_work = llm_layer * (RECOMPUTE_WORK if rl == "full" else 1.0)
    # the loss chunk (end of the forward) and a layer's backward do not overlap
    terms["transient"] = max(loss_chunk, vit_work, llm_work)
    return MemoryEstimate(terms=terms, recompute_vision=rv, recompute_llm=rl, seq_len=seq_len, tiles=int(tiles))


def recompute_cost(cfg: ModelConfig, rv: str, rl: str, seq_len: int, tiles: int) -> float:
    """Forward FLOPs the recompute choice repeats per pack (2 x matmul params x tokens)."""
    counts = param_counts(cfg)
    cost = 0.0
    if rv == "full":
        cost += 2 * counts["vision"] * tiles * cfg.vision.patches_per_side ** 2
    if rl == "full":
        cost += 2 * counts["llm"] * seq_len
    return cost


def resolve_recompute(cfg: ModelConfig, parallel: ParallelConfig, optim, seq_len: int, capacity: Optional[float],
                      *, dp: int = 1, margin: float = 0.9, tiles: Optional[int] = None,
                      offload_vit: bool = False, chunk_tokens: int = 2048) -> MemoryEstimate:
    """The recompute choice for ``auto``: among the settings a module's ``auto`` leaves open (an
    explicit setting stays), the one that repeats the fewest FLOPs whose predicted peak fits
    ``margin`` x ``capacity`` bytes; the most saving one when none fits. ``capacity`` None (no GPU):
    nothing is recomputed."""
    vs = MODES if cfg.recompute_vision == "auto" else (cfg.recompute_vision,)
    ls = MODES if cfg.recompute_llm == "auto" else (cfg.recompute_llm,)
    worst = seq_len // cfg.tokens_per_tile if tiles is None else tiles
    cands = [estimate(cfg, parallel, optim, seq_len, tiles, dp=dp, recompute_vision=rv, recompute_llm=rl,
                      offload_vit=offload_vit, chunk_tokens=chunk_tokens) for rv in vs for rl in ls]
    if capacity is None:
        return cands[0]
    fits = [e for e in cands if e.total <= margin * capacity]
    if not fits:
        return min(cands, key=lambda e: e.total)
    return min(fits, key=lambda e: (recompute_cost(cfg, e.recompute_vision, e.recompute_llm, seq_len, worst),
                                    e.total))


def device_capacity() -> Optional[float]:
    """Bytes this process may allocate on its GPU (None without one)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.mem_get_info()[1])


H100_80GB = 79.18 * GIB  # what torch may allocate on an H100 80GB


def plan_text(cfg: ModelConfig, parallel: ParallelConfig, optim, seq_len: int, capacity: Optional[float], *,
              dp: int = 1, tiles: Optional[int] = None, label: str = "") -> str:
    """What ``plan --memory`` and ``train --dry-run`` print: every recompute choice's predicted
    peak, the one ``auto`` (or the config) takes, and its breakdown by term."""
    cap = capacity if capacity is not None else H100_80GB
    chosen = resolve_recompute(cfg, parallel, optim, seq_len, cap, dp=dp, tiles=tiles)
    head = (f"{label}L={seq_len} TP={parallel.tp} CP={parallel.cp} PP={parallel.pp} DP={dp}, "
            f"{cfg.params_dtype} params; GPU {cap / GIB:.1f} GiB"
            + ("" if capacity is not None else " (assumed: an H100 80GB)") + "; worst case: every token visual"
            if tiles is None else f"; {tiles} tiles")
    lines = [head, "  recompute vision/llm   predicted peak"]
    for rv in ("none", "full"):
        for rl in ("none", "full"):
            e = estimate(cfg, parallel, optim, seq_len, tiles, dp=dp, recompute_vision=rv, recompute_llm=rl)
            fit = "fits" if e.total <= 0.9 * cap else ("tight (> 90%)" if e.total <= cap else "out of memory")
            lines.append(f"  {rv:>6s} / {rl:<6s}        {e.total / GIB:8.1f} GiB  {fit}")
    auto = "auto" in (cfg.recompute_vision, cfg.recompute_llm)
    lines.append(f"  -> {'auto picks' if auto else 'configured'}: vision {chosen.recompute_vision}, "
                 f"llm {chosen.recompute_llm}")
    lines += ["  " + x for x in chosen.table().splitlines()]
    if chosen.total > cap:
        lines.append("  DOES NOT FIT: shard the optimizer over more DP ranks, use TP or CP, or shorten L")
    return "\n".join(lines)


def plan_memory_command(args) -> int:
    """`megatron-eagle plan --memory PRESET --seq-len L [--tp --cp --pp --dp --gpu-gib]`."""
    from megatron_eagle.config import ConfigError, preset_model_config
    from megatron_eagle.training.optimizer import OptimConfig

    try:
        cfg = preset_model_config(args.memory)
        if not args.seq_len:
            raise ConfigError("--seq-len", "missing", "give the pack length, e.g. --seq-len 32768")
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    cfg.params_dtype = "bfloat16"
    par = ParallelConfig(tp=args.tp, cp=args.cp, pp=args.pp, sp=args.tp > 1)
    cap = args.gpu_gib * GIB if args.gpu_gib else None
    print(plan_text(cfg, par, OptimConfig(), args.seq_len, cap, dp=args.dp or 1, label=f"{args.memory}: "))
    return 0


def max_llm_layers(cfg: ModelConfig, parallel: ParallelConfig, optim, seq_len: int, capacity: float,
                   margin: float = 0.9) -> int:
    """The most LLM layers of ``cfg``'s shapes that fit ``margin`` x ``capacity`` beside the full ViT
    at ``seq_len`` with full recompute of both (an 8B-shaped model cut to one GPU); 0 if none."""
    best = 0
    for n in range(1, cfg.llm.num_layers + 1):
        c = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_layers=n))
        if estimate(c, parallel, optim, seq_len, recompute_vision="full", recompute_llm="full").total > margin * capacity:
            break
        best = n
    return best
