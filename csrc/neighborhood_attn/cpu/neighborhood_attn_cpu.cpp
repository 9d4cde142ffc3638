// CPU kernels of dat::neighborhood_attn: one fused pass per query row for the forward, a query-side
// and a key-side pass for the backward (each output element is written by exactly one task, so the
// results do not depend on the thread count), and one task per bias-table entry for its gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "neighborhood_attn/neighborhood_attn.h"
#include "neighborhood_attn/neighborhood_attn_math.h"

namespace dat {
namespace neighborhood_attn {
namespace {

// setup.py compiles for baseline x86-64 (SSE2); the hot loops also get an AVX2 + FMA clone that the
// loader picks on CPUs that have it (about 2-3x faster here).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DAT_HOT_LOOP __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DAT_HOT_LOOP
#endif

// Per index along one axis: its window start, the run of queries whose windows hold it, and its
// window slot in each of those queries' windows (at most 2k - 1 of them), computed once per call so
// the inner loops do no integer division.
struct AxisTable {
  int64_t max_run;
  std::vector<int64_t> start;
  std::vector<QueryRange> attending;
  std::vector<int64_t> slot_in_attending;  // [index * max_run + n]: slot in the n-th attending query's window
  AxisTable(int64_t length, int64_t kernel_size, int64_t dilation)
      : max_run(2 * kernel_size - 1), start(length), attending(length), slot_in_attending(length * max_run) {
    for (int64_t i = 0; i < length; ++i) start[i] = window_start(i, length, kernel_size, dilation);
    for (int64_t i = 0; i < length; ++i) {
      attending[i] = queries_attending(i, length, kernel_size, dilation);
      for (int64_t query = attending[i].first, n = 0; query <= attending[i].last; query += dilation, ++n) {
        slot_in_attending[i * max_run + n] = (i - start[query]) / dilation;
      }
    }
  }
};

template <typename acc_t, typename scalar_t>
inline acc_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  return sum;
}

template <typename acc_t, typename scalar_t>
inline void add_scaled(acc_t* accum, acc_t weight, const scalar_t* row, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) accum[i] += weight * static_cast<acc_t>(row[i]);
}

template <typename acc_t, typename scalar_t>
inline void store_scaled(scalar_t* destination, const acc_t* accum, acc_t factor, int64_t n) {
  for (int64_t i = 0; i < n; ++i) destination[i] = static_cast<scalar_t>(accum[i] * factor);
}

template <typename scalar_t>
DAT_HOT_LOOP void forward_rows(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* rpb,
                               scalar_t* out, at::opmath_type<scalar_t>* attn, const Geometry& g,
                               const AxisTable& rows_table, const AxisTable& columns_table,
                               at::opmath_type<scalar_t> scale, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = g.kernel_size, D = g.dim, W = g.width, H = g.height;
  std::vector<acc_t> accum(D);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t plane = row / H, y = row % H;
    const int64_t y0 = rows_table.start[y];
    const scalar_t* bias_rows = rpb + (plane % g.heads) * g.table_side() * g.table_side() +
                                bias_offset(y, y0, K, g.dilation) * g.table_side();
    for (int64_t x = 0; x < W; ++x) {
      const int64_t query = row * W + x;
      const int64_t x0 = columns_table.start[x];
      const scalar_t* bias = bias_rows + bias_offset(x, x0, K, g.dilation);
      const scalar_t* q_i = q + query * D;
      acc_t* logits = attn + query * g.window();
      acc_t max_logit = -std::numeric_limits<acc_t>::infinity();
      for (int64_t ty = 0; ty < K; ++ty) {
        const int64_t key_row = (plane * H + y0 + ty * g.dilation) * W;
        for (int64_t tx = 0; tx < K; ++tx) {
          const acc_t logit = dot<acc_t>(q_i, k + (key_row + x0 + tx * g.dilation) * D, D) * scale +
                              static_cast<acc_t>(bias[ty * g.table_side() + tx]);
          logits[ty * K + tx] = logit;
          max_logit = std::max(max_logit, logit);
        }
      }
      acc_t total = 0;
      for (int64_t t = 0; t < g.window(); ++t) {
        logits[t] = std::exp(logits[t] - max_logit);
        total += logits[t];
      }
      std::fill(accum.begin(), accum.end(), acc_t(0));
      for (int64_t ty = 0; ty < K; ++ty) {
        const int64_t key_row = (plane * H + y0 + ty * g.dilation) * W;
        for (int64_t tx = 0; tx < K; ++tx) {
          acc_t& probability = logits[ty * K + tx];
          probability /= total;
          add_scaled(accum.data(), probability, v + (key_row + x0 + tx * g.dilation) * D, D);
        }
      }
      store_scaled(out + query * D, accum.data(), acc_t(1), D);
    }
  }
}

