"""DAT backbones inside detection / segmentation frameworks: torchvision (Mask R-CNN, RetinaNet), Hugging Face
transformers (DETR, UperNet through TimmBackbone), mmdet / mmseg registries and detectron2's backbone registry.
A framework that is not installed skips its tests with the reason."""
import importlib
import re
import sys
import types
from dataclasses import dataclass

import pytest
import timm
import torch

from dat.backbone import DatBackbone

# narrow and shallow, with every block type of dat_tiny (window, shifted window, deformable)
NARROW = dict(dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), offset_groups=(1, 1, 2, 4), depths=(1, 1, 2, 2),
              block_types=('L', 'S', 'LD', 'LD'))


def synthetic_detection_batch(num_classes=3):
    """Two 128x160 images, each with two boxes and their instance masks."""
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 128, 160, generator=generator) for _ in range(2)]
    targets = []
    for offset in (0, 20):
        boxes = torch.tensor([[10. + offset, 12., 70. + offset, 90.], [80., 30. + offset, 150., 110.]])
        masks = torch.zeros(2, 128, 160, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
            mask[y0:y1, x0:x1] = 1
        targets.append(dict(boxes=boxes, labels=torch.tensor([1, num_classes - 1]), masks=masks))
    return images, targets


def test_torchvision_mask_rcnn_trains_and_infers():
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
    from dat.adapters.torchvision import dat_fpn_backbone
    backbone = dat_fpn_backbone('dat_tiny', out_channels=32, frozen_stages=0, **NARROW)
    model = MaskRCNN(backbone, num_classes=3, min_size=128, max_size=160,
                     rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_batch_size_per_image=32,
                     rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_batch_size_per_image=16,
                     mask_head=MaskRCNNHeads(32, (256,), 1))  # one conv into the default mask predictor
    images, targets = synthetic_detection_batch()

    model.train()
    features = backbone(torch.stack(images))
    assert list(features) == ['0', '1', '2', '3', 'pool']
    assert [tuple(f.shape[1:]) for f in features.values()] == [(32, 32, 40), (32, 16, 20), (32, 8, 10), (32, 4, 5),
                                                               (32, 2, 3)]
    losses = model(images, targets)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg'}
    assert all(torch.isfinite(loss) and loss > 0 for loss in losses.values())
    sum(losses.values()).backward()
    body = backbone.body
    assert body.stem.conv.weight.grad is None  # frozen
    for param in (body.stages[0].blocks[0].attn.proj_qkv.weight, body.stages[3].blocks[1].attn.proj_q.weight,
                  body.norms[3].weight):
        assert param.grad is not None and param.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for detection in detections:
        count = len(detection['boxes'])
        assert detection['boxes'].shape == (count, 4) and detection['scores'].shape == (count,)
        assert detection['masks'].shape == (count, 1, 128, 160)
        boxes = detection['boxes']
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= 160).all() and (boxes[:, 1::2] <= 128).all()


def test_torchvision_retinanet_on_strides_8_to_128():
    from torchvision.models.detection import RetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from dat.adapters.torchvision import dat_fpn_backbone
    backbone = dat_fpn_backbone('dat_tiny', out_channels=32, out_indices=(1, 2, 3),
                                extra_blocks=LastLevelP6P7(32, 32), **NARROW)
    model = RetinaNet(backbone, num_classes=3, min_size=128, max_size=160).train()
    images, targets = synthetic_detection_batch()
    losses = model(images, [{k: v for k, v in t.items() if k != 'masks'} for t in targets])
    assert all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    assert backbone.body.stem.conv.weight.grad.abs().sum() > 0


def test_torchvision_fpn_inputs_are_the_dat_features():
    """The FPN sees exactly the DatBackbone outputs, named '0', '1', ... finest first."""
    from dat.adapters.torchvision import dat_fpn_backbone
    backbone = dat_fpn_backbone('dat_tiny', out_channels=16, out_indices=(2, 3), **NARROW).eval()
    seen = {}
    backbone.fpn.register_forward_pre_hook(lambda module, args: seen.update(args[0]))
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        backbone(x)
        expected = backbone.body(x)
    assert list(seen) == ['0', '1']
    for name, feature in zip(('0', '1'), expected):
        torch.testing.assert_close(seen[name], feature)


