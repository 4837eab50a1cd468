from setuptools import find_packages, setup

setup(
    name="megatron-eagle",
    version="0.1.0",
    description="Long-context vision-language model training (Eagle 2.5 recipe) on megatron-core",
    packages=find_packages(include=["megatron_eagle", "megatron_eagle.*"]),
    python_requires=">=3.11",
    # torch is deliberately unpinned here: GPU images bring their own build.
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.17",
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "webdataset>=1.0",
        "av>=14",
        "pillow>=10",
        "pyyaml>=6",
        "numpy>=1.26",
        "tqdm>=4.66",
        "fsspec>=2023.1",
        "matplotlib>=3.8",
        "psutil>=5.9",
    ],
    # the benchmarks' hf-strong baseline (benchmarks/train/hf_strong.py): Liger's RoPE, RMSNorm,
    # SwiGLU and fused linear cross-entropy; GPU only (Triton)
    extras_require={"benchmarks": ["liger-kernel>=0.8.5"]},
    entry_points={"console_scripts": ["megatron-eagle=megatron_eagle.cli:main"]},
)
