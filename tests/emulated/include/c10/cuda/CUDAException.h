// Emulated-tier stand-in for c10/cuda/CUDAException.h (see tests/emulated/hip_cpu_prelude.h).
#pragma once
#include <c10/util/Exception.h>
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "emulated CUDA call failed: " #expr)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
