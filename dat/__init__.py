"""DAT and DAT++ vision backbones for timm, with fused deformable-attention ops.

Importing this package registers every model with timm: `timm.create_model('dat_tiny')`.
"""
import importlib.util
import os
import sys


def _bind_checkout_weights() -> None:
    """`dat.weights` is the top-level `weights/` folder, mapped there by the install. A checkout used without
    installing it (torch.hub.load from GitHub puts the bare checkout on sys.path) binds it here instead."""
    name = f'{__name__}.weights'
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'weights')
    if importlib.util.find_spec(name) is not None or not os.path.isfile(os.path.join(folder, '__init__.py')):
        return
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, '__init__.py'),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    globals()['weights'] = module  # as an import of the submodule would set it


_bind_checkout_weights()

from .models import MODEL_CONFIGS, DeformableAttentionTransformer  # noqa: E402 - after the weights binding
from .checkpoint import CheckpointError, checkpoint_filter_fn, load_checkpoint_file
from .backbone import DatBackbone
from .official import load_official
from .pretrained import PretrainedWeightsError

__all__ = ['MODEL_CONFIGS', 'DeformableAttentionTransformer', 'CheckpointError', 'checkpoint_filter_fn',
           'load_checkpoint_file', 'DatBackbone', 'load_official', 'PretrainedWeightsError']

__version__ = '0.1.0'
