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

// Where one displacement lands in a (height x width) table: its four corners (top-left, top-right,
// bottom-left, bottom-right), with their bilinear weights and row-major offsets. Corners outside the
// table get weight 0 and offset 0, so sampling is branch-free; the bounds are checked once here, and
// a tap computed once serves every head that shares the key positions.
// Pixel coordinate = (c + 1) / 2 * (size - 1) (align_corners=True).
template <typename acc_t>
struct BilinearTaps {
  int32_t offset[4];
  acc_t weight[4];
  acc_t frac_row;  // position inside the cell, for the position gradient
  acc_t frac_col;
  int32_t inside;  // bit c set when corner c lies inside the table
};

C10_HOST_DEVICE inline float floor_of(float x) { return ::floorf(x); }
C10_HOST_DEVICE inline double floor_of(double x) { return ::floor(x); }

// Whether the cell whose top-left corner is floor(pixel) has a corner inside a table of `size`
// pixels: -1 <= pixel < size (false for NaN). `&` rather than `&&`, so that loops over it vectorise.
template <typename acc_t>
C10_HOST_DEVICE inline bool cell_in_reach(acc_t pixel, acc_t size) {
  return (pixel >= acc_t(-1)) & (pixel < size);
}

// floor(pixel) when the cell is in reach, else -2 (which keeps both neighbours out of bounds),
// without converting a huge float to an integer.
template <typename acc_t>
C10_HOST_DEVICE inline int32_t cell_start(acc_t pixel, int64_t size) {
  return static_cast<int32_t>(floor_of(cell_in_reach(pixel, acc_t(size)) ? pixel : acc_t(-2)));
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t pixel_per_unit(int64_t size) {
  return acc_t(0.5) * acc_t(size - 1);
}

template <typename acc_t>
C10_HOST_DEVICE inline BilinearTaps<acc_t> bilinear_taps(acc_t disp_row, acc_t disp_col, int64_t height,
                                                         int64_t width) {
  const acc_t pixel_row = (disp_row + acc_t(1)) * pixel_per_unit<acc_t>(height);
  const acc_t pixel_col = (disp_col + acc_t(1)) * pixel_per_unit<acc_t>(width);
  const int64_t row = cell_start(pixel_row, height);
  const int64_t col = cell_start(pixel_col, width);
  BilinearTaps<acc_t> taps;
  taps.frac_row = row == -2 ? acc_t(0) : pixel_row - acc_t(row);
  taps.frac_col = col == -2 ? acc_t(0) : pixel_col - acc_t(col);
  taps.inside = 0;
  DAT_UNROLL
  for (int corner = 0; corner < 4; ++corner) {
    const int down = corner >> 1, right = corner & 1;
    const int64_t corner_row = row + down, corner_col = col + right;
    const bool inside = corner_row >= 0 && corner_row < height && corner_col >= 0 && corner_col < width;
    const acc_t row_weight = down ? taps.frac_row : acc_t(1) - taps.frac_row;
    const acc_t col_weight = right ? taps.frac_col : acc_t(1) - taps.frac_col;
    taps.offset[corner] = inside ? static_cast<int32_t>(corner_row * width + corner_col) : 0;
    taps.weight[corner] = inside ? row_weight * col_weight : acc_t(0);
    taps.inside |= inside ? (1 << corner) : 0;
  }
  return taps;
}

// Bilinear sample of `table` (row-major, height x width); corners outside the table count as zero.
template <typename acc_t, typename table_t>
C10_HOST_DEVICE inline acc_t bilinear_sample(const table_t* table, const BilinearTaps<acc_t>& taps) {
  acc_t value = 0;
  DAT_UNROLL
  for (int corner = 0; corner < 4; ++corner) {
    value += taps.weight[corner] * static_cast<acc_t>(table[taps.offset[corner]]);
  }
  return value;
}

// Backward of bilinear_sample for an upstream gradient `grad`: calls accumulate(offset, value) for the
// table gradient of every in-bounds corner, and adds d(sample)/d(displacement) * grad to
// grad_disp_row / grad_disp_col.
template <typename acc_t, typename table_t, typename Accumulate>
C10_HOST_DEVICE inline void bilinear_sample_backward(const table_t* table, int64_t height, int64_t width,
                                                     const BilinearTaps<acc_t>& taps, acc_t grad,
                                                     Accumulate&& accumulate, acc_t& grad_disp_row,
                                                     acc_t& grad_disp_col) {
  acc_t d_pixel_row = 0, d_pixel_col = 0;
  DAT_UNROLL
  for (int corner = 0; corner < 4; ++corner) {
    if (taps.inside & (1 << corner)) {
      const int down = corner >> 1, right = corner & 1;
      accumulate(taps.offset[corner], grad * taps.weight[corner]);
      const acc_t value = static_cast<acc_t>(table[taps.offset[corner]]);
      const acc_t row_weight = down ? taps.frac_row : acc_t(1) - taps.frac_row;
      const acc_t col_weight = right ? taps.frac_col : acc_t(1) - taps.frac_col;
      d_pixel_row += (down ? value : -value) * col_weight;
      d_pixel_col += (right ? value : -value) * row_weight;
    }
  }
  grad_disp_row += grad * d_pixel_row * pixel_per_unit<acc_t>(height);
  grad_disp_col += grad * d_pixel_col * pixel_per_unit<acc_t>(width);
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
