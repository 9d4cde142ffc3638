"""Mixed precision (dat.precision): autocast in bf16 and fp16, and weights cast to bf16, through every DAT family, the
detection backbone, MSDeformAttn and the three ops, on the CPU and, where there is one, on a GPU."""
import copy
from contextlib import nullcontext

import pytest
import timm
import torch
import torch.nn.functional as F

from dat.backbone import DatBackbone
from dat.layers import DeformableAttention, MSDeformAttn, level_pixel_centres
from dat.ops import (deformable_attention, deformable_attention_reference, ms_deform_attn_reference,
                     multi_scale_deformable_attention, native_op_available, neighborhood_attention,
                     neighborhood_attention_reference)

DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='no CUDA device: the GPU run of the mixed-precision matrix needs one'))]
# autocast in either half-precision dtype (weights stay fp32), or the whole model cast to bf16 without autocast
PRECISIONS = ['autocast_bf16', 'autocast_fp16', 'bf16_weights']
HALF_DTYPES = {'autocast_bf16': torch.bfloat16, 'autocast_fp16': torch.float16, 'bf16_weights': torch.bfloat16}

NARROW = dict(dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), offset_groups=(1, 1, 2, 4))
# Two blocks a stage keep every block type of a family (DAT: window L, shifted window S, deformable D; DAT++:
# neighborhood N, deformable D) at a fraction of the real depths' cost; dat_nano is the real model.
DAT = dict(NARROW, depths=(2, 2, 2, 2), block_types=('LS', 'LS', 'LD', 'LD'))
DAT_PP = dict(NARROW, depths=(2, 2, 2, 2), block_types=('ND', 'ND', 'ND', 'DD'))
# At 64x64 the stage maps are 16, 8, 4 and 2 pixels: windows are padded and masked, neighborhoods padded, and
# every offset group and key stride of DAT++ is exercised; the backbone (with its output norms) runs at the
# non-square 320x480 (maps 80x120 down to 10x15). One image each: CPUs without fp16 arithmetic run fp16
# convolutions in PyTorch's slow fallback, the bulk of the matrix's time on two cores.
ARCHITECTURES = {
    'dat': (lambda: timm.create_model('dat_tiny', **DAT), (64, 64)),
    'dat_pp': (lambda: timm.create_model('dat_pp_tiny', **DAT_PP), (64, 64)),
    'dat_nano': (lambda: timm.create_model('dat_nano'), (64, 64)),
    'backbone_dat_pp': (lambda: DatBackbone('dat_pp_tiny', **DAT_PP), (320, 480)),
}
MIN_COSINE = 0.99


def precision_context(precision: str, device: str):
    if precision.startswith('autocast'):
        return torch.autocast(device, dtype=HALF_DTYPES[precision])
    return nullcontext()


def half_and_full_precision_twins(module: torch.nn.Module, x: torch.Tensor, precision: str):
    """The module and input to run in `precision`, and an fp32 module and input with the same values: for
    bf16 weights, the fp32 twin holds the bf16-rounded weights and sees the bf16-rounded input."""
    if precision == 'bf16_weights':
        module = module.to(torch.bfloat16)
        x = x.bfloat16()
    return module, x, copy.deepcopy(module).float(), x.float()


def pooled_features_and_loss(model, x):
    """Pooled features (one (B, C) tensor per output) and a loss that reaches every parameter: cross-entropy of
    the classifier's logits, or random projections of the backbone's pooled features."""
    if isinstance(model, DatBackbone):
        pooled = [feature.mean((2, 3)) for feature in model(x)]
        generator = torch.Generator().manual_seed(1)
        loss = sum((p.float() * torch.randn(p.shape, generator=generator).to(p.device)).sum() for p in pooled)
        return pooled, loss
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    logits = model.get_classifier()(pooled)
    labels = torch.arange(x.shape[0], device=x.device) % logits.shape[1]
    return [pooled], F.cross_entropy(logits.float(), labels)


