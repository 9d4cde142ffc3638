"""Multi-scale deformable attention: reference vs a brute-force definition, fused op vs reference,
gradients, half precision, torch.compile, input errors, and MSDeformAttn in a small Deformable-DETR-style
encoder."""
import functools
import math

import pytest
import torch
from torch import nn

from dat.layers import MSDeformAttn, level_pixel_centres
from dat.ops import multi_scale_deformable_attention
from dat.ops.ms_deform_attn import KERNEL_LIMITS, fused_problem, fused_refusal, ms_deform_attn_reference
from dat.ops._extension import dtype_name, native_op_available
from half_precision import assert_within_roundoff, parametrize_half_cases
from kernel_limits import assert_auto_takes_reference, assert_cuda_choice, assert_kernel_refuses

FUSED_CPU = native_op_available('ms_deform_attn', 'cpu')
FUSED_CUDA = torch.cuda.is_available() and native_op_available('ms_deform_attn', 'cuda')
needs_fused_cpu = pytest.mark.skipif(not FUSED_CPU, reason='dat._C was built without the ms_deform_attn CPU kernel')
needs_fused_cuda = pytest.mark.skipif(not FUSED_CUDA, reason='needs a CUDA device and the ms_deform_attn CUDA kernel')

TINY_SHAPES = [(5, 6), (3, 2)]
DECODER_SHAPES = [(20, 27), (10, 14), (5, 7), (3, 4)]


def make_inputs(level_shapes, batch, queries, heads, channels, points, dtype=torch.float64, device='cpu',
                margin=0.15, seed=0):
    """Random inputs; sampling locations spread `margin` beyond [0, 1] so some taps fall outside."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(level_shapes, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    levels = len(level_shapes)
    value = torch.randn(batch, int(areas.sum()), heads, channels, generator=generator, dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=torch.float64)
    locations = locations * (1 + 2 * margin) - margin
    # Keep pixel coordinates 1e-3 away from integers, where bilinear sampling has a kink: there, one
    # float rounding decides which one-sided location gradient a kernel returns.
    sizes = spatial_shapes.flip(-1).double().view(1, 1, 1, levels, 1, 2)
    pixel = locations * sizes - 0.5
    fraction = pixel - pixel.floor()
    locations = torch.where((fraction < 1e-3) | (fraction > 1 - 1e-3), locations + 2e-3 / sizes, locations)
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator, dtype=torch.float64)
    floats = [t.to(device=device, dtype=dtype) for t in (value, locations, weights)]
    return floats[0], spatial_shapes.to(device), level_start_index.to(device), floats[1], floats[2]


def brute_force(value, spatial_shapes, level_start_index, locations, weights):
    """The definition, one tap at a time: bilinear weights (1 - |x - xi|) (1 - |y - yi|) at pixel
    coordinate (x W - 0.5, y H - 0.5), zero for taps outside the level."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = locations.shape
    output = torch.zeros(N, Lq, M, D, dtype=torch.float64)
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for level in range(L):
                    height, width = spatial_shapes[level].tolist()
                    start = int(level_start_index[level])
                    for p in range(P):
                        x = float(locations[n, q, m, level, p, 0]) * width - 0.5
                        y = float(locations[n, q, m, level, p, 1]) * height - 0.5
                        for xi in (math.floor(x), math.floor(x) + 1):
                            for yi in (math.floor(y), math.floor(y) + 1):
                                if 0 <= xi < width and 0 <= yi < height:
                                    tap = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                    output[n, q, m] += (weights[n, q, m, level, p] * tap
                                                        * value[n, start + yi * width + xi, m])
    return output.reshape(N, Lq, M * D)


def gradients(output, inputs, grad_output):
    return torch.autograd.grad(output, inputs, grad_output)


def test_reference_matches_brute_force():
    value, shapes, starts, locations, weights = make_inputs(TINY_SHAPES, 2, 3, 2, 3, 2, margin=0.3)
    expected = brute_force(value, shapes, starts, locations, weights)
    actual = ms_deform_attn_reference(value, shapes, starts, locations, weights)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    assert expected.abs().max() > 0.1  # the case is not degenerate


