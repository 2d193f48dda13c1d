#!/usr/bin/env bash
# Runs every CUDA kernel source (kernels/cuda) on the CPU emulation of kernels/emu against plain
# references: threads and barriers stand in for the GPU's blocks and warps, and mma.sync follows
# the PTX ISA's fragment layouts. Needs g++ 12 or later (C++20); no GPU, no CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target/emu
g++ -std=c++20 -O2 -pthread -Wall -Werror -Wno-unknown-pragmas -I kernels/emu/include \
  -o target/emu/check kernels/emu/check.cpp
target/emu/check
