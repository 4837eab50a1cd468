"""ModuleSpecs for the ViT and LLM layers, built from megatron-core parts + our core attention."""

from __future__ import annotations

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_eagle.models.attention import PackedCoreAttention


def _layer_spec(mask: AttnMaskType, backend: str) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=ModuleSpec(module=PackedCoreAttention, params={"backend": backend}),
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def vit_layer_spec(backend: str = "auto") -> ModuleSpec:
    """SigLIP layer: LayerNorm, bidirectional attention, GELU-tanh MLP (biases from config)."""
    return _layer_spec(AttnMaskType.no_mask, backend)


def llm_layer_spec(backend: str = "auto") -> ModuleSpec:
    """Qwen2 layer: RMSNorm, causal packed attention, SwiGLU (from config)."""
    return _layer_spec(AttnMaskType.causal, backend)
