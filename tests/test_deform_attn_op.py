"""The fused deformable-attention op `dat::deform_attn` against the pure-PyTorch reference and fp64 gradcheck."""
import functools

import pytest
import torch

import dat.ops.deform_attn as deform_attn_module
from dat.ops import deformable_attention, deformable_attention_reference, native_op_available, why_not_fused
from dat.ops._extension import IMPL_ENV, dtype_name
from dat.ops.deform_attn import KERNEL_LIMITS, fused_problem, fused_refusal
from half_precision import assert_within_roundoff, parametrize_half_cases
from kernel_limits import assert_auto_takes_reference, assert_cuda_choice, assert_kernel_refuses

CPU_OP = native_op_available('deform_attn', 'cpu')
CUDA_OP = torch.cuda.is_available() and native_op_available('deform_attn', 'cuda')
needs_cpu_op = pytest.mark.skipif(not CPU_OP, reason='dat._C is not built with the dat::deform_attn CPU kernel')


def make_inputs(batch, heads, groups, queries, keys, head_dim, table, dtype=torch.float64, device='cpu',
                key_spread=1.0, seed=0):
    """Random inputs; key positions span [-key_spread, key_spread] so that displacements (qpos - kpos) / 2
    cross the table border (spread > 1) or leave it entirely (spread > 3)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    tensors = dict(
        q=randn(batch, heads, queries, head_dim),
        k=randn(batch, heads, keys, head_dim),
        v=randn(batch, heads, keys, head_dim),
        kpos=(rand(batch, groups, keys, 2) * 2 - 1) * key_spread,
        qpos=rand(queries, 2) * 2 - 1,
        rpe=randn(heads, *table) if table is not None else None,
    )
    return {name: t.to(device=device, dtype=dtype) if t is not None else None for name, t in tensors.items()}


def fused(q, k, v, kpos, qpos, rpe, scale, op=None):
    """The fused op's output; `op` is another build of it (a KernelTarget's), default dat::deform_attn."""
    return (op or torch.ops.dat.deform_attn)(q, k, v, kpos, qpos, rpe, scale)[0]


DIFFERENTIABLE = ('q', 'k', 'v', 'kpos', 'rpe')

# (batch, heads, groups, queries, keys, head_dim, table, key_spread): odd/even/non-square and one-row
# tables, displacements inside, across and fully outside the table border, and no table. Several query
# and key tiles of the CPU kernel are covered by the fp64 comparison with the reference below.
GRADCHECK_CASES = [
    (1, 2, 1, 5, 7, 4, (5, 5), 1.0),
    (1, 4, 2, 9, 3, 3, (4, 6), 2.0),
    (1, 2, 2, 4, 66, 2, (3, 7), 2.5),
    (1, 2, 2, 37, 5, 2, (8, 3), 1.5),
    (1, 2, 1, 6, 5, 3, (5, 4), 5.0),
    (1, 1, 1, 3, 4, 3, (1, 6), 1.0),
    (2, 2, 1, 6, 5, 3, None, 1.0),
]


@needs_cpu_op
@pytest.mark.parametrize('case', GRADCHECK_CASES, ids=lambda c: '-'.join(map(str, c)))
def test_cpu_gradcheck_fp64(case):
    *shape, key_spread = case
    inputs = make_inputs(*shape, key_spread=key_spread)
    names = [n for n in DIFFERENTIABLE if inputs[n] is not None]
    leaves = [inputs[n].requires_grad_() for n in names]

    def fn(*tensors):
        args = dict(inputs, **dict(zip(names, tensors)))
        return fused(args['q'], args['k'], args['v'], args['kpos'], args['qpos'], args['rpe'], 0.7)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_cpu_op
def test_cpu_fully_outside_table_matches_no_bias():
    inputs = make_inputs(1, 2, 1, 6, 5, 4, (7, 7))
    inputs['kpos'] = inputs['kpos'] * 0.1 + 8.0  # every displacement is far outside [-1, 1]
    kpos = inputs['kpos'].requires_grad_()
    rpe = inputs['rpe'].requires_grad_()
    out = fused(inputs['q'], inputs['k'], inputs['v'], kpos, inputs['qpos'], rpe, 0.5)
    expected = fused(inputs['q'], inputs['k'], inputs['v'], kpos.detach(), inputs['qpos'], None, 0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    out.sum().backward()
    assert torch.count_nonzero(kpos.grad) == 0 and torch.count_nonzero(rpe.grad) == 0


def reference_outputs_and_grads(inputs, scale, grad_out, block_elements=None):
    leaves = {n: inputs[n].detach().clone().requires_grad_() for n in DIFFERENTIABLE if inputs[n] is not None}
    args = dict(inputs, **leaves)
    out = deformable_attention_reference(args['q'], args['k'], args['v'], args['kpos'], args['qpos'], args['rpe'],
                                         scale, block_elements=block_elements)
    out.backward(grad_out)
    return out.detach(), {n: t.grad for n, t in leaves.items()}


def fused_outputs_and_grads(inputs, scale, grad_out, op=None):
    leaves = {n: inputs[n].detach().clone().requires_grad_() for n in DIFFERENTIABLE if inputs[n] is not None}
    args = dict(inputs, **leaves)
    out = fused(args['q'], args['k'], args['v'], args['kpos'], args['qpos'], args['rpe'], scale, op)
    out.backward(grad_out)
    return out.detach(), {n: t.grad for n, t in leaves.items()}


def assert_grads_close(grads, expected_grads, rtol, atol):
    """Gradients (converted to the expected dtype and device) within tolerance relative to each gradient's
    magnitude: kpos and rpe gradients sum over many (query, key) pairs."""
    for name, expected in expected_grads.items():
        actual = grads[name].to(device=expected.device, dtype=expected.dtype) if expected is not None else grads[name]
        if expected is None:  # kpos without a table: the reference does not use it, the op returns zeros
            assert torch.count_nonzero(actual) == 0, name
            continue
        magnitude = expected.abs().max().clamp_min(1.0)
        torch.testing.assert_close(actual / magnitude, expected / magnitude, rtol=rtol, atol=atol,
                                   msg=lambda m: f'grad {name}: {m}')


# Larger fp32 cases: DAT-like head_dim 32, tables of the DAT sizes (odd, 2 * window - 1) and non-square.
FP32_CASES = [
    (2, 6, 3, 150, 130, 32, (27, 27), 1.2),
    (1, 4, 2, 200, 49, 32, (111, 111), 1.0),
    (2, 2, 1, 70, 100, 20, (14, 9), 2.0),
    (1, 3, 1, 40, 66, 16, None, 1.0),
    (1, 2, 1, 200, 1100, 16, (13, 13), 1.2),  # 3 key tiles, 3 query tiles
]


@needs_cpu_op
@pytest.mark.parametrize('case', FP32_CASES, ids=lambda c: '-'.join(map(str, c)))
def test_cpu_fp32_matches_reference(case):
    *shape, key_spread = case
    inputs = make_inputs(*shape, dtype=torch.float32, key_spread=key_spread, seed=1)
    grad_out = torch.randn(inputs['q'].shape, generator=torch.Generator().manual_seed(2))
    scale = shape[5] ** -0.5
    expected_out, expected_grads = reference_outputs_and_grads(inputs, scale, grad_out)
    out, grads = fused_outputs_and_grads(inputs, scale, grad_out)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, expected_grads, rtol=1e-5, atol=1e-5)


@needs_cpu_op
@pytest.mark.parametrize('queries, keys', [(45, 70), (300, 1030)], ids=['one-tile', 'many-tiles'])
def test_cpu_fp64_matches_reference_tightly(queries, keys):
    # many-tiles: 3 key tiles (the online softmax rescales across them) x 4 query tiles of the CPU kernel
    inputs = make_inputs(2, 4, 2, queries, keys, 8, (9, 12), key_spread=1.5, seed=3)
    grad_out = torch.randn(inputs['q'].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    expected_out, expected_grads = reference_outputs_and_grads(inputs, 0.3, grad_out)
    out, grads = fused_outputs_and_grads(inputs, 0.3, grad_out)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    assert_grads_close(grads, expected_grads, rtol=1e-11, atol=1e-11)


@needs_cpu_op
def test_cpu_logsumexp_is_the_softmax_normaliser():
    inputs = make_inputs(1, 2, 2, 10, 80, 4, (5, 5), key_spread=1.5)
    out, logsumexp = torch.ops.dat.deform_attn(*inputs.values(), 0.5)
    logits = inputs['q'] @ inputs['k'].transpose(-1, -2) * 0.5 + deform_attn_module.relative_position_bias(
        inputs['rpe'], inputs['qpos'], inputs['kpos'])
    torch.testing.assert_close(logsumexp, logits.logsumexp(-1), rtol=1e-12, atol=1e-12)
    assert logsumexp.dtype == torch.float64


@needs_cpu_op
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
def test_cpu_non_contiguous_inputs(dtype):
    inputs = make_inputs(1, 2, 1, 12, 9, 6, (5, 7), dtype=dtype)
    q_t = inputs['q'].transpose(2, 3).contiguous().transpose(2, 3)
    k_t = inputs['k'].transpose(2, 3).contiguous().transpose(2, 3)
    qpos_t = inputs['qpos'].t().contiguous().t()
    assert not q_t.is_contiguous()
    out = fused(q_t, k_t, inputs['v'], inputs['kpos'], qpos_t, inputs['rpe'], 0.4)
    torch.testing.assert_close(out, fused(*inputs.values(), 0.4), rtol=0, atol=0)


@needs_cpu_op
def test_cpu_opcheck():
    inputs = make_inputs(1, 2, 1, 6, 5, 4, (5, 6), dtype=torch.float32, key_spread=1.5)
    for name in DIFFERENTIABLE:
        inputs[name].requires_grad_()
    torch.library.opcheck(torch.ops.dat.deform_attn.default, (*inputs.values(), 0.5))
    no_table = dict(inputs, rpe=None)
    torch.library.opcheck(torch.ops.dat.deform_attn.default, (*no_table.values(), 0.5))


@needs_cpu_op
def test_cpu_torch_compile_fullgraph():
    # The aot_eager backend exercises what fullgraph needs (Dynamo tracing through the dispatcher, the fake
    # kernels, the autograd formula) without Inductor's C++ code generation, which takes ~1 min on 2 cores.
    inputs = make_inputs(1, 4, 2, 20, 9, 8, (7, 7), dtype=torch.float32, key_spread=1.5)

    def attention_sum(q, k, v, kpos, qpos, rpe):
        return (deformable_attention(q, k, v, kpos, qpos, rpe, impl='fused') * 2).sum()

    compiled = torch.compile(attention_sum, fullgraph=True, backend='aot_eager')
    leaves = {n: inputs[n].clone().requires_grad_() for n in DIFFERENTIABLE}
    total = compiled(**dict(inputs, **leaves))
    total.backward()
    expected_leaves = {n: inputs[n].clone().requires_grad_() for n in DIFFERENTIABLE}
    expected_total = attention_sum(**dict(inputs, **expected_leaves))
    expected_total.backward()
    torch.testing.assert_close(total, expected_total)
    for name in DIFFERENTIABLE:
        torch.testing.assert_close(leaves[name].grad, expected_leaves[name].grad)


def test_reference_blocks_and_checkpointing_match_unchunked():
    inputs = make_inputs(1, 2, 1, 30, 11, 4, (6, 6), key_spread=1.5)
    grad_out = torch.randn(inputs['q'].shape, dtype=torch.float64)
    expected_out, expected_grads = reference_outputs_and_grads(inputs, 0.5, grad_out, block_elements=None)
    # 2 * 11 * 4 elements per block: 4 queries at a time, each block checkpointed.
    out, grads = reference_outputs_and_grads(inputs, 0.5, grad_out, block_elements=2 * 11 * 4)
    torch.testing.assert_close(out, expected_out, rtol=1e-13, atol=1e-13)
    assert_grads_close(grads, expected_grads, rtol=1e-12, atol=1e-12)


class ReferenceSpy:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = deform_attn_module.deformable_attention_reference

        def spy(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(deform_attn_module, 'deformable_attention_reference', spy)


def test_dispatch_reference_by_argument_and_env(monkeypatch):
    inputs = make_inputs(1, 2, 1, 5, 6, 4, (5, 5), dtype=torch.float32)
    spy = ReferenceSpy(monkeypatch)
    deformable_attention(**inputs, impl='reference')
    assert spy.calls == 1
    monkeypatch.setenv(IMPL_ENV, 'reference')
    deformable_attention(**inputs)
    assert spy.calls == 2
    monkeypatch.setenv(IMPL_ENV, 'nonsense')
    with pytest.raises(ValueError, match='attention impl must be one of'):
        deformable_attention(**inputs)


@needs_cpu_op
def test_dispatch_fused_by_default_and_env(monkeypatch):
    inputs = make_inputs(1, 2, 1, 5, 6, 4, (5, 5), dtype=torch.float32)
    spy = ReferenceSpy(monkeypatch)
    monkeypatch.delenv(IMPL_ENV, raising=False)
    out = deformable_attention(**inputs)
    monkeypatch.setenv(IMPL_ENV, 'fused')
    deformable_attention(**inputs)
    assert spy.calls == 0
    torch.testing.assert_close(out, fused(*inputs.values(), 4 ** -0.5), rtol=0, atol=0)
    # The argument wins over the environment.
    deformable_attention(**inputs, impl='reference')
    assert spy.calls == 1


@needs_cpu_op
def test_half_precision_with_float32_positions_dispatches_fused_and_passes_opcheck(monkeypatch):
    inputs = make_inputs(1, 2, 1, 6, 5, 4, (5, 6), dtype=torch.float32, key_spread=1.5)
    inputs.update({name: inputs[name].bfloat16() for name in ('q', 'k', 'v')})
    spy = ReferenceSpy(monkeypatch)
    monkeypatch.delenv(IMPL_ENV, raising=False)
    out = deformable_attention(**inputs)
    assert spy.calls == 0 and out.dtype == torch.bfloat16
    for name in DIFFERENTIABLE:
        inputs[name].requires_grad_()
    torch.library.opcheck(torch.ops.dat.deform_attn.default, (*inputs.values(), 0.5))


@pytest.mark.skipif(CPU_OP, reason='checks the error when the extension is missing; it is built here')
def test_dispatch_fused_without_extension_is_an_error():
    inputs = make_inputs(1, 2, 1, 5, 6, 4, (5, 5), dtype=torch.float32)
    with pytest.raises(RuntimeError, match='requested but not available'):
        deformable_attention(**inputs, impl='fused')


BAD_INPUTS = [
    (dict(q=torch.zeros(1, 2, 5)), ValueError, 'q, k, v must be \\(B, heads, N, head_dim\\)'),
    (dict(k=torch.zeros(1, 2, 6, 3), v=torch.zeros(1, 2, 6, 3)), ValueError, 'k and v must be'),
    (dict(k=torch.zeros(1, 2, 0, 4), v=torch.zeros(1, 2, 0, 4), kpos=torch.zeros(1, 1, 0, 2)), ValueError,
     'needs at least one key'),
    (dict(kpos=torch.zeros(1, 1, 7, 2)), ValueError, 'kpos must be'),
    (dict(kpos=torch.zeros(1, 3, 6, 2)), ValueError, '2 heads cannot be split evenly into 3 offset groups'),
    (dict(qpos=torch.zeros(4, 2)), ValueError, 'qpos must be'),
    (dict(rpe=torch.zeros(3, 5, 5)), ValueError, 'rpe must be'),
    (dict(rpe=torch.zeros(2, 0, 5)), ValueError, 'rpe must be \\(heads=2, Th, Tw\\) with a non-empty table'),
    (dict(v=torch.zeros(1, 2, 6, 4, dtype=torch.float64)), TypeError, 'v has dtype \\S+ but q has'),
    (dict(kpos=torch.zeros(1, 1, 6, 2, dtype=torch.float64)), TypeError,
     "kpos has dtype \\S+ but q has \\S+ \\(kpos, qpos and rpe take q's dtype, or float32 when q is float16 or "
     "bfloat16\\)"),
    (dict(q=torch.zeros(1, 2, 5, 4, dtype=torch.bfloat16), k=torch.zeros(1, 2, 6, 4, dtype=torch.bfloat16),
          v=torch.zeros(1, 2, 6, 4, dtype=torch.bfloat16), qpos=torch.zeros(5, 2, dtype=torch.float16)), TypeError,
     'qpos has dtype \\S+ but q has'),
    (dict(q=torch.zeros(1, 2, 5, 4, dtype=torch.int32)), TypeError, 'needs floating-point tensors'),
    (dict(kpos=torch.zeros(1, 1, 6, 2, device='meta')), ValueError, 'kpos is on meta but q is on cpu'),
]


@pytest.mark.parametrize('bad, error, message', BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_inputs_are_rejected(bad, error, message):
    """The reference path (Python) and the op (C++) refuse a bad input with one exception type and message."""
    inputs = dict(make_inputs(1, 2, 1, 5, 6, 4, (5, 5), dtype=torch.float32), **bad)
    with pytest.raises(error, match=f'^dat::deform_attn: {message}'):
        deformable_attention(**inputs, impl='reference')
    if CPU_OP:
        with pytest.raises(error, match=f'^dat::deform_attn: {message}'):
            torch.ops.dat.deform_attn(*inputs.values(), 0.5)


@needs_cpu_op
def test_op_rejects_bad_logsumexp():
    inputs = make_inputs(1, 2, 1, 5, 6, 4, (5, 5), dtype=torch.float32)
    out, logsumexp = torch.ops.dat.deform_attn(*inputs.values(), 0.5)
    with pytest.raises(ValueError, match='logsumexp must be'):
        torch.ops.dat.deform_attn_backward(out, *inputs.values(), out, logsumexp.double(), 0.5)


# ------------------------------------------------------------------------------------ half precision
# float16 / bfloat16 q, k, v with positions and table in the same dtype or in float32, against the float64
# reference on the same rounded values (the criterion of tests/half_precision.py), forward and backward.

def border_positions(batch, groups, queries, keys, seed):
    """qpos and kpos on a grid of 1/4; with a (9, 17) table every displacement lands on a column border of the
    table's cells (pixel = (displacement + 1) * 8) and every other one on a row border (pixel = (displacement + 1)
    * 4); keys spread to +-1.5 reach the table's edges and beyond. Two thirds of the key coordinates then move by
    +-2^-12, which puts their pixels 2^-10 < 1e-3 (columns) or 2^-11 (rows) from a border, where the format can
    hold that (float16 and float32 can; bfloat16 rounds most back onto the grid)."""
    generator = torch.Generator().manual_seed(seed)
    qpos = torch.randint(-4, 5, (queries, 2), generator=generator).double() / 4
    kpos = torch.randint(-6, 7, (batch, groups, keys, 2), generator=generator).double() / 4
    return qpos, kpos + torch.randint(-1, 2, kpos.shape, generator=generator).double() * 2.0 ** -12


# (batch, heads, groups, queries, keys, head_dim, table, key_spread); key_spread None: border_positions.
HALF_CASES = {
    'dat-like': (2, 6, 3, 150, 140, 32, (27, 27), 1.3),
    'key-tiles': (1, 2, 1, 70, 1100, 16, (13, 13), 1.2),  # 3 key tiles of the CPU kernel
    'borders': (1, 4, 2, 60, 90, 16, (9, 17), None),
}
POSITIONS = ('kpos', 'qpos', 'rpe')
# Positions are multiples of 2^-16, on which the float32 pixel arithmetic of the kernels is exact: at a cell
# border the bias has a kink, and a float32 pixel rounded across it would pick the other one-sided derivative
# than the float64 reference (a float32 matter that would hide the half-precision errors measured here).
POSITION_GRID = 2.0 ** 16
# The reference's block size in these tests: several checkpointed query blocks in the two larger cases.
HALF_REFERENCE_BLOCK = 1 << 15


@functools.lru_cache(maxsize=None)
def half_precision_case(name, dtype, position_dtype):
    """HALF_CASES[name] rounded to `dtype` (kpos, qpos, rpe to `position_dtype`, None: `dtype`), a grad_out rounded
    to `dtype`, and the float64 reference's output and gradients on those very values."""
    batch, heads, groups, queries, keys, head_dim, table, key_spread = HALF_CASES[name]
    inputs = make_inputs(batch, heads, groups, queries, keys, head_dim, table, key_spread=key_spread or 1.0,
                         seed=11)
    if key_spread is None:
        inputs['qpos'], inputs['kpos'] = border_positions(batch, groups, queries, keys, seed=12)
    for name in ('qpos', 'kpos'):
        inputs[name] = torch.round(inputs[name] * POSITION_GRID) / POSITION_GRID
    rounded = {n: t.to((position_dtype or dtype) if n in POSITIONS else dtype) for n, t in inputs.items()}
    grad_out = torch.randn(inputs['q'].shape, generator=torch.Generator().manual_seed(13)).to(dtype)
    expected = reference_outputs_and_grads({n: t.double() for n, t in rounded.items()}, head_dim ** -0.5,
                                           grad_out.double())
    return rounded, grad_out, expected


