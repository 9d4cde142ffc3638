"""DatBackbone: features of any image size, official detection/segmentation checkpoints, frozen stages,
norm_eval, gradient checkpointing and its errors."""
import pytest
import timm
import torch
import torch.nn.functional as F

from dat.backbone import DatBackbone
from dat.checkpoint import CheckpointError
from conftest import official_detector_checkpoint

NARROW = dict(dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), offset_groups=(1, 1, 2, 4))


def layer_norm_nchw(x, weight, bias):
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], weight, bias, eps=1e-5).permute(0, 3, 1, 2)


def randomise_norms(backbone):
    with torch.no_grad():
        for norm in backbone.norms:
            for param in norm.parameters():
                param.normal_()


def test_features_are_the_stage_outputs_through_their_norms():
    classifier = timm.create_model('dat_tiny', **NARROW).eval()
    backbone = DatBackbone(classifier).eval()
    randomise_norms(backbone)
    x = torch.randn(2, 3, 97, 161)
    with torch.no_grad():
        stages = classifier.forward_intermediates(x, intermediates_only=True)
        features = backbone(x)
    assert backbone.out_channels == [16, 32, 64, 128] and backbone.strides == [4, 8, 16, 32]
    assert [info['module'] for info in backbone.feature_info] == ['norms.0', 'norms.1', 'norms.2', 'norms.3']
    for stage, feature, norm, stride in zip(stages, features, backbone.norms, (4, 8, 16, 32)):
        assert feature.shape[2:] == (-(-97 // stride), -(-161 // stride))
        torch.testing.assert_close(feature, layer_norm_nchw(stage, norm.weight, norm.bias))


# the shallowest model with every block type of dat_tiny, for the large inputs
SHALLOW = dict(NARROW, depths=(1, 1, 2, 1), block_types=('L', 'S', 'LD', 'D'))


@pytest.mark.parametrize('size', [(32, 32), (33, 47), (128, 128), (800, 1333)])
def test_output_sizes(size):
    backbone = DatBackbone('dat_tiny', **SHALLOW).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, *size))
    for feature, channels, stride in zip(features, (16, 32, 64, 128), (4, 8, 16, 32)):
        assert feature.shape == (1, channels, -(-size[0] // stride), -(-size[1] // stride))
        assert torch.isfinite(feature).all()


def test_out_indices_select_outputs_and_drop_unused_stages():
    full = DatBackbone('dat_tiny', **NARROW).eval()
    partial = DatBackbone('dat_tiny', out_indices=(0, -3), **NARROW).eval()
    assert partial.out_indices == (0, 1) and len(partial.stages) == 2 and len(partial.norms) == 2
    assert partial.out_channels == [16, 32] and partial.strides == [4, 8]
    partial.load_checkpoint(full.state_dict())  # the stages it does not build are skipped
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(partial(x), full(x)[:2]):
            torch.testing.assert_close(a, b)
    plain = DatBackbone('dat_tiny', out_indices=(1, 3), output_norms=False, **NARROW).eval()
    assert not any(True for _ in plain.norms.parameters())
    assert [info['module'] for info in plain.feature_info] == ['stages.1', 'stages.3']


def test_unwrap_keeps_only_the_backbone_of_a_whole_detector():
    from dat.checkpoint import unwrap_state_dict
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.)
    segmentor = {'state_dict': {'module.backbone.stem.conv.weight': a, 'module.decode_head.conv_seg.weight': b,
                                'module.auxiliary_head.conv.weight': c}, 'meta': {'iter': 160000}}
    assert unwrap_state_dict(segmentor) == {'stem.conv.weight': a}
    assert unwrap_state_dict({'model': {'stem.conv.weight': a, 'head.fc.weight': b}}) == {
        'stem.conv.weight': a, 'head.fc.weight': b}


@pytest.mark.parametrize('wrapper', ['state_dict', 'model'])
def test_official_detection_checkpoint_reproduces_official_outputs(wrapper):
    """The official detection code returns norms[i](stage i output); the fixture holds the official stage
    outputs, so the loaded backbone must give exactly LayerNorm(official stage output) with the file's norms."""
    config, checkpoint, references, image = official_detector_checkpoint(wrapper=wrapper)
    backbone = DatBackbone(dict(config, out_indices=(0, 1, 2, 3), use_checkpoint=True, type='DAT'))
    assert backbone.load_checkpoint(checkpoint) == []
    backbone.eval()
    detector = checkpoint[wrapper]
    with torch.no_grad():
        features = backbone(image)
    for i, feature in enumerate(features):
        expected = layer_norm_nchw(references[i], detector[f'backbone.norms.{i}.norm.weight'],
                                   detector[f'backbone.norms.{i}.norm.bias'])
        torch.testing.assert_close(feature, expected, atol=2e-5, rtol=0)


def test_official_keys_convert_when_a_whole_detector_loads_its_state_dict():
    """torch's (and mmengine's) loaders give the backbone its `backbone.*` keys, in the official layout."""
    config, checkpoint, _, _ = official_detector_checkpoint()
    detector = torch.nn.ModuleDict({'backbone': DatBackbone(config)})
    missing, unexpected = detector.load_state_dict(checkpoint['state_dict'], strict=False)
    assert missing == [] and sorted(unexpected) == ['neck.lateral_convs.0.conv.weight',
                                                    'roi_head.bbox_head.fc_cls.weight']
    reference = DatBackbone(config)
    reference.load_checkpoint(checkpoint)
    loaded = detector['backbone'].state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_retinanet_style_checkpoint_without_the_first_norm():
    config, checkpoint, references, image = official_detector_checkpoint(out_indices=(1, 2, 3))
    backbone = DatBackbone(config, out_indices=(1, 2, 3))
    assert not any(True for _ in backbone.norms[0].parameters())
    assert backbone.load_checkpoint(checkpoint) == []
    # the same file into a backbone that also returns stride 4: that norm is not in the file and stays as built
    assert DatBackbone(config).load_checkpoint(checkpoint) == ['norms.0.weight', 'norms.0.bias']


def test_classification_checkpoint_loads_with_fresh_norms(tmp_path):
    classifier = timm.create_model('dat_tiny', **NARROW).eval()
    path = tmp_path / 'classifier.pth'
    torch.save({'model': classifier.state_dict()}, path)
    backbone = DatBackbone('dat_tiny', **NARROW)
    missing = backbone.load_checkpoint(path)
    assert sorted(missing) == sorted(f'norms.{i}.{p}' for i in range(4) for p in ('weight', 'bias'))
    for name, value in backbone.state_dict().items():
        if not name.startswith('norms.'):
            torch.testing.assert_close(value, classifier.state_dict()[name], msg=name)
    from_file = DatBackbone('dat_tiny', checkpoint=path, **NARROW)
    torch.testing.assert_close(from_file.stages[2].blocks[1].attn.rpe_table,
                               classifier.stages[2].blocks[1].attn.rpe_table)


def test_checkpoint_of_another_architecture_is_refused():
    small = timm.create_model('dat_small', **NARROW)
    with pytest.raises(CheckpointError, match='another variant'):
        DatBackbone('dat_tiny', checkpoint=small.state_dict(), **NARROW)
    wide = timm.create_model('dat_tiny', dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), offset_groups=(1, 1, 2, 4))
    with pytest.raises(CheckpointError, match='shape mismatches'):
        DatBackbone('dat_tiny', **NARROW).load_checkpoint({'state_dict': {f'backbone.{k}': v for k, v
                                                                          in wide.state_dict().items()}})
    swin_detector = {'backbone.patch_embed.proj.weight': torch.zeros(96, 3, 4, 4)}
    with pytest.raises(CheckpointError, match='unexpected keys'):
        DatBackbone('dat_tiny', **NARROW).load_checkpoint(swin_detector)


