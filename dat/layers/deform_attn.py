"""Deformable multi-head attention (the 'D' blocks of DAT and DAT++).

Queries attend to a small set of keys sampled from the feature map at deformed positions: an offset network
(depth-wise conv, LayerNorm, GELU, 1x1 conv) predicts, per offset group, a shift of each point of a regular
key grid; keys and values are bilinearly sampled there, and a relative-position bias is read from a
learned table at the query-key displacement. The attention core is `dat.ops.deformable_attention`, which
runs the fused native op when it is built and a pure-PyTorch reference otherwise.

Under autocast or with half-precision weights, positions stay in fp32 (`dat.precision`): the offset network
runs in fp32, the grids are built in fp32, and keys and values are sampled from an fp32 copy of the map.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d, trunc_normal_

from dat.ops import deformable_attention
from dat.precision import full_precision, run_in_full_precision
from .grids import GENERATIONS, offset_unit, query_grid, reference_points


class DeformableAttention(nn.Module):
    """Input and output (B, C, H, W).

    Args:
        dim: channels C (= heads * head_dim).
        num_heads: attention heads M.
        num_groups: offset groups G; each group shares one set of deformed positions (M % G == 0).
        table_size: (Th, Tw) of the relative-position bias table; the official models use 2 * map - 1 at the
            training resolution. The table is sampled with normalised coordinates, so any input size works.
        use_rpe: add the bilinear relative-position bias.
        key_stride: stride of the offset network; the key grid is the map downsampled by it.
        offset_kernel: kernel of the depth-wise offset conv.
        offset_range_factor: offsets are bounded by tanh to this many key pixels; negative means unbounded
            (positions squashed by tanh in DAT, clamped in DAT++).
        generation: 'dat' or 'dat_pp', the normalisation rules of `dat.layers.grids`.
        attn_impl: 'auto' | 'fused' | 'reference' (None: the DAT_ATTN_IMPL environment variable, else auto).
    """

    def __init__(self, dim: int, num_heads: int, num_groups: int, table_size: Tuple[int, int],
                 use_rpe: bool = True, key_stride: int = 1, offset_kernel: int = 3,
                 offset_range_factor: float = -1.0, generation: str = 'dat', proj_drop: float = 0.,
                 attn_impl: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads or num_heads % num_groups:
            raise ValueError(f'need dim % heads == 0 and heads % groups == 0; got dim={dim}, heads={num_heads}, '
                             f'groups={num_groups}')
        if generation not in GENERATIONS:
            raise ValueError(f'generation must be one of {GENERATIONS}, got {generation!r}')
        self.num_heads = num_heads
        self.num_groups = num_groups
        self.head_dim = dim // num_heads
        self.group_dim = dim // num_groups
        self.scale = self.head_dim ** -0.5
        self.offset_range_factor = float(offset_range_factor)
        self.generation = generation
        self.attn_impl = attn_impl
        # DAT++ drops the padding when the kernel equals the stride (non-overlapping offset windows)
        padding = 0 if generation == 'dat_pp' and offset_kernel == key_stride else offset_kernel // 2
        self.conv_offset = nn.Sequential(
            nn.Conv2d(self.group_dim, self.group_dim, offset_kernel, key_stride, padding, groups=self.group_dim, **dd),
            LayerNorm2d(self.group_dim, eps=1e-5, **dd),
            nn.GELU(),
            nn.Conv2d(self.group_dim, 2, 1, bias=False, **dd),
        )
        self.proj_q = nn.Conv2d(dim, dim, 1, **dd)
        self.proj_k = nn.Conv2d(dim, dim, 1, **dd)
        self.proj_v = nn.Conv2d(dim, dim, 1, **dd)
        self.proj_out = nn.Conv2d(dim, dim, 1, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        if use_rpe:
            self.rpe_table = nn.Parameter(torch.zeros(num_heads, table_size[0], table_size[1], **dd))
            trunc_normal_(self.rpe_table, std=0.01)
        else:
            self.register_parameter('rpe_table', None)

    def sampling_positions(self, x: torch.Tensor, q: Optional[torch.Tensor] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Deformed key positions and their undeformed reference grid, both (B, G, Hk, Wk, 2) as (y, x), in fp32
        for half-precision activations (`dat.precision.full_precision`)."""
        B, C, H, W = x.shape
        if q is None:
            q = self.proj_q(x)
        # channels-last: oneDNN's depth-wise convolution runs its backward about 6x faster so (DAT-B++'s 9x9,
        # stride-8 offset conv at 200x336, forward+backward: 0.11 s against 0.61 s on 2 cores)
        group_queries = q.reshape(B * self.num_groups, self.group_dim, H, W).contiguous(
            memory_format=torch.channels_last)
        if torch.jit.is_scripting():
            # TorchScript cannot rebind a module's parameters; its outputs are still taken to full precision
            offset = self.conv_offset(group_queries)
            offset = offset.to(full_precision(offset.dtype))
        else:
            offset = run_in_full_precision(self.conv_offset, group_queries)
        key_h, key_w = offset.shape[2], offset.shape[3]
        if self.offset_range_factor >= 0:
            unit = torch.tensor([offset_unit(key_h, self.generation), offset_unit(key_w, self.generation)],
                                device=offset.device).to(offset.dtype)
            offset = offset.tanh() * unit.view(1, 2, 1, 1) * self.offset_range_factor
        reference = reference_points(key_h, key_w, self.generation, offset.dtype, offset.device)
        positions = offset.permute(0, 2, 3, 1) + reference
        if self.offset_range_factor < 0:
            positions = positions.tanh() if self.generation == 'dat' else positions.clamp(-1.0, 1.0)
        shape = (B, self.num_groups, key_h, key_w, 2)
        return positions.reshape(shape), reference.expand(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q = self.proj_q(x)
        positions, _ = self.sampling_positions(x, q)
        num_keys = positions.shape[2] * positions.shape[3]
        # sampled in the positions' dtype: bilinear weights stay accurate, and PyTorch's CPU grid_sample reads
        # wrong memory in half precision (see dat.precision)
        sampled = F.grid_sample(
            x.to(positions.dtype).reshape(B * self.num_groups, self.group_dim, H, W),
            positions.reshape(B * self.num_groups, positions.shape[2], positions.shape[3], 2).flip(-1),
            mode='bilinear', padding_mode='zeros', align_corners=True,
        ).to(x.dtype).reshape(B, C, 1, num_keys)
        k = self.proj_k(sampled).reshape(B, self.num_heads, self.head_dim, num_keys).transpose(-1, -2)
        v = self.proj_v(sampled).reshape(B, self.num_heads, self.head_dim, num_keys).transpose(-1, -2)
        # heads are split from the channels-last view: q comes channels-last from LayerNorm2d, so this is a view
        q = q.permute(0, 2, 3, 1).reshape(B, H * W, self.num_heads, self.head_dim).transpose(1, 2)
        qpos = query_grid(H, W, self.generation, positions.dtype, x.device)
        out = self._attend(q, k, v, positions.reshape(B, self.num_groups, num_keys, 2), qpos)
        # a channels-last map into the 1x1 conv: its fast CPU path (2-3x the NCHW one), and the residual add
        # that follows meets the channels-last stream
        out = out.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)
        return self.proj_drop(self.proj_out(out))

    @torch.jit.ignore
    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpos: torch.Tensor,
                qpos: torch.Tensor) -> torch.Tensor:
        # Python-side dispatch between the fused op and the reference: opaque to TorchScript
        return deformable_attention(q.contiguous(), k.contiguous(), v.contiguous(), kpos.contiguous(), qpos,
                                    self.rpe_table, self.scale, impl=self.attn_impl)
