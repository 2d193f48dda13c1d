// Host stand-in for CUDA's <cuda_bf16.h> when kernels/cuda is compiled by a host compiler for
// the CPU emulation (kernels/emu): pulls in the emulated runtime.
#pragma once
#include "rb_emu.h"
