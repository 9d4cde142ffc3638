// Input checks and problem sizes shared by the CPU and CUDA kernels of dat::ms_deform_attn.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace dat {
namespace ms_deform_attn {

struct Problem {
  int64_t batch;     // N
  int64_t value_len; // S, all levels flattened
  int64_t heads;     // M
  int64_t channels;  // D, per head
  int64_t queries;   // Lq
  int64_t levels;    // L
  int64_t points;    // P, per level
};

// Where each level lives inside the flattened value, read to the host.
struct LevelLayout {
  std::vector<int64_t> height;
  std::vector<int64_t> width;
  std::vector<int64_t> start;
};

// The forward inputs, checked, with the level geometry on the host and the float tensors contiguous:
// value in its dtype, sampling_locations and attention_weights in value's accumulation dtype
// (at::opmath_type: float32 beside a float16 or bfloat16 value), which the kernels read them in.
struct Inputs {
  Problem problem;
  LevelLayout layout;
  at::Tensor value;
  at::Tensor sampling_locations;
  at::Tensor attention_weights;
};

// Checks ranks, sizes, dtypes and devices of the forward inputs and returns the problem sizes; a kernel then
// checks its own limits on them, before prepare_inputs copies anything.
Problem check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                     const at::Tensor& sampling_locations, const at::Tensor& attention_weights);

// Checks that the levels tile the value of the checked `problem` exactly: positive sizes, starts at the
// running sum of H * W, total S; returns the inputs with sampling locations and attention weights in the
// accumulation dtype. Reading the level geometry is a device-to-host copy when it lives on a GPU.
Inputs prepare_inputs(const Problem& problem, const at::Tensor& value, const at::Tensor& spatial_shapes,
                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                      const at::Tensor& attention_weights);

// Checks grad_output against the problem size (dtype, device and shape (N, Lq, M * D)).
void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const Problem& size);

}  // namespace ms_deform_attn
}  // namespace dat
