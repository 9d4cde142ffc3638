"""2-D neighborhood attention with a relative-position bias (the local attention of DAT++).

Numerically the attention of natten 0.14 (`natten2dqkrpb` + softmax + `natten2dav`), which DAT++'s
official code uses and which no longer builds against current PyTorch.

Shapes: q, k, v (B, M, H, W, D); rpb (M, 2k-1, 2k-1); output (B, M, H, W, D). Kernel size k is odd
and > 1, dilation d >= 1, and H, W >= k * d (callers pad smaller maps).

Window rule, per axis of length L: query i attends to k keys of its dilation group, the indices
congruent to i mod d. That group has Lg elements and i sits at position i // d in it; the window
starts at start = clamp(i // d - k // 2, 0, Lg - k) and key t is at index (start + t) * d + i % d.
Windows are clamped at the borders rather than zero padded, so every query sees k * k real keys.
This is natten 0.14's get_window_start / get_pb_start, restated in group coordinates.

    logit(i, j) = scale * <q_i, k_j> + rpb[m, (j_y - i_y) / d + k - 1, (j_x - i_x) / d + k - 1]
    out_i       = sum_j softmax_j(logit(i, j)) * v_j          (over the k * k keys j of i's window)

`scale` multiplies the dot products; None means D ** -0.5. DAT++ (like natten's layers) scales q
before calling natten, so its port passes scale=1.0 on a pre-scaled q, or the scale here on a raw q.

Precision (the policy of all ops: `dat.precision`): the kernels take fp16 and bf16 and accumulate logits,
softmax and weighted sums in fp32. An fp32 rpb next to half-precision q, k, v (what autocast produces) is
cast to q's dtype, which the op computes and returns in; the reference computes in fp32.
"""
from typing import Any, Dict, Optional, Tuple, Union

import torch

from dat.precision import HALF_DTYPES, autocast_disabled, cast_floating, full_precision
from dat.tracing import eager_lru_cache
from ._extension import (FusedOpBinding, Refusal, autograd_will_run, bind_fused_op, check_input, dtype_name,
                         dtype_refusal, grid_refusal, read_kernel_limits, resolve_impl, shared_memory_refusal)

OP_NAME = 'neighborhood_attn'
OP = f'dat::{OP_NAME}'
# What each built kernel exports about the calls it takes, per device type (see `fused_refusal`).
KERNEL_LIMITS = read_kernel_limits(OP_NAME)
# Elements of one gathered (queries x window x head_dim) block in the reference; bounds its forward memory.
REFERENCE_BLOCK_ELEMENTS = 1 << 23


