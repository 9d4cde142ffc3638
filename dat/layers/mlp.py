"""The feed-forward layer of DAT++: 1x1 convs with a residual depth-wise conv, which timm has no layer for
(DAT's linear MLP is timm's `Mlp`)."""
import torch
import torch.nn as nn


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
