"""Context parallelism for packed multimodal sequences, and its process groups.

- :mod:`.groups`: the CP group (megatron-core's) and the variant's two-level Ulysses x ring split;
- :mod:`.cp_split`: zigzag split of a pack per sub-sample, and the inverse for outputs;
- :mod:`.cp_attention`: ring, all-gather KV, Ulysses and hybrid attention, exact forward/backward
  (on the block kernels of :mod:`megatron_eagle.kernels`);
- :mod:`.vision_cp`: the ViT data-parallel inside the CP group, embeddings routed to their owners;
- :mod:`.layout`: how this rank holds a pack for the model's forward (identity at CP = 1);
- :mod:`.comm`: collectives.

Never imports :mod:`megatron_eagle.models`.
"""