def _features_like_dat(model_name, feature_net, images, indices):
    """The stage outputs of a DAT classifier holding the weights of timm's features_only net."""
    classifier = timm.create_model(model_name, num_classes=0).eval()
    state_dict = {re.sub(r'^stages_(\d+)', r'stages.\1', key): value for key, value in feature_net.state_dict().items()}
    missing, unexpected = classifier.load_state_dict(state_dict, strict=False)
    assert not unexpected and all(key.startswith('norm.') for key in missing)  # the final norm is not a feature
    with torch.no_grad():
        return classifier.forward_intermediates(images, indices=indices, intermediates_only=True)


def test_transformers_upernet_and_detr_with_a_dat_timm_backbone():
    pytest.importorskip('transformers', reason='Hugging Face transformers is not installed')
    from transformers import (DetrConfig, DetrForObjectDetection, TimmBackboneConfig, UperNetConfig,
                              UperNetForSemanticSegmentation)
    images = torch.randn(1, 3, 32, 64)  # small: transformers builds the full-width dat_tiny
    upernet = UperNetForSemanticSegmentation(UperNetConfig(
        backbone_config=TimmBackboneConfig(backbone='dat_tiny', out_indices=[0, 1, 2, 3]), hidden_size=16,
        use_auxiliary_head=False, num_labels=5)).eval()
    captured = []
    upernet.backbone.register_forward_hook(lambda module, args, output: captured.append(output.feature_maps))
    with torch.no_grad():
        output = upernet(pixel_values=images)
    feature_maps, = captured
    assert output.logits.shape == (1, 5, 32, 64) and torch.isfinite(output.logits).all()
    assert upernet.backbone.channels == [96, 192, 384, 768]
    for feature, expected in zip(feature_maps, _features_like_dat('dat_tiny', upernet.backbone._backbone, images,
                                                                    [0, 1, 2, 3])):
        torch.testing.assert_close(feature, expected)

    detr = DetrForObjectDetection(DetrConfig(
        backbone_config=TimmBackboneConfig(backbone='dat_tiny', out_indices=[3]), d_model=32, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, num_queries=5, num_labels=3)).train()
    labels = [{'class_labels': torch.tensor([1]), 'boxes': torch.tensor([[0.5, 0.5, 0.2, 0.3]])}]
    with torch.no_grad():
        output = detr(pixel_values=images, labels=labels)
    assert output.logits.shape == (1, 5, 4) and output.pred_boxes.shape == (1, 5, 4)
    assert torch.isfinite(output.loss) and output.loss > 0


def openmmlab_registry(framework, need_models):
    try:
        registry = importlib.import_module(f'{framework}.registry').MODELS
        if need_models:  # building from the registry first imports all of the framework's models
            importlib.import_module(f'{framework}.models')
    except ImportError as error:
        pytest.skip(f'{framework}{".models" if need_models else ""} is not importable: {error}')
    return registry


@pytest.mark.parametrize('framework', ['mmdet', 'mmseg'])
def test_openmmlab_registration(framework):
    registry = openmmlab_registry(framework, need_models=False)
    from dat.adapters import mmdet as adapter
    assert framework in adapter.REGISTERED_IN and registry.module_dict['DatBackbone'] is DatBackbone


