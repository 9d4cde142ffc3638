// Shapes and input validation of dat::deform_attn, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace dat {
namespace deform_attn {

struct Problem {
  int64_t batch;
  int64_t heads;
  int64_t groups;
  int64_t queries;
  int64_t keys;
  int64_t head_dim;
  int64_t table_height;  // 0 when there is no relative-position table
  int64_t table_width;

  int64_t heads_per_group() const { return heads / groups; }
};

// The per-query logsumexp saved by the forward: float64 for float64 inputs (so that fp64 gradient
// checks see exact probabilities), float32 for every other dtype.
inline at::ScalarType logsumexp_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The inputs as a kernel reads them: contiguous, and kpos, qpos, rpe in `position_dtype` (converted
// unless they already are); rpe is undefined when absent.
struct ContiguousInputs {
  at::Tensor q, k, v, kpos, qpos, rpe;

  ContiguousInputs(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& kpos_in,
                   const at::Tensor& qpos_in, const std::optional<at::Tensor>& rpe_in, at::ScalarType position_dtype)
      : q(q_in.contiguous()), k(k_in.contiguous()), v(v_in.contiguous()),
        kpos(kpos_in.contiguous().to(position_dtype)), qpos(qpos_in.contiguous().to(position_dtype)),
        rpe(rpe_in.has_value() ? rpe_in->contiguous().to(position_dtype) : at::Tensor()) {}

  template <typename scalar_t>
  const scalar_t* table() const {
    return rpe.defined() ? rpe.data_ptr<scalar_t>() : nullptr;
  }
};

// Checks ranks, shapes, dtypes and devices of the forward inputs (contiguity is not required: the
// kernels call .contiguous()) and returns the problem geometry. k and v have q's dtype; kpos, qpos
// and rpe have it too, or are float32 when q is float16 or bfloat16 (positions rounded to 8 or 11
// bits move the bias, so callers under autocast keep them in float32).
Problem check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kpos,
                     const at::Tensor& qpos, const std::optional<at::Tensor>& rpe);

// As check_inputs, plus the saved forward results and the incoming gradient.
Problem check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& kpos, const at::Tensor& qpos, const std::optional<at::Tensor>& rpe,
                              const at::Tensor& out, const at::Tensor& logsumexp);

}  // namespace deform_attn
}  // namespace dat
