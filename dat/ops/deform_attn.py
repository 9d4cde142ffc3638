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

from ._extension import NATIVE_IMPORT_ERROR, resolve_impl, unsupported_dtype

# Elements of one (queries x keys) score block in the reference; bounds its peak memory.
REFERENCE_BLOCK_ELEMENTS = 1 << 22

# Input dtypes the fused kernels are built for, per device type.
FUSED_DTYPES = {
    'cpu': (torch.float32, torch.float64),
    'cuda': (torch.float32, torch.float16, torch.bfloat16),
}


def check_deformable_attention_inputs(q, k, v, kpos, qpos, rpe) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f'q, k, v must be (B, heads, N, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, '
                         f'{tuple(v.shape)}')
    B, M, Nq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != M or k.shape[3] != D:
        raise ValueError(f'k and v must be (B={B}, heads={M}, Nk, head_dim={D}); got {tuple(k.shape)}, '
                         f'{tuple(v.shape)}')
    if kpos.dim() != 4 or kpos.shape[0] != B or kpos.shape[2] != k.shape[2] or kpos.shape[3] != 2:
        raise ValueError(f'kpos must be (B={B}, groups, Nk={k.shape[2]}, 2); got {tuple(kpos.shape)}')
    if M % kpos.shape[1] != 0:
        raise ValueError(f'{M} heads cannot be split evenly into {kpos.shape[1]} offset groups')
    if qpos.shape != (Nq, 2):
        raise ValueError(f'qpos must be (Nq={Nq}, 2); got {tuple(qpos.shape)}')
    if rpe is not None and (rpe.dim() != 3 or rpe.shape[0] != M):
        raise ValueError(f'rpe must be (heads={M}, Th, Tw); got {tuple(rpe.shape)}')
    if not q.is_floating_point():
        raise TypeError(f'deformable attention needs floating-point tensors, got {q.dtype}')
    tensors = [k, v, kpos, qpos] + ([rpe] if rpe is not None else [])
    if any(t.dtype != q.dtype for t in tensors) or any(t.device != q.device for t in tensors):
        raise TypeError('q, k, v, kpos, qpos and rpe must share one dtype and device; got '
                        + ', '.join(f'{t.dtype}@{t.device}' for t in [q] + tensors))


def relative_position_bias(rpe: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """Bias (B, M, Nq, Nk) sampled from rpe (M, Th, Tw) at (qpos - kpos) / 2, the official rule."""
    B, G, Nk, _ = kpos.shape
    M = rpe.shape[0]
    displacement = (qpos[None, None, :, None, :] - kpos[:, :, None, :, :]) * 0.5  # B, G, Nq, Nk, (y, x)
    table = rpe.unsqueeze(0).expand(B, -1, -1, -1).reshape(B * G, M // G, rpe.shape[1], rpe.shape[2])
    bias = F.grid_sample(table, displacement.flip(-1).reshape(B * G, -1, Nk, 2),
                         mode='bilinear', padding_mode='zeros', align_corners=True)
    return bias.reshape(B, M, -1, Nk)


def _reference_block(q, k, v, kpos, qpos, rpe: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """The official math for a block of queries: full (queries x keys) scores, bias, softmax."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if rpe is not None:
        scores = scores + relative_position_bias(rpe, qpos, kpos)
    return torch.matmul(scores.softmax(dim=-1), v)


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
    check_deformable_attention_inputs(q, k, v, kpos, qpos, rpe)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if resolve_impl(impl, 'deform_attn', q.device.type, unsupported_dtype(q.dtype, q.device.type, FUSED_DTYPES)) == 'fused':
        return torch.ops.dat.deform_attn(q, k, v, kpos, qpos, rpe, scale)[0]
    return deformable_attention_reference(q, k, v, kpos, qpos, rpe, scale)


def _logsumexp_dtype(dtype: torch.dtype) -> torch.dtype:
    # Mirrors logsumexp_dtype() in csrc/deform_attn/deform_attn.h.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fused_op() -> None:
    """Fake kernels (for torch.compile / meta tensors) and autograd for the native op, when it is built."""

    @torch.library.register_fake('dat::deform_attn')
    def _deform_attn_fake(q, k, v, kpos, qpos, rpe, scale):
        check_deformable_attention_inputs(q, k, v, kpos, qpos, rpe)
        out = q.new_empty(q.shape)
        return out, q.new_empty(q.shape[:3], dtype=_logsumexp_dtype(q.dtype))

    @torch.library.register_fake('dat::deform_attn_backward')
    def _deform_attn_backward_fake(grad_out, q, k, v, kpos, qpos, rpe, out, logsumexp, scale):
        check_deformable_attention_inputs(q, k, v, kpos, qpos, rpe)
        grad_rpe = rpe.new_empty(rpe.shape) if rpe is not None else q.new_empty((0,))
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), kpos.new_empty(kpos.shape), grad_rpe

    def setup_context(ctx, inputs, output):
        q, k, v, kpos, qpos, rpe, scale = inputs
        out, logsumexp = output
        ctx.save_for_backward(q, k, v, kpos, qpos, rpe, out, logsumexp)
        ctx.scale = scale
        # logsumexp is saved for the backward; it is not a differentiable result.
        ctx.mark_non_differentiable(logsumexp)

    def backward(ctx, grad_out, _grad_logsumexp):
        q, k, v, kpos, qpos, rpe, out, logsumexp = ctx.saved_tensors
        grad_q, grad_k, grad_v, grad_kpos, grad_rpe = torch.ops.dat.deform_attn_backward(
            grad_out, q, k, v, kpos, qpos, rpe, out, logsumexp, ctx.scale)
        return grad_q, grad_k, grad_v, grad_kpos, None, grad_rpe if rpe is not None else None, None

    torch.library.register_autograd('dat::deform_attn', backward, setup_context=setup_context)


if NATIVE_IMPORT_ERROR is None and hasattr(torch.ops.dat, 'deform_attn'):
    _register_fused_op()
