"""Deformable attention with a bilinear relative-position bias (the attention core of DAT and DAT++).

    out[b, m, i] = sum_j softmax_j(scale * <q[b, m, i], k[b, m, j]> + bias[b, m, i, j]) * v[b, m, j]

`bias[b, m, i, j]` is `grid_sample(rpe[m], (qpos[i] - kpos[b, g(m), j]) * 0.5)` with bilinear
interpolation, `align_corners=True` and zeros outside the table, where g(m) = m // (M // G) is the
offset group of head m. Positions are (y, x) pairs normalised to [-1, 1]; the table may have any
size (it is trained at one resolution and used at every other).

Shapes: q (B, M, Nq, D); k, v (B, M, Nk, D); kpos (B, G, Nk, 2); qpos (Nq, 2); rpe (M, Th, Tw) or None.

Dtypes: k, v have q's dtype; kpos, qpos and rpe have it too, or are float32 when q is float16 or
bfloat16. Pass float32 positions with half-precision q, k, v: a position rounded to bfloat16 is off by
up to 2^-9 of its value, which moves the sampled bias (and its gradient) by as much. That is the mix
autocast and half-precision weights produce (`dat.precision`): kernels and reference compute it in float32
and return q's dtype.
"""
from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dat.precision import HALF_DTYPES, autocast_disabled, cast_floating, full_precision
from ._extension import (FusedOpBinding, Refusal, autograd_will_run, bind_fused_op, check_input, dtype_refusal,
                         read_kernel_limits, resolve_impl, shared_memory_refusal)

OP_NAME = 'deform_attn'
OP = f'dat::{OP_NAME}'
# Table cells are indexed with int32 in the kernels.
MAX_TABLE_ELEMENTS = 2 ** 31 - 1
# Elements of one (queries x keys) score block in the reference; bounds its peak memory.
REFERENCE_BLOCK_ELEMENTS = 1 << 22
# What each built kernel exports about the calls it takes, per device type (see `fused_refusal`).
KERNEL_LIMITS = read_kernel_limits(OP_NAME)


