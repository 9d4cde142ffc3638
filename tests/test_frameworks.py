"""DAT inside the real detection and segmentation frameworks: detectron2's Mask R-CNN, mmdet's Mask R-CNN and
mmseg's UperNet, each built from the framework's own config file with a DAT backbone in place of its ResNet, run a
training step on CPU (finite losses, gradients in every trained backbone stage) and inference; official
DAT-Detection / DAT-Segmentation checkpoints load through the frameworks' checkpoint loaders.

The frameworks come from the wheels in ../shared/wheels (scripts/install_frameworks.sh installs them): where that
folder is absent these tests skip; where it is present a framework that does not import fails them."""
import json
import os

import pytest
import torch

from dat.backbone import DatBackbone
from dat.checkpoint import checkpoint_filter_fn
from conftest import import_framework, official_detector_checkpoint, official_fixture, synthetic_detection_batch

NUM_CLASSES = 3
NANO_CHANNELS = [32, 64, 128, 256]  # dat_nano's stage widths: small enough for a CPU training step in seconds
FROZEN_STAGES = 1  # the stem and stage 0 stay fixed, so the tests also see the option pass through each framework


def uint8_images():
    """The synthetic batch's images as the frameworks' data pipelines give them: CHW, uint8 0..255."""
    images, targets = synthetic_detection_batch(NUM_CLASSES)
    return [(image * 255).to(torch.uint8) for image in images], targets


def assert_gradients_reach_the_backbone(backbone: DatBackbone):
    """Frozen parts got no gradient; every trained parameter a finite one, non-zero in each trained stage."""
    gradients = {name: param.grad for name, param in backbone.named_parameters()}
    frozen = ('stem.',) + tuple(f'{part}.{i}.' for i in range(FROZEN_STAGES) for part in ('stages', 'norms'))
    for name, gradient in gradients.items():
        if name.startswith(frozen):
            assert gradient is None, name
        else:
            assert gradient is not None and torch.isfinite(gradient).all(), name
    for i in range(FROZEN_STAGES, len(backbone.stages)):
        for part in ('stages', 'norms'):
            assert sum(g.abs().sum() for n, g in gradients.items() if n.startswith(f'{part}.{i}.')) > 0, (part, i)


def assert_finite_losses(losses):
    assert losses and all(torch.isfinite(loss) for loss in losses), losses


def assert_boxes_inside_the_image(boxes, height=128, width=160):
    assert torch.isfinite(boxes).all() and (boxes >= 0).all()
    assert (boxes[:, 0::2] <= width).all() and (boxes[:, 1::2] <= height).all()


def assert_state_equals(module, expected):
    """`module` holds exactly the tensors of `expected` (a state dict in its layout)."""
    state = module.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


# ---- detectron2 ----

def detectron2_config(dat_name='dat_nano'):
    """detectron2's COCO Mask R-CNN R50-FPN config (from its model zoo) with the DAT + FPN backbone."""
    model_zoo = import_framework('detectron2.model_zoo')
    from detectron2.config import get_cfg
    from dat.adapters.detectron2 import add_dat_config
    cfg = get_cfg()
    add_dat_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file('COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml'))
    cfg.MODEL.DEVICE = 'cpu'
    cfg.MODEL.WEIGHTS = ''  # the config's ImageNet ResNet weights are no part of a DAT model
    cfg.MODEL.BACKBONE.NAME = 'build_dat_fpn_backbone'
    cfg.MODEL.DAT.NAME = dat_name
    cfg.MODEL.DAT.FROZEN_STAGES = FROZEN_STAGES
    cfg.MODEL.FPN.IN_FEATURES = ['dat2', 'dat3', 'dat4', 'dat5']
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES
    # fewer proposals, sampled boxes and detections than for COCO: the images are 128x160
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 200
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.TEST.DETECTIONS_PER_IMAGE = 10
    return cfg