# Error budgets in unit roundoffs u (tests/half_precision.py). The output is rounded once: 1 u, plus float32
# error (~1e-6 relative, 0.002 u of float16). Gradients are rounded once too (1 u), and the fused kernels'
# grad_q, grad_k, grad_kpos and grad_rpe also read delta_i = <dO_i, out_i> off the *rounded* output (as flash
# attention does): off by sum_d dO_id e_id with |e_id| <= u |out_id|, which moves logit gradient (i, j) by p_ij
# times as much. Those roundings have independent signs, so delta's error is about u sqrt(sum_d (dO_id
# out_id)^2 / 3), below u times the spread |dp_ij - delta_i| of the logit gradients it shifts: one more u at
# most (the worst case, all signs aligned, would be ~0.6 sqrt(head_dim) u). Measured (fused CPU, emulated CUDA,
# reference): out <= 0.72 u, gradients <= 0.93 u.
HALF_OUTPUT_UNITS = 1.1
HALF_GRADIENT_UNITS = 2.0


def assert_half_precision_case(name, dtype, position_dtype, run):
    """`run(inputs, scale, grad_out)` -> (out, grads) of an implementation, within the budgets above."""
    rounded, grad_out, (expected_out, expected_grads) = half_precision_case(name, dtype, position_dtype)
    out, grads = run(rounded, rounded['q'].shape[-1] ** -0.5, grad_out)
    assert out.dtype == dtype
    assert_within_roundoff(out, expected_out, dtype, HALF_OUTPUT_UNITS, 'out')
    for grad_name, expected in expected_grads.items():
        assert grads[grad_name].dtype == rounded[grad_name].dtype, grad_name
        assert_within_roundoff(grads[grad_name], expected, dtype, HALF_GRADIENT_UNITS, f'grad {grad_name}')


