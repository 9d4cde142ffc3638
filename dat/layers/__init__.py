"""Building blocks of the DAT family, each usable alone, and heads' layers built on the dat ops."""
from .deform_attn import DeformableAttention
from .linear import Linear
from .mlp import DwConvMlp, Mlp
from .ms_deform_attn import MSDeformAttn, level_pixel_centres
from .neighborhood_attn import NeighborhoodAttention
from .stem import ConvStem, Downsample, PatchStem
from .window_attn import WindowAttention
