// Math that the CPU and CUDA kernels of dat::deform_attn both use: where a displacement lands in the
// relative-position table (the rules of grid_sample(mode='bilinear', padding_mode='zeros',
// align_corners=True)) and the online-softmax update. How each device then interpolates differs: the
// CPU kernel from per-cell coefficients (deform_attn_cpu.cpp), the CUDA kernel from four corner taps
// (deform_attn_cuda.cu).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace dat {
namespace deform_attn {

C10_HOST_DEVICE inline float exp_of(float x) { return ::expf(x); }
C10_HOST_DEVICE inline double exp_of(double x) { return ::exp(x); }
C10_HOST_DEVICE inline float log_of(float x) { return ::logf(x); }
C10_HOST_DEVICE inline double log_of(double x) { return ::log(x); }

C10_HOST_DEVICE inline float floor_of(float x) { return ::floorf(x); }
C10_HOST_DEVICE inline double floor_of(double x) { return ::floor(x); }

// Whether the cell whose top-left corner is floor(pixel) has a corner inside a table of `size`
// pixels: -1 <= pixel < size (false for NaN). `&` rather than `&&`, so that loops over it vectorise.
template <typename acc_t>
C10_HOST_DEVICE inline bool cell_in_reach(acc_t pixel, acc_t size) {
  return (pixel >= acc_t(-1)) & (pixel < size);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t pixel_per_unit(int64_t size) {
  return acc_t(0.5) * acc_t(size - 1);
}

// The bias looks the table up at half the query-minus-key position difference (the official rule);
// so d(bias)/d(key position) = -0.5 * d(bias)/d(displacement).
constexpr double kDisplacementPerPosition = 0.5;

// Online softmax: before folding in scores whose maximum is `block_max`, raise the running maximum and
// rescale the running sum. Returns the factor by which accumulators over earlier keys must be
// multiplied (1 when the maximum does not grow, 0 before the first finite score).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t online_softmax_rescale(acc_t& running_max, acc_t& running_sum, acc_t block_max) {
  if (!(block_max > running_max)) return acc_t(1);
  const acc_t factor = exp_of(running_max - block_max);
  running_max = block_max;
  running_sum *= factor;
  return factor;
}

// Gradient of the loss with respect to a logit s_ij, given p_ij = softmax probability,
// dp_ij = <grad_out_i, v_j> and delta_i = <grad_out_i, out_i> = sum_j p_ij dp_ij.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t softmax_logit_grad(acc_t prob, acc_t grad_prob, acc_t delta) {
  return prob * (grad_prob - delta);
}

}  // namespace deform_attn
}  // namespace dat
