// CPU kernels of dat::deform_attn (float64, float32, and float16 / bfloat16 computed in float32).
//
// Flash style: a work item is one (batch, offset group, query tile); keys are streamed in tiles
// through an online softmax, so no (Nq x Nk) tensor exists and memory stays linear in Nq + Nk. The
// matrix products of a tile (Q K^T and P V; in backward also dO V^T, P^T dO, dS^T Q and dS K) go to
// ATen's BLAS. The bias of a pair is interpolated inside one cell of the table; the cell and the
// in-cell position are computed once per pair and reused by every head of the offset group.
//
// float16 / bfloat16 q, k, v (and grad_out) stay in their dtype: each tile's rows are converted to
// float32 in the worker's workspace before its products (a key tile once per query tile, about
// 1 / (2 x query tile) of the products' work), everything accumulates in float32, and out and the
// gradients are rounded to their inputs' dtypes once. No float32 copy of the inputs exists, and no
// pass over them runs outside the kernel's one parallel region. Positions and table (small) are
// converted to float32 once per call, or used as they are when the caller passes them in float32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/cpu_exp.h"
#include "common/cpu_isa.h"
#include "common/kernel_limits.h"
#include "common/library.h"
#include "deform_attn/deform_attn.h"
#include "deform_attn/deform_attn_math.h"

namespace dat {
namespace deform_attn {
namespace {

// Tile bounds: a logit tile of at most 64 x 512 pairs and its pair cells stay in L2 (about 0.5 MB in
// float32). With fewer keys the query tile grows (up to 256 queries), so that the products stay large
// enough for BLAS to pay off.
constexpr int64_t kMaxKeyTile = 512;
constexpr int64_t kMaxTilePairs = 64 * kMaxKeyTile;
constexpr int64_t kMaxQueryTile = 256;

struct Tile {
  int64_t begin;
  int64_t count;
};

// `count` tiles of `size` elements (the last one shorter) over a length, as even as the bound allows.
struct Tiling {
  int64_t size;
  int64_t count;

  Tiling(int64_t length, int64_t max_size)
      : size(0), count(std::max<int64_t>(1, (length + max_size - 1) / max_size)) {
    size = (length + count - 1) / count;
  }
  Tile tile(int64_t index, int64_t length) const {
    const int64_t begin = index * size;
    return Tile{begin, std::min(size, length - begin)};
  }
};

// The relative-position table as cells: the bilinear sample at in-cell position (fr, fc) of the
// cell whose top-left corner is (r, c) is a + b fr + c fc + d fr fc with a = T[r][c],
// b = T[r+1][c] - a, c = T[r][c+1] - a, d = T[r+1][c+1] - T[r+1][c] - T[r][c+1] + a. The table is
// padded with kCellPadding rows/columns of zeros before and one after, so every cell that
// grid_sample(align_corners=True, zeros padding) can touch (top-left corner in [-1, size - 1]) has
// four real-or-zero corners, and cell 0 (all zero) stands for every pair outside the table: sampling
// needs no bounds checks, and such pairs' gradients go to coefficients that are thrown away.
constexpr int32_t kCellPadding = 2;
constexpr int64_t kCoefficientsPerCell = 4;

struct CellGrid {
  int64_t rows;
  int64_t columns;

