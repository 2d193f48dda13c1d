#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the build and tests need if missing,
# then checks formatting and lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/apt-need.sh
apt_need protoc:protobuf-compiler etcd:etcd-server g++:g++
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy

# The official `openai` Python package drives the HTTP API in the tests (tests/openai_client.py).
OPENAI_PY=target/py/openai
if ! PYTHONPATH="$OPENAI_PY" python3 -c 'import openai' 2>/dev/null; then
  python3 -m pip install --quiet --target "$OPENAI_PY" openai==3.63.0
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The CUDA code (feature `cuda`) must build and lint clean without CUDA installed.
cargo clippy --workspace --all-targets --all-features -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

# Every CUDA kernel, run from its source on a CPU emulation of blocks, warps and tensor-core
# fragments, matches a plain reference.
scripts/emulate-kernels.sh

# Every CUDA kernel compiles for sm_90 with NVRTC 13.0 (no GPU needed): the compiler and the
# CUDA headers come from NVIDIA's PyPI wheels, installed once under target/nvrtc.
NVRTC=target/nvrtc
if [ ! -e "$NVRTC/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  python3 -m pip install --quiet --no-deps --target "$NVRTC" \
    nvidia-cuda-nvrtc==13.0.88 'nvidia-cuda-runtime==13.0.*'
fi
cargo test -p ringbolt-kernels --features cuda --lib cuda::
cargo build --profile test -p ringbolt --features cuda
LD_LIBRARY_PATH="$PWD/$NVRTC/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  target/debug/ringbolt kernels compile --arch sm_90 --cuda-include "$NVRTC/nvidia/cu13/include"

# The Helm chart renders, and every manifest runs a real role with settings it accepts.
scripts/check-helm.sh target/debug/ringbolt

# The coordinator of a `cuda` build hands GPU workers a fresh NCCL unique id every plan epoch
# (ncclGetUniqueId needs the library, not a GPU): NCCL from NVIDIA's PyPI wheel.
NCCL=target/nccl
if [ ! -e "$NCCL/nvidia/nccl/lib/libnccl.so.2" ]; then
  python3 -m pip install --quiet --no-deps --target "$NCCL" nvidia-nccl-cu13==2.30.7
fi
ln -sf libnccl.so.2 "$NCCL/nvidia/nccl/lib/libnccl.so"
export RINGBOLT_REQUIRE_NCCL=1
LD_LIBRARY_PATH="$PWD/$NCCL/nvidia/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo test -p ringbolt-cluster --features cuda --lib group::
LD_LIBRARY_PATH="$PWD/$NCCL/nvidia/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo test -p ringbolt --features cuda --test cluster gpu_workers