def assert_gradients_reach_every_parameter(module):
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, f'{name} got no gradient'
        assert parameter.grad.dtype == parameter.dtype, name
        assert torch.isfinite(parameter.grad).all(), f'{name} has a non-finite gradient'
        assert parameter.grad.abs().sum() > 0, f'{name} has an all-zero gradient'


def assert_cosine_close(actual, expected):
    similarity = F.cosine_similarity(actual.float().flatten(1), expected.float().flatten(1), dim=1)
    assert (similarity >= MIN_COSINE).all(), similarity


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('precision', PRECISIONS)
@pytest.mark.parametrize('architecture', ARCHITECTURES)
def test_forward_and_training_step(architecture, precision, device):
    """Finite features close to fp32 on the same weights and input, and a training step whose gradients are
    finite and reach every parameter (all of them get non-zero gradients in fp32 too)."""
    build, size = ARCHITECTURES[architecture]
    model = build().to(device)
    images = torch.randn(1, 3, *size, device=device)
    model, images, full_model, full_images = half_and_full_precision_twins(model, images, precision)
    with torch.no_grad():
        expected, _ = pooled_features_and_loss(full_model, full_images)
    with precision_context(precision, device):
        pooled, loss = pooled_features_and_loss(model, images)
    for actual, reference in zip(pooled, expected):
        assert torch.isfinite(actual).all()
        assert_cosine_close(actual, reference)
    loss.backward()
    assert_gradients_reach_every_parameter(model)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('precision', PRECISIONS)
def test_ms_deform_attn_layer(precision, device):
    """MSDeformAttn as a Deformable DETR encoder layer (queries are the pixels of two levels)."""
    layer = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2).to(device)
    spatial_shapes = torch.tensor([[20, 30], [10, 15]], device=device)
    level_start_index = torch.tensor([0, 600], device=device)
    tokens = torch.randn(2, 750, 32, device=device)
    reference_points = level_pixel_centres(spatial_shapes)[None, :, None].expand(2, -1, 2, -1)
    layer, tokens, full_layer, full_tokens = half_and_full_precision_twins(layer, tokens, precision)

    def run(module, x):
        return module(x, reference_points, x, spatial_shapes, level_start_index)

    with torch.no_grad():
        expected = run(full_layer, full_tokens)
    with precision_context(precision, device):
        out = run(layer, tokens)
    assert torch.isfinite(out).all()
    assert_cosine_close(out.flatten(0, 1), expected.flatten(0, 1))
    (out.float() * torch.randn(out.shape, device=device)).sum().backward()
    assert_gradients_reach_every_parameter(layer)


# ----------------------------------------------------------------------------------------------- the layers

def deformable_layer():
    """A DAT++ stage-1 deformable layer (64 channels, key stride 8, offset kernel 9) with trained-looking offsets."""
    layer = DeformableAttention(64, 2, 1, table_size=(111, 111), key_stride=8, offset_kernel=9, generation='dat_pp')
    torch.nn.init.normal_(layer.conv_offset[-1].weight, std=0.3)
    return layer


@pytest.mark.parametrize('precision', PRECISIONS)
def test_deformable_positions_are_fp32(precision):
    """The offset network and grids run in fp32: the positions equal those of the fp32 layer given the same
    queries, where bf16 positions would be up to 2 ** -9 off."""
    layer = deformable_layer()
    x = torch.randn(1, 64, 56, 56)
    q = torch.randn(1, 64, 56, 56).bfloat16()
    layer, x, full_layer, full_x = half_and_full_precision_twins(layer, x, precision)
    with precision_context(precision, 'cpu'):
        positions, reference = layer.sampling_positions(x, q)
    expected_positions, expected_reference = full_layer.sampling_positions(full_x, q.float())
    assert positions.dtype == reference.dtype == torch.float32
    torch.testing.assert_close(positions, expected_positions, rtol=0, atol=1e-6)
    torch.testing.assert_close(reference, expected_reference, rtol=0, atol=0)


