// CUDA kernels of dat::deform_attn (float32, float16, bfloat16 inputs; float32 accumulation).
// Positions and the table are read as float32: the launchers convert half-precision ones (small
// tensors) and take float32 ones beside half-precision q, k, v as they are.
//
// Flash style: one block per (batch, head, tile of kQueryTile queries); keys and values are streamed
// through shared memory in tiles of kKeyTile, the bias is sampled from the table on the fly, and the
// softmax is accumulated online, so nothing of size Nq x Nk is ever stored.
//
// Thread layouts (kThreads = 256):
//  * pair phase: thread t handles the pairs (i, j) = (p / kKeyTile, p % kKeyTile) for p = t + c * kThreads;
//    a warp shares one query row and spans 32 keys.
//  * query phase: thread t owns query t / kLanesPerQuery and the channels d = t % kLanesPerQuery + c *
//    kLanesPerQuery (output / grad_q accumulators in registers).
//  * key phase (backward): thread t owns key t / kLanesPerKey and the channels / queries
//    t % kLanesPerKey + c * kLanesPerKey; it reduces over the tile's queries and adds the result to the
//    float32 key-side gradient buffers with one atomic per element per block.
// Shared-memory rows are padded by one element so that threads reading different rows at the same
// column hit different banks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_kernel.h"
#include "common/kernel_limits.h"
#include "deform_attn/deform_attn.h"
#include "deform_attn/deform_attn_math.h"

