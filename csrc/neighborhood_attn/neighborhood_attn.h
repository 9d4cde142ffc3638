// Checks and allocations shared by the CPU and CUDA kernels of dat::neighborhood_attn (schemas in
// neighborhood_attn.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <tuple>

#include "neighborhood_attn/neighborhood_attn_math.h"

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

inline Geometry geometry_of(const at::Tensor& q, int64_t kernel_size, int64_t dilation) {
  return {q.size(1), q.size(2), q.size(3), q.size(4), kernel_size, dilation};
}

// (batch, head, row, column) positions; not numel / head_dim, which divides by zero when head_dim is 0.
inline int64_t query_count(const at::Tensor& q) { return q.size(0) * q.size(1) * q.size(2) * q.size(3); }

// Inputs made contiguous, the output and the attention probabilities (in the accumulation dtype).
struct ForwardTensors {
  at::Tensor q, k, v, rpb, out, attn;
};

inline ForwardTensors prepare_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& rpb, int64_t kernel_size, int64_t dilation) {
  check_forward_inputs(q, k, v, rpb, kernel_size, dilation);
  ForwardTensors t{q.contiguous(), k.contiguous(), v.contiguous(), rpb.contiguous(), {}, {}};
  t.out = at::empty_like(t.q, at::MemoryFormat::Contiguous);
  t.attn = at::empty({q.size(0), q.size(1), q.size(2), q.size(3), kernel_size * kernel_size},
                     q.options().dtype(at::toOpMathType(q.scalar_type())));
  return t;
}

// Inputs made contiguous, the gradients, and the logit gradients dS (accumulation dtype) that the
// query-side pass writes and the key-side and bias passes read.
struct BackwardTensors {
  at::Tensor grad_out, q, k, v, attn, grad_q, grad_k, grad_v, grad_rpb, grad_logits;
};

inline BackwardTensors prepare_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& attn, int64_t kernel_size,
                                        int64_t dilation) {
  check_backward_inputs(grad_out, q, k, v, attn, kernel_size, dilation);
  BackwardTensors t;
  t.grad_out = grad_out.contiguous();
  t.q = q.contiguous();
  t.k = k.contiguous();
  t.v = v.contiguous();
  t.attn = attn.to(at::toOpMathType(q.scalar_type())).contiguous();
  t.grad_q = at::empty_like(t.q);
  t.grad_k = at::empty_like(t.q);
  t.grad_v = at::empty_like(t.q);
  t.grad_rpb = at::empty({q.size(1), 2 * kernel_size - 1, 2 * kernel_size - 1}, q.options());
  t.grad_logits = at::empty_like(t.attn);
  return t;
}

}  // namespace neighborhood_attn
}  // namespace dat
