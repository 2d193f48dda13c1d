# The image the Helm chart (helm/ringbolt) runs: `ringbolt` built with `--features cuda`, on
# NVIDIA's CUDA 13 development image, which carries what the binary loads at run time:
# libnvrtc and the CUDA headers (kernels are compiled by NVRTC at start-up for the GPU found,
# then cached), libcublas, and libnccl (the data group's communicators). libcuda comes from the
# node's driver through the NVIDIA container runtime. No GPU is needed to build it.
#
#   docker build -t REGISTRY/ringbolt:0.1.0 .
#
# Not built on the development machines (they have no container runtime); docs/DEPLOY.md.
FROM rust:1.90-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ringbolt --features cuda \
    && cp target/release/ringbolt /usr/local/bin/ringbolt

FROM nvidia/cuda:13.0.0-devel-ubuntu24.04
ENV CUDA_HOME=/usr/local/cuda \
    RUST_LOG=info
# The libraries loaded at run time must be here (the build fails early if one is not).
RUN for l in libnvrtc.so libcublas.so libnccl.so; do \
      ldconfig -p | grep -q "$l" || { echo "missing $l"; exit 1; }; \
    done
COPY --from=build /usr/local/bin/ringbolt /usr/local/bin/ringbolt
# Every kernel must compile against this image's NVRTC and headers (H800/H100/H200: sm_90);
# a pod compiles them for its GPU at start and caches them under $HOME/.cache/ringbolt.
RUN ringbolt kernels compile --arch sm_90 >/dev/null
ENTRYPOINT ["ringbolt"]
