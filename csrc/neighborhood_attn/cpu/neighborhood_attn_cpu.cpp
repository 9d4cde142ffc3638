// CPU kernels of dat::neighborhood_attn: one fused pass per query row for the forward, a query-side
// and a key-side pass for the backward (each output element is written by exactly one task, so the
// results do not depend on the thread count), and one task per plane for the bias gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cpu_exp.h"
#include "common/cpu_isa.h"
#include "common/kernel_limits.h"
#include "common/library.h"
#include "neighborhood_attn/neighborhood_attn.h"
#include "neighborhood_attn/neighborhood_attn_math.h"

namespace dat {
namespace neighborhood_attn {
namespace {

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

// The row loops, for the baseline instruction set and AVX2 + FMA (about 2-3x faster here; common/cpu_isa.h).
#define DAT_CPU_KERNELS "neighborhood_attn/cpu/neighborhood_attn_cpu_kernels.h"
#include "common/cpu_kernels_for_each_isa.h"

// grad_rpb[m] sums the logit gradients of head m into the bias-table entries their (query, key) pairs read: each
// plane (batch, head) sums its own table, walking its window slots in the order the forward reads the bias, and
// the planes of a head are added in batch order, so that the result does not depend on the thread count.
template <typename scalar_t>
void bias_backward(const at::opmath_type<scalar_t>* grad_logits, scalar_t* grad_rpb, int64_t batch, const Problem& g,
                   const AxisTable& rows_table, const AxisTable& columns_table) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = g.kernel_size, H = g.height, W = g.width, side = g.table_side(), entries = side * side;
  std::vector<acc_t> plane_tables(batch * g.heads * entries, acc_t(0));
  at::parallel_for(0, batch * g.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      acc_t* table = plane_tables.data() + plane * entries;
      for (int64_t y = 0; y < H; ++y) {
        const int64_t bias_row = bias_offset(y, rows_table.start[y], K, g.dilation);
        for (int64_t x = 0; x < W; ++x) {
          const acc_t* dS = grad_logits + ((plane * H + y) * W + x) * g.window();
          acc_t* bias = table + bias_row * side + bias_offset(x, columns_table.start[x], K, g.dilation);
          for (int64_t ty = 0; ty < K; ++ty) {
#pragma omp simd
            for (int64_t tx = 0; tx < K; ++tx) bias[ty * side + tx] += dS[ty * K + tx];
          }
        }
      }
    }
  });
  for (int64_t head = 0; head < g.heads; ++head) {
    for (int64_t entry = 0; entry < entries; ++entry) {
      acc_t total = 0;
      for (int64_t b = 0; b < batch; ++b) total += plane_tables[(b * g.heads + head) * entries + entry];
      grad_rpb[head * entries + entry] = static_cast<scalar_t>(total);
    }
  }
}

// The limits of these kernels (common/kernel_limits.h): the dtypes they are built for.
constexpr at::ScalarType kDtypes[] = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};

// Checks the limits before anything is copied.
void check_limits(at::ScalarType dtype) { check_kernel_dtype(dtype, kDtypes, "dat::neighborhood_attn", "CPU"); }

// What check_limits enforces, for dat/ops/neighborhood_attn.py.
std::string limits_json() { return LimitsJson().dtypes("dtypes", kDtypes).str(); }

std::tuple<at::Tensor, at::Tensor> neighborhood_attn_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& rpb,
                                                         int64_t kernel_size, int64_t dilation, double scale) {
  const Problem problem = check_inputs(q, k, v, rpb, kernel_size, dilation);
  check_limits(q.scalar_type());
  ForwardTensors t = prepare_forward(problem, q, k, v, rpb);
  const Problem& g = t.problem;
  const AxisTable rows_table(g.height, kernel_size, dilation), columns_table(g.width, kernel_size, dilation);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "neighborhood_attn_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, q.size(0) * g.heads * g.height, 1, [&](int64_t begin, int64_t end) {
      DAT_CPU_ISA_CALL(forward_rows<scalar_t>, t.q.data_ptr<scalar_t>(), t.k.data_ptr<scalar_t>(),
                       t.v.data_ptr<scalar_t>(), t.rpb.data_ptr<scalar_t>(), t.out.data_ptr<scalar_t>(),
                       t.attn.data_ptr<acc_t>(), g, rows_table, columns_table, static_cast<acc_t>(scale), begin, end);
    });
  });
  return {t.out, t.attn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> neighborhood_attn_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& attn, int64_t kernel_size, int64_t dilation, double scale) {
  const Problem problem = check_backward_inputs(grad_out, q, k, v, attn, kernel_size, dilation);
  check_limits(q.scalar_type());
  BackwardTensors t = prepare_backward(problem, grad_out, q, k, v, attn);
  const Problem& g = t.problem;
  const int64_t rows = q.size(0) * g.heads * g.height;
  const AxisTable rows_table(g.height, kernel_size, dilation), columns_table(g.width, kernel_size, dilation);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "neighborhood_attn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      DAT_CPU_ISA_CALL(query_side_backward_rows<scalar_t>, t.grad_out.data_ptr<scalar_t>(), t.k.data_ptr<scalar_t>(),
                       t.v.data_ptr<scalar_t>(), t.attn.data_ptr<acc_t>(), t.grad_logits.data_ptr<acc_t>(),
                       t.grad_q.data_ptr<scalar_t>(), g, rows_table, columns_table, static_cast<acc_t>(scale), begin,
                       end);
    });
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      DAT_CPU_ISA_CALL(key_side_backward_rows<scalar_t>, t.grad_out.data_ptr<scalar_t>(), t.q.data_ptr<scalar_t>(),
                       t.attn.data_ptr<acc_t>(), t.grad_logits.data_ptr<acc_t>(), t.grad_k.data_ptr<scalar_t>(),
                       t.grad_v.data_ptr<scalar_t>(), g, rows_table, columns_table, static_cast<acc_t>(scale), begin,
                       end);
    });
    bias_backward<scalar_t>(t.grad_logits.data_ptr<acc_t>(), t.grad_rpb.data_ptr<scalar_t>(), q.size(0), g, rows_table,
                           columns_table);
  });
  return {t.grad_q, t.grad_k, t.grad_v, t.grad_rpb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(DAT_OP_NAMESPACE, m) { m.def("neighborhood_attn_cpu_limits() -> str", &limits_json); }

TORCH_LIBRARY_IMPL(DAT_OP_NAMESPACE, CPU, m) {
  m.impl("neighborhood_attn", &neighborhood_attn_cpu);
  m.impl("neighborhood_attn_backward", &neighborhood_attn_backward_cpu);
}

}  // namespace neighborhood_attn
}  // namespace dat
