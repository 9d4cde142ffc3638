"""Deformable attention with a bilinear relative-position bias (the attention core of DAT and DAT++).

    out[b, m, i] = sum_j softmax_j(scale * <q[b, m, i], k[b, m, j]> + bias[b, m, i, j]) * v[b, m, j]

`bias[b, m, i, j]` is `grid_sample(rpe[m], (qpos[i] - kpos[b, g(m), j]) * 0.5)` with bilinear
interpolation, `align_corners=True` and zeros outside the table, where g(m) = m // (M // G) is the
offset group of head m. Positions are (y, x) pairs normalised to [-1, 1]; the table may have any
size (it is trained at one resolution and used at every other).

Shapes: q (B, M, Nq, D); k, v (B, M, Nk, D); kpos (B, G, Nk, 2); qpos (Nq, 2); rpe (M, Th, Tw) or None.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._extension import FusedOpBinding, bind_fused_op, resolve_impl, unsupported_dtype

OP = 'dat::deform_attn'
# Table cells are indexed with int32 in the kernels.
MAX_TABLE_ELEMENTS = 2 ** 31 - 1
# Elements of one (queries x keys) score block in the reference; bounds its peak memory.
REFERENCE_BLOCK_ELEMENTS = 1 << 22

# Input dtypes the fused kernels are built for, per device type.
FUSED_DTYPES = {
    'cpu': (torch.float32, torch.float64),
    'cuda': (torch.float32, torch.float16, torch.bfloat16),
}


def check_deformable_attention_inputs(q, k, v, kpos, qpos, rpe) -> None:
    """The checks of the C++ op (csrc/deform_attn/deform_attn.cpp), in its order, with its messages and exception
    types (ValueError for shapes and devices, TypeError for dtypes); torch._check_* so that fake tensors and
    symbolic shapes go through them under torch.compile."""
    def check(condition, message, kind=torch._check_value):
        kind(condition, lambda: f'{OP}: {message()}')

    check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
          lambda: f'q, k, v must be (B, heads, N, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    check(q.is_floating_point(), lambda: f'needs floating-point tensors, got {q.dtype}', torch._check_type)
    B, M, Nq, D = q.shape
    Nk = k.shape[2]
    check(k.shape == v.shape and k.shape[0] == B and k.shape[1] == M and k.shape[3] == D,
          lambda: f'k and v must be (B={B}, heads={M}, Nk, head_dim={D}); got {tuple(k.shape)} and {tuple(v.shape)}')
    check(Nk > 0, lambda: 'needs at least one key')
    check(kpos.dim() == 4 and kpos.shape[0] == B and kpos.shape[2] == Nk and kpos.shape[3] == 2,
          lambda: f'kpos must be (B={B}, groups, Nk={Nk}, 2); got {tuple(kpos.shape)}')
    G = kpos.shape[1]
    check(G > 0 and M % G == 0, lambda: f'{M} heads cannot be split evenly into {G} offset groups')
    check(qpos.dim() == 2 and qpos.shape[0] == Nq and qpos.shape[1] == 2,
          lambda: f'qpos must be (Nq={Nq}, 2); got {tuple(qpos.shape)}')
    named = dict(k=k, v=v, kpos=kpos, qpos=qpos, **({'rpe': rpe} if rpe is not None else {}))
    for name, tensor in named.items():
        if name == 'rpe':
            check(rpe.dim() == 3 and rpe.shape[0] == M and rpe.shape[1] > 0 and rpe.shape[2] > 0,
                  lambda: f'rpe must be (heads={M}, Th, Tw) with a non-empty table; got {tuple(rpe.shape)}')
            check(rpe.shape[1] * rpe.shape[2] <= MAX_TABLE_ELEMENTS,
                  lambda: f'relative-position table of {rpe.shape[1]} x {rpe.shape[2]} is too large')
        check(tensor.dtype == q.dtype, lambda: f'{name} has dtype {tensor.dtype} but q has {q.dtype}',
              torch._check_type)
        check(tensor.device == q.device, lambda: f'{name} is on {tensor.device} but q is on {q.device}')


def relative_position_bias(rpe: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """Bias (B, M, Nq, Nk) sampled from rpe (M, Th, Tw) at (qpos - kpos) / 2, the official rule."""
    B, G, Nk, _ = kpos.shape
    M = rpe.shape[0]
    displacement = (qpos[None, None, :, None, :] - kpos[:, :, None, :, :]) * 0.5  # B, G, Nq, Nk, (y, x)
    table = rpe.unsqueeze(0).expand(B, -1, -1, -1).reshape(B * G, M // G, rpe.shape[1], rpe.shape[2])
    bias = F.grid_sample(table, displacement.flip(-1).reshape(B * G, -1, Nk, 2),
                         mode='bilinear', padding_mode='zeros', align_corners=True)
    return bias.reshape(B, M, -1, Nk)


def reference_logits(q, k, kpos, qpos, rpe: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """The official (queries x keys) attention logits: scaled dot products plus the sampled bias."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if rpe is not None:
        scores = scores + relative_position_bias(rpe, qpos, kpos)
    return scores