  CellGrid(int64_t table_height, int64_t table_width)
      : rows(table_height + kCellPadding), columns(table_width + kCellPadding) {}
  int64_t size() const { return rows * columns * kCoefficientsPerCell; }  // coefficients per head
};

// The limits of these kernels (common/kernel_limits.h): the dtypes they are built for, and pair cells
// hold int32 coefficient offsets, so a head's coefficients must be indexable with int32.
constexpr at::ScalarType kDtypes[] = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
constexpr int64_t kMaxCellCoefficients = kMaxInt32;

void check_limits(const Problem& geometry, at::ScalarType dtype) {
  check_kernel_dtype(dtype, kDtypes, "dat::deform_attn", "CPU");
  TORCH_CHECK_VALUE(CellGrid(geometry.table_height, geometry.table_width).size() <= kMaxCellCoefficients,
                    "dat::deform_attn: the CPU kernel cannot index a relative-position table of ",
                    geometry.table_height, " x ", geometry.table_width, " (too large)");
}

// What check_limits enforces, for dat/ops/deform_attn.py.
std::string limits_json() {
  return LimitsJson()
      .dtypes("dtypes", kDtypes)
      .number("cell_padding", kCellPadding)
      .number("coefficients_per_cell", kCoefficientsPerCell)
      .number("max_cell_coefficients", kMaxCellCoefficients)
      .str();
}

// rpe (M, Th, Tw) -> coefficients (M, Th + 2, Tw + 2, 4), see CellGrid.
at::Tensor cell_coefficients(const at::Tensor& rpe) {
  const at::Tensor padded = at::constant_pad_nd(rpe, {kCellPadding, 1, kCellPadding, 1});
  const CellGrid cells(rpe.size(1), rpe.size(2));
  const auto corner = [&](int64_t down, int64_t right) {
    return padded.slice(1, down, down + cells.rows).slice(2, right, right + cells.columns);
  };
  const at::Tensor top_left = corner(0, 0), top_right = corner(0, 1);
  const at::Tensor bottom_left = corner(1, 0), bottom_right = corner(1, 1);
  return at::stack({top_left, bottom_left - top_left, top_right - top_left,
                    bottom_right - bottom_left - top_right + top_left},
                   -1)
      .contiguous();
}

// Gradients of the coefficients (M, Th + 2, Tw + 2, 4) -> gradient of rpe (M, Th, Tw): the transpose
// of cell_coefficients.
at::Tensor table_gradient(const at::Tensor& grad_coefficients, int64_t table_height, int64_t table_width) {
  const CellGrid cells(table_height, table_width);
  at::Tensor padded = at::zeros({grad_coefficients.size(0), cells.rows + 1, cells.columns + 1},
                                grad_coefficients.options());
  const auto corner = [&](int64_t down, int64_t right) {
    return padded.slice(1, down, down + cells.rows).slice(2, right, right + cells.columns);
  };
  const std::vector<at::Tensor> grad = grad_coefficients.unbind(-1);
  corner(0, 0).add_(grad[0] - grad[1] - grad[2] + grad[3]);
  corner(1, 0).add_(grad[1] - grad[3]);
  corner(0, 1).add_(grad[2] - grad[3]);
  corner(1, 1).add_(grad[3]);
  return padded.slice(1, kCellPadding, kCellPadding + table_height)
      .slice(2, kCellPadding, kCellPadding + table_width)
      .contiguous();
}

// c = alpha * op(a) @ op(b) + beta * c for row-major matrices (op = transpose or not; m x n result,
// inner size k), through ATen's BLAS. beta = 0 ignores c's contents.
template <typename scalar_t>
void matmul(const scalar_t* a, int64_t lda, bool transpose_a, const scalar_t* b, int64_t ldb, bool transpose_b,
            scalar_t* c, int64_t ldc, int64_t m, int64_t n, int64_t k, scalar_t alpha, scalar_t beta) {
  const at::TensorOptions options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const auto matrix = [&](const scalar_t* data, int64_t rows, int64_t columns, int64_t leading, bool transposed) {
    if (!transposed) return at::from_blob(const_cast<scalar_t*>(data), {rows, columns}, {leading, 1}, options);
    return at::from_blob(const_cast<scalar_t*>(data), {columns, rows}, {leading, 1}, options).t();
  };
  matrix(c, m, n, ldc, false).addmm_(matrix(a, m, k, lda, transpose_a), matrix(b, k, n, ldb, transpose_b), beta,
                                     alpha);
}

struct WorkItem {
  int64_t batch;
  int64_t group;
  Tile queries;
};

// scalar_t is the type the kernel computes in (float or double); input_t the type of q, k, v, out and the
// gradients of q, k, v: scalar_t itself, or float16 / bfloat16 beside float.
template <typename scalar_t, typename input_t>
struct Operands {
  const input_t* q;
  const input_t* k;
  const input_t* v;
  const scalar_t* kpos;
  const scalar_t* qpos;
  const scalar_t* cell_coefficients;  // (M, cells), see CellGrid; nullptr when there is no bias
  scalar_t scale;
  Problem geometry;
  Tiling key_tiling;  // before query_tiling, which depends on it
  Tiling query_tiling;
  CellGrid cells;

