// Emulated-tier stand-in for c10/cuda/CUDAStream.h: every launch goes to HIP-CPU's default stream.
#pragma once
namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(signed char = -1) { return {}; }
}  // namespace c10::cuda
