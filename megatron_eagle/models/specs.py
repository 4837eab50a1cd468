"""ModuleSpecs for the ViT and LLM layers, built from megatron-core parts + our core attention."""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_eagle.kernels.dispatch import AttentionKernels
from megatron_eagle.models.attention import PackedCoreAttention
from megatron_eagle.models.linear import BiasInGemmColumnParallelLinear
from megatron_eagle.models.norm import Norm


def _layer_spec(mask: AttnMaskType, kernels: AttentionKernels) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=BiasInGemmColumnParallelLinear,  # qkv biases (ViT, Qwen2) in the GEMM
                    core_attention=ModuleSpec(module=PackedCoreAttention, params={"kernels": kernels}),
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=BiasInGemmColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _block(layer: ModuleSpec, num_layers: int) -> TransformerBlockSubmodules:
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=Norm)


def vit_block_spec(config: TransformerConfig, kernels: AttentionKernels) -> TransformerBlockSubmodules:
    """SigLIP layers: LayerNorm, bidirectional attention, GELU-tanh MLP (biases from config)."""
    return _block(_layer_spec(AttnMaskType.no_mask, kernels), config.num_layers)


def llm_block_spec(config: TransformerConfig, kernels: AttentionKernels) -> TransformerBlockSubmodules:
    """This pipeline stage's Qwen2 layers: RMSNorm, causal packed attention, SwiGLU."""
    return _block(_layer_spec(AttnMaskType.causal, kernels), get_num_layers_to_build(config))
