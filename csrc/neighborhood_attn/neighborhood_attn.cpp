// Schemas of 2-D neighborhood attention (definition in neighborhood_attn_math.h and
// dat/ops/neighborhood_attn.py). The forward returns the output and the attention probabilities
// (B, heads, H, W, k*k) in the accumulation dtype (float for half/bfloat16), which the backward reuses.
#include "common/library.h"

TORCH_LIBRARY_FRAGMENT(DAT_OP_NAMESPACE, m) {
  m.def(
      "neighborhood_attn(Tensor q, Tensor k, Tensor v, Tensor rpb, int kernel_size, int dilation, float scale)"
      " -> (Tensor out, Tensor attn)");
  m.def(
      "neighborhood_attn_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor attn, int kernel_size,"
      " int dilation, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_rpb)");
}
