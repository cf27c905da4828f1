# GPU image for the Ray head and workers that run `ray job submit -- python jobs/extract.py ...`.
# Base: the official CUDA PyTorch runtime image (torch + CUDA + cuDNN already there, so pip keeps that torch).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_HOME=/opt/torch
WORKDIR /app

# Dependencies first (cached layer), then the code.
COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
RUN pip install '.' && python -m pipeline.weights install
COPY jobs/ jobs/
COPY cluster/ cluster/
COPY data/ data/

# Ray's default ports: GCS 6379, dashboard / job submission 8265, client 10001.
EXPOSE 6379 8265 10001
CMD ["bash"]
