"""Window attention and shifted-window attention (the 'L' and 'S' blocks of DAT).

Maps of any size work: the map is padded on the bottom/right to a multiple of the window, padded keys are
masked out, and the output is cropped back. At sizes that need no padding the result equals the official
module exactly (its shifted-window mask used -100 for cross-region pairs; so does this one).
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import gen_relative_position_index, trunc_normal_
from timm.models.swin_transformer import window_partition, window_reverse

from dat.precision import full_precision
from dat.tracing import eager_lru_cache

MASKED = -100.0


@eager_lru_cache(maxsize=64)
def window_attention_mask(height: int, width: int, window_size: int, shift_size: int, dtype: torch.dtype,
                          device: torch.device) -> Optional[torch.Tensor]:
    """(windows, w*w, w*w) additive mask for a (height, width) map, or None when nothing needs masking.

    Keys in another shift region than the query (Swin's rule) and keys on padding get MASKED. Cached: every
    block of a stage, and every forward at one input size, uses the same mask.
    """
    ws, shift = window_size, shift_size
    padded_h, padded_w = math.ceil(height / ws) * ws, math.ceil(width / ws) * ws
    if shift == 0 and padded_h == height and padded_w == width:
        return None
    region = torch.zeros(padded_h, padded_w, device=device)
    if shift:
        bands = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
        label = 0
        for rows in bands:
            for cols in bands:
                region[rows, cols] = label
                label += 1
    padding = torch.ones(padded_h, padded_w, device=device)
    padding[:height, :width] = 0
    if shift:
        padding = torch.roll(padding, shifts=(-shift, -shift), dims=(0, 1))
    region_windows = window_partition(region[None, :, :, None], (ws, ws)).flatten(1)
    padding_windows = window_partition(padding[None, :, :, None], (ws, ws)).flatten(1) > 0
    mask = (region_windows[:, None, :] != region_windows[:, :, None]) | padding_windows[:, None, :]
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(mask, MASKED)


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows of `window_size`; `shift_size > 0` makes it the shifted variant.

    Input and output are (B, C, H, W). DAT shifts by ceil(window / 2) (4 for window 7), not Swin's floor.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int = 0, proj_drop: float = 0.,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by {num_heads} heads')
        if not 0 <= shift_size < window_size:
            raise ValueError(f'shift {shift_size} must be in [0, window {window_size})')
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.scale = (dim // num_heads) ** -0.5
        self.proj_qkv = nn.Linear(dim, 3 * dim, **dd)
        self.proj_out = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads, **dd))
        self.register_buffer('relative_position_index',
                             gen_relative_position_index((window_size, window_size), device=device), persistent=False)
        trunc_normal_(self.relative_position_bias_table, std=0.01)

    @torch.jit.ignore
    def attention_mask(self, height: int, width: int, scores: torch.Tensor) -> Optional[torch.Tensor]:
        """The mask for a (height, width) map, in the dtype and on the device of the attention `scores`."""
        return window_attention_mask(height, width, self.window_size, self.shift_size, scores.dtype, scores.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        ws, shift = self.window_size, self.shift_size
        x = x.permute(0, 2, 3, 1)
        pad_h, pad_w = (ws - H % ws) % ws, (ws - W % ws) % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = H + pad_h, W + pad_w
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))

        windows = window_partition(x, (ws, ws)).flatten(1, 2)
        num_windows, tokens = windows.shape[0] // B, ws * ws
        qkv = self.proj_qkv(windows).reshape(-1, tokens, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # logits, bias, mask and softmax in fp32 for half-precision activations (dat.precision)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).to(full_precision(q.dtype))
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        # in place: the logits are a fresh tensor that no backward needs, and these are the largest tensors here
        attn += bias.view(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0)
        mask = self.attention_mask(H, W, attn)
        if mask is not None:
            attn.view(B, num_windows, self.num_heads, tokens, tokens).add_(mask[None, :, None])
        out = (attn.softmax(dim=-1).to(v.dtype) @ v).transpose(1, 2).reshape(-1, tokens, C)
        out = self.proj_drop(self.proj_out(out))

        x = window_reverse(out.view(-1, ws, ws, C), (ws, ws), padded_h, padded_w)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x[:, :H, :W].permute(0, 3, 1, 2)
