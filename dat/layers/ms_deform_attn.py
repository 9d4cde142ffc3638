"""Deformable DETR's multi-scale deformable attention module on top of `multi_scale_deformable_attention`."""
import math
from typing import Optional

import torch
from torch import nn

from dat.ops.ms_deform_attn import multi_scale_deformable_attention
from dat.precision import full_precision, run_in_full_precision


def level_pixel_centres(spatial_shapes: torch.Tensor) -> torch.Tensor:
    """(S, 2) normalised (x, y) centres of every pixel of every level, in the flattened value's order:
    the reference points of a Deformable DETR encoder, whose queries are the pixels themselves."""
    centres = []
    for height, width in spatial_shapes.tolist():
        y, x = torch.meshgrid((torch.arange(height, dtype=torch.float32) + 0.5) / height,
                              (torch.arange(width, dtype=torch.float32) + 0.5) / width, indexing='ij')
        centres.append(torch.stack([x.reshape(-1), y.reshape(-1)], -1))
    return torch.cat(centres).to(spatial_shapes.device)


class MSDeformAttn(nn.Module):
    """Each query attends to `n_points` sampled points per head and per feature level.

    Sampling offsets and attention weights are predicted from the query; the offsets move around
    the query's reference point, either a point (x, y) per level, with offsets measured in that
    level's pixels, or a box (cx, cy, w, h) per level, with offsets measured in half box sizes
    divided by `n_points`. All coordinates are normalised to [0, 1].
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 impl: Optional[str] = None):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f'd_model={d_model} must be divisible by n_heads={n_heads}')
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.impl = impl  # 'auto' | 'fused' | 'reference' | None ($DAT_ATTN_IMPL)
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Start with head h sampling along direction 2 pi h / heads, point i at distance i + 1 (in
        # pixels, on the square through (+-1, +-1)), uniformly weighted over all levels and points.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float64) * (2 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        distances = torch.arange(1, self.n_points + 1, dtype=torch.float64)
        offsets = directions[:, None, None, :] * distances[None, None, :, None]
        offsets = offsets.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(offsets.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                input_spatial_shapes: torch.Tensor, input_level_start_index: torch.Tensor,
                input_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """query (N, Lq, C); reference_points (N, Lq, levels, 2 or 4); input_flatten (N, S, C);
        input_spatial_shapes (levels, 2) int64 (H, W); input_level_start_index (levels,) int64;
        input_padding_mask (N, S) bool, True at padding. Returns (N, Lq, C)."""
        self._check_shapes(query, reference_points, input_flatten, input_spatial_shapes, input_padding_mask)
        N, Lq, _ = query.shape
        S = input_flatten.shape[1]
        M, L, P = self.n_heads, self.n_levels, self.n_points

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)
        # sampling locations and attention weights in fp32 for half-precision activations (dat.precision)
        offsets = run_in_full_precision(self.sampling_offsets, query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P).softmax(-1, dtype=full_precision(query.dtype))
        weights = weights.view(N, Lq, M, L, P)

        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: divide by (W, H).
            level_sizes = input_spatial_shapes.flip(-1).to(device=offsets.device, dtype=offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / level_sizes[None, None, None, :, None, :]
        else:
            centres = reference_points[:, :, None, :, None, :2]
            half_sizes = reference_points[:, :, None, :, None, 2:] * 0.5
            locations = centres + offsets / P * half_sizes
        output = multi_scale_deformable_attention(value, input_spatial_shapes, input_level_start_index,
                                                  locations, weights, impl=self.impl)
        return self.output_proj(output)

    def _check_shapes(self, query, reference_points, input_flatten, input_spatial_shapes, input_padding_mask):
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f'query must be (N, queries, d_model={self.d_model}), got shape {tuple(query.shape)}')
        N, Lq, _ = query.shape
        if input_flatten.dim() != 3 or input_flatten.shape[0] != N or input_flatten.shape[-1] != self.d_model:
            raise ValueError(f'input_flatten must be (N={N}, S, d_model={self.d_model}), got shape '
                             f'{tuple(input_flatten.shape)}')
        if input_spatial_shapes.shape != (self.n_levels, 2):
            raise ValueError(f'input_spatial_shapes must be (n_levels={self.n_levels}, 2), got shape '
                             f'{tuple(input_spatial_shapes.shape)}')
        if reference_points.shape[:3] != (N, Lq, self.n_levels) or reference_points.shape[-1] not in (2, 4) \
                or reference_points.dim() != 4:
            raise ValueError(f'reference_points must be (N={N}, queries={Lq}, n_levels={self.n_levels}, 2 or 4), '
                             f'got shape {tuple(reference_points.shape)}')
        if input_padding_mask is not None and input_padding_mask.shape != input_flatten.shape[:2]:
            raise ValueError(f'input_padding_mask must be (N, S) = {tuple(input_flatten.shape[:2])}, got shape '
                             f'{tuple(input_padding_mask.shape)}')
