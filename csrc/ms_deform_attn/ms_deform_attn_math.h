// Bilinear sampling math of multi-scale deformable attention, shared by the CPU and CUDA kernels.
//
// A sampling location (x, y) is normalised to [0, 1] over a level of H x W pixels whose pixel
// centres sit at ((i + 0.5) / W, (j + 0.5) / H), so it reads pixel coordinate
// (x * W - 0.5, y * H - 0.5): grid_sample's align_corners=False convention. Taps that fall outside
// the level read zeros.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace dat {
namespace ms_deform_attn {

constexpr int kTaps = 4;

// The four taps of one bilinear sample, in the order (x0, y0), (x0 + 1, y0), (x0, y0 + 1),
// (x0 + 1, y0 + 1). A tap outside the level has `inside` false and must not be read; its weight
// and weight gradients are zero.
template <typename acc_t>
struct BilinearStencil {
  int64_t pixel[kTaps];  // row-major index y * W + x inside the level
  bool inside[kTaps];
  acc_t weight[kTaps];
  acc_t weight_grad_x[kTaps];  // d weight / d x, with x the normalised location
  acc_t weight_grad_y[kTaps];
};

template <typename acc_t>
C10_HOST_DEVICE inline BilinearStencil<acc_t> bilinear_stencil(acc_t x, acc_t y, int64_t height, int64_t width) {
  BilinearStencil<acc_t> stencil;
  const acc_t px = x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
  const acc_t py = y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
  // Phrased so that NaN fails it: such locations, and any whose four taps are all outside,
  // sample nothing (this also keeps floor() from overflowing int64 on huge coordinates). At
  // px = -1 the tap x0 + 1 = 0 is inside with weight 0: kept, so that the location gradient there
  // is the right-hand derivative, as at every other kink (grid_sample's rule).
  const bool touches_level = px >= static_cast<acc_t>(-1) && px < static_cast<acc_t>(width) &&
                             py >= static_cast<acc_t>(-1) && py < static_cast<acc_t>(height);
  if (!touches_level) {
    for (int k = 0; k < kTaps; ++k) {
      stencil.pixel[k] = 0;
      stencil.inside[k] = false;
      stencil.weight[k] = stencil.weight_grad_x[k] = stencil.weight_grad_y[k] = static_cast<acc_t>(0);
    }
    return stencil;
  }
  const acc_t floor_x = ::floor(px);
  const acc_t floor_y = ::floor(py);
  const int64_t x0 = static_cast<int64_t>(floor_x);
  const int64_t y0 = static_cast<int64_t>(floor_y);
  const acc_t right = px - floor_x;  // weight of the x0 + 1 column
  const acc_t down = py - floor_y;   // weight of the y0 + 1 row
  const acc_t left = static_cast<acc_t>(1) - right;
  const acc_t up = static_cast<acc_t>(1) - down;
  const acc_t dpx_dx = static_cast<acc_t>(width);
  const acc_t dpy_dy = static_cast<acc_t>(height);

  const int64_t tap_x[kTaps] = {x0, x0 + 1, x0, x0 + 1};
  const int64_t tap_y[kTaps] = {y0, y0, y0 + 1, y0 + 1};
  const acc_t column_weight[kTaps] = {left, right, left, right};
  const acc_t row_weight[kTaps] = {up, up, down, down};
  const acc_t column_sign[kTaps] = {-1, 1, -1, 1};  // d column_weight / d px
  const acc_t row_sign[kTaps] = {-1, -1, 1, 1};     // d row_weight / d py
  for (int k = 0; k < kTaps; ++k) {
    const bool inside = tap_x[k] >= 0 && tap_x[k] < width && tap_y[k] >= 0 && tap_y[k] < height;
    stencil.inside[k] = inside;
    stencil.pixel[k] = inside ? tap_y[k] * width + tap_x[k] : 0;
    const acc_t gate = inside ? static_cast<acc_t>(1) : static_cast<acc_t>(0);
    stencil.weight[k] = gate * column_weight[k] * row_weight[k];
    stencil.weight_grad_x[k] = gate * column_sign[k] * row_weight[k] * dpx_dx;
    stencil.weight_grad_y[k] = gate * column_weight[k] * row_sign[k] * dpy_dy;
  }
  return stencil;
}

// The stencil of sample `sample` (its index in the flattened (N, Lq, M, L, P) sample grid), whose
// location is the pair locations[2 * sample], locations[2 * sample + 1].
template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline BilinearStencil<acc_t> sample_stencil(const scalar_t* locations, int64_t sample,
                                                              int64_t height, int64_t width) {
  return bilinear_stencil<acc_t>(static_cast<acc_t>(locations[2 * sample]),
                                 static_cast<acc_t>(locations[2 * sample + 1]), height, width);
}

template <typename acc_t>
struct SampleGradients {
  acc_t attention_weight;
  acc_t x;
  acc_t y;
};

// Gradients of  attention_weight * sum_k weight[k] * <grad_output, tap_value[k]>  with respect to the
// attention weight and the normalised location, given tap_dot[k] = <grad_output, tap_value[k]>.
// Linear in tap_dot, so partial dot products over a subset of channels give partial gradients.
template <typename acc_t>
C10_HOST_DEVICE inline SampleGradients<acc_t> sample_gradients(const BilinearStencil<acc_t>& stencil,
                                                                const acc_t (&tap_dot)[kTaps],
                                                                acc_t attention_weight) {
  SampleGradients<acc_t> grads{static_cast<acc_t>(0), static_cast<acc_t>(0), static_cast<acc_t>(0)};
  for (int k = 0; k < kTaps; ++k) {
    grads.attention_weight += stencil.weight[k] * tap_dot[k];
    grads.x += stencil.weight_grad_x[k] * tap_dot[k];
    grads.y += stencil.weight_grad_y[k] * tap_dot[k];
  }
  grads.x *= attention_weight;
  grads.y *= attention_weight;
  return grads;
}

}  // namespace ms_deform_attn
}  // namespace dat