HALF_PARAMETERS = parametrize_half_cases(HALF_CASES, 'positions')


@HALF_PARAMETERS
@pytest.mark.parametrize('impl', [pytest.param('fused', marks=needs_cpu_op), 'reference'])
def test_half_precision_matches_fp64_on_the_same_inputs(impl, case, dtype, mixed_dtype):
    run = fused_outputs_and_grads if impl == 'fused' else functools.partial(reference_outputs_and_grads,
                                                                             block_elements=HALF_REFERENCE_BLOCK)
    assert_half_precision_case(case, dtype, mixed_dtype, run)


# ---------------------------------------------------------------------------------------------- CUDA
# Each test runs on a GPU and emulated on the CPU (tests/kernel_targets.py), against the reference.


def cuda_case(target, dtype, table=(27, 27), head_dim=32, seed=5):
    return make_inputs(2, 6, 3, 150, 140, head_dim, table, dtype=dtype, device=target.device, key_spread=1.3,
                       seed=seed)


@pytest.mark.parametrize('head_dim', [32, 20, 64, 128])
def test_cuda_fp32_matches_reference(cuda_target, head_dim):
    inputs = cuda_case(cuda_target, torch.float32, head_dim=head_dim)
    grad_out = torch.randn(inputs['q'].shape, device=cuda_target.device, generator=cuda_target.generator(6))
    scale = head_dim ** -0.5
    expected_out, expected_grads = reference_outputs_and_grads(inputs, scale, grad_out)
    out, grads = fused_outputs_and_grads(inputs, scale, grad_out, cuda_target.op('deform_attn'))
    # float32 atomics reorder the sums, hence 1e-4.
    torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-5)
    assert_grads_close(grads, expected_grads, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('table', [None, (300, 300)], ids=['no-table', 'table-beyond-shared-memory'])
def test_cuda_no_table_and_large_table_fall_back_paths(cuda_target, table):
    # A 300 x 300 table does not fit in shared memory: grad_rpe goes straight to global atomics.
    inputs = cuda_case(cuda_target, torch.float32, table=table, seed=7)
    grad_out = torch.randn(inputs['q'].shape, device=cuda_target.device, generator=cuda_target.generator(8))
    expected_out, expected_grads = reference_outputs_and_grads(inputs, 0.2, grad_out)
    out, grads = fused_outputs_and_grads(inputs, 0.2, grad_out, cuda_target.op('deform_attn'))
    torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-5)
    assert_grads_close(grads, expected_grads, rtol=1e-4, atol=1e-4)


