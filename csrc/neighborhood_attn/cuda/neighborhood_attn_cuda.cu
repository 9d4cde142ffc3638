// CUDA kernels of dat::neighborhood_attn. One warp per query (forward, query-side backward) or per
// key (key-side backward): lanes split the k*k window slots for the dot products and softmax, then
// the head channels for the weighted sums, so loads along a channel row are coalesced. Everything
// accumulates in float (double for double). The bias gradient uses one block per table entry and a
// fixed-order block reduction, so all results are deterministic (no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "common/cuda_kernel.h"
#include "common/kernel_limits.h"
#include "neighborhood_attn/neighborhood_attn.h"
#include "neighborhood_attn/neighborhood_attn_math.h"

namespace dat {
namespace neighborhood_attn {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kBiasThreads = 256;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = ::max(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  return sum;
}

// Flat index (over B*heads*H*W) of window slot `slot` of the query at (plane, y0, x0) window corner.
__device__ __forceinline__ int64_t key_of_slot(int64_t slot, int64_t plane, int64_t y0, int64_t x0, const Problem& g) {
  const int64_t ty = slot / g.kernel_size, tx = slot % g.kernel_size;
  return (plane * g.height + y0 + ty * g.dilation) * g.width + x0 + tx * g.dilation;
}

struct QueryWindow {
  int64_t plane, y, x, y0, x0;
};

__device__ __forceinline__ QueryWindow window_of_query(int64_t query, const Problem& g) {
  const int64_t row = query / g.width, x = query % g.width;
  const int64_t y = row % g.height;
  return {row / g.height, y, x, window_start(y, g.height, g.kernel_size, g.dilation),
          window_start(x, g.width, g.kernel_size, g.dilation)};
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                               const scalar_t* __restrict__ v, const scalar_t* __restrict__ rpb,
                               scalar_t* __restrict__ out, acc_t* __restrict__ attn, int64_t queries, Problem g,
                               acc_t scale) {
  DAT_DYNAMIC_SHARED(unsigned char, shared_bytes);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t query = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (query >= queries) return;  // whole warps leave together; no block-wide barrier follows
  acc_t* probabilities = reinterpret_cast<acc_t*>(shared_bytes) + warp * g.window();
  const QueryWindow w = window_of_query(query, g);
  const int64_t side = g.table_side();
  const scalar_t* bias = rpb + (w.plane % g.heads) * side * side +
                         bias_offset(w.y, w.y0, g.kernel_size, g.dilation) * side +
                         bias_offset(w.x, w.x0, g.kernel_size, g.dilation);
  const scalar_t* q_i = q + query * g.dim;

  acc_t max_logit = std::numeric_limits<acc_t>::lowest();
  for (int64_t slot = lane; slot < g.window(); slot += kWarpSize) {
    const acc_t logit = dot<acc_t>(q_i, k + key_of_slot(slot, w.plane, w.y0, w.x0, g) * g.dim, g.dim) * scale +
                        static_cast<acc_t>(bias[(slot / g.kernel_size) * side + slot % g.kernel_size]);
    probabilities[slot] = logit;
    max_logit = ::max(max_logit, logit);
  }
  max_logit = warp_max(max_logit);
  acc_t total = 0;
  for (int64_t slot = lane; slot < g.window(); slot += kWarpSize) {
    const acc_t weight = std::exp(probabilities[slot] - max_logit);
    probabilities[slot] = weight;
    total += weight;
  }
  total = warp_sum(total);
  for (int64_t slot = lane; slot < g.window(); slot += kWarpSize) {
    probabilities[slot] /= total;
    attn[query * g.window() + slot] = probabilities[slot];
  }
  __syncwarp();
  for (int64_t channel = lane; channel < g.dim; channel += kWarpSize) {
    acc_t accum = 0;
    for (int64_t slot = 0; slot < g.window(); ++slot) {
      accum += probabilities[slot] * static_cast<acc_t>(v[key_of_slot(slot, w.plane, w.y0, w.x0, g) * g.dim + channel]);
    }
    out[query * g.dim + channel] = static_cast<scalar_t>(accum);
  }
}

// dS = P * (dP - sum(P * dP)) with dP = <grad_out_i, v_j>, and grad_q = scale * sum_j dS_j k_j.
template <typename scalar_t, typename acc_t>
__global__ void query_side_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ k,
                                           const scalar_t* __restrict__ v, const acc_t* __restrict__ attn,
                                           acc_t* __restrict__ grad_logits, scalar_t* __restrict__ grad_q,
                                           int64_t queries, Problem g, acc_t scale) {
  DAT_DYNAMIC_SHARED(unsigned char, shared_bytes);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t query = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (query >= queries) return;
  acc_t* dS = reinterpret_cast<acc_t*>(shared_bytes) + warp * g.window();
  const QueryWindow w = window_of_query(query, g);
  const acc_t* probabilities = attn + query * g.window();

  acc_t expected = 0;
  for (int64_t slot = lane; slot < g.window(); slot += kWarpSize) {
    dS[slot] = dot<acc_t>(grad_out + query * g.dim, v + key_of_slot(slot, w.plane, w.y0, w.x0, g) * g.dim, g.dim);
    expected += probabilities[slot] * dS[slot];
  }
  expected = warp_sum(expected);
  for (int64_t slot = lane; slot < g.window(); slot += kWarpSize) {
    dS[slot] = probabilities[slot] * (dS[slot] - expected);
    grad_logits[query * g.window() + slot] = dS[slot];
  }
  __syncwarp();
  for (int64_t channel = lane; channel < g.dim; channel += kWarpSize) {
    acc_t accum = 0;
    for (int64_t slot = 0; slot < g.window(); ++slot) {
      accum += dS[slot] * static_cast<acc_t>(k[key_of_slot(slot, w.plane, w.y0, w.x0, g) * g.dim + channel]);
    }
    grad_q[query * g.dim + channel] = static_cast<scalar_t>(accum * scale);
  }
}

// grad_k and grad_v of one key per warp, gathered over the queries whose windows hold it.
template <typename scalar_t, typename acc_t>
__global__ void key_side_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                                         const acc_t* __restrict__ attn, const acc_t* __restrict__ grad_logits,
                                         scalar_t* __restrict__ grad_k, scalar_t* __restrict__ grad_v, int64_t keys,
                                         Problem g, acc_t scale) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t key = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (key >= keys) return;
  const int64_t row = key / g.width, x = key % g.width;
  const int64_t plane = row / g.height, y = row % g.height;
  const int64_t K = g.kernel_size, d = g.dilation;
  const QueryRange rows_attending = queries_attending(y, g.height, K, d);
  const QueryRange columns_attending = queries_attending(x, g.width, K, d);
  for (int64_t channel = lane; channel < g.dim; channel += kWarpSize) {
    acc_t accum_k = 0, accum_v = 0;
    for (int64_t qy = rows_attending.first; qy <= rows_attending.last; qy += d) {
      const int64_t ty = (y - window_start(qy, g.height, K, d)) / d;
      for (int64_t qx = columns_attending.first; qx <= columns_attending.last; qx += d) {
        const int64_t tx = (x - window_start(qx, g.width, K, d)) / d;
        const int64_t query = (plane * g.height + qy) * g.width + qx;
        const int64_t slot = query * g.window() + ty * K + tx;
        accum_k += grad_logits[slot] * static_cast<acc_t>(q[query * g.dim + channel]);
        accum_v += attn[slot] * static_cast<acc_t>(grad_out[query * g.dim + channel]);
      }
    }
    grad_k[key * g.dim + channel] = static_cast<scalar_t>(accum_k * scale);
    grad_v[key * g.dim + channel] = static_cast<scalar_t>(accum_v);
  }
}

