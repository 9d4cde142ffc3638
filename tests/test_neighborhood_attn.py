"""Neighborhood attention: reference and fused op against a brute-force definition and each other."""
import functools
import math

import pytest
import torch

from dat.ops import native_op_available, neighborhood_attention, neighborhood_attention_reference
from dat.ops.neighborhood_attn import fused_problem, fused_refusal
from half_precision import HALF_DTYPES, assert_within_roundoff
from kernel_limits import assert_cuda_choice, assert_kernel_refuses

FUSED_CPU = native_op_available('neighborhood_attn', 'cpu')
needs_fused_cpu = pytest.mark.skipif(not FUSED_CPU, reason='dat._C built without the neighborhood_attn CPU kernel')

# (H, W, kernel_size, dilation): every border case, maps exactly k*d, H != W, lengths not divisible by d.
GEOMETRIES = [
    (3, 3, 3, 1), (5, 7, 3, 1), (6, 6, 3, 2), (9, 8, 3, 2), (11, 10, 3, 3),
    (7, 9, 5, 1), (10, 13, 5, 2), (7, 7, 7, 1), (8, 12, 7, 1), (14, 15, 7, 2),
]


def brute_force_window(index, length, kernel_size, dilation):
    """The k indices that `index` attends to along one axis, from the definition in group coordinates."""
    group = [j for j in range(length) if j % dilation == index % dilation]
    position = group.index(index)
    start = min(max(position - kernel_size // 2, 0), len(group) - kernel_size)
    return group[start:start + kernel_size]


def brute_force_attention(q, k, v, rpb, kernel_size, dilation, scale):
    _, _, H, W, _ = q.shape
    out = torch.zeros_like(q)
    for y in range(H):
        rows = brute_force_window(y, H, kernel_size, dilation)
        for x in range(W):
            columns = brute_force_window(x, W, kernel_size, dilation)
            logits, values = [], []
            for key_y in rows:
                for key_x in columns:
                    bias = rpb[:, (key_y - y) // dilation + kernel_size - 1, (key_x - x) // dilation + kernel_size - 1]
                    logits.append((q[:, :, y, x] * k[:, :, key_y, key_x]).sum(-1) * scale + bias)
                    values.append(v[:, :, key_y, key_x])
            weights = torch.stack(logits, dim=-1).softmax(dim=-1)
            out[:, :, y, x] = (weights[..., None] * torch.stack(values, dim=-2)).sum(-2)
    return out


def make_inputs(B, M, H, W, D, kernel_size, dtype=torch.float64, device='cpu', requires_grad=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, M, H, W, D, generator=generator, dtype=dtype) for _ in range(3))
    rpb = torch.randn(M, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=generator, dtype=dtype)
    return [t.to(device).requires_grad_(requires_grad) for t in (q, k, v, rpb)]


IMPLS = ['reference', pytest.param('fused', marks=needs_fused_cpu)]


@functools.lru_cache(maxsize=None)
def brute_force_case(H, W, kernel_size, dilation):
    """Inputs and brute-force output of one geometry, shared by the reference and fused tests."""
    inputs = make_inputs(2, 2, H, W, 3, kernel_size)
    return inputs, brute_force_attention(*inputs, kernel_size, dilation, scale=0.7)


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('H, W, kernel_size, dilation', GEOMETRIES)
def test_matches_brute_force(impl, H, W, kernel_size, dilation):
    (q, k, v, rpb), expected = brute_force_case(H, W, kernel_size, dilation)
    out = neighborhood_attention(q, k, v, rpb, kernel_size, dilation, scale=0.7, impl=impl)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, rpb = make_inputs(1, 2, 6, 7, 9, 3)
    out = neighborhood_attention_reference(q, k, v, rpb, 3)
    torch.testing.assert_close(out, brute_force_attention(q, k, v, rpb, 3, 1, scale=1 / 3), rtol=1e-12, atol=1e-12)


def test_reference_blocks_do_not_change_the_result():
    q, k, v, rpb = make_inputs(1, 2, 9, 8, 4, 3)
    whole = neighborhood_attention_reference(q, k, v, rpb, 3, 2, scale=1.0)
    blocked = neighborhood_attention_reference(q, k, v, rpb, 3, 2, scale=1.0, block_elements=1)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=0)


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('H, W, kernel_size, dilation', [(6, 7, 3, 1), (7, 6, 3, 2), (5, 6, 5, 1)])
def test_gradcheck(impl, H, W, kernel_size, dilation):
    inputs = make_inputs(1, 2, H, W, 3, kernel_size, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, rpb: neighborhood_attention(q, k, v, rpb, kernel_size, dilation, scale=0.8, impl=impl),
        inputs, fast_mode=True)


def _forward_backward(impl, inputs, kernel_size, dilation, op=None, grad_out=None):
    """Output and gradients of q, k, v, rpb through `impl`, or through `op` (a build of the fused op) when given,
    for `grad_out` (default: a ramp from -1 to 1)."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    if op is None:
        out = neighborhood_attention(*inputs, kernel_size, dilation, impl=impl)
    else:
        out = op(*inputs, kernel_size, dilation, inputs[0].shape[-1] ** -0.5)[0]
    if grad_out is None:
        grad_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    out.backward(grad_out)
    return [out] + [t.grad for t in inputs]


@needs_fused_cpu
@pytest.mark.parametrize('dilation', [1, 3])
def test_fused_matches_reference_at_dat_sizes(dilation):
    inputs = make_inputs(2, 2, 56, 56, 32, 7, dtype=torch.float32)
    fused = _forward_backward('fused', inputs, 7, dilation)
    reference = _forward_backward('reference', inputs, 7, dilation)
    for name, a, b in zip(['out', 'grad_q', 'grad_k', 'grad_v'], fused[:4], reference[:4]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f'{name}: {m}')
    # grad_rpb sums B*H*W logit gradients per entry, so fp32 rounding is relative to its largest entry
    # (both paths are ~1e-6 of it away from an fp64 evaluation).
    torch.testing.assert_close(fused[4], reference[4], rtol=1e-5, atol=1e-5 * reference[4].abs().max().item())


@needs_fused_cpu
@pytest.mark.parametrize('head_dim, dtype, tolerance', [(37, torch.float64, 1e-12), (40, torch.float32, 1e-5)])
@pytest.mark.parametrize('dilation', [1, 2])
def test_fused_matches_reference_over_whole_and_partial_vectors(head_dim, dtype, tolerance, dilation):
    """Head dims that fill the CPU kernels' vectors and chunks of channels and leave a remainder (fp64: 4 lanes,
    chunks of 16; fp32: 8 lanes, chunks of 32), forward and backward."""
    inputs = make_inputs(2, 3, 10, 11, head_dim, 5, dtype=dtype)
    fused = _forward_backward('fused', inputs, 5, dilation)
    reference = _forward_backward('reference', inputs, 5, dilation)
    for name, a, b in zip(['out', 'grad_q', 'grad_k', 'grad_v', 'grad_rpb'], fused, reference):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance * b.abs().max().item(),
                                   msg=lambda m: f'{name}: {m}')


@needs_fused_cpu
def test_fused_accepts_non_contiguous_inputs():
    q, k, v, rpb = make_inputs(2, 3, 9, 10, 4, 3)
    q, k, v = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v))
    assert not q.is_contiguous()
    torch.testing.assert_close(neighborhood_attention(q, k, v, rpb, 3, 2, impl='fused'),
                               neighborhood_attention_reference(q, k, v, rpb, 3, 2), rtol=1e-12, atol=1e-12)


# Half precision: float16 / bfloat16 inputs against the float64 reference on the same rounded values, forward and
# backward (the criterion of tests/half_precision.py). Every case has windows clamped at the map's borders.
# (B, M, H, W, D, kernel_size, dilation)
HALF_CASES = {
    'dilated': (1, 2, 20, 23, 32, 7, 2),
    'small-window': (2, 2, 11, 10, 16, 3, 3),
}
# Every result is computed in float32 (the forward keeps the float32 probabilities for the backward) and rounded
# once: 1 u, plus float32 error (~1e-6 relative, 0.002 u of float16). Measured: <= 0.78 u.
HALF_UNITS = 1.1
HALF_PARAMETERS = pytest.mark.parametrize('case, dtype', [
    pytest.param(case, dtype, id=f'{case}-{str(dtype).split(".")[1]}') for case in HALF_CASES for dtype in HALF_DTYPES])


@functools.lru_cache(maxsize=None)
def half_precision_case(name, dtype):
    """HALF_CASES[name] and a grad_out rounded to `dtype`, and the float64 reference's output and gradients on those
    very values."""
    B, M, H, W, D, kernel_size, dilation = HALF_CASES[name]
    rounded = [t.to(dtype) for t in make_inputs(B, M, H, W, D, kernel_size, seed=3)]
    grad_out = torch.randn(B, M, H, W, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
    expected = _forward_backward('reference', [t.double() for t in rounded], kernel_size, dilation,
                                 grad_out=grad_out.double())
    return rounded, grad_out, expected


def assert_half_precision_case(name, dtype, impl, op=None, device='cpu'):
    """`impl`, or `op` (a build of the fused op) when given, on `device`, within HALF_UNITS."""
    rounded, grad_out, expected = half_precision_case(name, dtype)
    _, _, _, _, _, kernel_size, dilation = HALF_CASES[name]
    results = _forward_backward(impl, [t.to(device) for t in rounded], kernel_size, dilation, op,
                                grad_out=grad_out.to(device))
    for result_name, result, want in zip(['out', 'grad_q', 'grad_k', 'grad_v', 'grad_rpb'], results, expected):
        assert result.dtype == dtype, result_name
        assert_within_roundoff(result, want, dtype, HALF_UNITS, result_name)


@HALF_PARAMETERS
@pytest.mark.parametrize('impl', IMPLS)
def test_half_precision_matches_fp64_on_the_same_inputs(impl, case, dtype):
    assert_half_precision_case(case, dtype, impl)


@needs_fused_cpu
def test_opcheck():
    q, k, v, rpb = make_inputs(1, 2, 6, 7, 4, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.dat.neighborhood_attn.default, (q, k, v, rpb, 3, 2, 0.5))
    _, attn = torch.ops.dat.neighborhood_attn(q, k, v, rpb, 3, 2, 0.5)
    grad_out = torch.randn_like(q)
    torch.library.opcheck(torch.ops.dat.neighborhood_attn_backward.default,
                          (grad_out, q.detach(), k.detach(), v.detach(), attn, 3, 2, 0.5))


BAD_INPUTS = [
    (dict(kernel_size=4), ValueError, 'kernel_size must be odd and > 1'),
    (dict(kernel_size=1), ValueError, 'kernel_size must be odd and > 1'),
    (dict(dilation=0), ValueError, 'dilation must be >= 1'),
    (dict(dilation=3), ValueError, 'the map \\(8 x 8\\) must be at least kernel_size \\* dilation = 9'),
    (dict(q=torch.zeros(1, 2, 8, 8)), ValueError, 'q must be'),
    (dict(k=torch.zeros(1, 2, 8, 7, 4, dtype=torch.float64)), ValueError, 'q, k, v must share one shape'),
    (dict(rpb=torch.zeros(2, 3, 3, dtype=torch.float64)), ValueError, 'rpb must be'),
    (dict(v=torch.zeros(1, 2, 8, 8, 4, dtype=torch.float32)), TypeError, 'v has dtype \\S+ but q has'),
    (dict(q=torch.zeros(1, 2, 8, 8, 4, dtype=torch.int64)), TypeError, 'needs floating-point tensors'),
    (dict(rpb=torch.zeros(2, 5, 5, dtype=torch.float64, device='meta')), ValueError, 'rpb is on meta but q is on cpu'),
]


@pytest.mark.parametrize('change, error, match', BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_inputs(change, error, match):
    """The reference path (Python) and the op (C++) refuse a bad input with one exception type and message."""
    q, k, v, rpb = make_inputs(1, 2, 8, 8, 4, 3)
    args = dict(q=q, k=k, v=v, rpb=rpb, kernel_size=3, dilation=1)
    args.update(change)
    with pytest.raises(error, match=f'^dat::neighborhood_attn: {match}'):
        neighborhood_attention(**args, impl='reference')
    if FUSED_CPU:
        with pytest.raises(error, match=f'^dat::neighborhood_attn: {match}'):
            torch.ops.dat.neighborhood_attn(*args.values(), 1.0)


def test_torchscript_module_calls_the_dispatcher():
    class LocalAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rpb = torch.nn.Parameter(torch.randn(2, 5, 5, dtype=torch.float64))

        @torch.jit.ignore
        def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return neighborhood_attention(q, k, v, self.rpb, 3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attend(x, x * 2.0, x + 1.0)

    module = LocalAttention()
    x = make_inputs(1, 2, 7, 8, 4, 3)[0]
    torch.testing.assert_close(torch.jit.script(module)(x), module(x), rtol=0, atol=0)


# CUDA kernels, on a GPU and emulated on the CPU (tests/kernel_targets.py). (56, 56, 7, 1) is DAT++'s stage-1
# geometry; windows of 49 slots are wider than a warp, and the last block of (11, 10) has idle warps.
@pytest.mark.parametrize('H, W, kernel_size, dilation', [(14, 15, 7, 2), (11, 10, 3, 3), (56, 56, 7, 1)])
def test_cuda_fused_matches_reference(cuda_target, H, W, kernel_size, dilation):
    inputs = make_inputs(2, 2, H, W, 32, kernel_size, dtype=torch.float32, device=cuda_target.device)
    fused = _forward_backward('fused', inputs, kernel_size, dilation, cuda_target.op('neighborhood_attn'))
    for a, b in zip(fused, _forward_backward('reference', inputs, kernel_size, dilation)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@HALF_PARAMETERS
def test_cuda_half_precision_matches_fp64_on_the_same_inputs(cuda_target, case, dtype):
    assert_half_precision_case(case, dtype, 'fused', cuda_target.op('neighborhood_attn'), cuda_target.device)


def test_cuda_gradcheck_and_opcheck(cuda_target):
    inputs = make_inputs(1, 2, 7, 6, 3, 3, device=cuda_target.device, requires_grad=True)
    op = cuda_target.op('neighborhood_attn')
    assert torch.autograd.gradcheck(lambda q, k, v, rpb: op(q, k, v, rpb, 3, 2, 0.8)[0], inputs)
    torch.library.opcheck(op.default, (*inputs, 3, 1, 0.5))


# --- kernel limits: every limit of the kernels (`fused_refusal`), from both sides (tests/kernel_limits.py) ---------
# Both kernels take every floating dtype but float8, which the reference has no arithmetic for either.

def refusal_of(inputs, kernel_size, device='cpu', **options):
    """What `fused_refusal` says of the call (q, k, v, rpb) = `inputs` with `kernel_size` on the `device` kernel;
    `options` are its further keywords (limits, shared_memory_limit) or override the call's sizes."""
    problem = dict(fused_problem(*inputs, kernel_size, 1), **options)
    return fused_refusal(device, inputs[0].dtype, **problem)


