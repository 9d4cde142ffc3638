"""Stems and between-stage downsampling of DAT (patchify convs) and DAT++ (overlapping 3x3 convs).

All of them pad the bottom/right of maps whose size is not a multiple of the stride, so a feature map at
stride s always has ceil(size / s) rows and columns and no input pixel is dropped.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models._features_fx import register_notrace_function


@register_notrace_function  # data-dependent padding: a leaf for fx feature extraction
def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad_h = (multiple - x.shape[2] % multiple) % multiple
    pad_w = (multiple - x.shape[3] % multiple) % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


class PatchStem(nn.Module):
    """Non-overlapping patch embedding: conv(kernel = stride = patch) -> LayerNorm (DAT)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.patch_size = patch_size
        self.conv = nn.Conv2d(in_chans, dim, patch_size, patch_size, **dd)
        self.norm = LayerNorm2d(dim, eps=1e-5, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(pad_to_multiple(x, self.patch_size)))


class ConvStem(nn.Module):
    """Two overlapping 3x3 stride-2 convs with LayerNorm, GELU between (DAT++)."""

    def __init__(self, in_chans: int, dim: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, 2, 1, **dd)
        self.norm1 = LayerNorm2d(dim // 2, eps=1e-5, **dd)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, 2, 1, **dd)
        self.norm2 = LayerNorm2d(dim, eps=1e-5, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class Downsample(nn.Module):
    """Halve the resolution: 2x2 stride-2 patch merging (DAT) or a 3x3 stride-2 conv (DAT++), then LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int, overlapping: bool, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.overlapping = overlapping
        kernel, padding = (3, 1) if overlapping else (2, 0)
        self.conv = nn.Conv2d(in_dim, out_dim, kernel, 2, padding, bias=False, **dd)
        self.norm = LayerNorm2d(out_dim, eps=1e-5, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.overlapping:
            x = pad_to_multiple(x, 2)
        return self.norm(self.conv(x))
