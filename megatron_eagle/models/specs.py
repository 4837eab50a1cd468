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


def _layer_spec(mask: AttnMaskType, kernels: AttentionKernels, qk_norm: bool = False) -> ModuleSpec:
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
                    # Qwen3: RMSNorm over each head's query/key (megatron builds it at head size).
                    q_layernorm=Norm if qk_norm else IdentityOp,
                    k_layernorm=Norm if qk_norm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=BiasInGemmColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _block(layer: ModuleSpec, num_layers: int, final_norm: bool = True) -> TransformerBlockSubmodules:
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=Norm if final_norm else None)


def vit_block_spec(config: TransformerConfig, kernels: AttentionKernels,
                   post_layernorm: bool = True) -> TransformerBlockSubmodules:
    """SigLIP layers: LayerNorm, bidirectional attention, GELU-tanh MLP (biases from config); the
    post-layernorm only when the features are the encoder's last output."""
    return _block(_layer_spec(AttnMaskType.no_mask, kernels), config.num_layers, post_layernorm)


def llm_block_spec(config: TransformerConfig, kernels: AttentionKernels) -> TransformerBlockSubmodules:
    """This pipeline stage's Qwen2 / Qwen3 layers: RMSNorm, causal packed attention (q/k RMSNorm with
    ``config.qk_layernorm``), SwiGLU."""
    return _block(_layer_spec(AttnMaskType.causal, kernels, config.qk_layernorm), get_num_layers_to_build(config))