@pytest.mark.parametrize('kwargs,message', [
    (dict(out_indices=(0, 4)), r'\[4\] out of range'),
    (dict(out_indices=(1, 1)), 'twice'),
    (dict(out_indices=()), 'non-empty'),
    (dict(out_indices=2), 'non-empty sequence'),
    (dict(frozen_stages=5), 'frozen_stages must be an int from -1'),
    (dict(frozen_stages=-2), 'frozen_stages'),
    (dict(out_indices=(0, 1), frozen_stages=3), 'all 2 stages'),
    (dict(model='dat_huge'), "unknown DAT model 'dat_huge'"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DatBackbone(**dict(dict(model='dat_tiny', **NARROW), **kwargs))


def test_bad_model_argument_types():
    with pytest.raises(TypeError, match='registered name'):
        DatBackbone(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match='built model instance'):
        DatBackbone(timm.create_model('dat_tiny', **NARROW), drop_path_rate=0.1)
    with pytest.raises(ValueError, match='too small'):
        DatBackbone('dat_tiny', **NARROW)(torch.randn(1, 3, 16, 64))


def test_frozen_stages_do_not_learn_and_stay_in_eval():
    backbone = DatBackbone('dat_tiny', frozen_stages=2, drop_path_rate=0.5, **NARROW)
    backbone.train()
    frozen = [backbone.stem, backbone.stages[0], backbone.stages[1], backbone.norms[0], backbone.norms[1]]
    assert all(not m.training for f in frozen for m in f.modules())
    assert all(m.training for m in backbone.stages[2].modules()) and backbone.training
    for name, param in backbone.named_parameters():
        assert param.requires_grad == name.startswith(('stages.2.', 'stages.3.', 'norms.2.', 'norms.3.')), name
    before = {name: param.detach().clone() for name, param in backbone.named_parameters()}
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1)  # all of them, as a careless training script would
    x = torch.randn(1, 3, 64, 64)
    sum(feature.square().mean() for feature in backbone(x)).backward()
    optimizer.step()
    for name, param in backbone.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
        if not param.requires_grad:
            assert torch.equal(before[name], param), name
    assert not torch.equal(before['stages.2.downsample.conv.weight'], backbone.stages[2].downsample.conv.weight)
    # frozen stages in eval: their drop path is off, so their outputs are deterministic in train mode
    stem_and_stage0 = lambda: backbone.stages[0](backbone.stem(x))  # noqa: E731
    torch.testing.assert_close(stem_and_stage0(), stem_and_stage0())
    assert DatBackbone('dat_tiny', frozen_stages=0, **NARROW).stem.conv.weight.requires_grad is False


def test_norm_eval_keeps_norm_layers_in_eval():
    backbone = DatBackbone('dat_tiny', norm_eval=True, **NARROW).train()
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) > 20 and not any(m.training for m in norms)
    assert backbone.stages[2].blocks[1].attn.training and backbone.training
    assert all(m.training for m in DatBackbone('dat_tiny', **NARROW).train().modules())
    assert not any(m.training for m in backbone.eval().modules())


def test_grad_checkpointing_recomputes_with_equal_gradients():
    backbone = DatBackbone('dat_tiny', frozen_stages=1, **NARROW).train()
    randomise_norms(backbone)
    x = torch.randn(1, 3, 64, 96)

    def run():
        backbone.zero_grad()
        features = backbone(x)
        sum((feature * torch.linspace(0, 1, feature.shape[-1])).sum() for feature in features).backward()
        return features, {n: p.grad.clone() for n, p in backbone.named_parameters() if p.requires_grad}

    plain_features, plain_grads = run()
    backbone.set_grad_checkpointing()
    calls = []
    handle = backbone.stages[3].blocks[1].attn.register_forward_hook(lambda *args: calls.append(1))
    checkpointed_features, checkpointed_grads = run()
    handle.remove()
    assert len(calls) == 2  # the forward, and the recomputation in backward
    for a, b in zip(plain_features, checkpointed_features):
        torch.testing.assert_close(a, b)
    assert plain_grads.keys() == checkpointed_grads.keys() and 'stages.1.downsample.conv.weight' in plain_grads
    for name in plain_grads:
        torch.testing.assert_close(checkpointed_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert DatBackbone('dat_tiny', grad_checkpointing=True, **NARROW).stages[0].grad_checkpointing


def test_no_weight_decay_names_position_tables():
    backbone = DatBackbone('dat_tiny', **NARROW)
    names = backbone.no_weight_decay()
    assert names and all(name.endswith(('relative_position_bias_table', 'rpe_table')) for name in names)
    assert names <= set(dict(backbone.named_parameters()))
