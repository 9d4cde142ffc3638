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

namespace detail {

inline void check_same_dtype_and_device(const at::Tensor& q, const at::Tensor& other, const char* name) {
  TORCH_CHECK_TYPE(other.scalar_type() == q.scalar_type(), "dat::neighborhood_attn: ", name, " has dtype ",
                   other.scalar_type(), " but q has ", q.scalar_type());
  TORCH_CHECK_VALUE(other.device() == q.device(), "dat::neighborhood_attn: ", name, " is on ", other.device(),
                    " but q is on ", q.device());
}

// The window, q, k and v: what the forward and the backward both take.
inline Problem check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      int64_t kernel_size, int64_t dilation) {
  TORCH_CHECK_VALUE(kernel_size > 1 && kernel_size % 2 == 1,
                    "dat::neighborhood_attn: kernel_size must be odd and > 1, got ", kernel_size);
  TORCH_CHECK_VALUE(dilation >= 1, "dat::neighborhood_attn: dilation must be >= 1, got ", dilation);
  TORCH_CHECK_VALUE(q.dim() == 5, "dat::neighborhood_attn: q must be (B, heads, H, W, head_dim); got ", q.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
                    "dat::neighborhood_attn: q, k, v must share one shape; got ", q.sizes(), ", ", k.sizes(), ", ",
                    v.sizes());
  TORCH_CHECK_VALUE(q.size(2) >= kernel_size * dilation && q.size(3) >= kernel_size * dilation,
                    "dat::neighborhood_attn: the map (", q.size(2), " x ", q.size(3),
                    ") must be at least kernel_size * dilation = ", kernel_size * dilation,
                    " on each side; pad it first");
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), "dat::neighborhood_attn: needs floating-point tensors, got ",
                   q.scalar_type());
  detail::check_same_dtype_and_device(q, k, "k");
  detail::check_same_dtype_and_device(q, v, "v");
  return {q.size(0), q.size(1), q.size(2), q.size(3), q.size(4), kernel_size, dilation};
}

}  // namespace detail

// The checks of the op; dat/ops/neighborhood_attn.py repeats them, in this order and with these messages,
// for the reference path and the fake kernel.
inline Problem check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rpb,
                            int64_t kernel_size, int64_t dilation) {
  const Problem problem = detail::check_attention_inputs(q, k, v, kernel_size, dilation);
  const int64_t side = problem.table_side();
  TORCH_CHECK_VALUE(rpb.dim() == 3 && rpb.size(0) == problem.heads && rpb.size(1) == side && rpb.size(2) == side,
                    "dat::neighborhood_attn: rpb must be (heads, 2k-1, 2k-1) = (", problem.heads, ", ", side, ", ",
                    side, "); got ", rpb.sizes());
  detail::check_same_dtype_and_device(q, rpb, "rpb");
  return problem;
}

// The window, q, k and v as in check_inputs, plus the incoming gradient and the attention probabilities
// saved by the forward.
inline Problem check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& attn, int64_t kernel_size,
                                     int64_t dilation) {
  const Problem problem = detail::check_attention_inputs(q, k, v, kernel_size, dilation);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes(), "dat::neighborhood_attn_backward: grad_out must have q's shape ",
                    q.sizes(), "; got ", grad_out.sizes());
  detail::check_same_dtype_and_device(q, grad_out, "grad_out");
  TORCH_CHECK_VALUE(attn.dim() == 5 && attn.sizes().slice(0, 4) == q.sizes().slice(0, 4) &&
                        attn.size(4) == problem.window() && attn.device() == q.device(),
                    "dat::neighborhood_attn_backward: attn must be (B, heads, H, W, k*k) on q's device, got ",
                    attn.sizes(), " on ", attn.device());
  return problem;
}

// Inputs made contiguous, the output and the attention probabilities (in the accumulation dtype), for a
// `problem` that check_inputs and then the kernel's limits accepted.
struct ForwardTensors {
  Problem problem;
  at::Tensor q, k, v, rpb, out, attn;
};

inline ForwardTensors prepare_forward(const Problem& problem, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& rpb) {
  ForwardTensors t{problem,
                   q.contiguous(),
                   k.contiguous(),
                   v.contiguous(),
                   rpb.contiguous(),
                   {},
                   {}};
  t.out = at::empty_like(t.q, at::MemoryFormat::Contiguous);
  t.attn = at::empty({q.size(0), q.size(1), q.size(2), q.size(3), problem.window()},
                     q.options().dtype(at::toOpMathType(q.scalar_type())));
  return t;
}

// Inputs made contiguous, the gradients, and the logit gradients dS (accumulation dtype) that the
// query-side pass writes and the key-side and bias passes read, for a `problem` that check_backward_inputs
// and then the kernel's limits accepted.
struct BackwardTensors {
  Problem problem;
  at::Tensor grad_out, q, k, v, attn, grad_q, grad_k, grad_v, grad_rpb, grad_logits;
};

inline BackwardTensors prepare_backward(const Problem& problem, const at::Tensor& grad_out, const at::Tensor& q,
                                        const at::Tensor& k, const at::Tensor& v, const at::Tensor& attn) {
  BackwardTensors t;
  t.problem = problem;
  t.grad_out = grad_out.contiguous();
  t.q = q.contiguous();
  t.k = k.contiguous();
  t.v = v.contiguous();
  t.attn = attn.to(at::toOpMathType(q.scalar_type())).contiguous();
  t.grad_q = at::empty_like(t.q);
  t.grad_k = at::empty_like(t.q);
  t.grad_v = at::empty_like(t.q);
  t.grad_rpb = at::empty({q.size(1), problem.table_side(), problem.table_side()}, q.options());
  t.grad_logits = at::empty_like(t.attn);
  return t;
}

}  // namespace neighborhood_attn
}  // namespace dat