@HALF_PARAMETERS
def test_cuda_half_precision_matches_fp64_on_the_same_inputs(cuda_target, case, dtype, mixed_dtype):
    op = cuda_target.op('deform_attn')

    def run(inputs, scale, grad_out):
        on_target = {n: t.to(cuda_target.device) for n, t in inputs.items()}
        return fused_outputs_and_grads(on_target, scale, grad_out.to(cuda_target.device), op)

    assert_half_precision_case(case, dtype, mixed_dtype, run)


def test_cuda_fp32_gradients_match_cpu_fp64(cuda_target):
    # fp64 has no CUDA kernel; compare the CUDA gradients with the (gradchecked) CPU op instead.
    inputs = make_inputs(1, 4, 2, 70, 40, 8, (9, 7), key_spread=1.5, seed=8)
    grad_out = torch.randn(inputs['q'].shape, dtype=torch.float64)
    expected_out, expected_grads = fused_outputs_and_grads(inputs, 0.4, grad_out) if CPU_OP else \
        reference_outputs_and_grads(inputs, 0.4, grad_out)
    on_target = {n: t.float().to(cuda_target.device) if t is not None else None for n, t in inputs.items()}
    out, grads = fused_outputs_and_grads(on_target, 0.4, grad_out.float().to(cuda_target.device),
                                         cuda_target.op('deform_attn'))
    torch.testing.assert_close(out.double().cpu(), expected_out, rtol=1e-4, atol=1e-5)
    assert_grads_close(grads, expected_grads, rtol=1e-4, atol=1e-4)


