"""DAT backbones in detection and segmentation frameworks, one module per framework (imported on demand, so
none of the frameworks is a dependency of `dat`):

* `dat.adapters.torchvision`: `dat_fpn_backbone(...)` for torchvision's FasterRCNN / MaskRCNN / RetinaNet / FCOS.
* `dat.adapters.mmdet`: registers `DatBackbone` with mmdet's and mmseg's `MODELS` registries on import.
* `dat.adapters.detectron2`: `add_dat_config(cfg)` and the backbone builders `build_dat_backbone` /
  `build_dat_fpn_backbone` in detectron2's `BACKBONE_REGISTRY`.
* Hugging Face transformers needs no adapter: after `import dat`, `TimmBackboneConfig(backbone='dat_tiny')`
  works in any model that takes a backbone config (DETR, UperNet, Mask2Former, ...).
"""