def test_detectron2_mask_rcnn_trains_and_infers():
    cfg = detectron2_config()
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage
    from dat.adapters.detectron2 import D2DatBackbone
    model = build_model(cfg)
    dat_features = model.backbone.bottom_up
    assert isinstance(dat_features, D2DatBackbone)
    assert {name: (shape.channels, shape.stride) for name, shape in dat_features.output_shape().items()} == {
        'dat2': (32, 4), 'dat3': (64, 8), 'dat4': (128, 16), 'dat5': (256, 32)}
    images, targets = uint8_images()
    batch = []
    for image, target in zip(images, targets):
        instances = Instances(image.shape[1:], gt_boxes=Boxes(target['boxes']), gt_classes=target['labels'],
                              gt_masks=BitMasks(target['masks'].bool()))
        batch.append(dict(image=image, instances=instances, height=image.shape[1], width=image.shape[2]))

    model.train()
    with EventStorage():  # detectron2's losses log to an event storage, which its trainer opens
        losses = model(batch)
    assert set(losses) == {'loss_cls', 'loss_box_reg', 'loss_mask', 'loss_rpn_cls', 'loss_rpn_loc'}
    assert_finite_losses(losses.values())
    sum(losses.values()).backward()
    assert_gradients_reach_the_backbone(dat_features.body)

    model.eval()
    with torch.no_grad():
        outputs = model([{key: value for key, value in inputs.items() if key != 'instances'} for inputs in batch])
    assert len(outputs) == 2
    for output in outputs:
        detections = output['instances']
        count = len(detections)
        assert 0 < count <= 10 and detections.image_size == (128, 160)
        assert_boxes_inside_the_image(detections.pred_boxes.tensor)
        assert detections.scores.shape == (count,) and torch.isfinite(detections.scores).all()
        assert ((detections.pred_classes >= 0) & (detections.pred_classes < NUM_CLASSES)).all()
        assert detections.pred_masks.shape == (count, 128, 160)


def test_detectron2_rejects_features_dat_does_not_have():
    cfg = detectron2_config()
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY
    cfg.MODEL.DAT.OUT_FEATURES = ['dat3', 'res4']
    with pytest.raises(ValueError, match="unknown \\['res4'\\]"):
        BACKBONE_REGISTRY.get('build_dat_backbone')(cfg, ShapeSpec(channels=3))


def official_dat_tiny_detector(path):
    """An official DAT-Detection Mask R-CNN checkpoint of DAT-T (random tensors in the layout of the released
    classification checkpoint, without its classifier, plus the detection code's output norms) written to `path`;
    returns the detector's state dict."""
    layout = json.loads(official_fixture('official_layouts.json').read_text())['dat_tiny_224']
    generator = torch.Generator().manual_seed(5)
    detector = {f'backbone.{key}': torch.randn(shape, generator=generator)
                for key, shape in layout['state_dict'].items() if not key.startswith(('cls_head.', 'cls_norm.'))}
    for i, dim in enumerate(layout['official_config']['dims']):
        detector.update({f'backbone.norms.{i}.norm.{name}': torch.randn(dim, generator=generator)
                         for name in ('weight', 'bias')})
    detector['neck.fpn_convs.0.conv.weight'] = torch.randn(256, 256, 3, 3, generator=generator)
    torch.save({'meta': {'epoch': 12}, 'state_dict': detector}, path)
    return detector


def test_detectron2_takes_official_detection_weights_and_reloads_its_own_checkpoint(tmp_path):
    """An official DAT-Detection checkpoint (an mmdet file: detectron2's checkpointer reads only files with a flat
    `model` dict) goes in through `MODEL.DAT.CHECKPOINT`; the detectron2 model saved with it loads back through
    detectron2's `DetectionCheckpointer` (`MODEL.WEIGHTS`, as its trainer and predictor load)."""
    cfg = detectron2_config('dat_tiny')  # the released architecture: MODEL.DAT.NAME takes registered names
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    official_path = tmp_path / 'mask_rcnn_dat_tiny_official.pth'
    official = official_dat_tiny_detector(official_path)
    cfg.MODEL.DAT.CHECKPOINT = str(official_path)
    model = build_model(cfg)
    expected = checkpoint_filter_fn({'state_dict': official}, model.backbone.bottom_up.body)
    assert_state_equals(model.backbone.bottom_up.body, expected)

    DetectionCheckpointer(model, save_dir=str(tmp_path)).save('model_final')
    cfg.MODEL.DAT.CHECKPOINT = ''
    cfg.MODEL.WEIGHTS = str(tmp_path / 'model_final.pth')
    reloaded = build_model(cfg)
    DetectionCheckpointer(reloaded).load(cfg.MODEL.WEIGHTS)
    assert_state_equals(reloaded, model.state_dict())