  Operands(const ContiguousInputs& inputs, const at::Tensor& coefficients, double scale_in, const Problem& geometry_in)
      : q(inputs.q.data_ptr<input_t>()), k(inputs.k.data_ptr<input_t>()), v(inputs.v.data_ptr<input_t>()),
        kpos(inputs.kpos.data_ptr<scalar_t>()), qpos(inputs.qpos.data_ptr<scalar_t>()),
        cell_coefficients(coefficients.defined() ? coefficients.data_ptr<scalar_t>() : nullptr),
        scale(static_cast<scalar_t>(scale_in)), geometry(geometry_in), key_tiling(geometry.keys, kMaxKeyTile),
        query_tiling(geometry.queries, std::min(kMaxQueryTile, kMaxTilePairs / key_tiling.size)),
        cells(geometry.table_height, geometry.table_width) {}

  bool has_bias() const { return cell_coefficients != nullptr; }
  const scalar_t* coefficients(int64_t head) const { return cell_coefficients + head * cells.size(); }
  // Offsets (in elements) of the (b, head, query) and (b, head, key) vectors and of a key position.
  int64_t query_offset(int64_t b, int64_t head, int64_t query) const {
    return ((b * geometry.heads + head) * geometry.queries + query) * geometry.head_dim;
  }
  int64_t key_offset(int64_t b, int64_t head, int64_t key) const {
    return ((b * geometry.heads + head) * geometry.keys + key) * geometry.head_dim;
  }
  int64_t kpos_offset(int64_t b, int64_t group, int64_t key) const {
    return ((b * geometry.groups + group) * geometry.keys + key) * 2;
  }
  int64_t work_item_count() const { return geometry.batch * geometry.groups * query_tiling.count; }
  WorkItem work_item(int64_t index) const {
    return WorkItem{index / (query_tiling.count * geometry.groups), (index / query_tiling.count) % geometry.groups,
                    query_tiling.tile(index % query_tiling.count, geometry.queries)};
  }
};

// What the backward reads besides the forward inputs.
template <typename scalar_t, typename input_t>
struct BackwardOperands {
  const input_t* grad_out;
  const input_t* out;
  const scalar_t* logsumexp;
};

// Key-side gradient buffers owned by one worker; workers never share them, and they are summed at the end.
template <typename scalar_t>
struct GradientSinks {
  scalar_t* k;
  scalar_t* v;
  scalar_t* kpos;
  scalar_t* coefficients;  // (M, cells)
};

// Cell (index of its coefficient block) and in-cell position of each pair of a tile, row-major.
template <typename scalar_t>
struct PairCells {
  std::vector<int32_t> cell;
  std::vector<scalar_t> frac_row;
  std::vector<scalar_t> frac_col;

  explicit PairCells(int64_t pairs) : cell(pairs), frac_row(pairs), frac_col(pairs) {}
};

// One worker's buffers, sized for the largest tiles.
template <typename scalar_t>
struct Workspace {
  PairCells<scalar_t> pairs;
  std::vector<scalar_t> logits;         // query tile x key tile: logits, then weights / probabilities
  std::vector<scalar_t> grad_logits;    // query tile x key tile (backward)
  std::vector<scalar_t> accumulators;   // heads of the group x query tile x head_dim: out, or grad_q / scale
  std::vector<scalar_t> running_max;    // heads of the group x query tile
  std::vector<scalar_t> running_sum;
  std::vector<scalar_t> deltas;         // <grad_out, out> per row (backward)
  std::vector<scalar_t> grad_key_frac;  // 2 per key of the tile (backward)
  // One head's q and grad_out rows of the query tile and k and v rows of the key tile, converted to
  // scalar_t; empty when the inputs already are scalar_t (the products then read them in place).
  std::vector<scalar_t> query_rows;
  std::vector<scalar_t> grad_out_rows;
  std::vector<scalar_t> key_rows;
  std::vector<scalar_t> value_rows;

