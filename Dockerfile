# syntax=docker/dockerfile:1
# The vishwamai image: the package (training, KFP components, the PyTorchJob launcher) in a venv,
# run as a non-root user on a read-only root filesystem.
#
#   docker build -t vishwamai:0.1.0-cpu .                                  # CPU (default)
#   docker build --build-arg VARIANT=cuda -t vishwamai:0.1.0-cuda .        # CUDA 12.8 wheels
#
# The CUDA variant needs no CUDA base image: torch's cu128 wheels carry the CUDA runtime
# libraries, and the node's driver comes in through the NVIDIA container toolkit.
#
# Reproducible: the base image is pinned by digest, and every Python dependency by
# constraints/image.txt (scripts/image_constraints.py writes it from an environment where the test
# suite passed).  Dependencies install in their own layers before the source is copied, so editing
# the code rebuilds only the last layers.  To bump the base image:
#   docker buildx imagetools inspect python:3.11-slim --format '{{json .Manifest.Digest}}'
# and put the digest into both FROM lines (the same image for the build and the runtime stage).

FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7 AS build
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG EXTRAS=monitoring,kubeflow,tune,wandb,int8
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the index of the chosen variant (the default PyPI wheel would pull CUDA on CPU images).
RUN case "$VARIANT" in \
      cpu)  index=https://download.pytorch.org/whl/cpu ;; \
      cuda) index=https://download.pytorch.org/whl/cu128 ;; \
      *) echo "VARIANT must be cpu or cuda, got $VARIANT" >&2; exit 1 ;; \
    esac && pip install "torch==${TORCH_VERSION}" --index-url "$index"
WORKDIR /src
# The dependencies alone (a cached layer while pyproject.toml and the constraints stay the same): the
# project's metadata with an empty package, installed with the pinned versions, then removed again.
COPY pyproject.toml README.md ./
COPY constraints/image.txt ./constraints/image.txt
RUN mkdir -p vishwamai components pipelines && touch vishwamai/__init__.py components/__init__.py pipelines/__init__.py \
    && pip install -c constraints/image.txt ".[${EXTRAS}]" && pip uninstall -y vishwamai \
    && rm -rf vishwamai components pipelines build ./*.egg-info
COPY vishwamai ./vishwamai
COPY components ./components
COPY pipelines ./pipelines
# Bytecode compiled now: at run time the root filesystem is read-only.
RUN pip install --no-deps . && python -m compileall -q /opt/venv

FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7 AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="vishwamai" \
      org.opencontainers.image.description="Train and compress transformer language models (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 vishwamai && \
    useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin vishwamai
COPY --from=build /opt/venv /opt/venv
# Writable places are mounted volumes (/tmp, /cache, /data); caches point there.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp XDG_CACHE_HOME=/cache MPLCONFIGDIR=/cache/matplotlib TORCH_HOME=/cache/torch HF_HOME=/cache/huggingface
USER 10001:10001
WORKDIR /tmp
# A batch job, not a service: nothing to probe.
HEALTHCHECK NONE
CMD ["python", "-m", "vishwamai.training_v2", "--help"]