def float8_inputs(device):
    return [t.to(torch.float8_e4m3fn) for t in make_inputs(1, 2, 8, 8, 4, 3, device=device)]


@needs_fused_cpu
def test_cpu_limit_dtype():
    assert refusal_of(make_inputs(1, 2, 8, 8, 4, 3), 3) is None
    inputs = float8_inputs('cpu')
    refusal = refusal_of(inputs, 3)
    assert_kernel_refuses(lambda: torch.ops.dat.neighborhood_attn(*inputs, 3, 1, 0.5), refusal)
    assert_kernel_refuses(lambda: neighborhood_attention(*inputs, 3, impl='fused'), refusal)


def expanded_inputs(batch, heads, height, width, kernel_size, device):
    """fp32 q, k, v, rpb of these sizes (head_dim 1), each expanded from one element: nothing large is allocated,
    and the kernels refuse sizes beyond their limits before they copy or allocate anything."""
    one = torch.zeros((), device=device)
    side = 2 * kernel_size - 1
    return [one.expand(batch, heads, height, width, 1)] * 3 + [one.expand(heads, side, side)]


# Calls just beyond and just inside each limit of the CUDA kernels but shared memory, on a device: (inputs,
# kernel_size) pairs. The forward runs one warp per query, 4 per block; the backward's bias kernel one block per
# entry of the heads x (2k - 1)^2 table; grids hold at most 2^31 - 1 blocks.
CUDA_LIMITS = {
    'dtype': (lambda device: (float8_inputs(device), 3),
              lambda device: (make_inputs(1, 2, 8, 8, 4, 3, dtype=torch.float32, device=device), 3)),
    'queries': (lambda device: (expanded_inputs(1, 1, 3, 2863311530, 3, device), 3),
                lambda device: (expanded_inputs(1, 1, 3, 2863311529, 3, device), 3)),
    'bias_table_entries': (lambda device: (expanded_inputs(1, 85899346, 3, 3, 3, device), 3),
                           lambda device: (expanded_inputs(1, 85899345, 3, 3, 3, device), 3)),
}