// Gradient of the logits, dS = P * (dP - sum(P * dP)) with dP = <grad_out_i, v_j>, and of q.
template <typename scalar_t>
DAT_HOT_LOOP void query_side_backward_rows(const scalar_t* grad_out, const scalar_t* k, const scalar_t* v,
                                           const at::opmath_type<scalar_t>* attn,
                                           at::opmath_type<scalar_t>* grad_logits, scalar_t* grad_q,
                                           const Geometry& g, const AxisTable& rows_table,
                                           const AxisTable& columns_table, at::opmath_type<scalar_t> scale,
                                           int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = g.kernel_size, D = g.dim, W = g.width, H = g.height;
  std::vector<acc_t> accum(D);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t plane = row / H, y = row % H;
    const int64_t y0 = rows_table.start[y];
    for (int64_t x = 0; x < W; ++x) {
      const int64_t query = row * W + x;
      const int64_t x0 = columns_table.start[x];
      const acc_t* probabilities = attn + query * g.window();
      acc_t* dS = grad_logits + query * g.window();
      acc_t expected = 0;
      for (int64_t ty = 0; ty < K; ++ty) {
        const int64_t key_row = (plane * H + y0 + ty * g.dilation) * W;
        for (int64_t tx = 0; tx < K; ++tx) {
          const int64_t t = ty * K + tx;
          dS[t] = dot<acc_t>(grad_out + query * D, v + (key_row + x0 + tx * g.dilation) * D, D);
          expected += probabilities[t] * dS[t];
        }
      }
      std::fill(accum.begin(), accum.end(), acc_t(0));
      for (int64_t ty = 0; ty < K; ++ty) {
        const int64_t key_row = (plane * H + y0 + ty * g.dilation) * W;
        for (int64_t tx = 0; tx < K; ++tx) {
          const int64_t t = ty * K + tx;
          dS[t] = probabilities[t] * (dS[t] - expected);
          add_scaled(accum.data(), dS[t], k + (key_row + x0 + tx * g.dilation) * D, D);
        }
      }
      store_scaled(grad_q + query * D, accum.data(), scale, D);
    }
  }
}

// Gradients of k and v, gathered per key over the queries whose windows hold it.
template <typename scalar_t>
DAT_HOT_LOOP void key_side_backward_rows(const scalar_t* grad_out, const scalar_t* q,
                                         const at::opmath_type<scalar_t>* attn,
                                         const at::opmath_type<scalar_t>* grad_logits, scalar_t* grad_k,
                                         scalar_t* grad_v, const Geometry& g, const AxisTable& rows_table,
                                         const AxisTable& columns_table, at::opmath_type<scalar_t> scale,
                                         int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = g.kernel_size, D = g.dim, W = g.width, H = g.height, d = g.dilation;
  std::vector<acc_t> accum_k(D), accum_v(D);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t plane = row / H, y = row % H;
    const QueryRange rows_attending = rows_table.attending[y];
    const int64_t* row_slots = rows_table.slot_in_attending.data() + y * rows_table.max_run;
    for (int64_t x = 0; x < W; ++x) {
      const QueryRange columns_attending = columns_table.attending[x];
      const int64_t* column_slots = columns_table.slot_in_attending.data() + x * columns_table.max_run;
      std::fill(accum_k.begin(), accum_k.end(), acc_t(0));
      std::fill(accum_v.begin(), accum_v.end(), acc_t(0));
      for (int64_t qy = rows_attending.first, ny = 0; qy <= rows_attending.last; qy += d, ++ny) {
        for (int64_t qx = columns_attending.first, nx = 0; qx <= columns_attending.last; qx += d, ++nx) {
          const int64_t query = (plane * H + qy) * W + qx;
          const int64_t slot = query * g.window() + row_slots[ny] * K + column_slots[nx];
          add_scaled(accum_k.data(), grad_logits[slot], q + query * D, D);
          add_scaled(accum_v.data(), attn[slot], grad_out + query * D, D);
        }
      }
      const int64_t key = row * W + x;
      store_scaled(grad_k + key * D, accum_k.data(), scale, D);
      store_scaled(grad_v + key * D, accum_v.data(), acc_t(1), D);
    }
  }
}