# ---- mmdet and mmseg ----

MMDET_MASK_RCNN = 'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
MMSEG_UPERNET = 'upernet/upernet_r50_4xb4-160k_ade20k-512x512.py'


def openmmlab_model_config(framework, config_file, backbone, channels):
    """The model section of a config file shipped inside mmdet / mmseg, with `backbone` (DatBackbone arguments)
    in place of its ResNet and the neck or heads sized for the backbone's output `channels`. Read by path: mmengine
    resolves `mmdet::` names through pkg_resources, which the setuptools of this stack no longer has."""
    package = import_framework(framework)
    from mmengine.config import Config
    import_framework(f'{framework}.utils').register_all_modules(init_default_scope=False)
    import dat.adapters.mmdet  # noqa: F401 - registers DatBackbone
    model = Config.fromfile(os.path.join(os.path.dirname(package.__file__), '.mim', 'configs', config_file)).model
    model.backbone = dict(type='DatBackbone', **backbone)
    if framework == 'mmdet':
        model.neck.in_channels = channels
        model.roi_head.bbox_head.num_classes = model.roi_head.mask_head.num_classes = NUM_CLASSES
        # fewer proposals, sampled boxes and detections than for COCO: the images are 128x160
        model.train_cfg.rpn_proposal.max_per_img = 200
        model.train_cfg.rcnn.sampler.num = 64
        model.test_cfg.rcnn.max_per_img = 10
    else:
        model.pretrained = None  # the config's ImageNet ResNet, which EncoderDecoder would hand to the backbone
        model.data_preprocessor.size = (128, 160)  # the config pads every image to its 512x512 crops
        model.decode_head.in_channels = channels
        model.auxiliary_head.in_channels = channels[2]  # the auxiliary FCN head reads stage 2 (in_index=2)
        # narrower heads than for ADE20K keep the CPU step short
        model.decode_head.channels, model.auxiliary_head.channels = 64, 32
        model.decode_head.num_classes = model.auxiliary_head.num_classes = NUM_CLASSES
    return model


def build_openmmlab_model(framework, model_config):
    from mmengine.registry import DefaultScope
    registry = import_framework(f'{framework}.registry').MODELS
    # the scope picks the registry of nested `type`s: mmdet's and mmseg's tests run in one process
    with DefaultScope.overwrite_default_scope(framework):
        return registry.build(model_config)


def mmdet_sample(image, target, metainfo):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    masks = BitmapMasks(target['masks'].numpy(), *image.shape[1:])
    return DetDataSample(metainfo=metainfo, gt_instances=InstanceData(
        bboxes=target['boxes'], labels=target['labels'], masks=masks))


def mmseg_sample(image, target, metainfo):
    """A class map painted from the instance masks."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    class_map = torch.zeros(1, *image.shape[1:], dtype=torch.long)
    for mask, label in zip(target['masks'], target['labels']):
        class_map[0][mask.bool()] = label
    return SegDataSample(metainfo=metainfo, gt_sem_seg=PixelData(data=class_map))


def openmmlab_batch(framework):
    """The synthetic images and their targets as the framework's data pipeline packs them."""
    make_sample = {'mmdet': mmdet_sample, 'mmseg': mmseg_sample}[framework]
    images, targets = uint8_images()
    samples = [make_sample(image, target, dict(img_shape=tuple(image.shape[1:]), ori_shape=tuple(image.shape[1:]),
                                               scale_factor=(1., 1.)))
               for image, target in zip(images, targets)]
    return dict(inputs=images, data_samples=samples)