@pytest.mark.parametrize('limit', CUDA_LIMITS)
def test_cuda_limit(cuda_target, shared_memory_limit, monkeypatch, caplog, limit):
    make_beyond, make_inside = CUDA_LIMITS[limit]
    options = dict(limits=cuda_target.limits('neighborhood_attn'), shared_memory_limit=shared_memory_limit,
                   backward=True)
    inside, kernel_size = make_inside(cuda_target.device)
    assert refusal_of(inside, kernel_size, 'cuda', **options) is None
    (q, k, v, rpb), kernel_size = make_beyond(cuda_target.device)
    refusal = refusal_of((q, k, v, rpb), kernel_size, 'cuda', **options)
    if limit == 'bias_table_entries':  # a limit of the backward alone
        assert refusal_of((q, k, v, rpb), kernel_size, 'cuda', **dict(options, backward=False)) is None
        attn = torch.zeros((), device=q.device).expand(*q.shape[:4], kernel_size ** 2)
        kernel, args = cuda_target.op('neighborhood_attn_backward'), (q, q, k, v, attn, kernel_size, 1, 1.0)
    else:
        kernel, args = cuda_target.op('neighborhood_attn'), (q, k, v, rpb, kernel_size, 1, 1.0)
    assert_kernel_refuses(lambda: kernel(*args), refusal)
    assert_cuda_choice(monkeypatch, caplog, 'neighborhood_attn', refusal)


