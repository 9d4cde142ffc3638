// Emulated-tier stand-in for c10/cuda/CUDAGuard.h: the emulated device is the CPU, there is nothing to switch.
#pragma once
#include <c10/core/Device.h>
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
