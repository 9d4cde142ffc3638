"""The timm model API of the DAT family, on inputs of any size, and its errors on bad input."""
import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch

from dat.models.dat import MIN_INPUT_SIZE

NARROW = dict(dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), offset_groups=(1, 1, 2, 4))


def narrow_model(name='dat_tiny', **kwargs):
    return timm.create_model(name, **dict(NARROW, **kwargs)).eval()


def test_every_registered_architecture_has_tags_and_cfg():
    for name in ('dat_tiny', 'dat_small', 'dat_base', 'dat_base_384', 'dat_pp_tiny', 'dat_pp_small', 'dat_pp_base'):
        assert name in timm.list_models('dat*')
        assert f'{name}.in1k' in timm.list_pretrained(f'{name}*')
    cfg = timm.get_pretrained_cfg('dat_base_384')
    assert cfg.input_size == (3, 384, 384) and cfg.pool_size == (12, 12) and cfg.crop_pct == 1.0
    cfg = timm.get_pretrained_cfg('dat_pp_base.in1k_384')
    assert cfg.input_size == (3, 384, 384) and cfg.first_conv == 'stem.conv1' and 'arXiv:2309.01430' in cfg.paper_ids
    assert timm.create_model('dat_pp_base.in1k_384', device='meta').stages[0].blocks[1].attn.rpe_table.shape == \
        (4, 191, 191)  # position tables of the 384 training resolution
    cfg = timm.get_pretrained_cfg('dat_tiny')
    assert cfg.first_conv == 'stem.conv' and cfg.classifier == 'head.fc' and cfg.interpolation == 'bicubic'
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.license == 'apache-2.0' and 'arXiv:2201.00520' in cfg.paper_ids


# the ordered state_dict keys and shapes of every registered model, recorded from the code before its stages were
# built from per-stage configs (issue 12): saved weights and converted official checkpoints depend on them
PINNED_LAYOUTS = json.loads((Path(__file__).parent / 'data' / 'state_dict_layouts.json').read_text())


def test_state_dict_layouts_are_pinned():
    assert set(PINNED_LAYOUTS) == set(timm.list_models('dat_*')) | {'dat_pp_base.in1k_384'}
    for name, pinned in PINNED_LAYOUTS.items():
        state_dict = timm.create_model(name, device='meta').state_dict()
        listing = '\n'.join(f'{key} {tuple(value.shape)}' for key, value in state_dict.items())
        assert (len(state_dict), hashlib.sha256(listing.encode()).hexdigest()) == \
            (pinned['keys'], pinned['sha256']), name


@pytest.mark.parametrize('family', ['dat_tiny', 'dat_pp_tiny'])
@pytest.mark.parametrize('size', [(32, 32), (33, 47), (224, 224), (97, 161), (800, 1333)])
def test_features_at_any_size(family, size):
    model = timm.create_model(family, features_only=True, **NARROW).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [16, 32, 64, 128]
    with torch.no_grad():
        features = model(torch.randn(1, 3, *size))
    for feature, reduction, channels in zip(features, (4, 8, 16, 32), (16, 32, 64, 128)):
        assert feature.shape == (1, channels, -(-size[0] // reduction), -(-size[1] // reduction))
        assert torch.isfinite(feature).all()


def test_padding_does_not_leak_into_valid_outputs():
    """Pixels appended beyond the stride grid must not change the features of the rows before them when the
    model is fed an image that already is a multiple of 32 vs. the same image cropped by a few pixels: the
    stem pads with zeros, so cropping the zero padding back gives identical features."""
    model = narrow_model()
    image = torch.randn(1, 3, 64, 96)
    padded = torch.nn.functional.pad(image[:, :, :61, :93], (0, 3, 0, 3))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(image[:, :, :61, :93]), model.forward_features(padded))


def test_forward_intermediates_agree_with_forward_features_and_features_only():
    torch.manual_seed(7)
    model = narrow_model()
    torch.manual_seed(7)
    features_only = timm.create_model('dat_tiny', features_only=True, **NARROW).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        for a, b in zip(intermediates, features_only(x)):
            torch.testing.assert_close(a, b)
        normed = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(normed, final)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], intermediates[1])
    with pytest.raises(ValueError, match='NCHW'):
        model.forward_intermediates(x, output_fmt='NHWC')


