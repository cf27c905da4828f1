# GPU image for the Ray head and workers that run `ray job submit -- python jobs/extract.py ...`.
# Versions: constraints.txt pins what the cluster must agree on (Ray, torch, torchvision, faiss), the same pins the
# tests run against (`make setup`). torch's PyPI wheels for Linux carry their CUDA libraries, so a slim Python base
# is enough: the NVIDIA driver comes from the host (the NVIDIA container toolkit).
# Tag: cluster/IMAGE (`docker build -t "$(cat cluster/IMAGE)" .`), the image every config under cluster/ names.
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="sigregions" \
      org.opencontainers.image.version="0.1.0"
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_HOME=/opt/torch \
    RAY_USAGE_STATS_ENABLED=0
WORKDIR /app

# wget: KubeRay's default liveness/readiness probes run it inside the Ray containers. openssh-client and rsync: the
# cluster launcher's autoscaler on the head reaches the workers it starts with ssh and syncs files with rsync.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget openssh-client rsync \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first, in a layer of their own: a code change does not reinstall torch. The project is installed from
# a stub package here (only its dependencies matter), then uninstalled; the real code comes below.
COPY pyproject.toml constraints.txt README.md LICENSE ./
RUN mkdir pipeline && touch pipeline/__init__.py \
    && pip install '.[cluster]' -c constraints.txt \
    && pip uninstall -y sigregions && rm -rf pipeline build *.egg-info

COPY pipeline/ pipeline/
RUN pip install --no-deps . && python -m pipeline.model.weights install
COPY jobs/ jobs/
COPY cluster/ cluster/
COPY data/ data/

# Ray's default ports: GCS 6379, dashboard / job submission 8265, client 10001.
EXPOSE 6379 8265 10001
CMD ["bash"]
