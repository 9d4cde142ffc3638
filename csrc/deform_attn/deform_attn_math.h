// Math shared by the CPU and CUDA kernels of dat::deform_attn: the bilinear relative-position bias
// (its value and its gradients) and the online-softmax update. Written once so that both devices
// follow exactly the same rules, which are those of
// grid_sample(mode='bilinear', padding_mode='zeros', align_corners=True).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

// Loop-unrolling hint for nvcc; host compilers unroll these tiny fixed loops on their own.
#if defined(__CUDACC__)
#define DAT_UNROLL _Pragma("unroll")
#else
#define DAT_UNROLL
#endif

namespace dat {
namespace deform_attn {

C10_HOST_DEVICE inline float exp_of(float x) { return ::expf(x); }
C10_HOST_DEVICE inline double exp_of(double x) { return ::exp(x); }
C10_HOST_DEVICE inline float log_of(float x) { return ::logf(x); }
C10_HOST_DEVICE inline double log_of(double x) { return ::log(x); }

// Where one displacement lands in a (height x width) table: the top-left corner of its 2x2 cell and
// the fractional position inside it. Pixel coordinate = (c + 1) / 2 * (size - 1) (align_corners=True).
template <typename acc_t>
struct BilinearTaps {
  // Top-left corner. Coordinates far outside the table (or NaN) are mapped to -2, which keeps every
  // corner out of bounds without converting huge floats to integers.
  int64_t row;
  int64_t col;
  acc_t frac_row;  // weight of row + 1; row gets 1 - frac_row
  acc_t frac_col;
  // d(pixel coordinate) / d(normalised displacement), for the position gradient.
  acc_t row_per_unit;
  acc_t col_per_unit;
};

template <typename acc_t>
C10_HOST_DEVICE inline BilinearTaps<acc_t> bilinear_taps(acc_t disp_row, acc_t disp_col, int64_t height,
                                                         int64_t width) {
  BilinearTaps<acc_t> taps;
  taps.row_per_unit = acc_t(0.5) * acc_t(height - 1);
  taps.col_per_unit = acc_t(0.5) * acc_t(width - 1);
  const acc_t pixel_row = (disp_row + acc_t(1)) * taps.row_per_unit;
  const acc_t pixel_col = (disp_col + acc_t(1)) * taps.col_per_unit;
  const acc_t floor_row = ::floor(pixel_row);
  const acc_t floor_col = ::floor(pixel_col);
  const bool row_near = floor_row > acc_t(-2) && floor_row < acc_t(height);
  const bool col_near = floor_col > acc_t(-2) && floor_col < acc_t(width);
  taps.row = row_near ? static_cast<int64_t>(floor_row) : -2;
  taps.col = col_near ? static_cast<int64_t>(floor_col) : -2;
  taps.frac_row = pixel_row - floor_row;
  taps.frac_col = pixel_col - floor_col;
  return taps;
}

C10_HOST_DEVICE inline bool inside_table(int64_t row, int64_t col, int64_t height, int64_t width) {
  return row >= 0 && row < height && col >= 0 && col < width;
}

// Bilinear sample of `table` (row-major, height x width); corners outside the table count as zero.
template <typename acc_t, typename table_t>
C10_HOST_DEVICE inline acc_t bilinear_sample(const table_t* table, int64_t height, int64_t width,
                                             const BilinearTaps<acc_t>& taps) {
  acc_t value = 0;
DAT_UNROLL
  for (int down = 0; down < 2; ++down) {
    const acc_t row_weight = down ? taps.frac_row : acc_t(1) - taps.frac_row;
DAT_UNROLL
    for (int right = 0; right < 2; ++right) {
      const int64_t row = taps.row + down, col = taps.col + right;
      if (inside_table(row, col, height, width)) {
        const acc_t col_weight = right ? taps.frac_col : acc_t(1) - taps.frac_col;
        value += row_weight * col_weight * static_cast<acc_t>(table[row * width + col]);
      }
    }
  }
  return value;
}

// Backward of bilinear_sample for an upstream gradient `grad`: calls accumulate(index, value) for the
// table gradient of every in-bounds corner, and adds d(sample)/d(displacement) * grad to
// grad_disp_row / grad_disp_col.
template <typename acc_t, typename table_t, typename Accumulate>
C10_HOST_DEVICE inline void bilinear_sample_backward(const table_t* table, int64_t height, int64_t width,
                                                     const BilinearTaps<acc_t>& taps, acc_t grad,
                                                     Accumulate&& accumulate, acc_t& grad_disp_row,
                                                     acc_t& grad_disp_col) {
  acc_t d_pixel_row = 0, d_pixel_col = 0;
DAT_UNROLL
  for (int down = 0; down < 2; ++down) {
    const acc_t row_weight = down ? taps.frac_row : acc_t(1) - taps.frac_row;
DAT_UNROLL
    for (int right = 0; right < 2; ++right) {
      const int64_t row = taps.row + down, col = taps.col + right;
      if (inside_table(row, col, height, width)) {
        const acc_t col_weight = right ? taps.frac_col : acc_t(1) - taps.frac_col;
        const int64_t index = row * width + col;
        accumulate(index, grad * row_weight * col_weight);
        const acc_t corner = static_cast<acc_t>(table[index]);
        d_pixel_row += (down ? corner : -corner) * col_weight;
        d_pixel_col += (right ? corner : -corner) * row_weight;
      }
    }
  }
  grad_disp_row += grad * d_pixel_row * taps.row_per_unit;
  grad_disp_col += grad * d_pixel_col * taps.col_per_unit;
}

// The bias looks the table up at half the query-minus-key position difference (the official rule);
// so d(bias)/d(key position) = -0.5 * d(bias)/d(displacement).
constexpr double kDisplacementPerPosition = 0.5;

template <typename acc_t>
C10_HOST_DEVICE inline BilinearTaps<acc_t> bias_taps(acc_t query_row, acc_t query_col, acc_t key_row, acc_t key_col,
                                                     int64_t height, int64_t width) {
  const acc_t half = acc_t(kDisplacementPerPosition);
  return bilinear_taps<acc_t>((query_row - key_row) * half, (query_col - key_col) * half, height, width);
}

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