// One block per entry (head, oy, ox) of the bias table: sums dS over every query whose window holds
// the key (oy, ox) group positions away.
template <typename scalar_t, typename acc_t>
__global__ void bias_backward_kernel(const acc_t* __restrict__ grad_logits, scalar_t* __restrict__ grad_rpb,
                                     int64_t batch, Problem g) {
  __shared__ acc_t partial[kBiasThreads];
  const int64_t side = g.table_side(), K = g.kernel_size;
  const int64_t entry = blockIdx.x;
  const int64_t head = entry / (side * side), oy = (entry / side) % side - (K - 1), ox = entry % side - (K - 1);
  const int64_t plane_size = g.height * g.width;
  acc_t total = 0;
  for (int64_t position = threadIdx.x; position < batch * plane_size; position += kBiasThreads) {
    const int64_t b = position / plane_size, y = (position / g.width) % g.height, x = position % g.width;
    const int64_t ty = window_slot(y, oy, g.height, K, g.dilation);
    const int64_t tx = window_slot(x, ox, g.width, K, g.dilation);
    if (ty >= 0 && tx >= 0) {
      const int64_t query = (b * g.heads + head) * plane_size + y * g.width + x;
      total += grad_logits[query * g.window() + ty * K + tx];
    }
  }
  partial[threadIdx.x] = total;
  __syncthreads();
  for (int stride = kBiasThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) grad_rpb[entry] = static_cast<scalar_t>(partial[0]);
}

