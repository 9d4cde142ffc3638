"""DAT (Vision Transformer with Deformable Attention, CVPR 2022) and DAT++ (arXiv:2309.01430) for timm.

One architecture class covers both generations; a variant is a dict of constructor arguments
(`MODEL_CONFIGS`). Stage layouts are strings of block letters, as in the official configs:

    L  window attention             S  shifted-window attention
    D  deformable attention         N  neighborhood attention (DAT++)

`generation` ('dat' or 'dat_pp') selects the official code generation's rules for sampling grids, offset
ranges and position squashing (see `dat.layers.grids`). Every other difference between the two official
code bases (conv stem, depth-wise-conv MLP, local perception units, layer scale, offset kernels and key
strides) is an explicit argument.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (ClassifierHead, DropPath, LayerNorm2d, LayerScale2d, calculate_drop_path_rates,
                         get_device_dtype)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._builder import resolve_pretrained_cfg
from timm.models._features_fx import register_notrace_function, register_notrace_module
from timm.models._manipulate import checkpoint_seq

from dat.layers.deform_attn import DeformableAttention
from dat.layers.grids import GENERATIONS
from dat.layers.linear import Linear
from dat.layers.mlp import DwConvMlp, Mlp, ResidualDepthwiseConv
from dat.layers.neighborhood_attn import NeighborhoodAttention
from dat.layers.stem import ConvStem, Downsample, PatchStem
from dat.layers.window_attn import WindowAttention
from dat.pretrained import load_pretrained_weights
from dat.weights import bundled_path, manifest

__all__ = ['DeformableAttentionTransformer', 'DatStageCfg', 'MODEL_CONFIGS', 'MIN_INPUT_SIZE',
           'position_table_names']

BLOCK_TYPES = 'LSDN'
MIN_INPUT_SIZE = 32  # stride-32 features of a 32x32 image are 1x1; smaller inputs have no last stage

# timm's fx feature extraction treats the attention layers as leaves: their shapes depend on the input size;
# so are the layers that choose their CPU path at run time (dat.layers.linear, dat.layers.blocking)
for _module in (WindowAttention, DeformableAttention, NeighborhoodAttention, Mlp, DwConvMlp, Linear):
    register_notrace_module(_module)


@register_notrace_function
def check_image_batch(x: torch.Tensor, in_chans: int, min_size: int = MIN_INPUT_SIZE) -> None:
    """Reject what the model cannot process, naming the problem, before it fails deep inside a layer."""
    if x.dim() != 4:
        raise ValueError('expected an image batch of shape (B, C, H, W), got a tensor of rank {}'.format(x.dim()))
    if x.shape[1] != in_chans:
        raise ValueError('expected {} input channels, got {} (input shape {})'.format(
            in_chans, x.shape[1], list(x.shape)))
    if not x.is_floating_point():
        raise ValueError('expected a floating-point image tensor, got {}; convert integer images with '
                         '.float() and normalise them first'.format(x.dtype))
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError('input {}x{} is too small: DAT needs at least {}x{} pixels'.format(
            x.shape[2], x.shape[3], min_size, min_size))


@register_notrace_function
def to_stage_layout(x: torch.Tensor) -> torch.Tensor:
    """The image in the memory layout the stages run on: channels-last on the CPU, where the residual stream then
    stays channels-last through every block. LayerNorm2d's permutes are views there, residual adds meet operands
    of one layout, and oneDNN runs its fast channels-last depth-wise convs (DAT++'s local perception units).
    Training steps of dat_tiny and dat_pp_tiny at batch 8, 224x224 ran 1.16x faster so, inference 1.03x to 1.04x
    (interleaved with NCHW input). On CUDA, not measured yet, the input's layout is kept."""
    if x.device.type == 'cpu':
        return x.contiguous(memory_format=torch.channels_last)
    return x


def position_table_names(model: nn.Module) -> set:
    """Names of the relative-position tables, exempt from weight decay like Swin's: decaying them pulls the
    learned bias towards zero."""
    return {name for name, _ in model.named_parameters()
            if name.endswith(('relative_position_bias_table', 'rpe_table', 'rpb'))}


@dataclass(frozen=True)
class DatStageCfg:
    """The architecture of one stage: its entry of each per-stage argument of `DeformableAttentionTransformer`
    (described there) and the model-wide settings its blocks use."""
    dim: int
    depth: int
    block_types: str
    num_heads: int
    offset_groups: int
    window_size: int
    neighborhood_kernel: int
    neighborhood_dilation: int
    key_stride: int
    offset_kernel: int
    offset_range_factor: float
    use_rpe: bool
    dwconv_mlp: bool
    local_perception: bool
    layer_scale_init: Optional[float]
    mlp_ratio: float
    generation: str
    proj_drop: float
    attn_impl: Optional[str]
    downsample: Optional[str]  # None (the first stage), 'patch' or 'conv': the Downsample at the stage's input
    feat_size: Tuple[int, int]  # the stage's map at the training resolution; it sizes the D blocks' position tables

    def __post_init__(self):
        unknown = set(self.block_types) - set(BLOCK_TYPES)
        if unknown or len(self.block_types) != self.depth:
            raise ValueError(f'block_types {self.block_types!r} of a stage of depth {self.depth} must be '
                             f'{self.depth} letters from {BLOCK_TYPES!r}')


def stage_cfgs(num_stages: int, **fields) -> List[DatStageCfg]:
    """One `DatStageCfg` per stage from its fields, each given per stage (a list or tuple) or once for all."""
    per_stage = {}
    for name, value in fields.items():
        values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * num_stages
        if len(values) != num_stages:
            raise ValueError(f'{name} needs one value per stage ({num_stages}), got {values}')
        per_stage[name] = values
    return [DatStageCfg(**{name: values[i] for name, values in per_stage.items()}) for i in range(num_stages)]


def build_attention(block_type: str, cfg: DatStageCfg, device=None, dtype=None) -> nn.Module:
    """The attention of a block of `cfg`'s stage whose letter is `block_type` (see the module docstring)."""
    dd = {'device': device, 'dtype': dtype}
    if block_type in ('L', 'S'):
        shift_size = -(-cfg.window_size // 2) if block_type == 'S' else 0  # DAT shifts by ceil(window / 2)
        return WindowAttention(cfg.dim, cfg.num_heads, window_size=cfg.window_size, shift_size=shift_size,
                               proj_drop=cfg.proj_drop, **dd)
    if block_type == 'D':
        map_h, map_w = cfg.feat_size
        return DeformableAttention(
            cfg.dim, cfg.num_heads, num_groups=cfg.offset_groups, table_size=(2 * map_h - 1, 2 * map_w - 1),
            use_rpe=cfg.use_rpe, key_stride=cfg.key_stride, offset_kernel=cfg.offset_kernel,
            offset_range_factor=cfg.offset_range_factor, generation=cfg.generation, proj_drop=cfg.proj_drop,
            attn_impl=cfg.attn_impl, **dd)
    return NeighborhoodAttention(cfg.dim, cfg.num_heads, kernel_size=cfg.neighborhood_kernel,
                                 dilation=cfg.neighborhood_dilation, proj_drop=cfg.proj_drop,
                                 attn_impl=cfg.attn_impl, **dd)


class DatBlock(nn.Module):
    """Pre-norm transformer block: [lpu(x) = x + dwconv(x)] -> x + attn(norm(x)) -> x + mlp(norm(x))."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, dwconv_mlp: bool, local_perception: bool,
                 layer_scale_init: Optional[float], drop_path: float, proj_drop: float, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.lpu = ResidualDepthwiseConv(dim, **dd) if local_perception else None
        self.norm1 = LayerNorm2d(dim, eps=1e-5, **dd)
        self.attn = attn
        self.ls1 = LayerScale2d(dim, layer_scale_init, **dd) if layer_scale_init else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = LayerNorm2d(dim, eps=1e-5, **dd)
        # DAT's MLP is linear layers (as its checkpoints store them), which timm's Mlp applies to the last
        # dimension: it runs on the map permuted to channels-last; DAT++'s MLP is convolutional
        self.mlp_channels_last = not dwconv_mlp
        mlp_layer = DwConvMlp if dwconv_mlp else Mlp
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.ls2 = LayerScale2d(dim, layer_scale_init, **dd) if layer_scale_init else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lpu is not None:
            x = self.lpu(x)
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        y = self.norm2(x)
        if self.mlp_channels_last:
            y = self.mlp(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            y = self.mlp(y)
        return x + self.drop_path(self.ls2(y))


class DatStage(nn.Module):
    """[downsample or channel projection] followed by the blocks `cfg.block_types` name, built from `cfg`."""

    def __init__(self, in_dim: int, cfg: DatStageCfg, drop_paths: Sequence[float], device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if cfg.downsample is not None:
            self.downsample = Downsample(in_dim, cfg.dim, overlapping=cfg.downsample == 'conv', **dd)
        elif in_dim != cfg.dim:
            self.downsample = nn.Conv2d(in_dim, cfg.dim, 1, **dd)  # the official stage-input projection
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            DatBlock(cfg.dim, attn=build_attention(block_type, cfg, **dd), mlp_ratio=cfg.mlp_ratio,
                     dwconv_mlp=cfg.dwconv_mlp, local_perception=cfg.local_perception,
                     layer_scale_init=cfg.layer_scale_init, drop_path=drop_path, proj_drop=cfg.proj_drop, **dd)
            for block_type, drop_path in zip(cfg.block_types, drop_paths)
        ])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class DeformableAttentionTransformer(nn.Module):
    """DAT / DAT++ image classifier and backbone (NCHW features at strides 4, 8, 16, 32).

    Args:
        in_chans: input image channels.
        num_classes: classes of the linear head (0: no classifier).
        global_pool: 'avg', 'max', ... or '' (no pooling).
        dims: channels of the four stages.
        depths: blocks per stage; must equal the lengths of `block_types`.
        block_types: per stage, a string of block letters (L, S, D, N; see the module docstring).
        num_heads: attention heads per stage.
        offset_groups: deformable-attention offset groups per stage.
        window_size: window of L/S blocks (per stage or one value).
        neighborhood_kernel: kernel of N blocks; neighborhood_dilation their dilation.
        key_strides: stride of the key grid of D blocks relative to the stage's map.
        offset_kernels: depth-wise kernel of the offset network of D blocks.
        offset_range_factors: bound of offsets in key pixels; negative: unbounded (see DeformableAttention).
        use_rpe: whether D blocks add the relative-position bias.
        stem: 'patch' (4x4 patchify conv; DAT) or 'conv' (two 3x3 stride-2 convs; DAT++), which also makes the
            between-stage downsampling overlapping 3x3 convs.
        stem_dim: stem output channels (default dims[0]; a 1x1 projection follows when they differ).
        dwconv_mlp: DAT++'s MLP with a residual depth-wise conv; local_perception: DAT++'s depth-wise conv
            residual before each block; layer_scale_init: per-stage LayerScale init (None or 0: none).
        mlp_ratio: MLP hidden width over dim.
        generation: 'dat' or 'dat_pp', the official grid-normalisation rules.
        img_size: training resolution; it fixes the size of the relative-position tables (2 * map - 1), not
            the input size, which may be anything from 32x32 up.
        attn_impl: attention kernels, 'auto' | 'fused' | 'reference' (None: $DAT_ATTN_IMPL, else auto).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            dims: Sequence[int] = (96, 192, 384, 768),
            depths: Sequence[int] = (2, 2, 6, 2),
            block_types: Sequence[str] = ('LS', 'LS', 'LDLDLD', 'LD'),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            offset_groups: Sequence[int] = (1, 1, 3, 6),
            window_size: Union[int, Sequence[int]] = 7,
            neighborhood_kernel: Union[int, Sequence[int]] = 7,
            neighborhood_dilation: Union[int, Sequence[int]] = 1,
            key_strides: Union[int, Sequence[int]] = 1,
            offset_kernels: Sequence[int] = (9, 7, 5, 3),
            offset_range_factors: Union[float, Sequence[float]] = (-1, -1, 2, 2),
            use_rpe: Union[bool, Sequence[bool]] = True,
            stem: str = 'patch',
            stem_dim: Optional[int] = None,
            dwconv_mlp: Union[bool, Sequence[bool]] = False,
            local_perception: Union[bool, Sequence[bool]] = False,
            layer_scale_init: Union[None, float, Sequence[Optional[float]]] = None,
            mlp_ratio: float = 4.,
            generation: str = 'dat',
            img_size: Union[int, Tuple[int, int]] = 224,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            attn_impl: Optional[str] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(dims)
        if generation not in GENERATIONS:
            raise ValueError(f'generation must be one of {GENERATIONS}, got {generation!r}')
        if stem not in ('patch', 'conv'):
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else img_size
        cfgs = stage_cfgs(
            num_stages, dim=dims, depth=depths, block_types=block_types, num_heads=num_heads,
            offset_groups=offset_groups, window_size=window_size, neighborhood_kernel=neighborhood_kernel,
            neighborhood_dilation=neighborhood_dilation, key_stride=key_strides, offset_kernel=offset_kernels,
            offset_range_factor=offset_range_factors, use_rpe=use_rpe, dwconv_mlp=dwconv_mlp,
            local_perception=local_perception, layer_scale_init=layer_scale_init, mlp_ratio=mlp_ratio,
            generation=generation, proj_drop=proj_drop_rate, attn_impl=attn_impl,
            downsample=[None] + [stem] * (num_stages - 1),
            feat_size=[(img_h // 2 ** (i + 2), img_w // 2 ** (i + 2)) for i in range(num_stages)])

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.generation = generation
        self.output_fmt = 'NCHW'
        stem_dim = stem_dim or dims[0]
        self.stem = PatchStem(in_chans, stem_dim, **dd) if stem == 'patch' else ConvStem(in_chans, stem_dim, **dd)

        drop_paths = calculate_drop_path_rates(drop_path_rate, [cfg.depth for cfg in cfgs], stagewise=True)
        stages, self.feature_info = [], []
        in_dim = stem_dim
        for i, cfg in enumerate(cfgs):
            stages.append(DatStage(in_dim, cfg, drop_paths[i], **dd))
            self.feature_info.append(dict(num_chs=cfg.dim, reduction=4 * 2 ** i, module=f'stages.{i}'))
            in_dim = cfg.dim
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = LayerNorm2d(self.num_features, eps=1e-5, **dd)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return position_table_names(self)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, **get_device_dtype(self))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of the selected stages (NCHW, strides 4/8/16/32) and, unless `intermediates_only`, the
        final feature map. `indices`: the last n stages if an int, all if None, else the listed stages;
        `norm` applies the final LayerNorm to the last stage's output; `stop_early` skips stages after the
        last one requested."""
        if output_fmt != 'NCHW':
            raise ValueError(f"DAT features are NCHW; output_fmt {output_fmt!r} is not supported")
        check_image_batch(x, self.in_chans)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_index = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]

        x = self.stem(to_stage_layout(x))
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                # NCHW in memory too, whatever layout the stages ran on: callers may view() them
                intermediates.append((self.norm(x) if norm and feat_idx == last_index else x).contiguous())
        if intermediates_only:
            return intermediates
        if feat_idx == last_index:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last of `indices` (and the norm / head on request)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            # the norm and head are sized for the last stage's features, which are gone
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            self.norm = nn.Identity()
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.num_classes = 0
            self.head.reset(0, '' if prune_head else None, in_features=self.num_features, **get_device_dtype(self))
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.in_chans)
        x = self.stem(to_stage_layout(x))
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


DAT_SPEC = dict(key_strides=1, offset_kernels=(9, 7, 5, 3),
                offset_range_factors=(-1, -1, 2, 2), use_rpe=(False, False, True, True), generation='dat')
DAT_PP_SPEC = dict(block_types=('ND', 'NDND', 'ND' * 9, 'DD'), key_strides=(8, 4, 2, 1), offset_kernels=(9, 7, 5, 3),
                   offset_range_factors=-1, use_rpe=True, stem='conv', dwconv_mlp=True, local_perception=True,
                   neighborhood_kernel=7, generation='dat_pp')


def _dat(depth3: int, **kwargs) -> dict:
    return dict(DAT_SPEC, depths=(2, 2, depth3, 2), block_types=('LS', 'LS', 'LD' * (depth3 // 2), 'LD'), **kwargs)


MODEL_CONFIGS: Dict[str, dict] = {
    # small enough to train on a CPU in minutes (scripts/train_digits.py), with a deformable block in every stage
    # after the first; at its 56x56 input the stage maps are 14, 7, 4 and 2 pixels
    'dat_nano': dict(DAT_SPEC, dims=(32, 64, 128, 256), depths=(1, 1, 2, 1), block_types=('L', 'D', 'LD', 'D'),
                     num_heads=(1, 2, 4, 8), offset_groups=(1, 1, 2, 4), offset_range_factors=(-1, 2, 2, 2),
                     use_rpe=(False, True, True, True)),
    'dat_tiny': _dat(6, dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), offset_groups=(1, 1, 3, 6)),
    'dat_small': _dat(18, dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), offset_groups=(1, 1, 3, 6)),
    'dat_base': _dat(18, dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), offset_groups=(1, 1, 4, 8)),
    'dat_base_384': _dat(18, dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), offset_groups=(1, 1, 4, 8),
                         window_size=12, img_size=384),
    'dat_pp_tiny': dict(DAT_PP_SPEC, depths=(2, 4, 18, 2), dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16),
                        offset_groups=(1, 2, 4, 8)),
    'dat_pp_small': dict(DAT_PP_SPEC, depths=(2, 4, 18, 2), dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24),
                         offset_groups=(1, 2, 3, 6)),
    'dat_pp_base': dict(DAT_PP_SPEC, depths=(2, 4, 18, 2), dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32),
                        offset_groups=(2, 4, 8, 16)),
}


def _create(variant: str, pretrained: bool = False, **kwargs) -> DeformableAttentionTransformer:
    model_args = dict(MODEL_CONFIGS[variant])
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay')).to_dict()
    # a tag trained at another resolution (dat_pp_base.in1k_384) has position tables of that resolution
    model_args.setdefault('img_size', tuple(cfg['input_size'][-2:]))

    def build(**model_kwargs) -> DeformableAttentionTransformer:
        # weights are loaded here, before timm wraps a features_only model, so that every source can be tried
        # in turn against the bare model (dat.pretrained); timm itself is told pretrained=False
        model = DeformableAttentionTransformer(**model_kwargs)
        if pretrained:
            load_pretrained_weights(model, cfg)
        return model

    return build_model_with_cfg(
        build, variant, False,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
        **dict(model_args, **kwargs),
    )


def _cfg(tag: str) -> dict:
    entry = manifest()[tag]
    size = entry['input_size']
    first_conv = 'stem.conv1' if entry['generation'] == 'dat_pp' else 'stem.conv'
    return {
        'url': entry['official_url'], 'hf_hub_id': entry['hf_hub_id'],
        'file': str(bundled_path(entry['file'])) if entry.get('file') else None,
        'num_classes': entry.get('num_classes', 1000), 'label_names': entry.get('label_names'),
        'input_size': tuple(size), 'pool_size': (-(-size[1] // 32), -(-size[2] // 32)), 'min_input_size': (3, 32, 32),
        'crop_pct': entry['crop_pct'], 'interpolation': entry['interpolation'], 'fixed_input_size': False,
        'mean': tuple(entry.get('mean', IMAGENET_DEFAULT_MEAN)), 'std': tuple(entry.get('std', IMAGENET_DEFAULT_STD)),
        'first_conv': first_conv, 'classifier': 'head.fc', 'license': entry['license'],
        'paper_ids': entry['paper'], 'origin_url': 'https://github.com/LeapLabTHU/DAT',
    }


default_cfgs = generate_default_cfgs({tag: _cfg(tag) for tag in manifest()})


@register_model
def dat_nano(pretrained: bool = False, **kwargs) -> DeformableAttentionTransformer:
    return _create('dat_nano', pretrained, **kwargs)


@register_model
def dat_tiny(pretrained: bool = False, **kwargs) -> DeformableAttentionTransformer:
    return _create('dat_tiny', pretrained, **kwargs)


@register_model
def dat_small(pretrained: bool = False, **kwargs) -> DeformableAttentionTransformer:
    return _create('dat_small', pretrained, **kwargs)


@register_model
def dat_base(pretrained: bool = False, **kwargs) -> DeformableAttentionTransformer:
    return _create('dat_base', pretrained, **kwargs)


@register_model
def dat_base_384(pretrained: bool = False, **kwargs) -> DeformableAttentionTransformer:
    return _create('dat_base_384', pretrained, **kwargs)


@register_model
def dat_pp_tiny(pretrained: bool = False, **kwargs) -> DeformableAttentionTransformer:
    return _create('dat_pp_tiny', pretrained, **kwargs)


@register_model
def dat_pp_small(pretrained: bool = False, **kwargs) -> DeformableAttentionTransformer:
    return _create('dat_pp_small', pretrained, **kwargs)


@register_model
def dat_pp_base(pretrained: bool = False, **kwargs) -> DeformableAttentionTransformer:
    return _create('dat_pp_base', pretrained, **kwargs)