def check_neighborhood_attention_inputs(q, k, v, rpb, kernel_size: int, dilation: int) -> None:
    """The checks of the C++ op (csrc/neighborhood_attn/neighborhood_attn.h), in its order, with its messages and
    exception types (ValueError for shapes, sizes and devices, TypeError for dtypes); torch._check_* so that fake
    tensors and symbolic shapes go through them under torch.compile."""
    def check(condition, message, kind=torch._check_value):
        check_input(OP, condition, message, kind)

    check(isinstance(kernel_size, int) and kernel_size > 1 and kernel_size % 2 == 1,
          lambda: f'kernel_size must be odd and > 1, got {kernel_size!r}')
    check(isinstance(dilation, int) and dilation >= 1, lambda: f'dilation must be >= 1, got {dilation!r}')
    check(q.dim() == 5, lambda: f'q must be (B, heads, H, W, head_dim); got {tuple(q.shape)}')
    check(k.shape == q.shape and v.shape == q.shape,
          lambda: f'q, k, v must share one shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    _, heads, height, width, _ = q.shape
    check(height >= kernel_size * dilation and width >= kernel_size * dilation,
          lambda: f'the map ({height} x {width}) must be at least kernel_size * dilation = {kernel_size * dilation} '
                  'on each side; pad it first')
    check(q.is_floating_point(), lambda: f'needs floating-point tensors, got {q.dtype}', torch._check_type)
    side = 2 * kernel_size - 1
    for name, tensor in (('k', k), ('v', v), ('rpb', rpb)):
        if name == 'rpb':
            check(rpb.shape == (heads, side, side),
                  lambda: f'rpb must be (heads, 2k-1, 2k-1) = ({heads}, {side}, {side}); got {tuple(rpb.shape)}')
        check(tensor.dtype == q.dtype, lambda: f'{name} has dtype {tensor.dtype} but q has {q.dtype}',
              torch._check_type)
        check(tensor.device == q.device, lambda: f'{name} is on {tensor.device} but q is on {q.device}')


def _axis_windows(length: int, kernel_size: int, dilation: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Key indices (length, k) of every query's window along one axis, and their bias-table indices."""
    index = torch.arange(length)
    group = index % dilation
    group_length = (length - group + dilation - 1) // dilation
    start = torch.minimum(index // dilation - kernel_size // 2, group_length - kernel_size).clamp(min=0)
    keys = (start[:, None] + torch.arange(kernel_size)) * dilation + group[:, None]
    bias = torch.div(keys - index[:, None], dilation, rounding_mode='floor') + kernel_size - 1
    return keys, bias


@eager_lru_cache(maxsize=64)
def neighborhood_tables(height: int, width: int, kernel_size: int, dilation: int,
                        device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat key indices (H*W, k*k) of each query's window and flat indices into rpb[m] (row-major)."""
    keys_y, bias_y = _axis_windows(height, kernel_size, dilation)
    keys_x, bias_x = _axis_windows(width, kernel_size, dilation)
    window = kernel_size * kernel_size
    key_index = (keys_y[:, None, :, None] * width + keys_x[None, :, None, :]).reshape(height * width, window)
    bias_index = (bias_y[:, None, :, None] * (2 * kernel_size - 1) + bias_x[None, :, None, :])
    return key_index.to(device), bias_index.reshape(height * width, window).to(device)


def window_attention_block(q, k, v, keys, bias, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Output (B, M, n, D) and softmax probabilities (B, M, n, k*k) of n queries q (B, M, n, D) over their windows:
    `keys` (n, k*k) indexes the flattened k, v (B, M, H*W, D); `bias` (M, n, k*k) is their rpb entries."""
    logits = torch.einsum('bmnd,bmnkd->bmnk', q, k[:, :, keys]) * scale
    probabilities = (logits + bias).softmax(dim=-1)
    return torch.einsum('bmnk,bmnkd->bmnd', probabilities, v[:, :, keys]), probabilities


def neighborhood_attention_reference(q, k, v, rpb, kernel_size: int, dilation: int = 1, scale: Optional[float] = None,
                                     block_elements: int = REFERENCE_BLOCK_ELEMENTS) -> torch.Tensor:
    """Gather each query's window from cached index tables, over blocks of queries.

    The forward never holds more than `block_elements` gathered keys (and as many values) at once;
    autograd keeps the gathered blocks for the backward, k*k times the size of k and v in total. Half-precision
    inputs are computed in fp32 and the result returned in q's dtype, with autocast disabled, as the kernels do.
    """
    check_neighborhood_attention_inputs(q, k, v, rpb, kernel_size, dilation)
    with autocast_disabled(q.device.type):
        out = _blockwise_reference(*cast_floating(full_precision(q.dtype), q, k, v, rpb), kernel_size, dilation,
                                   scale, block_elements)
    return out.to(q.dtype)


def _blockwise_reference(q, k, v, rpb, kernel_size: int, dilation: int, scale: Optional[float],
                         block_elements: int) -> torch.Tensor:
    B, M, H, W, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    key_index, bias_index = neighborhood_tables(H, W, kernel_size, dilation, q.device)
    window = kernel_size * kernel_size
    q, k, v = (t.reshape(B, M, H * W, D) for t in (q, k, v))
    bias = rpb.reshape(M, -1)[:, bias_index]  # M, H*W, window
    chunk = max(1, block_elements // max(1, B * M * window * D))
    outputs = []
    for start in range(0, H * W, chunk):
        block_out, _ = window_attention_block(q[:, :, start:start + chunk], k, v, key_index[start:start + chunk],
                                              bias[:, start:start + chunk], scale)
        outputs.append(block_out)
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.reshape(B, M, H, W, D)


def fused_refusal(device: Union[str, torch.device], dtype: torch.dtype, *, batch: int, heads: int, height: int,
                  width: int, kernel_size: int, backward: bool = False, limits: Optional[dict] = None,
                  shared_memory_limit: Optional[int] = None) -> Optional[Refusal]:
    """Why the fused kernel for `device` refuses a call of these sizes, or None when it takes it: the checks of
    its `check_limits` (csrc/neighborhood_attn/<device>/), in their order and with their messages, over the
    limits it exports.

    `backward` asks about the backward kernels too (autograd will run them); `limits` and `shared_memory_limit`
    default to this build's kernel and to the device's opt-in shared memory per block.
    """
    device = torch.device(device)
    limits = KERNEL_LIMITS.get(device.type) if limits is None else limits
    refusal = dtype_refusal(OP, device.type, dtype, limits)
    if refusal is not None or device.type == 'cpu':
        return refusal
    warps = limits['warps_per_block']  # one query per warp, whose attention row is in shared memory
    window_bytes = warps * kernel_size * kernel_size * limits['accumulator_bytes'][dtype_name(dtype)]
    refusal = (grid_refusal(OP, batch * heads * height * width, warps, 'queries', limits['max_blocks'])
               or shared_memory_refusal(OP, window_bytes, limits, device, shared_memory_limit))
    if refusal is None and backward:
        # The backward's bias kernel runs one block per entry of the bias table.
        bias_entries = heads * (2 * kernel_size - 1) ** 2
        refusal = grid_refusal(f'{OP}_backward', bias_entries, 1, 'bias-table entries', limits['max_blocks'])
    return refusal


def fused_problem(q, k, v, rpb, kernel_size: int, dilation: int) -> Dict[str, Any]:
    """The sizes of a call that the fused kernels' limits depend on (the keywords of `fused_refusal`), once the
    op's checks passed; while torch.compile traces, the op's fake kernel checks instead."""
    if not torch.compiler.is_compiling():
        check_neighborhood_attention_inputs(q, k, v, rpb, kernel_size, dilation)
    batch, heads, height, width, _ = q.shape
    return dict(batch=batch, heads=heads, height=height, width=width, kernel_size=kernel_size,
                backward=autograd_will_run(q, k, v, rpb))


def neighborhood_attention(q, k, v, rpb, kernel_size: int, dilation: int = 1, scale: Optional[float] = None,
                           impl: Optional[str] = None) -> torch.Tensor:
    """Dispatch to the fused `dat::neighborhood_attn` op or the pure-PyTorch reference (see module docstring).

    `impl` is 'auto' (fused where it is built for the device and its kernel takes the call, see
    `fused_refusal`), 'fused' or 'reference'; None defers to $DAT_ATTN_IMPL.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.dtype in HALF_DTYPES and rpb.dtype == torch.float32:  # autocast's mix: the table joins q's dtype
        rpb = rpb.to(q.dtype)
    if resolve_impl(impl, OP_NAME, q.device.type, lambda: fused_refusal(
            q.device, q.dtype, **fused_problem(q, k, v, rpb, kernel_size, dilation))) == 'fused':
        out, _ = torch.ops.dat.neighborhood_attn(q.contiguous(), k.contiguous(), v.contiguous(), rpb.contiguous(),
                                                 kernel_size, dilation, scale)
        return out
    return neighborhood_attention_reference(q, k, v, rpb, kernel_size, dilation, scale)


def _fake_forward(q, k, v, rpb, kernel_size, dilation, scale):
    check_neighborhood_attention_inputs(q, k, v, rpb, kernel_size, dilation)
    attn = q.new_empty((*q.shape[:4], kernel_size * kernel_size), dtype=full_precision(q.dtype))
    return torch.empty_like(q, memory_format=torch.contiguous_format), attn


def _fake_backward(grad_out, q, k, v, attn, kernel_size, dilation, scale):
    side = 2 * kernel_size - 1
    grads = [torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3)]
    return (*grads, q.new_empty((q.shape[1], side, side)))


def _setup_context(ctx, inputs, output):
    q, k, v, _, kernel_size, dilation, scale = inputs
    _, attn = output
    ctx.save_for_backward(q, k, v, attn)
    ctx.geometry = (kernel_size, dilation, scale)
    ctx.mark_non_differentiable(attn)


def _backward(ctx, backward_op, grad_out, _grad_attn):
    q, k, v, attn = ctx.saved_tensors
    grad_q, grad_k, grad_v, grad_rpb = backward_op(grad_out.contiguous(), q, k, v, attn, *ctx.geometry)
    return grad_q, grad_k, grad_v, grad_rpb, None, None, None


bind_fused_op(FusedOpBinding(OP_NAME, _fake_forward, _fake_backward, _setup_context, _backward))