def test_prune_intermediate_layers_keeps_taps():
    model = narrow_model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        assert model.prune_intermediate_layers([1]) == [1]
        assert len(model.stages) == 2 and model.num_features == 32
        torch.testing.assert_close(model.forward_intermediates(x, indices=[1], intermediates_only=True)[0], taps[1])
        assert model(x).shape == (1, 32, 8, 8)


def test_head_api():
    model = narrow_model(num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pooled.shape == (2, model.num_features) == (2, model.head_hidden_size)
        torch.testing.assert_close(pooled, model.norm(model.stages(model.stem(x))).mean((2, 3)))
        logits = model(x)
        torch.testing.assert_close(logits, model.get_classifier()(pooled))
        model.reset_classifier(3)
        assert model(x).shape == (2, 3) and model.num_classes == 3
        model.reset_classifier(0, '')
        assert model(x).shape == (2, 128, 2, 2)


def test_grad_checkpointing_recomputes_and_matches():
    model = narrow_model().train()
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(5)
    plain = model(x)
    plain.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    calls = []
    handle = model.stages[2].blocks[1].attn.register_forward_hook(lambda *args: calls.append(1))
    torch.manual_seed(5)
    checkpointed = model(x)
    checkpointed.sum().backward()
    handle.remove()
    assert len(calls) == 2  # once in forward, once more when backward recomputes the segment
    torch.testing.assert_close(plain, checkpointed)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_optimizer_hooks():
    model = narrow_model()
    no_decay = model.no_weight_decay()
    assert no_decay and all(name.endswith(('relative_position_bias_table', 'rpe_table')) for name in no_decay)
    assert sum(1 for name, _ in model.named_parameters() if name.endswith('rpe_table')) == 4
    from timm.models._manipulate import group_parameters
    groups = group_parameters(model, model.group_matcher())
    # the stem, one group per block (a stage's downsampling joins its first block), the head
    assert len(groups) == 1 + sum(len(stage.blocks) for stage in model.stages) + 1
    assert groups[0][0].startswith('stem.') and groups[len(groups) - 1] == ['head.fc.weight', 'head.fc.bias']


@pytest.mark.parametrize('family', ['dat_tiny', 'dat_pp_tiny'])
def test_torchscript_and_fx_match_eager(family):
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor
    model = narrow_model(family)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected)
        extractor = create_feature_extractor(model, return_nodes={'head.fc': 'out'}, tracer_kwargs=dict(
            leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions()))
        torch.testing.assert_close(extractor(x)['out'], expected)


def test_bfloat16_and_meta_device():
    model = narrow_model().to(torch.bfloat16)
    assert model(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    meta = timm.create_model('dat_base', device='meta')
    assert meta(torch.empty(1, 3, 224, 224, device='meta')).shape == (1, 1000)


@pytest.mark.parametrize('bad_input,message', [
    (torch.randn(3, 64, 64), 'rank 3'),
    (torch.randn(1, 1, 64, 64), 'expected 3 input channels, got 1'),
    (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), 'floating-point'),
    (torch.randn(1, 3, MIN_INPUT_SIZE - 1, 64), 'too small'),
])
@pytest.mark.parametrize('family', ['dat_tiny', 'dat_pp_tiny'])
def test_bad_input_is_named(family, bad_input, message):
    model = narrow_model(family)
    with pytest.raises(ValueError, match=message):
        model(bad_input)
    with pytest.raises(ValueError, match=message):
        model.forward_intermediates(bad_input)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match='block_types'):
        timm.create_model('dat_tiny', block_types=('LS', 'LS', 'LXLDLD', 'LD'))
    with pytest.raises(ValueError, match='generation'):
        timm.create_model('dat_tiny', generation='dat3')
    with pytest.raises(ValueError, match=r'key_stride needs one value per stage \(4\), got \(1, 2\)'):
        timm.create_model('dat_tiny', key_strides=(1, 2))
    with pytest.raises(TypeError):
        timm.create_model('dat_tiny', not_an_argument=1)