@pytest.mark.parametrize('framework', ['mmdet', 'mmseg'])
def test_openmmlab_registry_builds_the_backbone(framework):
    registry = openmmlab_registry(framework, need_models=True)
    import dat.adapters.mmdet  # noqa: F401 - registers DatBackbone
    config = dict(type='DatBackbone', model='dat_tiny', out_indices=(1, 2, 3), frozen_stages=1, norm_eval=True,
                  **NARROW)
    backbone = registry.build(config)
    assert isinstance(backbone, DatBackbone) and backbone.out_channels == [32, 64, 128]
    assert not backbone.stages[0].blocks[0].attn.proj_qkv.weight.requires_grad
    direct = DatBackbone('dat_tiny', out_indices=(1, 2, 3), **NARROW).eval()
    direct.load_state_dict(backbone.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(backbone.eval()(x), direct(x)):
            torch.testing.assert_close(a, b)


@dataclass
class _ShapeSpec:
    channels: int = None
    height: int = None
    width: int = None
    stride: int = None


def _detectron2_stand_in(monkeypatch):
    """detectron2 is not on PyPI; where it is not installed, the adapter runs against a stand-in of the
    documented interface it uses (Backbone with `_out_feature_*` and `output_shape()`, a registry, CfgNode)."""
    import torch.nn as nn

    class Backbone(nn.Module):
        def output_shape(self):
            return {name: _ShapeSpec(channels=self._out_feature_channels[name],
                                     stride=self._out_feature_strides[name]) for name in self._out_features}

    class Registry(dict):  # dict.get(name) is the registry's look-up
        def register(self):
            def add(function):
                self[function.__name__] = function
                return function
            return add

    class CfgNode(types.SimpleNamespace):
        pass

    modules = {name: types.ModuleType(name) for name in (
        'detectron2', 'detectron2.config', 'detectron2.layers', 'detectron2.modeling', 'detectron2.modeling.backbone',
        'detectron2.modeling.backbone.fpn')}
    modules['detectron2.config'].CfgNode = CfgNode
    modules['detectron2.layers'].ShapeSpec = _ShapeSpec
    modules['detectron2.modeling'].Backbone = Backbone
    modules['detectron2.modeling'].BACKBONE_REGISTRY = Registry()
    modules['detectron2.modeling.backbone.fpn'].FPN = lambda **kwargs: kwargs
    modules['detectron2.modeling.backbone.fpn'].LastLevelMaxPool = lambda: 'LastLevelMaxPool'
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    # the adapter is imported anew against the stand-in, and both forgotten after the test (set, then delete:
    # undoing restores the state before the test, whether the adapter had been imported or not)
    import dat.adapters
    monkeypatch.setitem(sys.modules, 'dat.adapters.detectron2', None)
    monkeypatch.delitem(sys.modules, 'dat.adapters.detectron2')
    monkeypatch.setattr(dat.adapters, 'detectron2', None, raising=False)
    monkeypatch.delattr(dat.adapters, 'detectron2')
    fpn_options = CfgNode(IN_FEATURES=['dat3', 'dat5'], OUT_CHANNELS=16, NORM='', FUSE_TYPE='sum')
    config = CfgNode(MODEL=CfgNode(FPN=fpn_options))
    return config, modules['detectron2.modeling'].BACKBONE_REGISTRY


def test_detectron2_backbone(monkeypatch):
    try:
        from detectron2.config import get_cfg
        from detectron2.layers import ShapeSpec
        from detectron2.modeling import BACKBONE_REGISTRY
        config = get_cfg()
        config.MODEL.FPN.IN_FEATURES = ['dat3', 'dat5']
        config.MODEL.FPN.OUT_CHANNELS = 16
        real = True
    except ImportError:
        config, BACKBONE_REGISTRY = _detectron2_stand_in(monkeypatch)
        ShapeSpec, real = _ShapeSpec, False
    from dat.adapters.detectron2 import D2DatBackbone, add_dat_config
    add_dat_config(config)
    config.MODEL.DAT.OUT_FEATURES = ['dat3', 'dat5']
    config.MODEL.DAT.FROZEN_STAGES = 1
    backbone = BACKBONE_REGISTRY.get('build_dat_backbone')(config, ShapeSpec(channels=3))
    assert isinstance(backbone, D2DatBackbone) and backbone.body.out_indices == (1, 3)
    shapes = backbone.output_shape()
    assert {name: (s.channels, s.stride) for name, s in shapes.items()} == {'dat3': (192, 8), 'dat5': (768, 32)}
    assert not backbone.body.stages[0].blocks[0].attn.proj_qkv.weight.requires_grad
    x = torch.randn(1, 3, 64, 96)
    body_outputs = []
    backbone.body.register_forward_hook(lambda module, args, output: body_outputs.append(output))
    with torch.no_grad():
        features = backbone.eval()(x)
    assert list(features) == ['dat3', 'dat5']
    assert features['dat3'] is body_outputs[0][0] and features['dat5'] is body_outputs[0][1]
    if real:
        fpn = BACKBONE_REGISTRY.get('build_dat_fpn_backbone')(config, ShapeSpec(channels=3)).eval()
        with torch.no_grad():
            pyramid = fpn(x)
        assert {name: tuple(f.shape[1:]) for name, f in pyramid.items()} == {
            'p3': (16, 8, 12), 'p5': (16, 2, 3), 'p6': (16, 1, 2)}
    else:
        fpn = BACKBONE_REGISTRY.get('build_dat_fpn_backbone')(config, ShapeSpec(channels=3))
        assert fpn['in_features'] == ['dat3', 'dat5'] and isinstance(fpn['bottom_up'], D2DatBackbone)
    config.MODEL.DAT.OUT_FEATURES = ['res4']
    with pytest.raises(ValueError, match="unknown \\['res4'\\]"):
        BACKBONE_REGISTRY.get('build_dat_backbone')(config, ShapeSpec(channels=3))
