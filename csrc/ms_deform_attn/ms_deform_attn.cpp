// Schemas of dat::ms_deform_attn (Deformable DETR's multi-scale deformable attention) and the input
// checks its CPU and CUDA kernels share.
//
//   value               (N, S, M, D)        L levels flattened row-major, S = sum_l H_l * W_l
//   spatial_shapes      (L, 2) int64        (H_l, W_l)
//   level_start_index   (L,) int64          running sum of H_l * W_l
//   sampling_locations  (N, Lq, M, L, P, 2) (x, y) normalised to [0, 1]
//   attention_weights   (N, Lq, M, L, P)
//   output              (N, Lq, M * D)
// sampling_locations and attention_weights have value's dtype, or float32 beside a float16 or bfloat16
// value (a location rounded to 8 bits is off by up to 1/512 of the level's width).
#include "ms_deform_attn/ms_deform_attn.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "common/library.h"

namespace dat {
namespace ms_deform_attn {

Problem check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                     const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK_VALUE(value.dim() == 4, "dat::ms_deform_attn: value must be (N, S, heads, head_dim), got shape ",
                    value.sizes());
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
                    "dat::ms_deform_attn: spatial_shapes must be (levels, 2), got shape ", spatial_shapes.sizes());
  const int64_t levels = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(levels >= 1, "dat::ms_deform_attn: needs at least one level");
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == levels,
                    "dat::ms_deform_attn: level_start_index must be (levels=", levels, ",), got shape ",
                    level_start_index.sizes());
  TORCH_CHECK_TYPE(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
                   "dat::ms_deform_attn: spatial_shapes and level_start_index must be int64, got ",
                   spatial_shapes.scalar_type(), " and ", level_start_index.scalar_type());
  const Problem size{value.size(0),
                     value.size(1),
                     value.size(2),
                     value.size(3),
                     sampling_locations.dim() == 6 ? sampling_locations.size(1) : -1,
                     levels,
                     sampling_locations.dim() == 6 ? sampling_locations.size(4) : -1};
  TORCH_CHECK_VALUE(sampling_locations.dim() == 6 && sampling_locations.size(0) == size.batch &&
                        sampling_locations.size(2) == size.heads && sampling_locations.size(5) == 2,
                    "dat::ms_deform_attn: sampling_locations must be (N=", size.batch, ", queries, heads=", size.heads,
                    ", levels=", levels, ", points, 2), got shape ", sampling_locations.sizes());
  TORCH_CHECK_VALUE(sampling_locations.size(3) == levels, "dat::ms_deform_attn: sampling_locations has ",
                    sampling_locations.size(3), " levels but spatial_shapes has ", levels);
  TORCH_CHECK_VALUE(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
                    "dat::ms_deform_attn: attention_weights must be (N, queries, heads, levels, points) = ",
                    sampling_locations.sizes().slice(0, 5), ", got shape ", attention_weights.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(value.scalar_type()), "dat::ms_deform_attn: value must be floating point, got ",
                   value.scalar_type());
  const auto dtype_fits = [&](const at::Tensor& tensor) {
    const bool float32_beside_half = tensor.scalar_type() == at::kFloat &&
                                     (value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16);
    return tensor.scalar_type() == value.scalar_type() || float32_beside_half;
  };
  TORCH_CHECK_TYPE(dtype_fits(sampling_locations) && dtype_fits(attention_weights),
                   "dat::ms_deform_attn: sampling_locations and attention_weights must have value's dtype (or "
                   "float32 when value is float16 or bfloat16), got value ",
                   value.scalar_type(), ", sampling_locations ", sampling_locations.scalar_type(),
                   ", attention_weights ", attention_weights.scalar_type());
  TORCH_CHECK_VALUE(sampling_locations.device() == value.device() && attention_weights.device() == value.device(),
                    "dat::ms_deform_attn: value, sampling_locations and attention_weights must be on one device, got ",
                    value.device(), ", ", sampling_locations.device(), ", ", attention_weights.device());
  return size;
}

namespace {

LevelLayout read_level_layout(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                              const Problem& size) {
  const at::Tensor shapes = spatial_shapes.to(at::kCPU).contiguous();
  const at::Tensor starts = level_start_index.to(at::kCPU).contiguous();
  const int64_t* shape_data = shapes.data_ptr<int64_t>();
  const int64_t* start_data = starts.data_ptr<int64_t>();
  LevelLayout layout;
  int64_t running_start = 0;
  for (int64_t level = 0; level < size.levels; ++level) {
    const int64_t height = shape_data[2 * level];
    const int64_t width = shape_data[2 * level + 1];
    TORCH_CHECK_VALUE(height >= 1 && width >= 1, "dat::ms_deform_attn: level ", level, " has spatial shape (", height,
                      ", ", width, "); both sides must be positive");
    TORCH_CHECK_VALUE(start_data[level] == running_start, "dat::ms_deform_attn: level_start_index[", level, "] is ",
                      start_data[level], " but the levels before it hold ", running_start, " pixels");
    layout.height.push_back(height);
    layout.width.push_back(width);
    layout.start.push_back(running_start);
    running_start += height * width;
  }
  TORCH_CHECK_VALUE(running_start == size.value_len, "dat::ms_deform_attn: spatial_shapes describe ", running_start,
                    " pixels but value holds S=", size.value_len);
  return layout;
}

}  // namespace

Inputs prepare_inputs(const Problem& problem, const at::Tensor& value, const at::Tensor& spatial_shapes,
                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                      const at::Tensor& attention_weights) {
  const at::ScalarType accumulation = at::toOpMathType(value.scalar_type());
  const auto as_accumulation = [&](const at::Tensor& tensor) { return tensor.contiguous().to(accumulation); };
  return {problem, read_level_layout(spatial_shapes, level_start_index, problem), value.contiguous(),
          as_accumulation(sampling_locations), as_accumulation(attention_weights)};
}

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const Problem& size) {
  TORCH_CHECK_VALUE(grad_output.dim() == 3 && grad_output.size(0) == size.batch &&
                        grad_output.size(1) == size.queries && grad_output.size(2) == size.heads * size.channels,
                    "dat::ms_deform_attn_backward: grad_output must be (N=", size.batch, ", queries=", size.queries,
                    ", heads * head_dim=", size.heads * size.channels, "), got shape ", grad_output.sizes());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == value.scalar_type() && grad_output.device() == value.device(),
                   "dat::ms_deform_attn_backward: grad_output must match value's dtype and device, got ",
                   grad_output.scalar_type(), " on ", grad_output.device());
}

}  // namespace ms_deform_attn
}  // namespace dat

TORCH_LIBRARY_FRAGMENT(DAT_OP_NAMESPACE, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
      "Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> (Tensor grad_value, Tensor grad_sampling_locations, "
      "Tensor grad_attention_weights)");
}
