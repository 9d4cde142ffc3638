"""Multi-scale deformable attention (Deformable DETR): fused `dat::ms_deform_attn` and its reference.

    out[n, q, m*D:(m+1)*D] = sum_{l, p} weight[n, q, m, l, p] * sample_l(value[n, :, m], loc[n, q, m, l, p])

`value` (N, S, M, D) holds L feature levels flattened row-major one after another; level l has
spatial shape (H_l, W_l) (`spatial_shapes`, (L, 2) int64) and starts at row `level_start_index[l]`
((L,) int64, the running sum of H_l * W_l). `sample_l` is a bilinear sample at the normalised
location (x, y) in [0, 1], i.e. pixel coordinate (x * W_l - 0.5, y * H_l - 0.5) (grid_sample's
align_corners=False convention), with zeros outside the level. Sampling locations are
(N, Lq, M, L, P, 2) (x, y) pairs; attention weights are (N, Lq, M, L, P); the output is (N, Lq, M * D).

Sampling locations and attention weights have value's dtype, or are float32 beside a float16 or
bfloat16 value; pass float32 locations then: one rounded to bfloat16 is off by up to 1/512 of the
level's width. That is the mix autocast produces and `MSDeformAttn` passes (`dat.precision`): kernels and
reference compute it in float32 and return value's dtype.
"""
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from dat.precision import HALF_DTYPES, autocast_disabled, cast_floating, full_precision
from ._extension import (FusedOpBinding, Refusal, bind_fused_op, check_input, dtype_refusal, grid_refusal,
                         read_kernel_limits, resolve_impl)

OP_NAME = 'ms_deform_attn'
OP = f'dat::{OP_NAME}'
# What each built kernel exports about the calls it takes, per device type (see `fused_refusal`).
KERNEL_LIMITS = read_kernel_limits(OP_NAME)


def _check(condition, message, kind=torch._check_value) -> None:
    check_input(OP, condition, message, kind)


def check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                attention_weights) -> None:
    """The checks of the C++ op (csrc/ms_deform_attn/ms_deform_attn.cpp) that need no tensor data, in its order,
    with its messages and exception types; torch._check_* so that they also run under torch.compile."""
    _check(value.dim() == 4, lambda: f'value must be (N, S, heads, head_dim), got shape {tuple(value.shape)}')
    _check(spatial_shapes.dim() == 2 and spatial_shapes.shape[1] == 2,
           lambda: f'spatial_shapes must be (levels, 2), got shape {tuple(spatial_shapes.shape)}')
    L = spatial_shapes.shape[0]
    _check(L >= 1, lambda: 'needs at least one level')
    _check(level_start_index.dim() == 1 and level_start_index.shape[0] == L,
           lambda: f'level_start_index must be (levels={L},), got shape {tuple(level_start_index.shape)}')
    _check(spatial_shapes.dtype == torch.int64 and level_start_index.dtype == torch.int64,
           lambda: f'spatial_shapes and level_start_index must be int64, got {spatial_shapes.dtype} and '
                   f'{level_start_index.dtype}', torch._check_type)
    N, _, M, _ = value.shape
    _check(sampling_locations.dim() == 6 and sampling_locations.shape[0] == N and sampling_locations.shape[2] == M
           and sampling_locations.shape[5] == 2,
           lambda: f'sampling_locations must be (N={N}, queries, heads={M}, levels={L}, points, 2), got shape '
                   f'{tuple(sampling_locations.shape)}')
    _check(sampling_locations.shape[3] == L,
           lambda: f'sampling_locations has {sampling_locations.shape[3]} levels but spatial_shapes has {L}')
    _check(attention_weights.shape == sampling_locations.shape[:5],
           lambda: f'attention_weights must be (N, queries, heads, levels, points) = '
                   f'{tuple(sampling_locations.shape[:5])}, got shape {tuple(attention_weights.shape)}')
    _check(value.is_floating_point(), lambda: f'value must be floating point, got {value.dtype}', torch._check_type)

    def dtype_fits(tensor):
        return tensor.dtype == value.dtype or (tensor.dtype == torch.float32 and value.dtype in HALF_DTYPES)

    _check(dtype_fits(sampling_locations) and dtype_fits(attention_weights),
           lambda: f"sampling_locations and attention_weights must have value's dtype (or float32 when value is "
                   f'float16 or bfloat16), got value {value.dtype}, sampling_locations {sampling_locations.dtype}, '
                   f'attention_weights {attention_weights.dtype}', torch._check_type)
    _check(sampling_locations.device == value.device and attention_weights.device == value.device,
           lambda: f'value, sampling_locations and attention_weights must be on one device, got {value.device}, '
                   f'{sampling_locations.device}, {attention_weights.device}')