@pytest.mark.parametrize('framework,config_file,loss_names', [
    ('mmdet', MMDET_MASK_RCNN, {'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'loss_mask'}),
    ('mmseg', MMSEG_UPERNET, {'decode.loss_ce', 'aux.loss_ce'}),
])
def test_openmmlab_model_trains_and_infers(framework, config_file, loss_names):
    """mmdet's Mask R-CNN and mmseg's UperNet, each from the framework's config file, with dat_nano."""
    model = build_openmmlab_model(framework, openmmlab_model_config(
        framework, config_file, dict(model='dat_nano', frozen_stages=FROZEN_STAGES), NANO_CHANNELS))
    assert isinstance(model.backbone, DatBackbone)
    data = openmmlab_batch(framework)

    model.train()
    losses = model(**model.data_preprocessor(data, True), mode='loss')
    assert loss_names <= set(losses)
    loss, logged = model.parse_losses(losses)  # what the framework's train_step sums and logs
    assert_finite_losses([loss] + [logged[name] for name in loss_names])
    loss.backward()
    assert_gradients_reach_the_backbone(model.backbone)

    model.eval()
    with torch.no_grad():
        results = model.test_step(data)
    assert len(results) == 2
    for result in results:
        if framework == 'mmdet':
            detections = result.pred_instances
            count = len(detections)
            assert 0 < count <= 10
            assert_boxes_inside_the_image(detections.bboxes)
            assert detections.scores.shape == (count,) and torch.isfinite(detections.scores).all()
            assert ((detections.labels >= 0) & (detections.labels < NUM_CLASSES)).all()
            assert detections.masks.shape == (count, 128, 160)
        else:
            assert result.seg_logits.data.shape == (NUM_CLASSES, 128, 160)
            assert torch.isfinite(result.seg_logits.data).all()
            assert result.pred_sem_seg.data.shape == (1, 128, 160)
            assert set(result.pred_sem_seg.data.unique().tolist()) <= set(range(NUM_CLASSES))


@pytest.mark.parametrize('framework,config_file', [('mmdet', MMDET_MASK_RCNN), ('mmseg', MMSEG_UPERNET)])
def test_openmmlab_checkpoint_loaders_take_official_checkpoints(framework, config_file, tmp_path):
    """An official DAT-Detection / DAT-Segmentation checkpoint (the official backbone keys under `backbone.`, next
    to the neck and heads) through mmengine's loaders: `load_checkpoint` into the whole model (what a config's
    `load_from` runs) and the `Pretrained` initialiser with `prefix='backbone.'` on the backbone (what
    `init_cfg=dict(type='Pretrained', prefix='backbone.', ...)` runs on an mmengine module)."""
    import_framework('mmengine')
    from mmengine.model.weight_init import PretrainedInit
    from mmengine.runner import load_checkpoint
    official_config, checkpoint, _, _ = official_detector_checkpoint()
    path = tmp_path / 'official.pth'
    torch.save(checkpoint, path)
    model_config = openmmlab_model_config(framework, config_file, dict(model=official_config),
                                          official_config['dims'])

    whole = build_openmmlab_model(framework, model_config)
    expected = checkpoint_filter_fn(checkpoint, whole.backbone)
    load_checkpoint(whole, str(path))
    assert_state_equals(whole.backbone, expected)

    backbone_only = build_openmmlab_model(framework, model_config)
    PretrainedInit(checkpoint=str(path), prefix='backbone.')(backbone_only.backbone)
    assert_state_equals(backbone_only.backbone, expected)


@pytest.mark.parametrize('framework', ['mmdet', 'mmseg'])
def test_openmmlab_registration(framework):
    registry = import_framework(f'{framework}.registry').MODELS
    from dat.adapters import mmdet as adapter
    assert framework in adapter.REGISTERED_IN and registry.module_dict['DatBackbone'] is DatBackbone
