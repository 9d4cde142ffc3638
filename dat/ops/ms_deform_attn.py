"""Multi-scale deformable attention (Deformable DETR): fused `dat::ms_deform_attn` and its reference.

    out[n, q, m*D:(m+1)*D] = sum_{l, p} weight[n, q, m, l, p] * sample_l(value[n, :, m], loc[n, q, m, l, p])

`value` (N, S, M, D) holds L feature levels flattened row-major one after another; level l has
spatial shape (H_l, W_l) (`spatial_shapes`, (L, 2) int64) and starts at row `level_start_index[l]`
((L,) int64, the running sum of H_l * W_l). `sample_l` is a bilinear sample at the normalised
location (x, y) in [0, 1], i.e. pixel coordinate (x * W_l - 0.5, y * H_l - 0.5) (grid_sample's
align_corners=False convention), with zeros outside the level. Sampling locations are
(N, Lq, M, L, P, 2) (x, y) pairs; attention weights are (N, Lq, M, L, P); the output is (N, Lq, M * D).
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ._extension import FusedOpBinding, bind_fused_op, resolve_impl, unsupported_dtype

OP_NAME = 'ms_deform_attn'
OP = f'dat::{OP_NAME}'
FUSED_DTYPES = {
    'cpu': (torch.float32, torch.float64),
    'cuda': (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


def _check(condition, message, kind=torch._check_value) -> None:
    kind(condition, lambda: f'{OP}: {message()}')


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
    _check(sampling_locations.dtype == value.dtype and attention_weights.dtype == value.dtype,
           lambda: f'value, sampling_locations and attention_weights must share one dtype, got {value.dtype}, '
                   f'{sampling_locations.dtype}, {attention_weights.dtype}', torch._check_type)
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
    """Pure-PyTorch definition: one `grid_sample` per level (align_corners=False, zeros padding)."""
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


def multi_scale_deformable_attention(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights, impl: Optional[str] = None) -> torch.Tensor:
    """Dispatch to the fused `dat::ms_deform_attn` op or the reference (see the module docstring).

    `impl` is 'auto' (fused where built for the device and dtype), 'fused' (an error where it is not)
    or 'reference'; None defers to $DAT_ATTN_IMPL. Both read `spatial_shapes` and `level_start_index`
    on the host: keeping them on the CPU saves a device-to-host copy per call on a GPU. The CUDA
    kernel takes at most 16 levels.
    """
    if resolve_impl(impl, OP_NAME, value.device.type,
                    unsupported_dtype(value.dtype, value.device.type, FUSED_DTYPES)) == 'fused':
        return torch.ops.dat.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                            attention_weights)
    check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights)


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
