"""The feed-forward layers: DAT's MLP of linear layers, run over row blocks, and DAT++'s MLP of 1x1 convs with a
residual depth-wise conv."""
import torch
import torch.nn as nn

from .blocking import map_row_blocks
from .linear import Linear


class Mlp(nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._mlp(x)
        return self._forward_in_blocks(x)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))

    @torch.jit.unused
    def _forward_in_blocks(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = map_row_blocks(lambda block, first: self._mlp(block), rows, self.fc1.out_features)
        return out.view(x.shape[:-1] + out.shape[-1:])


class DwConvMlp(nn.Module):
    """1x1 conv -> (+ depth-wise 3x3 conv of itself) -> GELU -> 1x1 conv, the DAT++ feed-forward."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0., device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1, **dd)
        self.drop1 = nn.Dropout(drop)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim, **dd)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.fc1(x))
        x = self.act(x + self.dwconv(x))
        return self.drop2(self.fc2(x))
