"""Neighborhood attention (the 'N' blocks of DAT++), on `dat.ops.neighborhood_attention` instead of natten.

Each pixel attends to the k x k pixels around it (windows clamped at the borders), with a learned
relative-position bias; the definition is documented in `dat.ops.neighborhood_attn`. As in the official
module, a map smaller than the window (k * dilation) is zero-padded at the bottom/right before the qkv
projection — the padded pixels then take part as keys — and the output is cropped back.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from dat.ops import neighborhood_attention

from .linear import Linear


class NeighborhoodAttention(nn.Module):
    """Input and output (B, C, H, W)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1, proj_drop: float = 0.,
                 attn_impl: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by {num_heads} heads')
        if kernel_size < 3 or kernel_size % 2 == 0 or dilation < 1:
            raise ValueError(f'kernel_size must be odd and >= 3 and dilation >= 1; got {kernel_size}, {dilation}')
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.scale = (dim // num_heads) ** -0.5
        self.attn_impl = attn_impl
        self.qkv = Linear(dim, 3 * dim, **dd)
        self.proj = Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1, **dd))
        trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        window = self.kernel_size * self.dilation
        x = x.permute(0, 2, 3, 1)
        pad_h, pad_w = max(0, window - H), max(0, window - W)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = H + pad_h, W + pad_w
        qkv = self.qkv(x).reshape(B, padded_h, padded_w, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
        out = self._attend(q * self.scale, k, v)
        out = out.permute(0, 2, 3, 1, 4).reshape(B, padded_h, padded_w, C)[:, :H, :W]
        return self.proj_drop(self.proj(out)).permute(0, 3, 1, 2)

    @torch.jit.ignore
    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q arrives scaled, as the official module scales it before natten
        return neighborhood_attention(q.contiguous(), k.contiguous(), v.contiguous(), self.rpb, self.kernel_size,
                                      self.dilation, scale=1.0, impl=self.attn_impl)
