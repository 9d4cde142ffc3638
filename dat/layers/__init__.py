"""Layers built on the dat ops."""
from .ms_deform_attn import MSDeformAttn, level_pixel_centres
