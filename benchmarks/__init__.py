"""Benchmarks of megatron-eagle. Run each from the repository root as a script; ``--help`` lists
its options, and each module's docstring says what it measures.

=============================  ==============================================================
``train_throughput.py``        training step vs the HF baseline (package :mod:`benchmarks.train`)
``context_parallel.py``        tokens/s and memory per CP variant against CP=1 (torchrun)
``attention_kernels.py``       packed LLM attention: FlashAttention-2 vs cuDNN (GPU)
``layer_kernels.py``           sub-layer kernel candidates at eagle2.5-2b shapes (GPU)
``check_flat_adamw.py``        the compiled flat AdamW kernel vs eager, and its bandwidth
``check_wgrad_fusion.py``      the fused weight-gradient GEMM vs a float64 reference
``loader.py``                  the training loader on real encoded media (CPU, gloo, NCCL)
``packing.py``                 Eagle 2 knapsack vs the cost-balanced packer
``plan_data.py``               ``megatron-eagle plan --data`` speed over a prepared index
``video_decode.py``            sparse (planned-frame) vs full video decoding
``*_sweep.sh``                 the GPU sweeps of train_throughput and context_parallel
``gpu_train_smoke.sh``         ``train`` end to end on 2 GPUs (demo, then CP=2)
=============================  ==============================================================

:mod:`benchmarks.records` gives every JSON result its ``commit`` (``git rev-parse HEAD``, with
``-dirty``) and ``config`` (the resolved options of the run).
"""
