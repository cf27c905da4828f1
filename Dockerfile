# GPU image for the Ray head and workers that run `ray job submit -- python jobs/extract.py ...`.
# Base: the official CUDA PyTorch runtime image (torch + CUDA + cuDNN already there, so pip keeps that torch).
# Tag: cluster/IMAGE (`docker build -t "$(cat cluster/IMAGE)" .`), the image every config under cluster/ names.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# Ray on the cluster, in cluster/kuberay/*.yaml (rayVersion) and on the machine that runs `ray up` / `ray job submit`
# must be one version.
ARG RAY_VERSION=2.60.0
LABEL org.opencontainers.image.title="sigregions" \
      org.opencontainers.image.version="0.1.0"
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_HOME=/opt/torch \
    RAY_USAGE_STATS_ENABLED=0
WORKDIR /app

# wget: KubeRay's default liveness/readiness probes run it inside the Ray containers.
RUN apt-get update && apt-get install -y --no-install-recommends wget && rm -rf /var/lib/apt/lists/*

# Dependencies first (cached layer), then the code. Ray pinned to RAY_VERSION; its extras come from pyproject.toml.
COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
RUN pip install '.' "ray==${RAY_VERSION}" && python -m pipeline.model.weights install
COPY jobs/ jobs/
COPY cluster/ cluster/
COPY data/ data/

# Ray's default ports: GCS 6379, dashboard / job submission 8265, client 10001.
EXPOSE 6379 8265 10001
CMD ["bash"]