  template <typename input_t>
  explicit Workspace(const Operands<scalar_t, input_t>& ops)
      : pairs(ops.has_bias() ? ops.query_tiling.size * ops.key_tiling.size : 0),
        logits(ops.query_tiling.size * ops.key_tiling.size),
        grad_logits(ops.query_tiling.size * ops.key_tiling.size),
        accumulators(ops.geometry.heads_per_group() * ops.query_tiling.size * ops.geometry.head_dim),
        running_max(ops.geometry.heads_per_group() * ops.query_tiling.size),
        running_sum(running_max.size()), deltas(running_max.size()), grad_key_frac(2 * ops.key_tiling.size) {
    if constexpr (!std::is_same_v<scalar_t, input_t>) {
      query_rows.resize(ops.query_tiling.size * ops.geometry.head_dim);
      grad_out_rows.resize(query_rows.size());
      key_rows.resize(ops.key_tiling.size * ops.geometry.head_dim);
      value_rows.resize(key_rows.size());
    }
  }
};

// The kernels, for the baseline instruction set and AVX2 + FMA (common/cpu_isa.h); the products are BLAS
// calls either way, the clones are for the bias, softmax and exp loops.
#define DAT_CPU_KERNELS "deform_attn/cpu/deform_attn_cpu_kernels.h"
#include "common/cpu_kernels_for_each_isa.h"

std::tuple<at::Tensor, at::Tensor> deform_attn_forward_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                           const at::Tensor& v_in, const at::Tensor& kpos_in,
                                                           const at::Tensor& qpos_in,
                                                           const std::optional<at::Tensor>& rpe_in, double scale) {
  const Problem geometry = check_inputs(q_in, k_in, v_in, kpos_in, qpos_in, rpe_in);
  check_limits(geometry, q_in.scalar_type());
  const at::ScalarType compute_dtype = at::toOpMathType(q_in.scalar_type());
  const ContiguousInputs inputs(q_in, k_in, v_in, kpos_in, qpos_in, rpe_in, compute_dtype);
  const at::Tensor& q = inputs.q;
  at::Tensor out = at::empty_like(q);
  // logsumexp_dtype() is the compute dtype, so the kernel writes it directly.
  at::Tensor logsumexp = at::empty({geometry.batch, geometry.heads, geometry.queries},
                                   q.options().dtype(logsumexp_dtype(q.scalar_type())));
  if (out.numel() == 0) return {out, logsumexp};
  const at::Tensor coefficients = inputs.rpe.defined() ? cell_coefficients(inputs.rpe) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "deform_attn_forward_cpu", [&] {
    using input_t = scalar_t;
    using compute_t = at::opmath_type<input_t>;
    const Operands<compute_t, input_t> ops(inputs, coefficients, scale, geometry);
    input_t* out_data = out.data_ptr<input_t>();
    compute_t* logsumexp_data = logsumexp.data_ptr<compute_t>();
    at::parallel_for(0, ops.work_item_count(), 1, [&](int64_t begin, int64_t end) {
      DAT_CPU_ISA_CALL(forward_items, ops, begin, end, out_data, logsumexp_data);
    });
  });
  return {out, logsumexp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_attn_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& kpos_in, const at::Tensor& qpos_in, const std::optional<at::Tensor>& rpe_in,
    const at::Tensor& out_in, const at::Tensor& logsumexp_in, double scale) {
  const Problem geometry =
      check_backward_inputs(grad_out_in, q_in, k_in, v_in, kpos_in, qpos_in, rpe_in, out_in, logsumexp_in);
  check_limits(geometry, q_in.scalar_type());
  const at::ScalarType compute_dtype = at::toOpMathType(q_in.scalar_type());
  const ContiguousInputs inputs(q_in, k_in, v_in, kpos_in, qpos_in, rpe_in, compute_dtype);
  const at::Tensor &q = inputs.q, &k = inputs.k, &v = inputs.v, &kpos = inputs.kpos, &rpe = inputs.rpe;
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous();
  const at::Tensor logsumexp = logsumexp_in.contiguous();
  const at::Tensor coefficients = rpe.defined() ? cell_coefficients(rpe) : at::Tensor();
  const CellGrid cells(geometry.table_height, geometry.table_width);

  // Work is split into one contiguous range of work items per worker, each with its own key-side
  // gradient buffers (keys are shared by all query tiles): no races, and a result that does not
  // depend on scheduling. Extra memory: workers x (|k| + |v| + |kpos| + 4 |padded rpe|), in the compute
  // dtype.
  at::Tensor grad_q = at::zeros_like(q);
  at::Tensor grad_k, grad_v, grad_kpos, grad_coefficients;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "deform_attn_backward_cpu", [&] {
    using input_t = scalar_t;
    using compute_t = at::opmath_type<input_t>;
    const Operands<compute_t, input_t> ops(inputs, coefficients, scale, geometry);
    const int64_t items = ops.work_item_count();
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
    const at::TensorOptions accumulate = q.options().dtype(compute_dtype);
    grad_k = at::zeros({workers, k.numel()}, accumulate);
    grad_v = at::zeros({workers, v.numel()}, accumulate);
    grad_kpos = at::zeros({workers, kpos.numel()}, accumulate);
    grad_coefficients = at::zeros({workers, rpe.defined() ? geometry.heads * cells.size() : 0}, accumulate);
    if (q.numel() == 0) return;
    const BackwardOperands<compute_t, input_t> saved{grad_out.data_ptr<input_t>(), out.data_ptr<input_t>(),
                                                     logsumexp.data_ptr<compute_t>()};
    input_t* grad_q_data = grad_q.data_ptr<input_t>();
    at::parallel_for(0, workers, 1, [&](int64_t worker_begin, int64_t worker_end) {
      for (int64_t worker = worker_begin; worker < worker_end; ++worker) {
        const GradientSinks<compute_t> sinks{
            grad_k[worker].data_ptr<compute_t>(), grad_v[worker].data_ptr<compute_t>(),
            grad_kpos[worker].data_ptr<compute_t>(), grad_coefficients[worker].data_ptr<compute_t>()};
        DAT_CPU_ISA_CALL(backward_items, ops, saved, items * worker / workers, items * (worker + 1) / workers, sinks,
                         grad_q_data);
      }
    });
  });
  at::Tensor grad_rpe = rpe.defined() ? table_gradient(grad_coefficients.sum(0).view({geometry.heads, cells.rows,
                                                                                         cells.columns, 4}),
                                                       geometry.table_height, geometry.table_width)
                                                .to(rpe_in->scalar_type())
                                      : q_in.new_empty({0});
  return {grad_q, grad_k.sum(0).view(k.sizes()).to(k_in.scalar_type()),
          grad_v.sum(0).view(v.sizes()).to(v_in.scalar_type()),
          grad_kpos.sum(0).view(kpos.sizes()).to(kpos_in.scalar_type()), grad_rpe};
}

}  // namespace
}  // namespace deform_attn
}  // namespace dat

TORCH_LIBRARY_FRAGMENT(DAT_OP_NAMESPACE, m) {
  m.def("deform_attn_cpu_limits() -> str", &dat::deform_attn::limits_json);
}

TORCH_LIBRARY_IMPL(DAT_OP_NAMESPACE, CPU, m) {
  m.impl("deform_attn", &dat::deform_attn::deform_attn_forward_cpu);
  m.impl("deform_attn_backward", &dat::deform_attn::deform_attn_backward_cpu);
}