def _reference_block(q, k, v, kpos, qpos, rpe: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """The official math for a block of queries: full (queries x keys) scores, bias, softmax."""
    return torch.matmul(reference_logits(q, k, kpos, qpos, rpe, scale).softmax(dim=-1), v)


def deformable_attention_reference(q, k, v, kpos, qpos, rpe: Optional[torch.Tensor], scale: float,
                                   block_elements: Optional[int] = REFERENCE_BLOCK_ELEMENTS) -> torch.Tensor:
    """The official math, evaluated over blocks of queries so that no (Nq x Nk) tensor is whole.

    When gradients are needed each block is checkpointed (recomputed in backward), so backward memory
    is bounded by the block size too. `block_elements=None` evaluates the official math in one piece,
    exactly as the original implementation does (the benchmarks' baseline).
    """
    B, M, Nq, _ = q.shape
    Nk = k.shape[2]
    chunk = Nq if block_elements is None else max(1, block_elements // max(1, B * M * Nk))
    if chunk >= Nq:
        return _reference_block(q, k, v, kpos, qpos, rpe, scale)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, kpos, qpos, rpe))
    outputs = []
    for start in range(0, Nq, chunk):
        block = (q[:, :, start:start + chunk], k, v, kpos, qpos[start:start + chunk], rpe, scale)
        outputs.append(checkpoint(_reference_block, *block, use_reentrant=False) if needs_grad
                       else _reference_block(*block))
    return torch.cat(outputs, dim=2)


def deformable_attention(q, k, v, kpos, qpos, rpe: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                         impl: Optional[str] = None) -> torch.Tensor:
    """Dispatch to the fused `dat::deform_attn` op or the pure-PyTorch reference (see module docstring).

    `impl` is 'auto' (default: fused when built for the device and dtype), 'fused' or 'reference';
    when None, the `DAT_ATTN_IMPL` environment variable decides.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if resolve_impl(impl, 'deform_attn', q.device.type, unsupported_dtype(q.dtype, q.device.type, FUSED_DTYPES)) == 'fused':
        return torch.ops.dat.deform_attn(q, k, v, kpos, qpos, rpe, scale)[0]
    check_deformable_attention_inputs(q, k, v, kpos, qpos, rpe)
    return deformable_attention_reference(q, k, v, kpos, qpos, rpe, scale)


def logsumexp_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the op's logsumexp output for inputs of `dtype`."""
    # Mirrors logsumexp_dtype() in csrc/deform_attn/deform_attn.h.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(q, k, v, kpos, qpos, rpe, scale):
    check_deformable_attention_inputs(q, k, v, kpos, qpos, rpe)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=logsumexp_dtype(q.dtype))


def _fake_backward(grad_out, q, k, v, kpos, qpos, rpe, out, logsumexp, scale):
    check_deformable_attention_inputs(q, k, v, kpos, qpos, rpe)
    grad_rpe = rpe.new_empty(rpe.shape) if rpe is not None else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), kpos.new_empty(kpos.shape), grad_rpe


def _setup_context(ctx, inputs, output):
    q, k, v, kpos, qpos, rpe, scale = inputs
    out, logsumexp = output
    ctx.save_for_backward(q, k, v, kpos, qpos, rpe, out, logsumexp)
    ctx.scale = scale
    # logsumexp is saved for the backward; it is not a differentiable result.
    ctx.mark_non_differentiable(logsumexp)


def _backward(ctx, backward_op, grad_out, _grad_logsumexp):
    q, k, v, kpos, qpos, rpe, out, logsumexp = ctx.saved_tensors
    grad_q, grad_k, grad_v, grad_kpos, grad_rpe = backward_op(grad_out, q, k, v, kpos, qpos, rpe, out, logsumexp,
                                                              ctx.scale)
    return grad_q, grad_k, grad_v, grad_kpos, None, grad_rpe if rpe is not None else None, None


bind_fused_op(FusedOpBinding('deform_attn', _fake_forward, _fake_backward, _setup_context, _backward))
