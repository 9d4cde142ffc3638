"""DAT + FPN for torchvision's detection models, in the place of `BackboneWithFPN`.

    from torchvision.models.detection import MaskRCNN
    from dat.adapters.torchvision import dat_fpn_backbone
    model = MaskRCNN(dat_fpn_backbone('dat_tiny', checkpoint='dat_tiny_in1k_224.pth', frozen_stages=1),
                     num_classes=91)

The FPN outputs are named '0'..'3' (strides 4..32) and 'pool' (stride 64), as those of torchvision's ResNet
FPN backbones, so the default anchor generators and RoI poolers of FasterRCNN / MaskRCNN apply unchanged. For
RetinaNet / FCOS use `out_indices=(1, 2, 3)` and `extra_blocks=LastLevelP6P7(256, 256)` (strides 8..128).
"""
from collections import OrderedDict
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from dat.backbone import DatBackbone

__all__ = ['DatFpnBackbone', 'dat_fpn_backbone']


class DatFpnBackbone(nn.Module):
    """A `DatBackbone` (`body`) followed by torchvision's `FeaturePyramidNetwork` (`fpn`); `out_channels` is the
    channel count of every returned map, which torchvision's detectors read."""

    def __init__(self, body: DatBackbone, out_channels: int = 256, extra_blocks: Optional[ExtraFPNBlock] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, out_channels,
                                         extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks,
                                         norm_layer=norm_layer)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.body(images)
        return self.fpn(OrderedDict((str(i), feature) for i, feature in enumerate(features)))


def dat_fpn_backbone(model='dat_tiny', out_channels: int = 256, extra_blocks: Optional[ExtraFPNBlock] = None,
                     norm_layer: Optional[Callable[..., nn.Module]] = None, **backbone_kwargs) -> DatFpnBackbone:
    """`DatFpnBackbone` of `DatBackbone(model, **backbone_kwargs)` (out_indices, frozen_stages, checkpoint, ...)."""
    return DatFpnBackbone(DatBackbone(model, **backbone_kwargs), out_channels, extra_blocks, norm_layer)
