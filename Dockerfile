# tcpmon container image, multi-arch through buildx:
#   docker buildx build --platform linux/amd64,linux/arm64,linux/arm/v7,linux/riscv64 -t tcpmon .
# Debian 13 is the base because it is the first Debian release with riscv64 images.
# Stages: bpf (native, cross-compiles the probe for TARGETARCH) -> wheel (target
# platform: Cython extensions + the wheel) -> runtime (python3 + libbpf1 + the wheel).
# On one machine, offline, with podman: make image (scripts/build-image.sh).
# No `# syntax=` line: BuildKit's built-in frontend has RUN --mount, and naming one
# makes docker pull it from a registry (make image builds offline).
ARG DEBIAN_IMAGE=debian:13.1-slim

FROM --platform=$BUILDPLATFORM ${DEBIAN_IMAGE} AS bpf
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends clang llvm libbpf-dev make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY bpf/ bpf/
COPY scripts/target-arch.sh scripts/
ARG TARGETARCH
# buildx TARGETARCH (amd64, arm64, arm, riscv64) -> BPF TARGET_ARCH (x86, arm64, arm, riscv)
RUN bpf_arch="$(scripts/target-arch.sh "${TARGETARCH:?build with buildx or pass --build-arg TARGETARCH}")" \
    && make -C bpf TARGET_ARCH="$bpf_arch" BUILD_DIR=/out \
    && cp "/out/$bpf_arch/tcpconnect.bpf.o" /out/tcpconnect.bpf.o

FROM ${DEBIAN_IMAGE} AS wheel
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libbpf-dev make python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip install cython==3.3.1 setuptools==84.2.1 wheel==0.48.0
WORKDIR /src
COPY setup.py ./
COPY bpf/ bpf/
COPY ext/ ext/
COPY tcpmon/ tcpmon/
COPY --from=bpf /out/tcpconnect.bpf.o tcpmon/data/tcpconnect.bpf.o
# tcpmon's wheel and the wheels of its dependencies, for an offline install below
RUN /opt/build/bin/pip wheel --no-build-isolation --wheel-dir /wheels .

FROM ${DEBIAN_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends libbpf1 python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    python3 -m venv /opt/tcpmon \
    && /opt/tcpmon/bin/pip install --no-index --no-cache-dir --find-links /wheels tcpmon \
    && /opt/tcpmon/bin/pip uninstall -y pip \
    && /opt/tcpmon/bin/tcpmon --version
ENV PATH=/opt/tcpmon/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="tcpmon" \
      org.opencontainers.image.description="eBPF exporter counting TCP connect attempts per process" \
      org.opencontainers.image.licenses="BSD-2-Clause AND (LGPL-2.1-only OR BSD-2-Clause)"
# 9090: /metrics; 8080: /liveness, /readiness, /health
EXPOSE 9090 8080
ENTRYPOINT ["tcpmon"]
CMD ["run"]
