// CPU kernels of dat::ms_deform_attn (float64, float32, float16, bfloat16; accumulation in
// at::opmath_type, i.e. float32 for the half types, each backward task summing its slice of the value
// gradient in float32 and rounding it once).
//
// Forward: each task owns whole output rows (one query of one batch element), so no two threads
// write the same memory. Backward: the value gradient is a scatter, so the work is partitioned by
// (batch element, head, level): the slice of value a task samples from (and scatters into) is
// disjoint from every other task's, and so are the sampling-location and attention-weight gradients
// it writes. There are N * M * L tasks of equal cost (Lq * P samples each).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/kernel_limits.h"
#include "common/library.h"
#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/ms_deform_attn_math.h"

namespace dat {
namespace ms_deform_attn {
namespace {

// The kernels, for the baseline instruction set and AVX2 + FMA (common/cpu_isa.h).
#define DAT_CPU_KERNELS "ms_deform_attn/cpu/ms_deform_attn_cpu_kernels.h"
#include "common/cpu_kernels_for_each_isa.h"

// The limits of these kernels (common/kernel_limits.h): the dtypes they are built for.
constexpr at::ScalarType kDtypes[] = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};

// Checks the limits before anything is copied.
void check_limits(at::ScalarType dtype) { check_kernel_dtype(dtype, kDtypes, "dat::ms_deform_attn", "CPU"); }

// What check_limits enforces, for dat/ops/ms_deform_attn.py.
std::string limits_json() { return LimitsJson().dtypes("dtypes", kDtypes).str(); }

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights) {
  const Problem problem = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_limits(value.scalar_type());
  const Inputs in =
      prepare_inputs(problem, value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Problem& size = in.problem;
  at::Tensor output = at::empty({size.batch, size.queries, size.heads * size.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    DAT_CPU_ISA_CALL(forward_kernel<scalar_t>, in.value.data_ptr<scalar_t>(), in.sampling_locations.data_ptr<acc_t>(),
                     in.attention_weights.data_ptr<acc_t>(), output.data_ptr<scalar_t>(), in.layout, size);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Problem problem = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_grad_output(grad_output, value, problem);
  check_limits(value.scalar_type());
  const Inputs in =
      prepare_inputs(problem, value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const at::Tensor grad_output_c = grad_output.contiguous();
  // Zeroed where the kernel sums into it in place; a half-precision kernel writes every element.
  const bool sums_in_place = in.sampling_locations.scalar_type() == value.scalar_type();
  at::Tensor grad_value = sums_in_place ? at::zeros_like(in.value) : at::empty_like(in.value);
  // In the accumulation dtype (in.sampling_locations' dtype); rounded to the inputs' dtypes at the end.
  at::Tensor grad_locations = at::empty_like(in.sampling_locations);
  at::Tensor grad_weights = at::empty_like(in.attention_weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    DAT_CPU_ISA_CALL(backward_kernel<scalar_t>, grad_output_c.data_ptr<scalar_t>(), in.value.data_ptr<scalar_t>(),
                     in.sampling_locations.data_ptr<acc_t>(), in.attention_weights.data_ptr<acc_t>(),
                     grad_value.data_ptr<scalar_t>(), grad_locations.data_ptr<acc_t>(), grad_weights.data_ptr<acc_t>(),
                     in.layout, in.problem);
  });
  return {grad_value, grad_locations.to(sampling_locations.scalar_type()),
          grad_weights.to(attention_weights.scalar_type())};
}

}  // namespace
}  // namespace ms_deform_attn
}  // namespace dat

TORCH_LIBRARY_FRAGMENT(DAT_OP_NAMESPACE, m) {
  m.def("ms_deform_attn_cpu_limits() -> str", &dat::ms_deform_attn::limits_json);
}

TORCH_LIBRARY_IMPL(DAT_OP_NAMESPACE, CPU, m) {
  m.impl("ms_deform_attn", &dat::ms_deform_attn::ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &dat::ms_deform_attn::ms_deform_attn_backward_cpu);
}
