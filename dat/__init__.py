"""DAT and DAT++ vision backbones for timm, with fused deformable-attention ops."""
__version__ = '0.1.0'
