"""The feed-forward layers: DAT's MLP of linear layers, run over row blocks, and DAT++'s MLP of 1x1 convs with a
residual depth-wise conv, run over blocks of images; and that residual depth-wise conv, which DAT++'s local
perception units are too."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocking import map_row_blocks
from .linear import Linear


class _BlockedMlp(nn.Module):
    """An MLP that eager mode runs over blocks (`_forward_in_blocks`, over `dat.layers.blocking`) and TorchScript,
    which cannot script the blocking, runs whole (`_mlp`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._mlp(x)
        return self._forward_in_blocks(x)


class Mlp(_BlockedMlp):
    """Linear -> GELU -> Linear on the last dimension (timm's `Mlp` parameters and state dict), run over blocks
    of rows in eager mode (`dat.layers.blocking`)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0., device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.fc1 = Linear(dim, hidden_dim, **dd)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden_dim, dim, **dd)
        self.drop2 = nn.Dropout(drop)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))

    @torch.jit.unused
    def _forward_in_blocks(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = map_row_blocks(lambda block, first: self._mlp(block), rows, self.fc1.out_features)
        return out.view(x.shape[:-1] + out.shape[-1:])


class ResidualDepthwiseConv(nn.Conv2d):
    """x + conv(x) for a 3x3 depth-wise conv (padding 1), run as one conv whose kernel has the identity added to
    its centre tap: no separate add over the map, and in the backward no sum of the two input gradients.
    Parameters and state dict are `nn.Conv2d`'s; the identity kernel is made from the weight at each call, not
    kept in a buffer that a model built on the meta device would leave uninitialised. In fp32 the result differs
    from the two-step form by a rounding of the centre weight (about 1e-7 relative); in half precision a rounding
    of the same order as the add's.

    dat_pp_tiny at batch 8, 224x224, 2 threads, interleaved: inference 1.08x with its 52 such convs folded.
    """

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__(channels, channels, 3, padding=1, groups=channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = F.pad(self.weight.new_ones(self.out_channels, 1, 1, 1), (1, 1, 1, 1))
        return self._conv_forward(x, self.weight + identity, self.bias)


class DwConvMlp(_BlockedMlp):
    """1x1 conv -> (+ depth-wise 3x3 conv of itself) -> GELU -> 1x1 conv, the DAT++ feed-forward, run over blocks
    of images in eager inference (`dat.layers.blocking`; the depth-wise conv mixes pixels, not images)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0., device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1, **dd)
        self.drop1 = nn.Dropout(drop)
        self.dwconv = ResidualDepthwiseConv(hidden_dim, **dd)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, **dd)
        self.drop2 = nn.Dropout(drop)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.act(self.dwconv(self.drop1(self.fc1(x))))))

    @torch.jit.unused
    def _forward_in_blocks(self, x: torch.Tensor) -> torch.Tensor:
        hidden_per_image = self.fc1.out_channels * x.shape[2] * x.shape[3]
        return map_row_blocks(lambda images, first: self._mlp(images), x, hidden_per_image)
