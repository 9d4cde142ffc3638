// Checks shared by the CPU and CUDA kernels of dat::neighborhood_attn (schemas in neighborhood_attn.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace dat {
namespace neighborhood_attn {

inline void check_geometry(const at::Tensor& q, int64_t kernel_size, int64_t dilation) {
  TORCH_CHECK(q.dim() == 5, "neighborhood_attn: q must be (B, heads, H, W, head_dim), got ", q.sizes());
  TORCH_CHECK(kernel_size > 1 && kernel_size % 2 == 1, "neighborhood_attn: kernel_size must be odd and > 1, got ",
              kernel_size);
  TORCH_CHECK(dilation >= 1, "neighborhood_attn: dilation must be >= 1, got ", dilation);
  TORCH_CHECK(q.size(2) >= kernel_size * dilation && q.size(3) >= kernel_size * dilation,
              "neighborhood_attn: the map (", q.size(2), " x ", q.size(3), ") must be at least kernel_size * dilation = ",
              kernel_size * dilation, " on each side; pad it first");
}

inline void check_forward_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rpb,
                                 int64_t kernel_size, int64_t dilation) {
  check_geometry(q, kernel_size, dilation);
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "neighborhood_attn: q, k, v must share one shape, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(rpb.dim() == 3 && rpb.size(0) == q.size(1) && rpb.size(1) == 2 * kernel_size - 1 &&
                  rpb.size(2) == 2 * kernel_size - 1,
              "neighborhood_attn: rpb must be (heads, 2k-1, 2k-1) = (", q.size(1), ", ", 2 * kernel_size - 1, ", ",
              2 * kernel_size - 1, "), got ", rpb.sizes());
  for (const at::Tensor* t : {&k, &v, &rpb}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device() == q.device(),
                "neighborhood_attn: q, k, v, rpb must share one dtype and device");
  }
}

inline void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& attn, int64_t kernel_size, int64_t dilation) {
  check_geometry(q, kernel_size, dilation);
  for (const at::Tensor* t : {&grad_out, &k, &v}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() && t->device() == q.device(),
                "neighborhood_attn_backward: grad_out, q, k, v must share one shape, dtype and device");
  }
  TORCH_CHECK(attn.dim() == 5 && attn.sizes().slice(0, 4) == q.sizes().slice(0, 4) &&
                  attn.size(4) == kernel_size * kernel_size && attn.device() == q.device(),
              "neighborhood_attn_backward: attn must be (B, heads, H, W, k*k) on q's device, got ", attn.sizes());
}

}  // namespace neighborhood_attn
}  // namespace dat