@needs_fused_cpu
def test_fused_cpu_matches_brute_force():
    value, shapes, starts, locations, weights = make_inputs(TINY_SHAPES, 2, 3, 2, 3, 2, margin=0.3, seed=1)
    expected = brute_force(value, shapes, starts, locations, weights)
    actual = torch.ops.dat.ms_deform_attn(value, shapes, starts, locations, weights)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@needs_fused_cpu
def test_fused_cpu_gradcheck_float64():
    value, shapes, starts, locations, weights = make_inputs(TINY_SHAPES, 2, 3, 2, 3, 2, margin=0.3, seed=2)
    # Every sample is checked: some locations straddle a border, a few fall fully outside.
    pixel_x = locations[..., 0] * shapes[:, 1].view(1, 1, 1, -1, 1).double() - 0.5
    assert bool((pixel_x < 0).any()) and bool((pixel_x > shapes[:, 1].view(1, 1, 1, -1, 1) - 1).any())

    def op(value, locations, weights):
        return torch.ops.dat.ms_deform_attn(value, shapes, starts, locations, weights)

    inputs = tuple(t.clone().requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(op, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_fused_cpu
@pytest.mark.parametrize('level_shapes, batch, queries, heads, channels, points', [
    (DECODER_SHAPES, 2, 60, 8, 32, 4),
    ([(17, 11), (9, 6), (1, 1)], 1, 200, 4, 16, 3),
])
def test_fused_cpu_matches_reference_float32(level_shapes, batch, queries, heads, channels, points):
    value, shapes, starts, locations, weights = make_inputs(level_shapes, batch, queries, heads, channels, points,
                                                            dtype=torch.float32, seed=3)
    inputs = tuple(t.clone().requires_grad_() for t in (value, locations, weights))
    fused = multi_scale_deformable_attention(inputs[0], shapes, starts, inputs[1], inputs[2], impl='fused')
    reference = multi_scale_deformable_attention(inputs[0], shapes, starts, inputs[1], inputs[2], impl='reference')
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    grad_output = torch.randn_like(fused)
    for grad_fused, grad_reference in zip(gradients(fused, inputs, grad_output),
                                          gradients(reference, inputs, grad_output)):
        # Location gradients are in units of 1 / pixel (up to W ~ 27 here); compare relative to their scale.
        scale = max(1.0, float(grad_reference.abs().max()))
        torch.testing.assert_close(grad_fused / scale, grad_reference / scale, rtol=1e-5, atol=1e-5)


@needs_fused_cpu
def test_fused_cpu_non_contiguous_inputs():
    value, shapes, starts, locations, weights = make_inputs(DECODER_SHAPES[:2], 1, 10, 2, 4, 2, seed=4)
    value_t = value.transpose(2, 3).contiguous().transpose(2, 3)
    weights_t = weights.transpose(1, 2).contiguous().transpose(1, 2)
    assert not value_t.is_contiguous() and not weights_t.is_contiguous()
    torch.testing.assert_close(torch.ops.dat.ms_deform_attn(value_t, shapes, starts, locations, weights_t),
                               ms_deform_attn_reference(value, shapes, starts, locations, weights))


FUSED_DEVICES = [pytest.param('cpu', marks=needs_fused_cpu), pytest.param('cuda', marks=needs_fused_cuda)]


def opcheck_forward_and_backward(forward_op, backward_op, device, value_dtype=torch.float32):
    """opcheck of both ops, with value (and grad_output) in `value_dtype` and float32 locations and weights."""
    value, shapes, starts, locations, weights = make_inputs(TINY_SHAPES, 2, 3, 2, 4, 2, dtype=torch.float32,
                                                            device=device, seed=5)
    args = (value.to(value_dtype).requires_grad_(), shapes, starts, locations.requires_grad_(),
            weights.requires_grad_())
    torch.library.opcheck(forward_op.default, args)
    grad_output = torch.randn(2, 3, 8, device=device, dtype=value_dtype)
    torch.library.opcheck(backward_op.default, (grad_output,) + tuple(a.detach() for a in args))


@needs_fused_cpu
@pytest.mark.parametrize('value_dtype', [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(value_dtype):
    opcheck_forward_and_backward(torch.ops.dat.ms_deform_attn, torch.ops.dat.ms_deform_attn_backward, 'cpu',
                                 value_dtype)


@pytest.mark.parametrize('value_dtype', [torch.float32, torch.bfloat16], ids=str)
def test_cuda_opcheck(cuda_target, value_dtype):
    opcheck_forward_and_backward(cuda_target.op('ms_deform_attn'), cuda_target.op('ms_deform_attn_backward'),
                                 cuda_target.device, value_dtype)


@pytest.mark.parametrize('device', FUSED_DEVICES)
def test_torch_compile_fullgraph(device):
    value, shapes, starts, locations, weights = make_inputs(DECODER_SHAPES[:3], 2, 16, 4, 8, 2,
                                                            dtype=torch.float32, device=device, seed=6)

    def attend(value, logits, weight_logits):
        return multi_scale_deformable_attention(value * 2, shapes, starts, logits.sigmoid(), weight_logits.softmax(-1),
                                                impl='fused')

    inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    compiled = torch.compile(attend, fullgraph=True, backend='aot_eager')
    actual = compiled(*inputs)
    expected = attend(*inputs)
    torch.testing.assert_close(actual, expected)
    grad_output = torch.randn_like(actual)
    for grad_compiled, grad_eager in zip(gradients(actual, inputs, grad_output),
                                         gradients(expected, inputs, grad_output)):
        torch.testing.assert_close(grad_compiled, grad_eager)


def _with(inputs, **changes):
    names = ('value', 'spatial_shapes', 'level_start_index', 'sampling_locations', 'attention_weights')
    arguments = dict(zip(names, inputs))
    arguments.update(changes)
    return [arguments[name] for name in names]


BAD_INPUTS = [
    (lambda v, s, i, l, w: _with((v, s, i, l, w), value=v[0]), ValueError, r'value must be \(N, S'),
    (lambda v, s, i, l, w: _with((v, s, i, l, w), spatial_shapes=s[:, :1]), ValueError, 'spatial_shapes must be'),
    (lambda v, s, i, l, w: _with((v, s, i, l, w), level_start_index=i[:1]), ValueError, 'level_start_index must be'),
    (lambda v, s, i, l, w: _with((v, s, i, l, w), spatial_shapes=s.int()), TypeError, 'must be int64'),
    (lambda v, s, i, l, w: _with((v, s, i, l, w), sampling_locations=l[..., :1]), ValueError,
     'sampling_locations must be'),
    (lambda v, s, i, l, w: _with((v, s, i, l, w), sampling_locations=l[:, :, :, :1], attention_weights=w[:, :, :, :1]),
     ValueError, 'has 1 levels but spatial_shapes has 2'),
    (lambda v, s, i, l, w: _with((v, s, i, l, w), attention_weights=w[..., :1]), ValueError,
     'attention_weights must be'),
    (lambda v, s, i, l, w: _with((v, s, i, l, w), attention_weights=w.float()), TypeError,
     "sampling_locations and attention_weights must have value's dtype \\(or float32 when value is float16"),
    (lambda v, s, i, l, w: _with((v, s, i, l, w), value=v.long()), TypeError, 'floating point'),
    (lambda v, s, i, l, w: _with((v, s, i, l, w), value=v[:, :-1]), ValueError, 'describe 36 pixels but value holds'),
    (lambda v, s, i, l, w: _with((v, s, i, l, w), level_start_index=i + 1), ValueError, r'level_start_index\[0\] is 1'),
    (lambda v, s, i, l, w: _with((v, s, i, l, w), spatial_shapes=torch.tensor([[36, 1], [0, 5]])), ValueError,
     'both sides must be positive'),
]


@pytest.mark.parametrize('corrupt, error, message', BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(corrupt, error, message):
    """The reference path (Python) and the op (C++) refuse a bad input with one exception type and message."""
    inputs = corrupt(*make_inputs(TINY_SHAPES, 1, 2, 2, 3, 2))
    with pytest.raises(error, match=f'^dat::ms_deform_attn: .*{message}'):
        multi_scale_deformable_attention(*inputs, impl='reference')
    if FUSED_CPU:
        with pytest.raises(error, match=f'^dat::ms_deform_attn: .*{message}'):
            torch.ops.dat.ms_deform_attn(*inputs)


# --- kernel limits: every limit of the kernels (`fused_refusal`), from both sides (tests/kernel_limits.py) ---------

def refusal_of(inputs, device='cpu', limits=None):
    """What `fused_refusal` says of the call `inputs` (make_inputs' tuple) on the `device` kernel."""
    return fused_refusal(device, inputs[0].dtype, limits=limits, **fused_problem(*inputs))


def brute_force_of_rounded(inputs):
    """The definition in float64 on the inputs as they are (rounded to their dtype)."""
    value, shapes, starts, locations, weights = inputs
    return brute_force(value.double().cpu(), shapes.cpu(), starts.cpu(), locations.double().cpu(),
                       weights.double().cpu())


# Dtypes beyond the CPU kernel's: the half types it is not built for, and float8, which no kernel takes.
CPU_DTYPES_BEYOND = [dtype for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn)
                     if FUSED_CPU and dtype_name(dtype) not in KERNEL_LIMITS['cpu']['dtypes']]


@needs_fused_cpu
@pytest.mark.parametrize('dtype', CPU_DTYPES_BEYOND, ids=dtype_name)
def test_cpu_limit_dtype(caplog, dtype):
    assert refusal_of(make_inputs(TINY_SHAPES, 1, 2, 2, 3, 2, dtype=torch.float32)) is None
    inputs = make_inputs(TINY_SHAPES, 1, 2, 2, 3, 2, dtype=dtype)
    refusal = refusal_of(inputs)
    assert_kernel_refuses(lambda: torch.ops.dat.ms_deform_attn(*inputs), refusal)
    assert_kernel_refuses(lambda: multi_scale_deformable_attention(*inputs, impl='fused'), refusal)
    if dtype == torch.float8_e4m3fn:
        return  # the reference has no float8 arithmetic either
    out = assert_auto_takes_reference(caplog, lambda: multi_scale_deformable_attention(*inputs, impl='auto'),
                                      'ms_deform_attn', 'cpu', refusal)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), brute_force_of_rounded(inputs), rtol=2e-2, atol=2e-2)


def expanded_rows(queries, device):
    """One 1 x 1 level and `queries` queries of one head, expanded from one element: nothing large is allocated,
    and the kernels refuse sizes beyond their limits before they copy or allocate anything."""
    one = torch.zeros((), device=device)
    return (one.expand(1, 1, 1, 1), torch.tensor([[1, 1]], device=device), torch.tensor([0], device=device),
            one.expand(1, queries, 1, 1, 1, 2), one.expand(1, queries, 1, 1, 1))


# Calls just beyond and just inside each limit of the CUDA kernel, on a device; the levels limit's inside call
# runs (tiny levels) and matches the definition.
TINY_LEVELS = [(1 + level % 3, 1 + level % 2) for level in range(17)]
CUDA_LIMITS = {
    'dtype': (lambda device: make_inputs(TINY_SHAPES, 1, 2, 2, 3, 2, dtype=torch.float8_e4m3fn, device=device),
              lambda device: make_inputs(TINY_SHAPES, 1, 2, 2, 3, 2, dtype=torch.float32, device=device)),
    'levels': (lambda device: make_inputs(TINY_LEVELS, 1, 3, 2, 4, 2, device=device),
               lambda device: make_inputs(TINY_LEVELS[:16], 1, 3, 2, 4, 2, device=device)),
    # 8 rows per block and at most 2^31 - 1 blocks
    'rows': (lambda device: expanded_rows(8 * (2 ** 31 - 1) + 1, device),
             lambda device: expanded_rows(8 * (2 ** 31 - 1), device)),
}


@pytest.mark.parametrize('limit', CUDA_LIMITS)
def test_cuda_limit(cuda_target, monkeypatch, caplog, limit):
    make_beyond, make_inside = CUDA_LIMITS[limit]
    limits = cuda_target.limits('ms_deform_attn')
    inside = make_inside(cuda_target.device)
    assert refusal_of(inside, 'cuda', limits) is None
    if limit == 'levels':
        torch.testing.assert_close(cuda_target.op('ms_deform_attn')(*inside).cpu(), brute_force_of_rounded(inside))
    beyond = make_beyond(cuda_target.device)
    refusal = refusal_of(beyond, 'cuda', limits)
    assert_kernel_refuses(lambda: cuda_target.op('ms_deform_attn')(*beyond), refusal)
    assert_cuda_choice(monkeypatch, caplog, 'ms_deform_attn', refusal)


# --- half precision ------------------------------------------------------------------------------------------------
# float16 / bfloat16 value with sampling locations and attention weights in the same dtype or in float32, against
# the float64 reference on the same rounded values (the criterion of tests/half_precision.py), forward and backward.

def border_locations(level_shapes, batch, queries, heads, points, seed):
    """Sampling locations whose pixel coordinates (x W - 0.5, y H - 0.5) are integers from -1 to the level's size:
    the kinks of bilinear sampling (pixel centres, the level's edges and one pixel beyond them). Two thirds then
    move by +-2^-10 pixels (< 1e-3) where the format can hold that (float32 and, on small levels, float16).
    With power-of-two sides, the kernels' float32 pixel arithmetic is exact on these values, so they pick the
    float64 reference's side of every kink."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.tensor(level_shapes, dtype=torch.float64).flip(-1).view(1, 1, 1, -1, 1, 2)  # (W, H)
    shape = (batch, queries, heads, len(level_shapes), points, 2)
    pixel = torch.floor(torch.rand(shape, generator=generator, dtype=torch.float64) * (sizes + 2)) - 1
    pixel = pixel + torch.randint(-1, 2, shape, generator=generator).double() * 2.0 ** -10
    return (pixel + 0.5) / sizes


HALF_CASES = {
    'decoder': (DECODER_SHAPES, 2, 100, 8, 32, 4),
    'borders': ([(8, 16), (4, 8), (2, 2)], 1, 60, 4, 16, 4),
}
# Every result is computed in float32 and rounded once: 1 u, plus float32 error (~1e-6 relative, 0.002 u of
# float16; tests/half_precision.py). Measured: <= 0.93 u.
HALF_UNITS = 1.1


@functools.lru_cache(maxsize=None)
def half_precision_case(name, dtype, mixed_dtype):
    """HALF_CASES[name]: value rounded to `dtype`, sampling locations and attention weights to `mixed_dtype` (None:
    `dtype`), a grad_output rounded to `dtype`, and the float64 reference's output and gradients on those values."""
    level_shapes, batch, queries, heads, channels, points = HALF_CASES[name]
    value, shapes, starts, locations, weights = make_inputs(level_shapes, batch, queries, heads, channels, points,
                                                            seed=9)
    if name == 'borders':
        locations = border_locations(level_shapes, batch, queries, heads, points, seed=10)
    rounded = (value.to(dtype), locations.to(mixed_dtype or dtype), weights.to(mixed_dtype or dtype))
    grad_output = torch.randn(batch, queries, heads * channels, generator=torch.Generator().manual_seed(11),
                              dtype=torch.float64).to(dtype)
    leaves = [t.double().requires_grad_() for t in rounded]
    expected = ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2])
    expected_grads = gradients(expected, leaves, grad_output.double())
    return shapes, starts, rounded, grad_output, (expected.detach(), *expected_grads)


