"""DAT backbones inside torchvision's Mask R-CNN and RetinaNet and Hugging Face transformers' DETR and UperNet
(through TimmBackbone). detectron2, mmdet and mmseg: tests/test_frameworks.py."""
import re

import pytest
import timm
import torch

from conftest import synthetic_detection_batch

# narrow and shallow, with every block type of dat_tiny (window, shifted window, deformable)
NARROW = dict(dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), offset_groups=(1, 1, 2, 4), depths=(1, 1, 2, 2),
              block_types=('L', 'S', 'LD', 'LD'))


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
