// Schemas of the fused deformable attention (see dat/ops/deform_attn.py for the semantics) and the
// input checks shared by its kernels.
#include "deform_attn/deform_attn.h"

#include <limits>

#include "common/library.h"

namespace dat {
namespace deform_attn {

namespace {

enum class Role { activation, position };

// `other` is on q's device and has q's dtype; a position or the table may instead be float32 when q is
// float16 or bfloat16.
void check_dtype_and_device(const at::Tensor& q, const at::Tensor& other, const char* name,
                            Role role = Role::activation) {
  const bool float32_beside_half = role == Role::position && other.scalar_type() == at::kFloat &&
                                   (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16);
  TORCH_CHECK_TYPE(other.scalar_type() == q.scalar_type() || float32_beside_half, "dat::deform_attn: ", name,
                   " has dtype ", other.scalar_type(), " but q has ", q.scalar_type(),
                   role == Role::position ? " (kpos, qpos and rpe take q's dtype, or float32 when q is float16 or "
                                            "bfloat16)"
                                          : "");
  TORCH_CHECK_VALUE(other.device() == q.device(), "dat::deform_attn: ", name, " is on ", other.device(),
                    " but q is on ", q.device());
}

}  // namespace

Problem check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kpos,
                     const at::Tensor& qpos, const std::optional<at::Tensor>& rpe) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "dat::deform_attn: q, k, v must be (B, heads, N, head_dim); got ", q.sizes(), ", ", k.sizes(), ", ",
                    v.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), "dat::deform_attn: needs floating-point tensors, got ",
                   q.scalar_type());
  Problem geometry{};
  geometry.batch = q.size(0);
  geometry.heads = q.size(1);
  geometry.queries = q.size(2);
  geometry.head_dim = q.size(3);
  geometry.keys = k.size(2);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes() && k.size(0) == geometry.batch && k.size(1) == geometry.heads &&
                        k.size(3) == geometry.head_dim,
                    "dat::deform_attn: k and v must be (B=", geometry.batch, ", heads=", geometry.heads,
                    ", Nk, head_dim=", geometry.head_dim, "); got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK_VALUE(geometry.keys > 0, "dat::deform_attn: needs at least one key");
  TORCH_CHECK_VALUE(
      kpos.dim() == 4 && kpos.size(0) == geometry.batch && kpos.size(2) == geometry.keys && kpos.size(3) == 2,
      "dat::deform_attn: kpos must be (B=", geometry.batch, ", groups, Nk=", geometry.keys, ", 2); got ", kpos.sizes());
  geometry.groups = kpos.size(1);
  TORCH_CHECK_VALUE(geometry.groups > 0 && geometry.heads % geometry.groups == 0, "dat::deform_attn: ", geometry.heads,
                    " heads cannot be split evenly into ", geometry.groups, " offset groups");
  TORCH_CHECK_VALUE(qpos.dim() == 2 && qpos.size(0) == geometry.queries && qpos.size(1) == 2,
                    "dat::deform_attn: qpos must be (Nq=", geometry.queries, ", 2); got ", qpos.sizes());
  check_dtype_and_device(q, k, "k");
  check_dtype_and_device(q, v, "v");
  check_dtype_and_device(q, kpos, "kpos", Role::position);
  check_dtype_and_device(q, qpos, "qpos", Role::position);
  if (rpe.has_value()) {
    TORCH_CHECK_VALUE(rpe->dim() == 3 && rpe->size(0) == geometry.heads && rpe->size(1) > 0 && rpe->size(2) > 0,
                      "dat::deform_attn: rpe must be (heads=", geometry.heads, ", Th, Tw) with a non-empty table; got ",
                      rpe->sizes());
    TORCH_CHECK_VALUE(rpe->size(1) * rpe->size(2) <= std::numeric_limits<int32_t>::max(),
                      "dat::deform_attn: relative-position table of ", rpe->size(1), " x ", rpe->size(2),
                      " is too large");
    check_dtype_and_device(q, *rpe, "rpe", Role::position);
    geometry.table_height = rpe->size(1);
    geometry.table_width = rpe->size(2);
  }
  return geometry;
}

Problem check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& kpos, const at::Tensor& qpos, const std::optional<at::Tensor>& rpe,
                              const at::Tensor& out, const at::Tensor& logsumexp) {
  const Problem geometry = check_inputs(q, k, v, kpos, qpos, rpe);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
                    "dat::deform_attn_backward: grad_out and out must have q's shape ", q.sizes(), "; got ",
                    grad_out.sizes(), " and ", out.sizes());
  check_dtype_and_device(q, grad_out, "grad_out");
  check_dtype_and_device(q, out, "out");
  const at::ScalarType lse_dtype = logsumexp_dtype(q.scalar_type());
  TORCH_CHECK_VALUE(logsumexp.sizes() == q.sizes().slice(0, 3) && logsumexp.scalar_type() == lse_dtype &&
                        logsumexp.device() == q.device(),
                    "dat::deform_attn_backward: logsumexp must be ", lse_dtype,
                    " (B, heads, Nq) = ", q.sizes().slice(0, 3), " on ", q.device(), "; got ", logsumexp.scalar_type(),
                    " ", logsumexp.sizes(), " on ", logsumexp.device());
  return geometry;
}

}  // namespace deform_attn
}  // namespace dat

TORCH_LIBRARY_FRAGMENT(DAT_OP_NAMESPACE, m) {
  m.def(
      "deform_attn(Tensor q, Tensor k, Tensor v, Tensor kpos, Tensor qpos, Tensor? rpe, float scale) "
      "-> (Tensor out, Tensor logsumexp)");
  // grad_rpe is an empty tensor when rpe is None; grad_kpos is zero then (positions only enter the bias).
  m.def(
      "deform_attn_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor kpos, Tensor qpos, Tensor? rpe, "
      "Tensor out, Tensor logsumexp, float scale) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_kpos, Tensor grad_rpe)");
}