// The limits of these kernels (common/kernel_limits.h): the dtypes they are built for, the grids (one warp
// per query, kWarpsPerBlock per block; one block per bias-table entry in the backward) and the shared memory
// of the warps' attention rows, in the accumulation dtype.
constexpr at::ScalarType kDtypes[] = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};

int64_t warp_blocks(int64_t items) { return (items + kWarpsPerBlock - 1) / kWarpsPerBlock; }

int64_t bias_entries(const Problem& g) { return g.heads * g.table_side() * g.table_side(); }

size_t window_shared_bytes(const Problem& g, at::ScalarType dtype) {
  return kWarpsPerBlock * g.window() * c10::elementSize(at::toOpMathType(dtype));
}

// Checks the limits of the forward kernel, or of the backward kernels, before anything is allocated.
void check_limits(const Problem& g, at::ScalarType dtype, bool backward) {
  const char* op_name = backward ? "dat::neighborhood_attn_backward" : "dat::neighborhood_attn";
  check_kernel_dtype(dtype, kDtypes, "dat::neighborhood_attn", "CUDA");
  check_grid_blocks(warp_blocks(g.queries()), op_name, g.queries(), "queries");
  if (backward) check_grid_blocks(bias_entries(g), op_name, bias_entries(g), "bias-table entries");
  check_shared_bytes(window_shared_bytes(g, dtype), op_name);
}

// What check_limits enforces, for dat/ops/neighborhood_attn.py.
std::string limits_json() {
  LimitsJson accumulator_bytes;
  for (const at::ScalarType dtype : kDtypes) {
    accumulator_bytes.number(dtype_name(dtype).c_str(), c10::elementSize(at::toOpMathType(dtype)));
  }
  return LimitsJson()
      .dtypes("dtypes", kDtypes)
      .number("warps_per_block", kWarpsPerBlock)
      .number("max_blocks", kMaxInt32)
      .number("default_shared_bytes", static_cast<int64_t>(kDefaultSharedBytes))
      .object("accumulator_bytes", accumulator_bytes)
      .str();
}