def level_layout(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                 value_len: int) -> List[Tuple[int, int, int]]:
    """(H, W, start) of every level, checked to tile the S = `value_len` rows of value exactly (the op's data
    checks, read on the host)."""
    layout = []
    running_start = 0
    for level, ((height, width), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        for side in (height, width):  # one check per side: exporting, sizes are symbols `and` cannot combine
            _check(side >= 1,
                   lambda: f'level {level} has spatial shape ({height}, {width}); both sides must be positive')
        _check(start == running_start,
               lambda: f'level_start_index[{level}] is {start} but the levels before it hold {running_start} pixels')
        layout.append((height, width, start))
        running_start += height * width
    _check(running_start == value_len,
           lambda: f'spatial_shapes describe {running_start} pixels but value holds S={value_len}')
    return layout


def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights) -> torch.Tensor:
    """Pure-PyTorch definition: one `grid_sample` per level (align_corners=False, zeros padding). Half-precision
    inputs are computed on float32 copies and the output is rounded to value's dtype once, with autocast
    disabled, as the kernels do."""
    with autocast_disabled(value.device.type):
        value_in, sampling_locations, attention_weights = cast_floating(
            full_precision(value.dtype), value, sampling_locations, attention_weights)
        output = _sampled_sum(value_in, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return output.to(value.dtype)


def _sampled_sum(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> torch.Tensor:
    N, S, M, D = value.shape
    Lq, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    grids = sampling_locations * 2 - 1  # grid_sample wants [-1, 1]
    samples = []
    for level, (height, width, start) in enumerate(level_layout(spatial_shapes, level_start_index, S)):
        level_value = value[:, start:start + height * width].permute(0, 2, 3, 1).reshape(N * M, D, height, width)
        level_grid = grids[:, :, :, level].transpose(1, 2).reshape(N * M, Lq, P, 2)
        samples.append(F.grid_sample(level_value, level_grid, mode='bilinear', padding_mode='zeros',
                                     align_corners=False))  # (N * M, D, Lq, P)
    sampled = torch.stack(samples, dim=3).flatten(3)  # (N * M, D, Lq, L * P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    output = (sampled * weights).sum(-1)  # (N * M, D, Lq)
    return output.reshape(N, M * D, Lq).transpose(1, 2).contiguous()


def fused_refusal(device: Union[str, torch.device], dtype: torch.dtype, *, batch: int, queries: int, heads: int,
                  levels: int, limits: Optional[dict] = None) -> Optional[Refusal]:
    """Why the fused kernel for `device` refuses a call of these sizes, or None when it takes it: the checks of
    its `check_limits` (csrc/ms_deform_attn/<device>/), in their order and with their messages, over the limits
    it exports (`limits` defaults to this build's kernel). Its backward has the same limits."""
    device = torch.device(device)
    limits = KERNEL_LIMITS.get(device.type) if limits is None else limits
    refusal = dtype_refusal(OP, device.type, dtype, limits)
    if refusal is not None or device.type == 'cpu':
        return refusal
    if levels > limits['max_levels']:
        return Refusal(f'{OP}: the CUDA kernel takes at most {limits["max_levels"]} levels, got {levels}')
    return grid_refusal(OP, batch * queries * heads, limits['rows_per_block'], '(batch, query, head) rows',
                        limits['max_blocks'])


def fused_problem(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> Dict[str, int]:
    """The sizes of a call that the fused kernels' limits depend on (the keywords of `fused_refusal`), once the
    op's checks that need no tensor data passed; while torch.compile traces, the op's fake kernel checks instead."""
    if not torch.compiler.is_compiling():
        check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    batch, queries, heads, levels = sampling_locations.shape[:4]
    return dict(batch=batch, queries=queries, heads=heads, levels=levels)


def multi_scale_deformable_attention(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights, impl: Optional[str] = None) -> torch.Tensor:
    """Dispatch to the fused `dat::ms_deform_attn` op or the reference (see the module docstring).

    `impl` is 'auto' (fused where it is built for the device and its kernel takes the call, see
    `fused_refusal`), 'fused' (an error where it is not) or 'reference'; None defers to $DAT_ATTN_IMPL.
    Both read `spatial_shapes` and `level_start_index` on the host: keeping them on the CPU saves a
    device-to-host copy per call on a GPU.
    """
    inputs = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if resolve_impl(impl, OP_NAME, value.device.type,
                    lambda: fused_refusal(value.device, value.dtype, **fused_problem(*inputs))) == 'fused':
        return torch.ops.dat.ms_deform_attn(*inputs)
    check_ms_deform_attn_inputs(*inputs)
    return ms_deform_attn_reference(*inputs)


def _fake_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    N, _, M, D = value.shape
    return value.new_empty((N, sampling_locations.shape[1], M * D))


def _fake_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, backward_op, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = backward_op(grad_output, value, spatial_shapes, level_start_index,
                                                           sampling_locations, attention_weights)
    return grad_value, None, None, grad_locations, grad_weights


bind_fused_op(FusedOpBinding(OP_NAME, _fake_forward, _fake_backward, _setup_context, _backward))