def assert_half_precision_case(name, dtype, mixed_dtype, op, device):
    """`op` (the fused op of some target, or the reference) on `device`, within HALF_UNITS."""
    shapes, starts, rounded, grad_output, expected = half_precision_case(name, dtype, mixed_dtype)
    inputs = [t.to(device).requires_grad_() for t in rounded]
    output = op(inputs[0], shapes.to(device), starts.to(device), inputs[1], inputs[2])
    results = (output, *gradients(output, inputs, grad_output.to(device)))
    names = ('output', 'grad value', 'grad sampling_locations', 'grad attention_weights')
    for result_name, result, want, like in zip(names, results, expected, (rounded[0], *rounded)):
        assert result.dtype == like.dtype, result_name
        assert_within_roundoff(result, want, dtype, HALF_UNITS, result_name)


HALF_PARAMETERS = parametrize_half_cases(HALF_CASES, 'locations-weights')


@HALF_PARAMETERS
@pytest.mark.parametrize('impl', [pytest.param('fused', marks=needs_fused_cpu), 'reference'])
def test_half_precision_matches_fp64_on_the_same_inputs(impl, case, dtype, mixed_dtype):
    op = torch.ops.dat.ms_deform_attn if impl == 'fused' else ms_deform_attn_reference
    assert_half_precision_case(case, dtype, mixed_dtype, op, 'cpu')