std::tuple<at::Tensor, at::Tensor> neighborhood_attn_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& rpb,
                                                          int64_t kernel_size, int64_t dilation, double scale) {
  const Problem problem = check_inputs(q, k, v, rpb, kernel_size, dilation);
  const c10::cuda::CUDAGuard device_guard(q.device());
  check_limits(problem, q.scalar_type(), /*backward=*/false);
  ForwardTensors t = prepare_forward(problem, q, k, v, rpb);
  const Problem& g = t.problem;
  const int64_t queries = g.queries();
  if (queries == 0) return {t.out, t.attn};
  const size_t shared_bytes = window_shared_bytes(g, q.scalar_type());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "neighborhood_attn_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto* kernel = forward_kernel<scalar_t, acc_t>;
    reserve_shared_bytes(kernel, shared_bytes, "dat::neighborhood_attn");
    launch_kernel(kernel, warp_blocks(queries), kWarpsPerBlock * kWarpSize, shared_bytes, stream,
                  t.q.data_ptr<scalar_t>(), t.k.data_ptr<scalar_t>(), t.v.data_ptr<scalar_t>(),
                  t.rpb.data_ptr<scalar_t>(), t.out.data_ptr<scalar_t>(), t.attn.data_ptr<acc_t>(), queries, g,
                  static_cast<acc_t>(scale));
  });
  return {t.out, t.attn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> neighborhood_attn_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& attn, int64_t kernel_size, int64_t dilation, double scale) {
  const Problem problem = check_backward_inputs(grad_out, q, k, v, attn, kernel_size, dilation);
  const c10::cuda::CUDAGuard device_guard(q.device());
  check_limits(problem, q.scalar_type(), /*backward=*/true);
  BackwardTensors t = prepare_backward(problem, grad_out, q, k, v, attn);
  const Problem& g = t.problem;
  const int64_t queries = g.queries();
  if (queries == 0) {
    t.grad_rpb.zero_();
    return {t.grad_q, t.grad_k, t.grad_v, t.grad_rpb};
  }
  const size_t shared_bytes = window_shared_bytes(g, q.scalar_type());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "neighborhood_attn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto* query_side = query_side_backward_kernel<scalar_t, acc_t>;
    reserve_shared_bytes(query_side, shared_bytes, "dat::neighborhood_attn_backward");
    launch_kernel(query_side, warp_blocks(queries), kWarpsPerBlock * kWarpSize, shared_bytes, stream,
                  t.grad_out.data_ptr<scalar_t>(), t.k.data_ptr<scalar_t>(), t.v.data_ptr<scalar_t>(),
                  t.attn.data_ptr<acc_t>(), t.grad_logits.data_ptr<acc_t>(), t.grad_q.data_ptr<scalar_t>(), queries, g,
                  static_cast<acc_t>(scale));
    launch_kernel(key_side_backward_kernel<scalar_t, acc_t>, warp_blocks(queries), kWarpsPerBlock * kWarpSize, 0,
                  stream, t.grad_out.data_ptr<scalar_t>(), t.q.data_ptr<scalar_t>(), t.attn.data_ptr<acc_t>(),
                  t.grad_logits.data_ptr<acc_t>(), t.grad_k.data_ptr<scalar_t>(), t.grad_v.data_ptr<scalar_t>(),
                  queries, g, static_cast<acc_t>(scale));
    launch_kernel(bias_backward_kernel<scalar_t, acc_t>, t.grad_rpb.numel(), kBiasThreads, 0, stream,
                  t.grad_logits.data_ptr<acc_t>(), t.grad_rpb.data_ptr<scalar_t>(), q.size(0), g);
  });
  return {t.grad_q, t.grad_k, t.grad_v, t.grad_rpb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(DAT_OP_NAMESPACE, m) { m.def("neighborhood_attn_cuda_limits() -> str", &limits_json); }

TORCH_LIBRARY_IMPL(DAT_OP_NAMESPACE, DAT_CUDA_DISPATCH_KEY, m) {
  m.impl("neighborhood_attn", &neighborhood_attn_cuda);
  m.impl("neighborhood_attn_backward", &neighborhood_attn_backward_cuda);
}

}  // namespace neighborhood_attn
}  // namespace dat
