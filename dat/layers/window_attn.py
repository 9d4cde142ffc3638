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

from .blocking import map_row_blocks
from .linear import Linear

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
        self.proj_qkv = Linear(dim, 3 * dim, **dd)
        self.proj_out = Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads, **dd))
        self.register_buffer('relative_position_index',
                             gen_relative_position_index((window_size, window_size), device=device), persistent=False)
        trunc_normal_(self.relative_position_bias_table, std=0.01)

    @torch.jit.ignore
    def attention_mask(self, height: int, width: int, windows: torch.Tensor) -> Optional[torch.Tensor]:
        """The mask for a (height, width) map, in the dtype of the logits of `windows` and on their device."""
        return window_attention_mask(height, width, self.window_size, self.shift_size,
                                     full_precision(windows.dtype), windows.device)

    def relative_position_bias(self) -> torch.Tensor:
        """(1, heads, tokens, tokens): the bias of every query-key pair of a window, from the table."""
        tokens = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0)

    def _attend(self, windows: torch.Tensor, first_window: int, bias: torch.Tensor,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Attention within each of `windows` (N, tokens, C), the windows from `first_window` on of the batch's
        windows in order; `bias` is `relative_position_bias()`, `mask` has one entry per window of an image."""
        num_windows, tokens, C = windows.shape
        qkv = self.proj_qkv(windows).reshape(num_windows, tokens, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        # logits, bias, mask and softmax in fp32 for half-precision activations (dat.precision)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).to(full_precision(q.dtype))
        # in place: the logits are a fresh tensor that no backward needs, and these are the largest tensors here
        attn += bias
        if mask is not None:
            image_windows = mask.shape[0]
            if first_window % image_windows == 0 and num_windows % image_windows == 0:
                attn.view(-1, image_windows, self.num_heads, tokens, tokens).add_(mask[None, :, None])
            else:
                index = torch.arange(first_window, first_window + num_windows, device=mask.device) % image_windows
                attn += mask[index][:, None]
        out = (attn.softmax(dim=-1).to(v.dtype) @ v).transpose(1, 2).reshape(num_windows, tokens, C)
        return self.proj_drop(self.proj_out(out))

    @torch.jit.unused
    def _attend_in_blocks(self, windows: torch.Tensor, bias: torch.Tensor,
                          mask: Optional[torch.Tensor]) -> torch.Tensor:
        tokens, C = windows.shape[1:]
        # the widest intermediates of a window are its qkv and its logits
        return map_row_blocks(lambda block, first: self._attend(block, first, bias, mask), windows,
                              tokens * max(3 * C, self.num_heads * tokens))

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
        bias, mask = self.relative_position_bias(), self.attention_mask(H, W, windows)
        if torch.jit.is_scripting():
            out = self._attend(windows, 0, bias, mask)
        else:
            out = self._attend_in_blocks(windows, bias, mask)

        x = window_reverse(out.view(-1, ws, ws, C), (ws, ws), padded_h, padded_w)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x[:, :H, :W].permute(0, 3, 1, 2)
