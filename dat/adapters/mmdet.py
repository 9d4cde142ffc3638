"""Registers `DatBackbone` with OpenMMLab's model registries: mmdet's and mmseg's `MODELS`, whichever of
them is installed. Importing this module is all it takes; in a config:

    custom_imports = dict(imports=['dat.adapters.mmdet'], allow_failed_imports=False)
    model = dict(backbone=dict(type='DatBackbone', model='dat_tiny', out_indices=(0, 1, 2, 3),
                               drop_path_rate=0.2, checkpoint='dat_tiny_in1k_224.pth'), ...)

`checkpoint` loads official classification, DAT-Detection or DAT-Segmentation checkpoints with their key
conversion; mmengine's loaders (`load_from`, `load_checkpoint`) convert the official `backbone.` keys of a whole
DAT-Detection / DAT-Segmentation model as well (see `DatBackbone._load_from_state_dict`).
"""
import importlib
from typing import List

from dat.backbone import DatBackbone

__all__ = ['REGISTERED_IN', 'register']

FRAMEWORK_REGISTRIES = ('mmdet.registry', 'mmseg.registry')


def register() -> List[str]:
    """Register `DatBackbone` in every installed framework's `MODELS`; returns the frameworks' names."""
    registered = []
    for module_name in FRAMEWORK_REGISTRIES:
        try:
            models = importlib.import_module(module_name).MODELS
        except ImportError:
            continue
        models.register_module(name='DatBackbone', module=DatBackbone, force=True)
        registered.append(module_name.split('.')[0])
    if not registered:
        raise ImportError('dat.adapters.mmdet registers DatBackbone with mmdet or mmseg, and neither is '
                          'importable: pip install mmdet (or mmsegmentation) with its mmengine and mmcv')
    return registered


REGISTERED_IN = register()