@HALF_PARAMETERS
def test_cuda_half_precision_matches_fp64_on_the_same_inputs(cuda_target, case, dtype, mixed_dtype):
    assert_half_precision_case(case, dtype, mixed_dtype, cuda_target.op('ms_deform_attn'), cuda_target.device)


# CUDA kernels, on a GPU and emulated on the CPU (tests/kernel_targets.py).
@pytest.mark.parametrize('dtype, tolerance', [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_fused_cuda_matches_reference(cuda_target, dtype, tolerance):
    value, shapes, starts, locations, weights = make_inputs(DECODER_SHAPES, 2, 300, 8, 32, 4, seed=7)
    grad_output = torch.randn(2, 300, 256, dtype=torch.float64)
    # The reference runs in float64 on the inputs rounded to `dtype`, so only the kernel's error is measured.
    rounded = [t.to(dtype).double() for t in (value, locations, weights, grad_output)]
    reference_inputs = [t.clone().requires_grad_() for t in rounded[:3]]
    expected = ms_deform_attn_reference(reference_inputs[0], shapes, starts, *reference_inputs[1:])
    expected_grads = gradients(expected, reference_inputs, rounded[3])

    device = cuda_target.device
    inputs = [t.to(device, dtype).requires_grad_() for t in (value, locations, weights)]
    actual = cuda_target.op('ms_deform_attn')(inputs[0], shapes.to(device), starts.to(device), *inputs[1:])
    assert actual.dtype == dtype
    actual_grads = gradients(actual, inputs, grad_output.to(device, dtype))
    for got, want in zip((actual, *actual_grads), (expected, *expected_grads)):
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got.double().cpu() / scale, want.detach() / scale, rtol=tolerance, atol=tolerance)


def test_fused_cuda_channels_above_warp_size(cuda_target):
    # 80 channels: lanes stride over more than one channel each, with a partial last stride.
    value, shapes, starts, locations, weights = make_inputs(DECODER_SHAPES[:2], 1, 40, 2, 80, 3, seed=8)
    inputs = [t.to(cuda_target.device).requires_grad_() for t in (value, locations, weights)]
    # The level geometry may stay on the host.
    actual = cuda_target.op('ms_deform_attn')(inputs[0], shapes, starts, inputs[1], inputs[2])
    expected = ms_deform_attn_reference(inputs[0], shapes, starts, inputs[1], inputs[2])
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    grad_output = torch.randn_like(actual)
    for got, want in zip(gradients(actual, inputs, grad_output), gradients(expected, inputs, grad_output)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# --- MSDeformAttn -------------------------------------------------------------------------------------------------

def test_msdeformattn_initial_offsets_point_along_head_directions():
    layer = MSDeformAttn(d_model=32, n_levels=2, n_heads=8, n_points=3)
    offsets = layer.sampling_offsets.bias.view(8, 2, 3, 2)
    # Head 0 looks along +x, head 2 along +y, head 1 along the diagonal; point i sits at distance i + 1.
    torch.testing.assert_close(offsets[0, 1], torch.tensor([[1., 0.], [2., 0.], [3., 0.]]))
    torch.testing.assert_close(offsets[2, 0], torch.tensor([[0., 1.], [0., 2.], [0., 3.]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(offsets[1, 0], torch.tensor([[1., 1.], [2., 2.], [3., 3.]]))
    assert layer.sampling_offsets.weight.abs().sum() == 0
    assert layer.attention_weights.weight.abs().sum() == 0 and layer.attention_weights.bias.abs().sum() == 0


def _pyramid(image_size, strides):
    shapes = torch.tensor([[image_size[0] // s, image_size[1] // s] for s in strides], dtype=torch.int64)
    areas = shapes.prod(1)
    return shapes, torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


@pytest.mark.parametrize('reference_dim', [2, 4])
def test_msdeformattn_matches_explicit_sampling(reference_dim):
    """The module's locations and weights, rebuilt by hand, through the reference op give its output."""
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, impl='reference')
    nn.init.normal_(layer.sampling_offsets.weight, std=0.3)
    nn.init.normal_(layer.attention_weights.weight, std=0.3)
    shapes, starts = _pyramid((16, 24), (4, 8))
    source = torch.randn(2, int(shapes.prod(1).sum()), 16)
    query = torch.randn(2, 5, 16)
    reference = torch.rand(2, 5, 2, reference_dim)
    output = layer(query, reference, source, shapes, starts)

    offsets = layer.sampling_offsets(query).view(2, 5, 2, 2, 2, 2)
    weights = layer.attention_weights(query).view(2, 5, 2, 4).softmax(-1).view(2, 5, 2, 2, 2)
    if reference_dim == 2:
        wh = torch.stack([shapes[:, 1], shapes[:, 0]], -1).float()
        locations = reference.view(2, 5, 1, 2, 1, 2) + offsets / wh.view(1, 1, 1, 2, 1, 2)
    else:
        box = reference.view(2, 5, 1, 2, 1, 4)
        locations = box[..., :2] + offsets / 2 * box[..., 2:] / 2
    value = layer.value_proj(source).view(2, -1, 2, 8)
    expected = layer.output_proj(ms_deform_attn_reference(value, shapes, starts, locations, weights))
    torch.testing.assert_close(output, expected)


def test_msdeformattn_padding_mask_hides_padded_pixels():
    torch.manual_seed(1)
    layer = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, impl='reference')
    shapes, starts = _pyramid((16, 24), (4, 8))
    source = torch.randn(1, int(shapes.prod(1).sum()), 16)
    mask = torch.zeros(1, source.shape[1], dtype=torch.bool)
    mask[:, ::3] = True
    query, reference = torch.randn(1, 4, 16), torch.rand(1, 4, 2, 2)
    changed = source.clone()
    changed[mask] += 100.0
    torch.testing.assert_close(layer(query, reference, source, shapes, starts, mask),
                               layer(query, reference, changed, shapes, starts, mask))


@pytest.mark.parametrize('call, message', [
    (lambda f, q, r, s, sh, st: f(q[0], r, s, sh, st), r'query must be \(N, queries, d_model=16\)'),
    (lambda f, q, r, s, sh, st: f(q, torch.rand(*r.shape[:3], 3), s, sh, st), 'reference_points must be'),
    (lambda f, q, r, s, sh, st: f(q, r[:, :, :1], s, sh, st), 'reference_points must be'),
    (lambda f, q, r, s, sh, st: f(q, r, s[..., :8], sh, st), 'input_flatten must be'),
    (lambda f, q, r, s, sh, st: f(q, r, s, sh[:1], st[:1]), 'input_spatial_shapes must be'),
    (lambda f, q, r, s, sh, st: f(q, r, s, sh, st, torch.zeros(1, 3, dtype=torch.bool)), 'input_padding_mask must be'),
    (lambda f, q, r, s, sh, st: f(q, r, s[:, 1:], sh, st), 'describe .* pixels but value holds'),
])
def test_msdeformattn_bad_shapes(call, message):
    layer = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    shapes, starts = _pyramid((16, 24), (4, 8))
    source = torch.randn(1, int(shapes.prod(1).sum()), 16)
    with pytest.raises(ValueError, match=message):
        call(layer, torch.randn(1, 4, 16), torch.rand(1, 4, 2, 2), source, shapes, starts)


def test_msdeformattn_rejects_indivisible_heads():
    with pytest.raises(ValueError, match='divisible by n_heads'):
        MSDeformAttn(d_model=30, n_heads=8)


def test_level_pixel_centres():
    centres = level_pixel_centres(torch.tensor([[2, 3], [1, 1]]))
    expected = torch.tensor([[1 / 6, 1 / 4], [3 / 6, 1 / 4], [5 / 6, 1 / 4], [1 / 6, 3 / 4], [3 / 6, 3 / 4],
                             [5 / 6, 3 / 4], [1 / 2, 1 / 2]])
    torch.testing.assert_close(centres, expected)


class EncoderLayer(nn.Module):
    """Deformable DETR's encoder layer: deformable self-attention over the pyramid, then an FFN."""

    def __init__(self, d_model, n_levels, n_heads, n_points, d_ffn):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ffn), nn.ReLU(), nn.Linear(d_ffn, d_model))
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + attended)
        return self.norm2(src + self.ffn(src))


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=needs_fused_cuda)])
def test_deformable_detr_encoder_forward_backward(device):
    torch.manual_seed(0)
    d_model, levels = 64, 3
    shapes, starts = (t.to(device) for t in _pyramid((256, 320), (8, 16, 32)))  # 32x40, 16x20, 8x10
    encoder = nn.ModuleList(EncoderLayer(d_model, levels, n_heads=8, n_points=4, d_ffn=128) for _ in range(2))
    for layer in encoder:
        # Query-dependent offsets, so sampling locations are generic rather than on pixel centres.
        nn.init.normal_(layer.self_attn.sampling_offsets.weight, std=0.05)
        nn.init.normal_(layer.self_attn.attention_weights.weight, std=0.05)
    batch, pixels = 2, int(shapes.prod(1).sum())
    src = torch.randn(batch, pixels, d_model)
    pos = torch.randn(batch, pixels, d_model) * 0.1
    probe = torch.randn(batch, pixels, d_model)  # loss = <output, probe>: every output element matters
    padding_mask = torch.zeros(batch, pixels, dtype=torch.bool, device=device)
    padding_mask[1, starts[0] + 40 * 28:starts[1]] = True  # the second image is shorter
    reference_points = level_pixel_centres(shapes)[None, :, None, :].expand(batch, -1, levels, -1)

    def run(impl, dtype):
        encoder.to(device=device, dtype=dtype).zero_grad()
        for layer in encoder:
            layer.self_attn.impl = impl
        out = src.to(device, dtype)
        for layer in encoder:
            out = layer(out, pos.to(device, dtype), reference_points.to(dtype), shapes, starts, padding_mask)
        (out * probe.to(device, dtype)).sum().backward()
        return out.detach(), {name: p.grad.clone() for name, p in encoder.named_parameters()}

    output, grads = run('auto', torch.float32)
    assert output.shape == (batch, pixels, d_model) and torch.isfinite(output).all()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, f'no gradient reached {name}'
    reference_output, _ = run('reference', torch.float32)
    torch.testing.assert_close(output, reference_output, rtol=1e-5, atol=1e-5)
    # Gradients are compared in float64: in float32 the two implementations can round a sampling
    # location to opposite sides of a pixel boundary, where the location gradient jumps (a valid
    # one-sided derivative either way), which makes float32 gradient comparisons flaky.
    _, grads = run('auto', torch.float64)
    _, reference_grads = run('reference', torch.float64)
    for name, grad in grads.items():
        scale = float(reference_grads[name].abs().max())
        torch.testing.assert_close(grad / scale, reference_grads[name] / scale, rtol=1e-9, atol=1e-9,
                                   msg=lambda text: f'{name}: {text}')
