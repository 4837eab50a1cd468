# megatron-eagle on an NGC PyTorch base (brings CUDA, NCCL, transformer-engine, apex, flash-attn).
# Build:  docker build -t megatron-eagle .
# Run:    docker run --gpus all --ipc=host -v /data:/data megatron-eagle \
#           torchrun --nproc_per_node 8 -m megatron_eagle.cli train --config /data/run.yaml
FROM nvcr.io/nvidia/pytorch:25.09-py3

ENV PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /opt/megatron-eagle
COPY requirements.txt setup.py ./
# torch comes from the base image: install every pinned requirement except torch itself.
# nvidia-cudnn-frontend: the Python graphs of the cuDNN packed attention (GPU only, no deps).
RUN grep -v '^torch==' requirements.txt | grep -v '^#' > /tmp/req.txt \
    && pip install --no-cache-dir -r /tmp/req.txt nvidia-cudnn-frontend==1.16.0 \
    && rm /tmp/req.txt

COPY megatron_eagle ./megatron_eagle
COPY tools ./tools
COPY examples ./examples
RUN pip install --no-cache-dir --no-deps -e . \
    && python -c "import megatron_eagle.cli, megatron.core; print('megatron-eagle ready')"

ENTRYPOINT []
CMD ["megatron-eagle", "--help"]
