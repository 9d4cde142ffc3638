// CUDA kernels of dat::ms_deform_attn (float32, float64, float16, bfloat16; accumulation in
// at::opmath_type, i.e. float32 for the half types).
//
// One warp per (batch element, query, head): its lanes stride over the head's channels, so value
// reads are coalesced and the per-sample location and weight are broadcast loads. In the backward
// pass the lanes' partial gradients of a sample's location and weight are summed with shuffles, and
// the value gradient is scattered with atomics into an opmath_type buffer (cast to the value's dtype
// at the end). Sampling locations and attention weights are read, and their gradients written, in
// opmath_type too (prepare_inputs converts them; the gradients are cast to their dtypes at the end).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "common/cuda_kernel.h"
#include "common/kernel_limits.h"
#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/ms_deform_attn_math.h"

namespace dat {
namespace ms_deform_attn {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreadsPerBlock = 256;
constexpr int kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
// The level geometry travels as a kernel argument; Deformable DETR uses 4 levels.
constexpr int kMaxLevels = 16;

struct LevelGeometry {
  int64_t height[kMaxLevels];
  int64_t width[kMaxLevels];
  int64_t start[kMaxLevels];
};

// The limits of these kernels (common/kernel_limits.h): the dtypes they are built for, the levels of
// LevelGeometry, and the grid: one warp per (batch, query, head) row, kWarpsPerBlock rows per block.
constexpr at::ScalarType kDtypes[] = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};

int64_t blocks_for_rows(const Problem& size) {
  return (size.batch * size.queries * size.heads + kWarpsPerBlock - 1) / kWarpsPerBlock;
}

// Checks the limits before anything is copied.
void check_limits(const Problem& size, at::ScalarType dtype) {
  check_kernel_dtype(dtype, kDtypes, "dat::ms_deform_attn", "CUDA");
  TORCH_CHECK_VALUE(size.levels <= kMaxLevels, "dat::ms_deform_attn: the CUDA kernel takes at most ", kMaxLevels,
                    " levels, got ", size.levels);
  check_grid_blocks(blocks_for_rows(size), "dat::ms_deform_attn", size.batch * size.queries * size.heads,
                    "(batch, query, head) rows");
}

// What check_limits enforces, for dat/ops/ms_deform_attn.py.
std::string limits_json() {
  return LimitsJson()
      .dtypes("dtypes", kDtypes)
      .number("max_levels", kMaxLevels)
      .number("rows_per_block", kWarpsPerBlock)
      .number("max_blocks", kMaxInt32)
      .str();
}

LevelGeometry to_geometry(const LevelLayout& layout) {
  LevelGeometry geometry{};
  for (size_t level = 0; level < layout.height.size(); ++level) {
    geometry.height[level] = layout.height[level];
    geometry.width[level] = layout.width[level];
    geometry.start[level] = layout.start[level];
  }
  return geometry;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T partial) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) partial += __shfl_xor_sync(0xffffffffu, partial, offset);
  return partial;
}

// The output row a warp computes: row = (batch * queries + query) * heads + head. Rows past the end
// belong to whole warps, which return together, so every lane of a working warp reaches the shuffles.
struct WarpRow {
  int64_t row;
  int64_t batch;
  int64_t head;
  int64_t first_sample;  // index of (row, level 0, point 0) in the (N, Lq, M, L, P) sample grid
  int lane;
};

__device__ __forceinline__ bool locate_warp_row(const Problem& size, WarpRow& warp) {
  warp.row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  warp.lane = threadIdx.x % kWarpSize;
  warp.head = warp.row % size.heads;
  warp.batch = warp.row / (size.queries * size.heads);
  warp.first_sample = warp.row * size.levels * size.points;
  return warp.row < size.batch * size.queries * size.heads;
}