def test_cuda_opcheck(cuda_target):
    inputs = make_inputs(1, 2, 1, 70, 40, 32, (7, 9), dtype=torch.float32, device=cuda_target.device,
                         key_spread=1.5)
    for name in DIFFERENTIABLE:
        inputs[name].requires_grad_()
    torch.library.opcheck(cuda_target.op('deform_attn').default, (*inputs.values(), 0.5))


# ------------------------------------------------------------------------------------------- kernel limits
# Every limit of the kernels (`fused_refusal`), tested from both sides as tests/kernel_limits.py describes.


def refusal_of(inputs, device='cpu', **options):
    """What `fused_refusal` says of the call `inputs` (a make_inputs dict) on the `device` kernel; `options` are
    its further keywords (limits, shared_memory_limit) or override the call's sizes."""
    problem = dict(fused_problem(*inputs.values()), **options)
    return fused_refusal(device, inputs['q'].dtype, **problem)


@needs_cpu_op
def test_why_not_fused_answers_by_sizes(caplog):
    sizes = dict(batch=1, heads=2, queries=5, keys=6, head_dim=4)
    assert why_not_fused('deform_attn', 'cpu', torch.float32, **sizes) is None
    assert why_not_fused('deform_attn', 'cpu', torch.float32, table_height=23169, table_width=23169, **sizes) == \
        'dat::deform_attn: the CPU kernel cannot index a relative-position table of 23169 x 23169 (too large)'
    assert why_not_fused('deform_attn', 'meta', torch.float32, **sizes) == \
        'dat::deform_attn has no meta kernel in this build'
    with pytest.raises(ValueError, match="no dat op 'deform'"):
        why_not_fused('deform', 'cpu', torch.float32, **sizes)
    # A call that the kernel takes goes to it, without a word.
    with caplog.at_level('DEBUG', logger='dat.ops'):
        deformable_attention(**make_inputs(1, 2, 1, 5, 6, 4, (5, 5), dtype=torch.float32), impl='auto')
    assert not caplog.records


