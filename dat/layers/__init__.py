from .deform_attn import DeformableAttention
from .mlp import DwConvMlp, Mlp
from .neighborhood_attn import NeighborhoodAttention
from .stem import ConvStem, Downsample, PatchStem
from .window_attn import WindowAttention
