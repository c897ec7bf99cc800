# glmserve container images. One Dockerfile, three targets:
#
#   docker build --target gpu      -t ghcr.io/glmserve/glmserve:0.1.0 .           # default: router, workers, operator
#   docker build --target cpu      -t ghcr.io/glmserve/glmserve:0.1.0-cpu .       # CPU torch: tests, demos
#   docker build --target operator -t ghcr.io/glmserve/glmserve-operator:0.1.0 .  # operator (no torch)
#
# The Helm chart's default image (charts/glmserve/values.yaml, operator/crd.yaml) is the `gpu` target at the
# chart's appVersion. Every target runs as a non-root user and writes only to /tmp (GLMSERVE_CACHE lives
# there), so pods can set readOnlyRootFilesystem: true with an emptyDir on /tmp.

ARG PYTORCH_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- gpu: CUDA + PyTorch base, glmserve with the `gpu` extra (FlashInfer) --------------------------------
FROM ${PYTORCH_IMAGE} AS gpu
WORKDIR /opt/glmserve
COPY pyproject.toml README.md Makefile ./
COPY services services
COPY protos protos
COPY kernels kernels
COPY operator operator
RUN pip install --no-cache-dir ".[gpu]" && rm -rf /root/.cache
RUN useradd --uid 10001 --create-home --home-dir /home/glmserve glmserve
USER 10001
ENV GLMSERVE_CACHE=/tmp/glmserve-cache HOME=/tmp PYTHONDONTWRITEBYTECODE=1
EXPOSE 8000 50061 50071 8101 8201 29600
ENTRYPOINT ["glmserve"]
CMD ["--help"]

# ---- cpu: Python with the CPU build of torch, in a venv at /opt/venv ----------------------------------------
# torch comes from TORCH_INDEX_URL (PyTorch's CPU index). A builder without that index passes
# TORCH_FIND_LINKS, a pip --find-links location (directory or URL) holding the CPU wheel; the other
# packages then come from PyPI, e.g. with buildah/podman and the wheel in /opt/wheels:
#   buildah bud --target cpu -v /opt/wheels:/wheels:ro --build-arg TORCH_FIND_LINKS=/wheels -t glmserve:cpu .
# A venv rather than the system Python: the same steps then work on python:*-slim and on a plain Debian
# base (whose Python is "externally managed", PEP 668), which is how tests/image/test_cpu_image.py builds.
FROM ${PYTHON_IMAGE} AS cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
WORKDIR /opt/glmserve
COPY pyproject.toml README.md Makefile ./
COPY services services
COPY protos protos
COPY kernels kernels
COPY operator operator
RUN python3 -m venv /opt/venv \
    && if [ -n "$TORCH_FIND_LINKS" ]; then \
         /opt/venv/bin/pip install --no-cache-dir --find-links "$TORCH_FIND_LINKS" "torch==${TORCH_VERSION}+cpu"; \
       else \
         /opt/venv/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
       fi \
    && /opt/venv/bin/pip install --no-cache-dir . && rm -rf /root/.cache
RUN useradd --uid 10001 --create-home --home-dir /home/glmserve glmserve
USER 10001
ENV PATH=/opt/venv/bin:$PATH GLMSERVE_CACHE=/tmp/glmserve-cache HOME=/tmp PYTHONDONTWRITEBYTECODE=1
EXPOSE 8000
ENTRYPOINT ["glmserve"]
CMD ["up", "--host", "0.0.0.0"]

# ---- operator: kopf and the Kubernetes client, no torch -----------------------------------------------------
FROM ${PYTHON_IMAGE} AS operator
WORKDIR /opt/glmserve
COPY pyproject.toml README.md Makefile ./
COPY services services
COPY protos protos
COPY kernels kernels
COPY operator operator
# --no-deps skips torch; the operator's own needs are listed here.
RUN pip install --no-cache-dir --no-deps . \
    && pip install --no-cache-dir kopf kubernetes pyyaml prometheus-client httpx && rm -rf /root/.cache
RUN useradd --uid 10001 --create-home --home-dir /home/glmserve glmserve
USER 10001
ENV HOME=/tmp PYTHONDONTWRITEBYTECODE=1
ENTRYPOINT ["glmserve"]
CMD ["operator", "--all-namespaces"]