def test_cuda_limit_shared_memory(cuda_target, reduced_shared_memory_limit, monkeypatch, caplog):
    # Each warp keeps its query's window of k * k logits in shared memory, in the accumulation dtype: the
    # largest window that fits the device runs and matches the reference, the next one (k + 2) is refused.
    limits = cuda_target.limits('neighborhood_attn')
    slot_bytes = limits['warps_per_block'] * limits['accumulator_bytes']['float64']
    inside_k = math.isqrt(reduced_shared_memory_limit // slot_bytes)
    inside_k -= 1 - inside_k % 2  # the largest odd one
    options = dict(limits=limits, shared_memory_limit=reduced_shared_memory_limit)
    inside = make_inputs(1, 1, inside_k, inside_k, 2, inside_k, device=cuda_target.device)
    assert refusal_of(inside, inside_k, 'cuda', **options) is None
    fused = _forward_backward('fused', inside, inside_k, 1, cuda_target.op('neighborhood_attn'))
    for a, b in zip(fused, _forward_backward('reference', inside, inside_k, 1)):
        torch.testing.assert_close(a, b)

    beyond = make_inputs(1, 1, inside_k + 2, inside_k + 2, 2, inside_k + 2, device=cuda_target.device)
    refusal = refusal_of(beyond, inside_k + 2, 'cuda', **options)
    assert_kernel_refuses(lambda: cuda_target.op('neighborhood_attn')(*beyond, inside_k + 2, 1, 1.0), refusal)
    assert_cuda_choice(monkeypatch, caplog, 'neighborhood_attn', refusal)