def constant_table_inputs(height, width, bias=0.7):
    """Small fp32 inputs with a `height` x `width` table expanded from one element (nothing large is allocated).
    Every displacement lies in the table and a constant table biases every pair alike, so the expected output
    is plain softmax attention."""
    inputs = make_inputs(1, 2, 1, 5, 6, 4, None, dtype=torch.float32)
    inputs['rpe'] = torch.full((1, 1, 1), bias).expand(2, height, width)
    expected = torch.softmax(inputs['q'] @ inputs['k'].transpose(-1, -2) * 0.5, dim=-1) @ inputs['v']
    return inputs, expected


@needs_cpu_op
def test_cpu_limit_table_cell_offsets(caplog):
    # The table's padded cells (2 more rows and columns) x 4 coefficients must be indexable with int32:
    # 23168 x 23168 just is, 23169 x 23169 is not.
    inside, _ = constant_table_inputs(23168, 23168)
    assert refusal_of(inside) is None
    beyond, expected = constant_table_inputs(23169, 23169)
    refusal = refusal_of(beyond)
    assert_kernel_refuses(lambda: fused(*beyond.values(), 0.5), refusal)
    out = assert_auto_takes_reference(caplog, lambda: deformable_attention(**beyond, scale=0.5, impl='auto'),
                                      'deform_attn', 'cpu', refusal)
    torch.testing.assert_close(out, expected)
    assert_kernel_refuses(lambda: deformable_attention(**beyond, scale=0.5, impl='fused'), refusal)