def test_deformable_layer_in_bf16_on_a_channels_last_map():
    """The cause of bf16 DAT++'s NaN: the layer sampled keys from its (channels-last) input with grid_sample in
    bf16, whose CPU kernel indexes with 16-bit offsets and reads wrong rows past 32767 elements (56 x 64
    here). Sampled in fp32, the bf16 layer is close to the fp32 one."""
    layer = deformable_layer().bfloat16()
    x = torch.randn(1, 56, 56, 64).bfloat16().permute(0, 3, 1, 2)  # channels last, as LayerNorm2d returns it
    with torch.no_grad():
        out = layer(x)
        expected = copy.deepcopy(layer).float()(x.float())
    assert torch.isfinite(out).all()
    assert_cosine_close(out, expected)


# -------------------------------------------------------------------------------------------------- the ops

def impls(op_name):
    """'reference', and 'fused' where the CPU kernel is built (it runs in fp32 for a half-precision mix)."""
    return ['reference'] + (['fused'] if native_op_available(op_name, 'cpu') else [])


def max_error(actual, expected):
    return float((actual.detach().double() - expected.detach()).abs().max() / expected.detach().abs().max())


def gradients(output, inputs, grad_output):
    return torch.autograd.grad(output, inputs, grad_output.to(output.dtype))


@pytest.mark.parametrize('impl', impls('deform_attn'))
def test_deformable_attention_with_half_activations_and_fp32_positions(impl):
    """bf16 q, k, v next to fp32 positions and table, as autocast hands them over: the result in bf16, as accurate
    as the exact math on those values allows, where positions rounded to bf16 would shift the bias sampled from
    a 255-cell table by up to a quarter of a cell."""
    generator = torch.Generator().manual_seed(0)
    B, M, G, Nq, Nk, D = 2, 4, 2, 40, 30, 16
    q, k, v = (torch.randn(B, M, n, D, generator=generator, dtype=torch.float64).bfloat16() for n in (Nq, Nk, Nk))
    kpos = (torch.rand(B, G, Nk, 2, generator=generator, dtype=torch.float64) * 2 - 1).float()
    qpos = (torch.rand(Nq, 2, generator=generator, dtype=torch.float64) * 2 - 1).float()
    rpe = (torch.randn(M, 255, 255, generator=generator, dtype=torch.float64) * 3).float()
    leaves = [t.clone().requires_grad_() for t in (q, kpos, rpe)]
    out = deformable_attention(leaves[0], k, v, leaves[1], qpos, leaves[2], impl=impl)
    assert out.dtype == torch.bfloat16

    exact_leaves = [t.double().requires_grad_() for t in (q, kpos, rpe)]
    expected = deformable_attention_reference(exact_leaves[0], k.double(), v.double(), exact_leaves[1],
                                              qpos.double(), exact_leaves[2], D ** -0.5)
    assert max_error(out, expected) < 1e-2
    rounded_positions = deformable_attention_reference(q.double(), k.double(), v.double(), kpos.bfloat16().double(),
                                                       qpos.bfloat16().double(), rpe.double(), D ** -0.5)
    assert max_error(rounded_positions, expected) > 5e-2  # what the 1e-2 above rules out

    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    for got, want, leaf in zip(gradients(out, leaves, grad_out), gradients(expected, exact_leaves, grad_out), leaves):
        assert got.dtype == leaf.dtype
        assert max_error(got, want) < 1e-2


