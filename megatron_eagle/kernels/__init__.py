"""Attention kernels and their dispatch, shared by the models and the context-parallel attention.

- :mod:`.dispatch`: :class:`~.dispatch.AttentionKernels`, the one switch (``attention_backend``) and
  the kernels' state;
- :mod:`.reference`: exact per-segment SDPA and varlen blocks with log-sum-exp (any device);
- :mod:`.flash`: FlashAttention-2 varlen kernels through torch's aten ops;
- :mod:`.cudnn_graphs`: cuDNN graph building, caching and execution shared by
  :mod:`.cudnn_packed` (THD, ragged offsets) and :mod:`.cudnn_strided` ([s, b, h, d] strided views).

Imports neither :mod:`megatron_eagle.models` nor :mod:`megatron_eagle.parallel`.
"""
