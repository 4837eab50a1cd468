"""Model FLOPs of a packed step (ViT + connector + LLM + attention) from the actual lengths."""

from __future__ import annotations

from megatron_eagle.config import FreezeConfig, ModelConfig


def _vit_params(m: ModelConfig) -> float:
    v = m.vision
    return v.num_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.ffn_hidden_size)


def _connector_params(m: ModelConfig) -> float:
    c4 = m.vision.hidden_size / m.downsample_ratio ** 2
    return c4 * m.llm.hidden_size + m.llm.hidden_size ** 2


def _llm_params(m: ModelConfig) -> float:
    l = m.llm
    head = l.hidden_size // l.num_heads
    attn = l.hidden_size * (l.num_heads + 2 * l.num_kv_heads) * head + l.num_heads * head * l.hidden_size
    return l.num_layers * (attn + 3 * l.hidden_size * l.ffn_hidden_size) + l.vocab_size * l.hidden_size


def step_flops(m: ModelConfig, freeze: FreezeConfig, seq_lens: list[int], tiles: int,
               supervised_tokens: int | None = None) -> float:
    """Forward+backward FLOPs of one pack.

    A trained module costs 6·N per token (fwd, input-grad, weight-grad); a frozen module that
    gradients flow through costs 4·N; a frozen module with nothing trainable before it 2·N.
    Attention: QKᵀ and PV cost 4·s²·h per layer forward, halved by causality, tripled by the
    backward, so 6·L·h·s² per sub-sample; the ViT's bidirectional attention 12·L·C·p² per tile.
    Modules that run forward only pay a third of that.
    """
    tokens = sum(seq_lens)
    patches = (m.vision.patches_per_side ** 2)
    trainable_before = False
    total = 0.0
    for name, n_params, n_tokens, attn in (
        ("vision", _vit_params(m), tiles * patches,
         12 * m.vision.num_layers * m.vision.hidden_size * patches ** 2 * tiles),
        ("connector", _connector_params(m), tiles * m.tokens_per_tile, 0.0),
        ("llm", _llm_params(m) - m.llm.vocab_size * m.llm.hidden_size, tokens,
         6 * m.llm.num_layers * m.llm.hidden_size * sum(s * s for s in seq_lens)),
    ):
        frozen = getattr(freeze, name)
        mult = 6 if not frozen else (4 if trainable_before else 2)
        attn_mult = 1.0 if (not frozen or trainable_before) else 1.0 / 3
        total += mult * n_params * n_tokens + attn * attn_mult
        trainable_before = trainable_before or not frozen
    # LM head only on supervised tokens (the chunked loss projects only those).
    head_tokens = tokens if supervised_tokens is None else supervised_tokens
    total += (6 if not freeze.llm else 4) * m.llm.vocab_size * m.llm.hidden_size * head_tokens
    return float(total)