def check_deformable_attention_inputs(q, k, v, kpos, qpos, rpe) -> None:
    """The checks of the C++ op (csrc/deform_attn/deform_attn.cpp), in its order, with its messages and exception
    types (ValueError for shapes and devices, TypeError for dtypes); torch._check_* so that fake tensors and
    symbolic shapes go through them under torch.compile."""
    def check(condition, message, kind=torch._check_value):
        check_input(OP, condition, message, kind)

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
        position = name in ('kpos', 'qpos', 'rpe')
        float32_beside_half = position and tensor.dtype == torch.float32 and q.dtype in HALF_DTYPES
        check(tensor.dtype == q.dtype or float32_beside_half,
              lambda: f'{name} has dtype {tensor.dtype} but q has {q.dtype}' + (
                  " (kpos, qpos and rpe take q's dtype, or float32 when q is float16 or bfloat16)" if position else ''),
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
    as the original implementation does (the benchmarks' baseline).

    Half-precision inputs are computed on float32 copies and the output is rounded to q's dtype once, as the
    fused kernels do; autocast is disabled inside, so that under autocast the reference computes what the
    kernels compute.
    """
    with autocast_disabled(q.device.type):
        out = _blockwise_reference(*cast_floating(full_precision(q.dtype), q, k, v, kpos, qpos, rpe), scale,
                                   block_elements)
    return out.to(q.dtype)


def _blockwise_reference(q, k, v, kpos, qpos, rpe: Optional[torch.Tensor], scale: float,
                         block_elements: Optional[int]) -> torch.Tensor:
    B, M, Nq, _ = q.shape
    Nk = k.shape[2]
    chunk = Nq if block_elements is None else max(1, block_elements // max(1, B * M * Nk))
    if chunk >= Nq:
        return _reference_block(q, k, v, kpos, qpos, rpe, scale)
    needs_grad = autograd_will_run(q, k, v, kpos, qpos, rpe)
    outputs = []
    for start in range(0, Nq, chunk):
        block = (q[:, :, start:start + chunk], k, v, kpos, qpos[start:start + chunk], rpe, scale)
        outputs.append(checkpoint(_reference_block, *block, use_reentrant=False) if needs_grad
                       else _reference_block(*block))
    return torch.cat(outputs, dim=2)


def fused_refusal(device: Union[str, torch.device], dtype: torch.dtype, *, batch: int, heads: int, queries: int,
                  keys: int, head_dim: int, table_height: int = 0, table_width: int = 0, backward: bool = False,
                  limits: Optional[dict] = None, shared_memory_limit: Optional[int] = None) -> Optional[Refusal]:
    """Why the fused kernel for `device` refuses a call of these sizes, or None when it takes it: the checks of
    its `check_limits` (csrc/deform_attn/<device>/), in their order and with their messages, over the limits it
    exports. A table of 0 x 0 is no table.

    `backward` asks about the backward kernel too (autograd will run it); `limits` and `shared_memory_limit`
    default to this build's kernel and to the device's opt-in shared memory per block.
    """
    device = torch.device(device)
    limits = KERNEL_LIMITS.get(device.type) if limits is None else limits
    refusal = dtype_refusal(OP, device.type, dtype, limits)
    if refusal is not None:
        return refusal
    if device.type == 'cpu':
        padding = limits['cell_padding']
        cells = (table_height + padding) * (table_width + padding) * limits['coefficients_per_cell']
        if cells > limits['max_cell_coefficients']:
            return Refusal(f'{OP}: the CPU kernel cannot index a relative-position table of {table_height} x '
                           f'{table_width} (too large)')
        return None
    if head_dim > limits['max_head_dim']:
        return Refusal(f'{OP}: the CUDA kernel supports head_dim up to {limits["max_head_dim"]}, got {head_dim}')
    if batch * heads > limits['max_batch_heads']:
        return Refusal(f'{OP}: the CUDA kernel supports batch x heads up to {limits["max_batch_heads"]}, '
                       f'got {batch * heads}')
    if queries > limits['max_tokens'] or keys > limits['max_tokens']:
        return Refusal(f'{OP}: the CUDA kernel supports up to {limits["max_tokens"]} queries and keys, '
                       f'got {queries} and {keys}')

    def shared_refusal(kernel: str, layout: str) -> Optional[Refusal]:
        need = limits[layout]['fixed'] + limits[layout]['per_head_dim'] * head_dim
        return shared_memory_refusal(kernel, need, limits, device, shared_memory_limit)

    refusal = shared_refusal(OP, 'forward_shared_bytes')
    if refusal is None and backward:
        refusal = shared_refusal(f'{OP}_backward', 'backward_shared_bytes')
    return refusal


def fused_problem(q, k, v, kpos, qpos, rpe: Optional[torch.Tensor]) -> Dict[str, Any]:
    """The sizes of a call that the fused kernels' limits depend on (the keywords of `fused_refusal`), once the
    op's checks passed; while torch.compile traces, the op's fake kernel checks instead."""
    if not torch.compiler.is_compiling():
        check_deformable_attention_inputs(q, k, v, kpos, qpos, rpe)
    batch, heads, queries, head_dim = q.shape
    table_height, table_width = rpe.shape[1:] if rpe is not None else (0, 0)
    return dict(batch=batch, heads=heads, queries=queries, keys=k.shape[2], head_dim=head_dim,
                table_height=table_height, table_width=table_width,
                backward=autograd_will_run(q, k, v, kpos, qpos, rpe))


def deformable_attention(q, k, v, kpos, qpos, rpe: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                         impl: Optional[str] = None) -> torch.Tensor:
    """Dispatch to the fused `dat::deform_attn` op or the pure-PyTorch reference (see module docstring).

    `impl` is 'auto' (default: fused where it is built for the device and its kernel takes the call, see
    `fused_refusal`), 'fused' or 'reference'; when None, the `DAT_ATTN_IMPL` environment variable decides.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if resolve_impl(impl, OP_NAME, q.device.type,
                    lambda: fused_refusal(q.device, q.dtype, **fused_problem(q, k, v, kpos, qpos, rpe))) == 'fused':
        return torch.ops.dat.deform_attn(q, k, v, kpos, qpos, rpe, scale)[0]
    check_deformable_attention_inputs(q, k, v, kpos, qpos, rpe)
    return deformable_attention_reference(q, k, v, kpos, qpos, rpe, scale)


def _fake_forward(q, k, v, kpos, qpos, rpe, scale):
    check_deformable_attention_inputs(q, k, v, kpos, qpos, rpe)
    # The logsumexp is in the accumulation dtype, as logsumexp_dtype() in csrc/deform_attn/deform_attn.h says.
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=full_precision(q.dtype))


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


bind_fused_op(FusedOpBinding(OP_NAME, _fake_forward, _fake_backward, _setup_context, _backward))
