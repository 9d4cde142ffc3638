// CPU kernels of dat::deform_attn (float32, float64).
//
// Flash style: queries are processed in tiles and keys are streamed in tiles through an online
// softmax, so no (Nq x Nk) tensor ever exists and memory stays linear in Nq + Nk. A work item is one
// (batch, offset group, query tile): the heads of a group share the key positions, so the bilinear
// taps of a (query, key) pair are computed once and reused by every head of the group.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>
#include <vector>

#include "deform_attn/deform_attn.h"
#include "deform_attn/deform_attn_math.h"

namespace dat {
namespace deform_attn {
namespace {

constexpr int64_t kQueryTile = 32;
constexpr int64_t kKeyTile = 64;

template <typename scalar_t>
struct Operands {
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  const scalar_t* kpos;
  const scalar_t* qpos;
  const scalar_t* rpe;  // nullptr when there is no relative-position bias
  scalar_t scale;
  Geometry geometry;

  int64_t table_size() const { return geometry.table_height * geometry.table_width; }
  const scalar_t* table(int64_t head) const { return rpe + head * table_size(); }
  // Row offsets (in elements) of (b, head, query) and (b, head, key) vectors.
  int64_t query_offset(int64_t b, int64_t head, int64_t query) const {
    return ((b * geometry.heads + head) * geometry.queries + query) * geometry.head_dim;
  }
  int64_t key_offset(int64_t b, int64_t head, int64_t key) const {
    return ((b * geometry.heads + head) * geometry.keys + key) * geometry.head_dim;
  }
  int64_t kpos_offset(int64_t b, int64_t group, int64_t key) const {
    return ((b * geometry.groups + group) * geometry.keys + key) * 2;
  }
};

struct QueryTile {
  int64_t batch;
  int64_t group;
  int64_t begin;
  int64_t count;
};

int64_t query_tiles_per_row(const Geometry& geometry) { return (geometry.queries + kQueryTile - 1) / kQueryTile; }

int64_t query_tile_count(const Geometry& geometry) {
  return geometry.batch * geometry.groups * query_tiles_per_row(geometry);
}

QueryTile query_tile(int64_t index, const Geometry& geometry) {
  const int64_t per_row = query_tiles_per_row(geometry);
  QueryTile tile;
  tile.begin = (index % per_row) * kQueryTile;
  tile.count = std::min(kQueryTile, geometry.queries - tile.begin);
  tile.group = (index / per_row) % geometry.groups;
  tile.batch = index / (per_row * geometry.groups);
  return tile;
}

// Gradient buffers owned by one worker; workers never share them, and they are summed at the end.
template <typename scalar_t>
struct GradientSinks {
  scalar_t* k;
  scalar_t* v;
  scalar_t* kpos;
  scalar_t* rpe;
};

// Table-gradient sink for bilinear_sample_backward. Defined outside the instruction-set regions below
// (unlike a lambda there) so that GCC may inline it into the baseline-ISA math helpers.
template <typename scalar_t>
struct AddToTable {
  scalar_t* table;
  void operator()(int32_t offset, scalar_t value) const { table[offset] += value; }
};

// The kernels, compiled for the baseline instruction set and, on x86-64 with GCC, for AVX2 + FMA
// (an AVX-512 build measured no faster: the bias gathers, not the arithmetic, bound these loops).
namespace baseline {
#include "deform_attn/cpu/deform_attn_cpu_kernels.h"
}  // namespace baseline

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DAT_DEFORM_ATTN_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "deform_attn/cpu/deform_attn_cpu_kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

bool cpu_has_avx2() {
#ifdef DAT_DEFORM_ATTN_AVX2
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

template <typename scalar_t>
void run_forward_tiles(const Operands<scalar_t>& ops, int64_t begin, int64_t end, scalar_t* out,
                       scalar_t* logsumexp) {
#ifdef DAT_DEFORM_ATTN_AVX2
  if (cpu_has_avx2()) return avx2::forward_tiles(ops, begin, end, out, logsumexp);
#endif
  baseline::forward_tiles(ops, begin, end, out, logsumexp);
}

template <typename scalar_t>
void run_backward_tiles(const Operands<scalar_t>& ops, const scalar_t* grad_out, const scalar_t* out,
                        const scalar_t* logsumexp, int64_t begin, int64_t end, const GradientSinks<scalar_t>& sinks,
                        scalar_t* grad_q) {
#ifdef DAT_DEFORM_ATTN_AVX2
  if (cpu_has_avx2()) return avx2::backward_tiles(ops, grad_out, out, logsumexp, begin, end, sinks, grad_q);
#endif
  baseline::backward_tiles(ops, grad_out, out, logsumexp, begin, end, sinks, grad_q);
}

void check_cpu_dtype(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "dat::deform_attn on CPU supports float32 and float64, got ", q.scalar_type());
}

template <typename scalar_t>
Operands<scalar_t> make_operands(const ContiguousInputs& inputs, double scale, const Geometry& geometry) {
  return Operands<scalar_t>{inputs.q.data_ptr<scalar_t>(),    inputs.k.data_ptr<scalar_t>(),
                            inputs.v.data_ptr<scalar_t>(),    inputs.kpos.data_ptr<scalar_t>(),
                            inputs.qpos.data_ptr<scalar_t>(), inputs.table<scalar_t>(),
                            static_cast<scalar_t>(scale),     geometry};
}

std::tuple<at::Tensor, at::Tensor> deform_attn_forward_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                           const at::Tensor& v_in, const at::Tensor& kpos_in,
                                                           const at::Tensor& qpos_in,
                                                           const std::optional<at::Tensor>& rpe_in, double scale) {
  const Geometry geometry = check_forward_inputs(q_in, k_in, v_in, kpos_in, qpos_in, rpe_in);
  check_cpu_dtype(q_in);
  const ContiguousInputs inputs(q_in, k_in, v_in, kpos_in, qpos_in, rpe_in);
  const at::Tensor& q = inputs.q;
  at::Tensor out = at::empty_like(q);
  at::Tensor logsumexp = at::empty({geometry.batch, geometry.heads, geometry.queries},
                                   q.options().dtype(logsumexp_dtype(q.scalar_type())));
  if (out.numel() == 0) return {out, logsumexp};

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "deform_attn_forward_cpu", [&] {
    const Operands<scalar_t> ops = make_operands<scalar_t>(inputs, scale, geometry);
    scalar_t* out_data = out.data_ptr<scalar_t>();
    scalar_t* logsumexp_data = logsumexp.data_ptr<scalar_t>();
    at::parallel_for(0, query_tile_count(geometry), 1, [&](int64_t begin, int64_t end) {
      run_forward_tiles(ops, begin, end, out_data, logsumexp_data);
    });
  });
  return {out, logsumexp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_attn_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& kpos_in, const at::Tensor& qpos_in, const std::optional<at::Tensor>& rpe_in,
    const at::Tensor& out_in, const at::Tensor& logsumexp_in, double scale) {
  const Geometry geometry =
      check_backward_inputs(grad_out_in, q_in, k_in, v_in, kpos_in, qpos_in, rpe_in, out_in, logsumexp_in);
  check_cpu_dtype(q_in);
  const ContiguousInputs inputs(q_in, k_in, v_in, kpos_in, qpos_in, rpe_in);
  const at::Tensor &q = inputs.q, &k = inputs.k, &v = inputs.v, &kpos = inputs.kpos, &rpe = inputs.rpe;
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous();
  const at::Tensor logsumexp = logsumexp_in.contiguous();

  // Work is split into one contiguous range of query tiles per worker, each with its own key-side
  // gradient buffers (keys are shared by all query tiles): no races, and a result that does not
  // depend on scheduling. Extra memory: workers x (|k| + |v| + |kpos| + |rpe|).
  const int64_t tiles = query_tile_count(geometry);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  at::Tensor grad_q = at::zeros_like(q);
  at::Tensor grad_k_parts = at::zeros({workers, k.numel()}, k.options());
  at::Tensor grad_v_parts = at::zeros({workers, v.numel()}, v.options());
  at::Tensor grad_kpos_parts = at::zeros({workers, kpos.numel()}, kpos.options());
  at::Tensor grad_rpe_parts = at::zeros({workers, rpe.defined() ? rpe.numel() : 0}, q.options());

  if (tiles > 0) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "deform_attn_backward_cpu", [&] {
      const Operands<scalar_t> ops = make_operands<scalar_t>(inputs, scale, geometry);
      const scalar_t* grad_out_data = grad_out.data_ptr<scalar_t>();
      const scalar_t* out_data = out.data_ptr<scalar_t>();
      const scalar_t* logsumexp_data = logsumexp.data_ptr<scalar_t>();
      scalar_t* grad_q_data = grad_q.data_ptr<scalar_t>();
      at::parallel_for(0, workers, 1, [&](int64_t worker_begin, int64_t worker_end) {
        for (int64_t worker = worker_begin; worker < worker_end; ++worker) {
          const GradientSinks<scalar_t> sinks{grad_k_parts[worker].data_ptr<scalar_t>(),
                                              grad_v_parts[worker].data_ptr<scalar_t>(),
                                              grad_kpos_parts[worker].data_ptr<scalar_t>(),
                                              grad_rpe_parts[worker].data_ptr<scalar_t>()};
          run_backward_tiles(ops, grad_out_data, out_data, logsumexp_data, tiles * worker / workers,
                             tiles * (worker + 1) / workers, sinks, grad_q_data);
        }
      });
    });
  }
  at::Tensor grad_rpe = rpe.defined() ? grad_rpe_parts.sum(0).view(rpe.sizes()) : q.new_empty({0});
  return {grad_q, grad_k_parts.sum(0).view(k.sizes()), grad_v_parts.sum(0).view(v.sizes()),
          grad_kpos_parts.sum(0).view(kpos.sizes()), grad_rpe};
}

}  // namespace
}  // namespace deform_attn
}  // namespace dat

TORCH_LIBRARY_IMPL(dat, CPU, m) {
  m.impl("deform_attn", &dat::deform_attn::deform_attn_forward_cpu);
  m.impl("deform_attn_backward", &dat::deform_attn::deform_attn_backward_cpu);
}
