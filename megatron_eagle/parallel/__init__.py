"""Context parallelism for packed multimodal sequences (issue 6).

- :mod:`.groups`: the CP group (megatron-core's) and the variant's two-level Ulysses x ring split;
- :mod:`.cp_split`: zigzag split of a pack per sub-sample, and the inverse for outputs;
- :mod:`.cp_attention`: ring, all-gather KV, Ulysses and hybrid attention, exact forward/backward;
- :mod:`.kernels`: varlen attention blocks with log-sum-exp (flash on GPU, exact reference on CPU);
- :mod:`.vision_cp`: the ViT data-parallel inside the CP group, embeddings routed to their owners;
- :mod:`.model_forward`: EagleModel's forward when cp > 1; :mod:`.comm`: collectives.
"""