namespace dat {
namespace deform_attn {
namespace {

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

// floor(pixel) when the cell is in reach, else -2 (which keeps both neighbours out of bounds),
// without converting a huge float to an integer.
template <typename acc_t>
__device__ inline int32_t cell_start(acc_t pixel, int64_t size) {
  return static_cast<int32_t>(floor_of(cell_in_reach(pixel, acc_t(size)) ? pixel : acc_t(-2)));
}

template <typename acc_t>
__device__ inline BilinearTaps<acc_t> bilinear_taps(acc_t disp_row, acc_t disp_col, int64_t height, int64_t width) {
  const acc_t pixel_row = (disp_row + acc_t(1)) * pixel_per_unit<acc_t>(height);
  const acc_t pixel_col = (disp_col + acc_t(1)) * pixel_per_unit<acc_t>(width);
  const int64_t row = cell_start(pixel_row, height);
  const int64_t col = cell_start(pixel_col, width);
  BilinearTaps<acc_t> taps;
  taps.frac_row = row == -2 ? acc_t(0) : pixel_row - acc_t(row);
  taps.frac_col = col == -2 ? acc_t(0) : pixel_col - acc_t(col);
  taps.inside = 0;
#pragma unroll
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
__device__ inline acc_t bilinear_sample(const table_t* table, const BilinearTaps<acc_t>& taps) {
  acc_t value = 0;
#pragma unroll
  for (int corner = 0; corner < 4; ++corner) {
    value += taps.weight[corner] * static_cast<acc_t>(table[taps.offset[corner]]);
  }
  return value;
}

// Backward of bilinear_sample for an upstream gradient `grad`: calls accumulate(offset, value) for the
// table gradient of every in-bounds corner, and adds d(sample)/d(displacement) * grad to
// grad_disp_row / grad_disp_col.
template <typename acc_t, typename table_t, typename Accumulate>
__device__ inline void bilinear_sample_backward(const table_t* table, int64_t height, int64_t width,
                                                const BilinearTaps<acc_t>& taps, acc_t grad, Accumulate&& accumulate,
                                                acc_t& grad_disp_row, acc_t& grad_disp_col) {
  acc_t d_pixel_row = 0, d_pixel_col = 0;
#pragma unroll
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

template <typename acc_t>
__device__ inline BilinearTaps<acc_t> bias_taps(acc_t query_row, acc_t query_col, acc_t key_row, acc_t key_col,
                                                int64_t height, int64_t width) {
  const acc_t half = acc_t(kDisplacementPerPosition);
  return bilinear_taps<acc_t>((query_row - key_row) * half, (query_col - key_col) * half, height, width);
}

constexpr int kThreads = 256;
constexpr int kQueryTile = 64;
constexpr int kKeyTile = 32;
constexpr int kLanesPerQuery = kThreads / kQueryTile;  // 4
constexpr int kLanesPerKey = kThreads / kKeyTile;      // 8
constexpr int kPairsPerThread = kQueryTile * kKeyTile / kThreads;
constexpr int kMaxHeadDim = 128;
static_assert(kThreads % kQueryTile == 0 && kThreads % kKeyTile == 0, "tiles must divide the block");
static_assert(32 % kLanesPerKey == 0 && 32 % kLanesPerQuery == 0, "lane groups must not straddle warps");

struct KernelGeometry {
  int batch;
  int heads;
  int groups;
  int queries;
  int keys;
  int head_dim;
  int table_height;  // 0 without a relative-position table
  int table_width;
};

// Shared-memory layout, in floats; identical on host (sizing) and device (carving).
struct SharedLayout {
  int row_stride;    // head_dim + 1
  int score_stride;  // kKeyTile + 1
  int query_rows;    // q tile
  int query_rows_2;  // grad_out tile (backward only)
  int key_rows;      // k tile
  int value_rows;    // v tile
  int scores;        // logits (forward) / probabilities (backward)
  int grad_scores;   // logit gradients (backward only)
  int query_pos;     // kQueryTile x 2
  int key_pos;       // kKeyTile x 2
  int per_query;     // logsumexp and delta (backward only), 2 x kQueryTile
  int table;         // grad_rpe accumulator of one head (backward, when it fits)
  int total;

  C10_HOST_DEVICE SharedLayout(int head_dim, bool backward, int table_floats) {
    row_stride = head_dim + 1;
    score_stride = kKeyTile + 1;
    int at = 0;
    query_rows = at;
    at += kQueryTile * row_stride;
    query_rows_2 = at;
    at += backward ? kQueryTile * row_stride : 0;
    key_rows = at;
    at += kKeyTile * row_stride;
    value_rows = at;
    at += kKeyTile * row_stride;
    scores = at;
    at += kQueryTile * score_stride;
    grad_scores = at;
    at += backward ? kQueryTile * score_stride : 0;
    query_pos = at;
    at += kQueryTile * 2;
    key_pos = at;
    at += kKeyTile * 2;
    per_query = at;
    at += backward ? 2 * kQueryTile : 0;
    table = at;
    at += table_floats;
    total = at;
  }
  size_t bytes() const { return static_cast<size_t>(total) * sizeof(float); }
};

// The (batch, head, query tile) that this block works on, and where its data starts (in elements).
struct BlockTile {
  int batch_head;
  int query_begin;
  int query_count;
  int64_t query_base;    // first q / out / grad_out row of the tile
  int64_t key_base;      // first k / v row of (batch, head)
  int64_t key_pos_base;  // first kpos entry of (batch, group of head)
  int64_t table_base;    // the head's relative-position table

  __device__ explicit BlockTile(const KernelGeometry& geometry) {
    batch_head = blockIdx.y;
    const int batch = batch_head / geometry.heads;
    const int head = batch_head % geometry.heads;
    const int group = head / (geometry.heads / geometry.groups);
    query_begin = blockIdx.x * kQueryTile;
    query_count = min(kQueryTile, geometry.queries - query_begin);
    query_base = (static_cast<int64_t>(batch_head) * geometry.queries + query_begin) * geometry.head_dim;
    key_base = static_cast<int64_t>(batch_head) * geometry.keys * geometry.head_dim;
    key_pos_base = (static_cast<int64_t>(batch) * geometry.groups + group) * geometry.keys * 2;
    table_base = static_cast<int64_t>(head) * geometry.table_height * geometry.table_width;
  }
};

template <typename scalar_t>
__device__ inline float to_float(scalar_t value) {
  return static_cast<float>(value);
}

__device__ inline float dot_rows(const float* a, const float* b, int length) {
  float sum = 0.f;
  for (int d = 0; d < length; ++d) sum += a[d] * b[d];
  return sum;
}

// Copies `rows` rows of `width` elements (row-major, global) into padded float rows in shared memory;
// rows past `valid_rows` are zero.
template <typename scalar_t>
__device__ inline void load_rows(const scalar_t* __restrict__ source, int valid_rows, int rows, int width,
                                 int stride, float* destination) {
  for (int e = threadIdx.x; e < rows * width; e += kThreads) {
    const int row = e / width, column = e % width;
    destination[row * stride + column] = row < valid_rows ? to_float(source[static_cast<int64_t>(row) * width + column]) : 0.f;
  }
}

// Pair (i, j) of the tile handled by this thread in round c of the pair phase.
__device__ inline int pair_query(int round) { return (threadIdx.x + round * kThreads) / kKeyTile; }
__device__ inline int pair_key(int round) { return (threadIdx.x + round * kThreads) % kKeyTile; }

__device__ inline float pair_bias(const float* __restrict__ table, const KernelGeometry& geometry,
                                  const float* query_pos, const float* key_pos, BilinearTaps<float>& taps) {
  taps = bias_taps<float>(query_pos[0], query_pos[1], key_pos[0], key_pos[1], geometry.table_height,
                          geometry.table_width);
  return bilinear_sample(table, taps);
}

template <typename scalar_t, int kSlice>
__global__ void __launch_bounds__(kThreads)
    deform_attn_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                               const scalar_t* __restrict__ v, const float* __restrict__ kpos,
                               const float* __restrict__ qpos, const float* __restrict__ rpe, float scale,
                               KernelGeometry geometry, scalar_t* __restrict__ out, float* __restrict__ logsumexp) {
  DAT_DYNAMIC_SHARED(float, shared);
  const SharedLayout layout(geometry.head_dim, false, 0);
  float* query_rows = shared + layout.query_rows;
  float* key_rows = shared + layout.key_rows;
  float* value_rows = shared + layout.value_rows;
  float* logits = shared + layout.scores;
  float* query_pos = shared + layout.query_pos;
  float* key_pos = shared + layout.key_pos;

  const int D = geometry.head_dim, stride = layout.row_stride;
  const BlockTile tile(geometry);
  const int query_begin = tile.query_begin, query_count = tile.query_count;
  const int64_t query_base = tile.query_base, key_base = tile.key_base;
  const float* key_positions = kpos + tile.key_pos_base;
  const float* table = rpe != nullptr ? rpe + tile.table_base : nullptr;

  load_rows(q + query_base, query_count, kQueryTile, D, stride, query_rows);
  load_rows(qpos + static_cast<int64_t>(query_begin) * 2, query_count, kQueryTile, 2, 2, query_pos);

  const int row = threadIdx.x / kLanesPerQuery, lane = threadIdx.x % kLanesPerQuery;
  const bool row_valid = row < query_count;
  float accumulator[kSlice];
#pragma unroll
  for (int c = 0; c < kSlice; ++c) accumulator[c] = 0.f;
  float running_max = -INFINITY, running_sum = 0.f;

  for (int key_begin = 0; key_begin < geometry.keys; key_begin += kKeyTile) {
    const int key_count = min(kKeyTile, geometry.keys - key_begin);
    __syncthreads();  // the previous tile is fully consumed
    load_rows(k + key_base + static_cast<int64_t>(key_begin) * D, key_count, kKeyTile, D, stride, key_rows);
    load_rows(v + key_base + static_cast<int64_t>(key_begin) * D, key_count, kKeyTile, D, stride, value_rows);
    load_rows(key_positions + static_cast<int64_t>(key_begin) * 2, key_count, kKeyTile, 2, 2, key_pos);
    __syncthreads();

#pragma unroll
    for (int round = 0; round < kPairsPerThread; ++round) {
      const int i = pair_query(round), j = pair_key(round);
      float logit = -INFINITY;
      if (i < query_count && j < key_count) {
        logit = scale * dot_rows(query_rows + i * stride, key_rows + j * stride, D);
        if (table != nullptr) {
          BilinearTaps<float> taps;
          logit += pair_bias(table, geometry, query_pos + 2 * i, key_pos + 2 * j, taps);
        }
      }
      logits[i * layout.score_stride + j] = logit;
    }
    __syncthreads();

    if (row_valid) {
      const float* row_logits = logits + row * layout.score_stride;
      float block_max = -INFINITY;
      for (int j = 0; j < key_count; ++j) block_max = fmaxf(block_max, row_logits[j]);
      const float factor = online_softmax_rescale(running_max, running_sum, block_max);
#pragma unroll
      for (int c = 0; c < kSlice; ++c) accumulator[c] *= factor;
      for (int j = 0; j < key_count; ++j) {
        const float weight = exp_of(row_logits[j] - running_max);
        running_sum += weight;
        const float* value = value_rows + j * stride;
#pragma unroll
        for (int c = 0; c < kSlice; ++c) {
          const int d = lane + c * kLanesPerQuery;
          if (d < D) accumulator[c] += weight * value[d];
        }
      }
    }
  }

  if (row_valid) {
    const float inverse_sum = 1.f / running_sum;
    scalar_t* out_row = out + query_base + static_cast<int64_t>(row) * D;
#pragma unroll
    for (int c = 0; c < kSlice; ++c) {
      const int d = lane + c * kLanesPerQuery;
      if (d < D) out_row[d] = static_cast<scalar_t>(accumulator[c] * inverse_sum);
    }
    if (lane == 0) {
      logsumexp[static_cast<int64_t>(tile.batch_head) * geometry.queries + query_begin + row] =
          running_max + log_of(running_sum);
    }
  }
}

template <typename scalar_t, int kSlice>
__global__ void __launch_bounds__(kThreads)
    deform_attn_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                                const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                const float* __restrict__ kpos, const float* __restrict__ qpos,
                                const float* __restrict__ rpe, const scalar_t* __restrict__ out,
                                const float* __restrict__ logsumexp, float scale, KernelGeometry geometry,
                                bool table_grad_in_shared, scalar_t* __restrict__ grad_q,
                                float* __restrict__ grad_k, float* __restrict__ grad_v,
                                float* __restrict__ grad_kpos, float* __restrict__ grad_rpe) {
  DAT_DYNAMIC_SHARED(float, shared);
  const int table_size = geometry.table_height * geometry.table_width;
  const SharedLayout layout(geometry.head_dim, true, table_grad_in_shared ? table_size : 0);
  float* query_rows = shared + layout.query_rows;
  float* grad_out_rows = shared + layout.query_rows_2;
  float* key_rows = shared + layout.key_rows;
  float* value_rows = shared + layout.value_rows;
  float* probs = shared + layout.scores;
  float* grad_logits = shared + layout.grad_scores;
  float* query_pos = shared + layout.query_pos;
  float* key_pos = shared + layout.key_pos;
  float* row_logsumexp = shared + layout.per_query;
  float* row_delta = row_logsumexp + kQueryTile;

  const int D = geometry.head_dim, stride = layout.row_stride, score_stride = layout.score_stride;
  const BlockTile tile(geometry);
  const int query_begin = tile.query_begin, query_count = tile.query_count;
  const int64_t query_base = tile.query_base, key_base = tile.key_base, key_pos_base = tile.key_pos_base;
  const float* table = rpe != nullptr ? rpe + tile.table_base : nullptr;
  float* table_grad = table == nullptr         ? nullptr
                      : table_grad_in_shared ? shared + layout.table
                                             : grad_rpe + tile.table_base;

  load_rows(q + query_base, query_count, kQueryTile, D, stride, query_rows);
  load_rows(grad_out + query_base, query_count, kQueryTile, D, stride, grad_out_rows);
  load_rows(qpos + static_cast<int64_t>(query_begin) * 2, query_count, kQueryTile, 2, 2, query_pos);
  if (table != nullptr && table_grad_in_shared) {
    for (int e = threadIdx.x; e < table_size; e += kThreads) table_grad[e] = 0.f;
  }

  const int row = threadIdx.x / kLanesPerQuery, lane = threadIdx.x % kLanesPerQuery;
  const bool row_valid = row < query_count;
  {
    // delta_i = <grad_out_i, out_i>, reduced over the kLanesPerQuery threads of the row.
    float partial = 0.f;
    if (row_valid) {
      const scalar_t* out_row = out + query_base + static_cast<int64_t>(row) * D;
      const scalar_t* grad_row = grad_out + query_base + static_cast<int64_t>(row) * D;
      for (int d = lane; d < D; d += kLanesPerQuery) partial += to_float(grad_row[d]) * to_float(out_row[d]);
    }
#pragma unroll
    for (int offset = kLanesPerQuery / 2; offset > 0; offset /= 2) partial += __shfl_xor_sync(0xffffffffu, partial, offset);
    if (lane == 0) {
      row_delta[row] = partial;
      row_logsumexp[row] =
          row_valid ? logsumexp[static_cast<int64_t>(tile.batch_head) * geometry.queries + query_begin + row] : 0.f;
    }
  }

  float grad_query[kSlice];
#pragma unroll
  for (int c = 0; c < kSlice; ++c) grad_query[c] = 0.f;

  const int key_slot = threadIdx.x / kLanesPerKey, key_lane = threadIdx.x % kLanesPerKey;
  for (int key_begin = 0; key_begin < geometry.keys; key_begin += kKeyTile) {
    const int key_count = min(kKeyTile, geometry.keys - key_begin);
    __syncthreads();
    load_rows(k + key_base + static_cast<int64_t>(key_begin) * D, key_count, kKeyTile, D, stride, key_rows);
    load_rows(v + key_base + static_cast<int64_t>(key_begin) * D, key_count, kKeyTile, D, stride, value_rows);
    load_rows(kpos + key_pos_base + static_cast<int64_t>(key_begin) * 2, key_count, kKeyTile, 2, 2, key_pos);
    __syncthreads();

    // Pair phase: probabilities recomputed from the saved logsumexp, and logit gradients.
#pragma unroll
    for (int round = 0; round < kPairsPerThread; ++round) {
      const int i = pair_query(round), j = pair_key(round);
      float prob = 0.f, grad_logit = 0.f;
      if (i < query_count && j < key_count) {
        float logit = scale * dot_rows(query_rows + i * stride, key_rows + j * stride, D);
        if (table != nullptr) {
          BilinearTaps<float> taps;
          logit += pair_bias(table, geometry, query_pos + 2 * i, key_pos + 2 * j, taps);
        }
        prob = exp_of(logit - row_logsumexp[i]);
        const float grad_prob = dot_rows(grad_out_rows + i * stride, value_rows + j * stride, D);
        grad_logit = softmax_logit_grad(prob, grad_prob, row_delta[i]);
      }
      probs[i * score_stride + j] = prob;
      grad_logits[i * score_stride + j] = grad_logit;
    }
    __syncthreads();

    // Query phase: grad_q_i += sum_j grad_logit_ij * k_j (scaled at the end).
    if (row_valid) {
      const float* row_grads = grad_logits + row * score_stride;
      for (int j = 0; j < key_count; ++j) {
        const float grad_logit = row_grads[j];
        const float* key = key_rows + j * stride;
#pragma unroll
        for (int c = 0; c < kSlice; ++c) {
          const int d = lane + c * kLanesPerQuery;
          if (d < D) grad_query[c] += grad_logit * key[d];
        }
      }
    }

    // Key phase: grad_k_j = scale * sum_i grad_logit_ij q_i, grad_v_j = sum_i p_ij grad_out_i, and the bias
    // gradients of the pairs (i, j) for i = key_lane + c * kLanesPerKey.
    const int j = key_slot;
    const bool key_valid = j < key_count;
    if (key_valid) {
      const int64_t key_row = key_base + static_cast<int64_t>(key_begin + j) * D;
      for (int d = key_lane; d < D; d += kLanesPerKey) {
        float sum_k = 0.f, sum_v = 0.f;
        for (int i = 0; i < query_count; ++i) {
          sum_k += grad_logits[i * score_stride + j] * query_rows[i * stride + d];
          sum_v += probs[i * score_stride + j] * grad_out_rows[i * stride + d];
        }
        atomicAdd(grad_k + key_row + d, scale * sum_k);
        atomicAdd(grad_v + key_row + d, sum_v);
      }
    }
    if (table != nullptr) {
      float grad_disp_row = 0.f, grad_disp_col = 0.f;
      if (key_valid) {
        for (int i = key_lane; i < query_count; i += kLanesPerKey) {
          const float grad_logit = grad_logits[i * score_stride + j];
          if (grad_logit == 0.f) continue;
          const BilinearTaps<float> taps = bias_taps<float>(query_pos[2 * i], query_pos[2 * i + 1], key_pos[2 * j],
                                                            key_pos[2 * j + 1], geometry.table_height,
                                                            geometry.table_width);
          bilinear_sample_backward(
              table, geometry.table_height, geometry.table_width, taps, grad_logit,
              [table_grad](int32_t offset, float value) { atomicAdd(table_grad + offset, value); }, grad_disp_row,
              grad_disp_col);
        }
      }
#pragma unroll
      for (int offset = kLanesPerKey / 2; offset > 0; offset /= 2) {
        grad_disp_row += __shfl_xor_sync(0xffffffffu, grad_disp_row, offset);
        grad_disp_col += __shfl_xor_sync(0xffffffffu, grad_disp_col, offset);
      }
      if (key_valid && key_lane == 0) {
        float* grad_position = grad_kpos + key_pos_base + static_cast<int64_t>(key_begin + j) * 2;
        const float per_position = -static_cast<float>(kDisplacementPerPosition);
        atomicAdd(grad_position, per_position * grad_disp_row);
        atomicAdd(grad_position + 1, per_position * grad_disp_col);
      }
    }
  }

  if (row_valid) {
    scalar_t* grad_row = grad_q + query_base + static_cast<int64_t>(row) * D;
#pragma unroll
    for (int c = 0; c < kSlice; ++c) {
      const int d = lane + c * kLanesPerQuery;
      if (d < D) grad_row[d] = static_cast<scalar_t>(grad_query[c] * scale);
    }
  }
  if (table != nullptr && table_grad_in_shared) {
    __syncthreads();
    float* global_table_grad = grad_rpe + tile.table_base;
    for (int e = threadIdx.x; e < table_size; e += kThreads) {
      if (table_grad[e] != 0.f) atomicAdd(global_table_grad + e, table_grad[e]);
    }
  }
}

// The limits of these kernels (common/kernel_limits.h), besides shared memory (check_shared_bytes): the dtypes
// they are built for, the register slices of head_dim, the grid's y dimension (one row of blocks per
// (batch, head)) and the int fields of KernelGeometry.
constexpr at::ScalarType kDtypes[] = {at::kFloat, at::kHalf, at::kBFloat16};
constexpr int64_t kMaxBatchHeads = 65535;
constexpr int64_t kMaxTokens = kMaxInt32;

// Checks the limits before anything is allocated; the forward and the backward kernels share them, except for
// their shared memory (the backward's without the table gradient, which moves to global memory where it does
// not fit).
KernelGeometry check_limits(const Problem& geometry, at::ScalarType dtype, bool backward) {
  check_kernel_dtype(dtype, kDtypes, "dat::deform_attn", "CUDA");
  TORCH_CHECK_VALUE(geometry.head_dim <= kMaxHeadDim, "dat::deform_attn: the CUDA kernel supports head_dim up to ",
                    kMaxHeadDim, ", got ", geometry.head_dim);
  TORCH_CHECK_VALUE(geometry.batch * geometry.heads <= kMaxBatchHeads,
                    "dat::deform_attn: the CUDA kernel supports batch x heads up to ", kMaxBatchHeads, ", got ",
                    geometry.batch * geometry.heads);
  TORCH_CHECK_VALUE(geometry.queries <= kMaxTokens && geometry.keys <= kMaxTokens,
                    "dat::deform_attn: the CUDA kernel supports up to ", kMaxTokens, " queries and keys, got ",
                    geometry.queries, " and ", geometry.keys);
  check_shared_bytes(SharedLayout(static_cast<int>(geometry.head_dim), backward, 0).bytes(),
                     backward ? "dat::deform_attn_backward" : "dat::deform_attn");
  return KernelGeometry{static_cast<int>(geometry.batch),        static_cast<int>(geometry.heads),
                        static_cast<int>(geometry.groups),       static_cast<int>(geometry.queries),
                        static_cast<int>(geometry.keys),         static_cast<int>(geometry.head_dim),
                        static_cast<int>(geometry.table_height), static_cast<int>(geometry.table_width)};
}

// The shared memory check_limits asks for, as fixed + per_head_dim * head_dim bytes (the layout is linear in
// head_dim).
LimitsJson shared_bytes_json(bool backward) {
  const size_t fixed = SharedLayout(0, backward, 0).bytes();
  return LimitsJson()
      .number("fixed", static_cast<int64_t>(fixed))
      .number("per_head_dim", static_cast<int64_t>(SharedLayout(1, backward, 0).bytes() - fixed));
}

// What check_limits enforces, for dat/ops/deform_attn.py.
std::string limits_json() {
  return LimitsJson()
      .dtypes("dtypes", kDtypes)
      .number("max_head_dim", kMaxHeadDim)
      .number("max_batch_heads", kMaxBatchHeads)
      .number("max_tokens", kMaxTokens)
      .number("default_shared_bytes", static_cast<int64_t>(kDefaultSharedBytes))
      .object("forward_shared_bytes", shared_bytes_json(false))
      .object("backward_shared_bytes", shared_bytes_json(true))
      .str();
}

// Calls fn.template operator()<scalar_t, kSlice>() for the input dtype and the smallest register slice
// holding head_dim / kLanesPerQuery channels.
template <typename Fn>
void dispatch_kernel(at::ScalarType dtype, int64_t head_dim, Fn&& fn) {
  auto with_slice = [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    if (head_dim <= 32) {
      fn.template operator()<scalar_t, 32 / kLanesPerQuery>();
    } else if (head_dim <= 64) {
      fn.template operator()<scalar_t, 64 / kLanesPerQuery>();
    } else {
      fn.template operator()<scalar_t, kMaxHeadDim / kLanesPerQuery>();
    }
  };
  switch (dtype) {
    case at::kFloat:
      with_slice(float{});
      break;
    case at::kHalf:
      with_slice(at::Half{});
      break;
    case at::kBFloat16:
      with_slice(at::BFloat16{});
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "dat::deform_attn: check_limits admits ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor> deform_attn_forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                            const at::Tensor& v_in, const at::Tensor& kpos_in,
                                                            const at::Tensor& qpos_in,
                                                            const std::optional<at::Tensor>& rpe_in, double scale) {
  const Problem geometry = check_inputs(q_in, k_in, v_in, kpos_in, qpos_in, rpe_in);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const KernelGeometry kernel = check_limits(geometry, q_in.scalar_type(), /*backward=*/false);
  const ContiguousInputs inputs(q_in, k_in, v_in, kpos_in, qpos_in, rpe_in, at::kFloat);
  at::Tensor out = at::empty_like(inputs.q);
  at::Tensor logsumexp =
      at::empty({geometry.batch, geometry.heads, geometry.queries}, inputs.q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, logsumexp};

  const SharedLayout layout(kernel.head_dim, false, 0);
  const dim3 grid((kernel.queries + kQueryTile - 1) / kQueryTile, kernel.batch * kernel.heads);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_kernel(inputs.q.scalar_type(), geometry.head_dim, [&]<typename scalar_t, int kSlice>() {
    auto* kernel_fn = deform_attn_forward_kernel<scalar_t, kSlice>;
    reserve_shared_bytes(kernel_fn, layout.bytes(), "dat::deform_attn");
    launch_kernel(kernel_fn, grid, kThreads, layout.bytes(), stream, inputs.q.data_ptr<scalar_t>(),
                  inputs.k.data_ptr<scalar_t>(), inputs.v.data_ptr<scalar_t>(), inputs.kpos.data_ptr<float>(),
                  inputs.qpos.data_ptr<float>(), inputs.table<float>(), static_cast<float>(scale), kernel,
                  out.data_ptr<scalar_t>(), logsumexp.data_ptr<float>());
  });
  return {out, logsumexp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_attn_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& kpos_in, const at::Tensor& qpos_in, const std::optional<at::Tensor>& rpe_in,
    const at::Tensor& out_in, const at::Tensor& logsumexp_in, double scale) {
  const Problem geometry =
      check_backward_inputs(grad_out_in, q_in, k_in, v_in, kpos_in, qpos_in, rpe_in, out_in, logsumexp_in);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const KernelGeometry kernel = check_limits(geometry, q_in.scalar_type(), /*backward=*/true);
  const ContiguousInputs inputs(q_in, k_in, v_in, kpos_in, qpos_in, rpe_in, at::kFloat);
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous();
  const at::Tensor logsumexp = logsumexp_in.contiguous();
  const at::TensorOptions accumulate = inputs.q.options().dtype(at::kFloat);

  at::Tensor grad_q = at::empty_like(inputs.q);
  at::Tensor grad_k = at::zeros(inputs.k.sizes(), accumulate);
  at::Tensor grad_v = at::zeros(inputs.v.sizes(), accumulate);
  at::Tensor grad_kpos = at::zeros(inputs.kpos.sizes(), accumulate);
  at::Tensor grad_rpe = at::zeros(inputs.rpe.defined() ? inputs.rpe.sizes() : at::IntArrayRef{0}, accumulate);

  if (grad_q.numel() > 0) {
    // grad_rpe is accumulated per block in shared memory (cheap shared atomics, one flush per block)
    // when one head's table fits next to the tiles; otherwise straight into global memory.
    const int table_size = kernel.table_height * kernel.table_width;
    const SharedLayout with_table(kernel.head_dim, true, table_size);
    const bool table_grad_in_shared = inputs.rpe.defined() && with_table.bytes() <= max_shared_bytes();
    const SharedLayout layout(kernel.head_dim, true, table_grad_in_shared ? table_size : 0);
    const dim3 grid((kernel.queries + kQueryTile - 1) / kQueryTile, kernel.batch * kernel.heads);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_kernel(inputs.q.scalar_type(), geometry.head_dim, [&]<typename scalar_t, int kSlice>() {
      auto* kernel_fn = deform_attn_backward_kernel<scalar_t, kSlice>;
      reserve_shared_bytes(kernel_fn, layout.bytes(), "dat::deform_attn_backward");
      launch_kernel(kernel_fn, grid, kThreads, layout.bytes(), stream, grad_out.data_ptr<scalar_t>(),
                    inputs.q.data_ptr<scalar_t>(), inputs.k.data_ptr<scalar_t>(), inputs.v.data_ptr<scalar_t>(),
                    inputs.kpos.data_ptr<float>(), inputs.qpos.data_ptr<float>(), inputs.table<float>(),
                    out.data_ptr<scalar_t>(), logsumexp.data_ptr<float>(), static_cast<float>(scale), kernel,
                    table_grad_in_shared, grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<float>(),
                    grad_v.data_ptr<float>(), grad_kpos.data_ptr<float>(), grad_rpe.data_ptr<float>());
    });
  }
  const at::ScalarType dtype = inputs.q.scalar_type();
  return {grad_q, grad_k.to(dtype), grad_v.to(dtype), grad_kpos.to(kpos_in.scalar_type()),
          grad_rpe.to(rpe_in.has_value() ? rpe_in->scalar_type() : dtype)};
}

}  // namespace
}  // namespace deform_attn
}  // namespace dat

TORCH_LIBRARY_FRAGMENT(DAT_OP_NAMESPACE, m) {
  m.def("deform_attn_cuda_limits() -> str", &dat::deform_attn::limits_json);
}

TORCH_LIBRARY_IMPL(DAT_OP_NAMESPACE, DAT_CUDA_DISPATCH_KEY, m) {
  m.impl("deform_attn", &dat::deform_attn::deform_attn_forward_cuda);
  m.impl("deform_attn_backward", &dat::deform_attn::deform_attn_backward_cuda);
}
