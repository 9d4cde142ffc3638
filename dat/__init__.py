"""DAT and DAT++ vision backbones for timm, with fused deformable-attention ops.

Importing this package registers every model with timm: `timm.create_model('dat_tiny')`.
"""
from .models import MODEL_CONFIGS, DeformableAttentionTransformer
from .checkpoint import CheckpointError, checkpoint_filter_fn, load_checkpoint_file
from .backbone import DatBackbone
from .pretrained import PretrainedWeightsError

__version__ = '0.1.0'