// grad_rpb[m, oy + K - 1, ox + K - 1] sums the logit gradients of every (query, key) pair of head m
// that is (oy, ox) group positions apart.
template <typename scalar_t>
void bias_backward(const at::opmath_type<scalar_t>* grad_logits, scalar_t* grad_rpb, int64_t batch,
                   const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = g.kernel_size, H = g.height, W = g.width, side = g.table_side();
  std::vector<int64_t> row_slots(side * H), column_slots(side * W);
  for (int64_t offset = 0; offset < side; ++offset) {
    for (int64_t y = 0; y < H; ++y) row_slots[offset * H + y] = window_slot(y, offset - K + 1, H, K, g.dilation);
    for (int64_t x = 0; x < W; ++x) column_slots[offset * W + x] = window_slot(x, offset - K + 1, W, K, g.dilation);
  }
  at::parallel_for(0, g.heads * side * side, 1, [&](int64_t begin, int64_t end) {
    for (int64_t entry = begin; entry < end; ++entry) {
      const int64_t head = entry / (side * side), oy = (entry / side) % side, ox = entry % side;
      acc_t total = 0;
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t y = 0; y < H; ++y) {
          const int64_t ty = row_slots[oy * H + y];
          if (ty < 0) continue;
          const acc_t* row = grad_logits + ((b * g.heads + head) * H + y) * W * g.window() + ty * K;
          for (int64_t x = 0; x < W; ++x) {
            const int64_t tx = column_slots[ox * W + x];
            if (tx >= 0) total += row[x * g.window() + tx];
          }
        }
      }
      grad_rpb[entry] = static_cast<scalar_t>(total);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> neighborhood_attn_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& rpb,
                                                         int64_t kernel_size, int64_t dilation, double scale) {
  ForwardTensors t = prepare_forward(q, k, v, rpb, kernel_size, dilation);
  const Geometry g = geometry_of(t.q, kernel_size, dilation);
  const AxisTable rows_table(g.height, kernel_size, dilation), columns_table(g.width, kernel_size, dilation);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "neighborhood_attn_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, q.size(0) * g.heads * g.height, 1, [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t>(t.q.data_ptr<scalar_t>(), t.k.data_ptr<scalar_t>(), t.v.data_ptr<scalar_t>(),
                             t.rpb.data_ptr<scalar_t>(), t.out.data_ptr<scalar_t>(), t.attn.data_ptr<acc_t>(), g,
                             rows_table, columns_table, static_cast<acc_t>(scale), begin, end);
    });
  });
  return {t.out, t.attn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> neighborhood_attn_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& attn, int64_t kernel_size, int64_t dilation, double scale) {
  BackwardTensors t = prepare_backward(grad_out, q, k, v, attn, kernel_size, dilation);
  const Geometry g = geometry_of(t.q, kernel_size, dilation);
  const int64_t rows = q.size(0) * g.heads * g.height;
  const AxisTable rows_table(g.height, kernel_size, dilation), columns_table(g.width, kernel_size, dilation);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "neighborhood_attn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      query_side_backward_rows<scalar_t>(t.grad_out.data_ptr<scalar_t>(), t.k.data_ptr<scalar_t>(),
                                         t.v.data_ptr<scalar_t>(), t.attn.data_ptr<acc_t>(),
                                         t.grad_logits.data_ptr<acc_t>(), t.grad_q.data_ptr<scalar_t>(), g, rows_table,
                                         columns_table, static_cast<acc_t>(scale), begin, end);
    });
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      key_side_backward_rows<scalar_t>(t.grad_out.data_ptr<scalar_t>(), t.q.data_ptr<scalar_t>(),
                                       t.attn.data_ptr<acc_t>(), t.grad_logits.data_ptr<acc_t>(),
                                       t.grad_k.data_ptr<scalar_t>(), t.grad_v.data_ptr<scalar_t>(), g, rows_table,
                                       columns_table, static_cast<acc_t>(scale), begin, end);
    });
    bias_backward<scalar_t>(t.grad_logits.data_ptr<acc_t>(), t.grad_rpb.data_ptr<scalar_t>(), q.size(0), g);
  });
  return {t.grad_q, t.grad_k, t.grad_v, t.grad_rpb};
}

}  // namespace

TORCH_LIBRARY_IMPL(dat, CPU, m) {
  m.impl("neighborhood_attn", &neighborhood_attn_cpu);
  m.impl("neighborhood_attn_backward", &neighborhood_attn_backward_cpu);
}

}  // namespace neighborhood_attn
}  // namespace dat