// Offset of (batch, first pixel of `level`, head, channel 0) in the (N, S, M, D) value.
__device__ __forceinline__ int64_t level_offset(const Problem& size, const LevelGeometry& geometry, const WarpRow& warp,
                                                int64_t level) {
  return ((warp.batch * size.value_len + geometry.start[level]) * size.heads + warp.head) * size.channels;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    forward_kernel(const scalar_t* __restrict__ value, const acc_t* __restrict__ locations,
                   const acc_t* __restrict__ weights, scalar_t* __restrict__ output, const LevelGeometry geometry,
                   const Problem size) {
  WarpRow warp;
  if (!locate_warp_row(size, warp)) return;
  const int64_t pixel_stride = size.heads * size.channels;
  for (int64_t channel = warp.lane; channel < size.channels; channel += kWarpSize) {
    acc_t accumulator = 0;
    for (int64_t level = 0; level < size.levels; ++level) {
      const scalar_t* level_value = value + level_offset(size, geometry, warp, level) + channel;
      for (int64_t point = 0; point < size.points; ++point) {
        const int64_t sample = warp.first_sample + level * size.points + point;
        const auto stencil = sample_stencil<acc_t>(locations, sample, geometry.height[level], geometry.width[level]);
        const acc_t attention = weights[sample];
#pragma unroll
        for (int k = 0; k < kTaps; ++k) {
          if (stencil.inside[k]) {
            accumulator +=
                attention * stencil.weight[k] * static_cast<acc_t>(level_value[stencil.pixel[k] * pixel_stride]);
          }
        }
      }
    }
    output[warp.row * size.channels + channel] = static_cast<scalar_t>(accumulator);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                    const acc_t* __restrict__ locations, const acc_t* __restrict__ weights,
                    acc_t* __restrict__ grad_value, acc_t* __restrict__ grad_locations,
                    acc_t* __restrict__ grad_weights, const LevelGeometry geometry, const Problem size) {
  WarpRow warp;
  if (!locate_warp_row(size, warp)) return;
  const int64_t pixel_stride = size.heads * size.channels;
  const scalar_t* row_grad = grad_output + warp.row * size.channels;
  for (int64_t level = 0; level < size.levels; ++level) {
    const int64_t level_start = level_offset(size, geometry, warp, level);
    for (int64_t point = 0; point < size.points; ++point) {
      const int64_t sample = warp.first_sample + level * size.points + point;
      const auto stencil = sample_stencil<acc_t>(locations, sample, geometry.height[level], geometry.width[level]);
      const acc_t attention = weights[sample];
      acc_t tap_dot[kTaps] = {0, 0, 0, 0};
      for (int64_t channel = warp.lane; channel < size.channels; channel += kWarpSize) {
        const acc_t grad = static_cast<acc_t>(row_grad[channel]);
#pragma unroll
        for (int k = 0; k < kTaps; ++k) {
          if (stencil.inside[k]) {
            const int64_t index = level_start + stencil.pixel[k] * pixel_stride + channel;
            tap_dot[k] += grad * static_cast<acc_t>(value[index]);
            atomicAdd(grad_value + index, attention * stencil.weight[k] * grad);
          }
        }
      }
      const auto partial = sample_gradients<acc_t>(stencil, tap_dot, attention);
      const acc_t grad_weight = warp_sum(partial.attention_weight);
      const acc_t grad_x = warp_sum(partial.x);
      const acc_t grad_y = warp_sum(partial.y);
      if (warp.lane == 0) {
        grad_weights[sample] = grad_weight;
        grad_locations[2 * sample] = grad_x;
        grad_locations[2 * sample + 1] = grad_y;
      }
    }
  }
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights) {
  const Problem problem = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_limits(problem, value.scalar_type());
  const Inputs in =
      prepare_inputs(problem, value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const LevelGeometry geometry = to_geometry(in.layout);
  const Problem& size = in.problem;
  const c10::cuda::CUDAGuard device_guard(value.device());
  at::Tensor output = at::empty({size.batch, size.queries, size.heads * size.channels}, value.options());
  const int64_t blocks = blocks_for_rows(size);
  if (blocks == 0 || size.channels == 0) return output;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_kernel(forward_kernel<scalar_t, acc_t>, blocks, kThreadsPerBlock, 0, stream, in.value.data_ptr<scalar_t>(),
                  in.sampling_locations.data_ptr<acc_t>(), in.attention_weights.data_ptr<acc_t>(),
                  output.data_ptr<scalar_t>(), geometry, size);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Problem problem = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_grad_output(grad_output, value, problem);
  check_limits(problem, value.scalar_type());
  const Inputs in =
      prepare_inputs(problem, value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const LevelGeometry geometry = to_geometry(in.layout);
  const c10::cuda::CUDAGuard device_guard(value.device());
  const at::Tensor grad_output_c = grad_output.contiguous();
  // In the accumulation dtype (in.sampling_locations' dtype). Zero-filled: when D == 0 no kernel runs, and
  // the gradients are zero, as in the reference.
  at::Tensor grad_value_acc = at::zeros(in.value.sizes(), in.sampling_locations.options());
  at::Tensor grad_locations = at::zeros_like(in.sampling_locations);
  at::Tensor grad_weights = at::zeros_like(in.attention_weights);
  const int64_t blocks = blocks_for_rows(in.problem);
  if (blocks > 0 && in.problem.channels > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch_kernel(backward_kernel<scalar_t, acc_t>, blocks, kThreadsPerBlock, 0, stream,
                    grad_output_c.data_ptr<scalar_t>(), in.value.data_ptr<scalar_t>(),
                    in.sampling_locations.data_ptr<acc_t>(), in.attention_weights.data_ptr<acc_t>(),
                    grad_value_acc.data_ptr<acc_t>(), grad_locations.data_ptr<acc_t>(),
                    grad_weights.data_ptr<acc_t>(), geometry, in.problem);
    });
  }
  return {grad_value_acc.to(value.scalar_type()), grad_locations.to(sampling_locations.scalar_type()),
          grad_weights.to(attention_weights.scalar_type())};
}

}  // namespace
}  // namespace ms_deform_attn
}  // namespace dat

TORCH_LIBRARY_FRAGMENT(DAT_OP_NAMESPACE, m) {
  m.def("ms_deform_attn_cuda_limits() -> str", &dat::ms_deform_attn::limits_json);
}

TORCH_LIBRARY_IMPL(DAT_OP_NAMESPACE, DAT_CUDA_DISPATCH_KEY, m) {
  m.impl("ms_deform_attn", &dat::ms_deform_attn::ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &dat::ms_deform_attn::ms_deform_attn_backward_cuda);
}