# Dtypes beyond the CPU kernel's: the half types it is not built for, and float8, which no kernel takes.
CPU_DTYPES_BEYOND = [dtype for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn)
                     if CPU_OP and dtype_name(dtype) not in KERNEL_LIMITS['cpu']['dtypes']]


@needs_cpu_op
@pytest.mark.parametrize('dtype', CPU_DTYPES_BEYOND, ids=dtype_name)
def test_cpu_limit_dtype(caplog, dtype):
    assert refusal_of(make_inputs(1, 2, 1, 5, 6, 4, (5, 5), dtype=torch.float32)) is None
    inputs = make_inputs(1, 2, 1, 5, 6, 4, (5, 5), dtype=dtype, key_spread=1.5)
    refusal = refusal_of(inputs)
    assert_kernel_refuses(lambda: fused(*inputs.values(), 0.5), refusal)
    assert_kernel_refuses(lambda: deformable_attention(**inputs, scale=0.5, impl='fused'), refusal)
    if dtype == torch.float8_e4m3fn:
        return  # the reference has no float8 arithmetic either
    out = assert_auto_takes_reference(caplog, lambda: deformable_attention(**inputs, scale=0.5, impl='auto'),
                                      'deform_attn', 'cpu', refusal)
    as_fp32 = {name: t.float() if t is not None else None for name, t in inputs.items()}
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), deformable_attention_reference(**as_fp32, scale=0.5), rtol=5e-2, atol=5e-2)


def expanded_inputs(batch, heads, queries, keys, head_dim, device):
    """fp32 inputs of these sizes, each expanded from one element: nothing large is allocated, and the kernels
    refuse sizes beyond their limits before they copy or allocate anything."""
    one = torch.zeros((), device=device)
    return dict(q=one.expand(batch, heads, queries, head_dim), k=one.expand(batch, heads, keys, head_dim),
                v=one.expand(batch, heads, keys, head_dim), kpos=one.expand(batch, 1, keys, 2),
                qpos=one.expand(queries, 2), rpe=None)


