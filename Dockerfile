# The image launch/gke.py's manifests run: this checkout's code and its Python dependencies, with
# the accelerator's JAX (the versions in requirements-lock.txt, used as constraints).
#
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/t5g2:tpu .                           # TPU
#   docker build --build-arg JAX_EXTRA=cuda12 -t REGION-docker.pkg.dev/PROJECT/REPO/t5g2:gpu .
#
# The code lives in /t5g2 (the manifests' workingDir); `python` is the image's Python 3.11.
# It runs as root: the TPU and GPU device plugins and the Cloud Storage FUSE volume need no
# uid/gid mapping then.
FROM python:3.11-slim

# jax[tpu] (libtpu) or jax[cuda12] (the CUDA plugin and its CUDA libraries; the driver comes
# from the GKE node)
ARG JAX_EXTRA=tpu
RUN case "$JAX_EXTRA" in tpu|cuda12) ;; \
      *) echo "JAX_EXTRA=$JAX_EXTRA: valid are tpu, cuda12" >&2; exit 1 ;; esac

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /t5g2
# Dependencies first: a code change reuses this layer.
COPY requirements.txt requirements-lock.txt ./
# (data.source=seqio runs also need the package's seqio extra: add "seqio>=0.0.19,<0.1" here.)
RUN pip install -r requirements.txt "jax[${JAX_EXTRA}]" -c requirements-lock.txt
COPY . .