@pytest.mark.parametrize('impl', impls('neighborhood_attn'))
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_neighborhood_attention_with_half_activations_and_fp32_bias(impl, dtype):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 11, 8, generator=generator, dtype=torch.float64).to(dtype) for _ in range(3))
    rpb = (torch.randn(2, 9, 9, generator=generator, dtype=torch.float64) * 2).float().requires_grad_()
    out = neighborhood_attention(q, k, v, rpb, 5, 1, impl=impl)
    assert out.dtype == dtype
    exact_rpb = rpb.detach().double().requires_grad_()
    expected = neighborhood_attention_reference(q.double(), k.double(), v.double(), exact_rpb, 5, 1)
    assert max_error(out, expected) < 1e-2
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    (grad_rpb,), (expected_grad_rpb,) = gradients(out, [rpb], grad_out), gradients(expected, [exact_rpb], grad_out)
    assert grad_rpb.dtype == torch.float32 and max_error(grad_rpb, expected_grad_rpb) < 1e-2


@pytest.mark.parametrize('impl', impls('ms_deform_attn'))
def test_ms_deform_attn_with_half_value_and_fp32_locations(impl):
    """A bf16 value next to fp32 locations and weights: bf16 locations would be up to 0.4 pixel off on the
    200-wide level, and a bf16 grid_sample on the CPU reads wrong rows of a 200 x 200 level at all."""
    generator = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[200, 200], [20, 30]])
    starts = torch.tensor([0, 40000])
    N, Lq, M, D, L, P = 1, 50, 2, 8, 2, 3
    value = torch.randn(N, 40600, M, D, generator=generator, dtype=torch.float64).bfloat16()
    locations = torch.rand(N, Lq, M, L, P, 2, generator=generator, dtype=torch.float64).float().requires_grad_()
    weights = torch.rand(N, Lq, M, L, P, generator=generator, dtype=torch.float64).float()
    out = multi_scale_deformable_attention(value, shapes, starts, locations, weights, impl=impl)
    assert out.dtype == torch.bfloat16
    exact_locations = locations.detach().double().requires_grad_()
    expected = ms_deform_attn_reference(value.double(), shapes, starts, exact_locations, weights.double())
    assert max_error(out, expected) < 1e-2
    rounded = ms_deform_attn_reference(value.double(), shapes, starts, locations.detach().bfloat16().double(),
                                       weights.double())
    assert max_error(rounded, expected) > 5e-2
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    (grad_locations,), (expected_grad,) = (gradients(out, [locations], grad_out),
                                           gradients(expected, [exact_locations], grad_out))
    assert grad_locations.dtype == torch.float32 and max_error(grad_locations, expected_grad) < 1e-2


def test_references_take_half_precision_and_ignore_autocast():
    """The references compute half-precision inputs in fp32 (returning the inputs' dtype) and, under autocast,
    exactly what they compute outside it: autocast would otherwise run their matmuls in half precision."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    calls = {
        'deform_attn': lambda *t: deformable_attention_reference(*t, scale=0.25),
        'neighborhood_attn': lambda *t: neighborhood_attention_reference(*t, 3, 1),
        'ms_deform_attn': lambda value, locations, weights: ms_deform_attn_reference(
            value, torch.tensor([[6, 7]]), torch.tensor([0]), locations, weights),
    }
    inputs = {
        'deform_attn': (randn(1, 2, 12, 16), randn(1, 2, 9, 16), randn(1, 2, 9, 16), randn(1, 1, 9, 2).tanh(),
                        randn(12, 2).tanh(), randn(2, 7, 7)),
        'neighborhood_attn': (randn(1, 2, 5, 6, 16), randn(1, 2, 5, 6, 16), randn(1, 2, 5, 6, 16), randn(2, 5, 5)),
        'ms_deform_attn': (randn(1, 42, 2, 16), randn(1, 10, 2, 1, 4, 2).sigmoid(), randn(1, 10, 2, 1, 4).softmax(-1)),
    }
    for name, call in calls.items():
        fp32 = call(*inputs[name])
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert torch.equal(call(*inputs[name]), fp32), name
        rounded = [t.bfloat16() for t in inputs[name]]
        half = call(*rounded)
        assert half.dtype == torch.bfloat16, name
        exact = call(*[t.double() for t in rounded])
        # only the rounding of the output to bf16 (8 bits) remains
        assert max_error(half, exact) <= 2 ** -8 + 1e-6, name
