"""DAT backbones for detectron2. Importing this module registers two builders in `BACKBONE_REGISTRY`:
`build_dat_backbone` (the DAT features alone) and `build_dat_fpn_backbone` (with detectron2's FPN).

    from detectron2.config import get_cfg
    from dat.adapters.detectron2 import add_dat_config
    cfg = get_cfg()
    add_dat_config(cfg)
    cfg.merge_from_file('mask_rcnn_R_50_FPN_1x.yaml')
    cfg.MODEL.BACKBONE.NAME = 'build_dat_fpn_backbone'
    cfg.MODEL.DAT.NAME = 'dat_tiny'
    cfg.MODEL.DAT.CHECKPOINT = 'dat_tiny_in1k_224.pth'
    cfg.MODEL.FPN.IN_FEATURES = ['dat2', 'dat3', 'dat4', 'dat5']

Features are named like ResNet's res2..res5: `datK` has stride 2**K. `MODEL.DAT.CHECKPOINT` loads official
classification / detection / segmentation checkpoints with their key conversion; detectron2's own
`MODEL.WEIGHTS` loads whole detectron2 models as usual.
"""
from typing import Dict

import torch

try:
    from detectron2.config import CfgNode
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY, Backbone
    from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
except ImportError as error:
    raise ImportError(f'dat.adapters.detectron2 needs detectron2 ({error}); see '
                      'https://detectron2.readthedocs.io/en/latest/tutorials/install.html') from error

from dat.backbone import DatBackbone

__all__ = ['D2DatBackbone', 'add_dat_config', 'build_dat_backbone', 'build_dat_fpn_backbone']

FEATURE_NAMES = ('dat2', 'dat3', 'dat4', 'dat5')  # stage i has stride 2 ** (i + 2)


def add_dat_config(cfg: CfgNode) -> None:
    """Add the `MODEL.DAT` options (with their defaults) to a detectron2 config."""
    cfg.MODEL.DAT = CfgNode()
    cfg.MODEL.DAT.NAME = 'dat_tiny'
    cfg.MODEL.DAT.OUT_FEATURES = list(FEATURE_NAMES)
    cfg.MODEL.DAT.OUTPUT_NORMS = True
    cfg.MODEL.DAT.FROZEN_STAGES = -1
    cfg.MODEL.DAT.NORM_EVAL = False
    cfg.MODEL.DAT.GRAD_CHECKPOINTING = False
    cfg.MODEL.DAT.DROP_PATH_RATE = 0.2
    cfg.MODEL.DAT.CHECKPOINT = ''


class D2DatBackbone(Backbone):
    """A `DatBackbone` (`body`) with detectron2's Backbone interface: named features and `output_shape()`."""

    def __init__(self, body: DatBackbone):
        super().__init__()
        self.body = body
        self._out_features = [FEATURE_NAMES[i] for i in body.out_indices]
        self._out_feature_channels = dict(zip(self._out_features, body.out_channels))
        self._out_feature_strides = dict(zip(self._out_features, body.strides))

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return dict(zip(self._out_features, self.body(images)))


def _dat_from_cfg(cfg: CfgNode, input_shape: ShapeSpec) -> D2DatBackbone:
    options = cfg.MODEL.DAT
    unknown = [name for name in options.OUT_FEATURES if name not in FEATURE_NAMES]
    if unknown:
        raise ValueError(f'MODEL.DAT.OUT_FEATURES: unknown {unknown}; DAT features are {list(FEATURE_NAMES)}')
    body = DatBackbone(
        options.NAME, out_indices=[FEATURE_NAMES.index(name) for name in options.OUT_FEATURES],
        output_norms=options.OUTPUT_NORMS, frozen_stages=options.FROZEN_STAGES, norm_eval=options.NORM_EVAL,
        grad_checkpointing=options.GRAD_CHECKPOINTING, checkpoint=options.CHECKPOINT or None,
        in_chans=input_shape.channels, drop_path_rate=options.DROP_PATH_RATE)
    return D2DatBackbone(body)


@BACKBONE_REGISTRY.register()
def build_dat_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> D2DatBackbone:
    return _dat_from_cfg(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_dat_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    return FPN(bottom_up=_dat_from_cfg(cfg, input_shape), in_features=cfg.MODEL.FPN.IN_FEATURES,
               out_channels=cfg.MODEL.FPN.OUT_CHANNELS, norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(),
               fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