# Calls just beyond and just inside each limit of the CUDA kernel but shared memory, on a device.
CUDA_LIMITS = {
    'dtype': (lambda device: make_inputs(1, 2, 1, 5, 6, 4, (5, 5), dtype=torch.float64, device=device),
              lambda device: make_inputs(1, 2, 1, 5, 6, 4, (5, 5), dtype=torch.float32, device=device)),
    'head_dim': (lambda device: make_inputs(1, 2, 1, 5, 6, 129, (5, 5), dtype=torch.float32, device=device),
                 lambda device: make_inputs(1, 2, 1, 5, 6, 128, (5, 5), dtype=torch.float32, device=device)),
    'batch_x_heads': (lambda device: expanded_inputs(2, 32768, 1, 1, 1, device),
                      lambda device: expanded_inputs(3, 21845, 1, 1, 1, device)),
    'queries': (lambda device: expanded_inputs(1, 1, 2 ** 31, 1, 1, device),
                lambda device: expanded_inputs(1, 1, 2 ** 31 - 1, 1, 1, device)),
    'keys': (lambda device: expanded_inputs(1, 1, 1, 2 ** 31, 1, device),
             lambda device: expanded_inputs(1, 1, 1, 2 ** 31 - 1, 1, device)),
}


@pytest.mark.parametrize('limit', CUDA_LIMITS)
def test_cuda_limit(cuda_target, shared_memory_limit, monkeypatch, caplog, limit):
    # Inside the head_dim limit the kernel runs: test_cuda_fp32_matches_reference covers head_dim 128.
    make_beyond, make_inside = CUDA_LIMITS[limit]
    options = dict(limits=cuda_target.limits('deform_attn'), shared_memory_limit=shared_memory_limit)
    assert refusal_of(make_inside(cuda_target.device), 'cuda', **options) is None
    beyond = make_beyond(cuda_target.device)
    refusal = refusal_of(beyond, 'cuda', **options)
    assert_kernel_refuses(lambda: fused(*beyond.values(), 0.5, cuda_target.op('deform_attn')), refusal)
    assert_cuda_choice(monkeypatch, caplog, 'deform_attn', refusal)


@pytest.mark.parametrize('backward', [False, True], ids=['forward', 'backward'])
def test_cuda_limit_shared_memory(cuda_target, reduced_shared_memory_limit, monkeypatch, caplog, backward):
    # The kernels keep tiles of head_dim + 1 floats per row in shared memory; the largest head_dim that fits
    # the device runs and matches the reference, one more is refused.
    limits = cuda_target.limits('deform_attn')
    layout = limits['backward_shared_bytes' if backward else 'forward_shared_bytes']
    inside_dim = (reduced_shared_memory_limit - layout['fixed']) // layout['per_head_dim']
    if inside_dim >= limits['max_head_dim']:
        pytest.skip('this GPU has the shared memory for every head_dim that the kernel takes')
    options = dict(limits=limits, shared_memory_limit=reduced_shared_memory_limit, backward=backward)
    inside = make_inputs(1, 2, 1, 5, 6, inside_dim, (5, 5), dtype=torch.float32, device=cuda_target.device)
    assert refusal_of(inside, 'cuda', **options) is None
    grad_out = torch.randn(inside['q'].shape, device=cuda_target.device, generator=cuda_target.generator(3))
    expected_out, expected_grads = reference_outputs_and_grads(inside, 0.5, grad_out)
    if backward:
        out, grads = fused_outputs_and_grads(inside, 0.5, grad_out, cuda_target.op('deform_attn'))
        assert_grads_close(grads, expected_grads, rtol=1e-4, atol=1e-4)
    else:
        out = fused(*inside.values(), 0.5, cuda_target.op('deform_attn'))
    torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-5)

    beyond = make_inputs(1, 2, 1, 5, 6, inside_dim + 1, (5, 5), dtype=torch.float32, device=cuda_target.device)
    refusal = refusal_of(beyond, 'cuda', **options)
    if backward:  # the forward still fits: the backward kernel refuses
        out, logsumexp = cuda_target.op('deform_attn')(*beyond.values(), 0.5)
        assert_kernel_refuses(lambda: cuda_target.op('deform_attn_backward')(out, *beyond.values(), out, logsumexp,
                                                                             0.5), refusal)
    else:
        assert_kernel_refuses(lambda: fused(*beyond.values(), 0.5, cuda_target.op('deform_attn')), refusal)
    assert_cuda_choice(monkeypatch, caplog, 'deform_attn', refusal)


@pytest.mark.skipif(not CUDA_OP, reason='needs a CUDA device and dat._C built with CUDA kernels')
@pytest.mark.parametrize('dtype, head_dim', [(torch.float64, 32), (torch.float32, 129)])
def test_cuda_auto_takes_reference_beyond_a_limit(caplog, dtype, head_dim):
    inputs = make_inputs(2, 6, 3, 150, 140, head_dim, (27, 27), dtype=dtype, device='cuda')
    refusal = refusal_of(inputs, 'cuda')
    out = assert_auto_takes_reference(caplog, lambda: deformable_attention(**inputs, scale=0.5, impl='auto'),
                                      'deform_attn', 'cuda', refusal)
    torch.testing.assert_close(out, deformable_attention_reference(**inputs, scale=0.5))
    assert_kernel_refuses(lambda: deformable_attention(**inputs, scale=0.5, impl='fused'), refusal)
