"""Normalised sampling grids of the two DAT generations.

Both generations express positions as (y, x) in [-1, 1] and sample with `align_corners=True`, but they
normalise pixel indices differently, and a faithful port must reproduce each rule exactly:

| grid                        | DAT (CVPR 2022)        | DAT++                      |
|-----------------------------|------------------------|----------------------------|
| key reference points        | (i + 0.5) / L * 2 - 1  | (i + 0.5) / (L - 1) * 2 - 1 |
| query grid (for the bias)   | (i + 0.5) / L * 2 - 1  | i / (L - 1) * 2 - 1         |
| offset range unit           | 1 / L                  | 1 / (L - 1)                 |
| unbounded offsets           | tanh(ref + offset)     | clamp(ref + offset, -1, 1)  |

The official code divides by L - 1 and so yields NaN/inf on 1-pixel axes (32x32 inputs reach those);
here an axis of length 1 has the single coordinate 0, the centre, under every rule.
"""
import torch

GENERATIONS = ('dat', 'dat_pp')


def _axis(length: int, offset: float, denominator: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if length == 1:
        return torch.zeros(1, dtype=dtype, device=device)
    return (torch.arange(length, dtype=dtype, device=device) + offset).div_(denominator).mul_(2.0).sub_(1.0)


def _grid(height: int, width: int, offset: float, minus_one: bool, dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    ys = _axis(height, offset, height - 1.0 if minus_one else float(height), dtype, device)
    xs = _axis(width, offset, width - 1.0 if minus_one else float(width), dtype, device)
    return torch.stack(torch.meshgrid([ys, xs], indexing='ij'), dim=-1)


def reference_points(height: int, width: int, generation: str, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """Undeformed key positions (height, width, 2) of a key map of the given size."""
    return _grid(height, width, 0.5, generation == 'dat_pp', dtype, device)


def query_grid(height: int, width: int, generation: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Query positions (height * width, 2) that the relative-position bias is measured from."""
    offset = 0.5 if generation == 'dat' else 0.0
    return _grid(height, width, offset, generation == 'dat_pp', dtype, device).reshape(-1, 2)


def offset_unit(length: int, generation: str) -> float:
    """Offsets are `tanh(raw) * range_factor * offset_unit`: one key-pixel in normalised units."""
    denominator = length if generation == 'dat' else length - 1
    return 1.0 / max(denominator, 1)
