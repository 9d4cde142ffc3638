"""Build models from official DAT / DAT++ configs and load official checkpoints into them.

`load_official(config, checkpoint)` accepts the official YAML file, its parsed dict, or just the dict of its
`MODEL.DAT` section. Which generation of the official code a config belongs to decides the grid rules (see
`dat.layers.grids`):

* an explicit `generation='dat'|'dat_pp'` argument wins;
* otherwise a config with any key only the DAT++ code knows (`ksizes`, `nat_ksizes`, `use_lpus`,
  `layer_scale_values`, `log_cpb`, ...) or with an 'N' block is DAT++; anything else is DAT (CVPR 2022).
"""
from pathlib import Path
from typing import Mapping, Optional, Union


from dat.checkpoint import checkpoint_filter_fn, load_checkpoint_file
from dat.models.dat import DeformableAttentionTransformer

DAT_PP_ONLY_KEYS = ('ksizes', 'nat_ksizes', 'use_lpus', 'layer_scale_values', 'log_cpb', 'heads_q', 'ksize_qnas',
                    'nqs', 'qna_activation', 'lower_lr_kvs')
SUPPORTED_LETTERS = 'LSDN'
# official options whose non-default values change the architecture in ways this package does not implement
UNSUPPORTED_WHEN_SET = {'dwc_pes': 'depth-wise-conv position encoding', 'no_offs': 'deformable blocks without offsets',
                        'fixed_pes': 'fixed (non-relative) position tables', 'log_cpb': 'log-spaced continuous bias'}
# options that matter only for block letters this package does not implement (P, Q, X, E), or only for training
IGNORED_KEYS = ('sr_ratios', 'ns_per_pts', 'heads_q', 'ksize_qnas', 'nqs', 'qna_activation', 'lower_lr_kvs')


def official_model_section(config: Union[str, Path, Mapping]) -> dict:
    """The `MODEL.DAT` dict of an official config given as a YAML path, a parsed config, or the section itself."""
    if isinstance(config, (str, Path)):
        import yaml
        with open(config, encoding='utf-8') as handle:
            config = yaml.safe_load(handle)
    if not isinstance(config, Mapping):
        raise ValueError(f'an official config must be a mapping or a YAML file, got {type(config).__name__}')
    if 'MODEL' in config:
        config = config['MODEL'].get('DAT', {}) if isinstance(config['MODEL'], Mapping) else {}
    elif 'DAT' in config:
        config = config['DAT']
    if 'dims' not in config or 'stage_spec' not in config:
        raise ValueError('the config has no MODEL.DAT section with dims and stage_spec')
    return dict(config)


def detect_generation(section: Mapping) -> str:
    letters = {letter for stage in section['stage_spec'] for letter in stage}
    return 'dat_pp' if any(key in section for key in DAT_PP_ONLY_KEYS) or 'N' in letters else 'dat'


def _uniform(section: Mapping, key: str, default, description: str):
    values = section.get(key, [default] * 4)
    if len(set(values)) != 1:
        raise ValueError(f'{key}={values}: {description} varying per stage is not supported')
    return values[0]


def model_args_from_official(section: Mapping, generation: Optional[str] = None) -> dict:
    """Constructor arguments of `DeformableAttentionTransformer` equivalent to an official `MODEL.DAT` section."""
    generation = generation or detect_generation(section)
    for key, description in UNSUPPORTED_WHEN_SET.items():
        if any(section.get(key, [False] * 4)):
            raise ValueError(f'official option {key}={section[key]} ({description}) is not supported')
    if section.get('attn_drop_rate', 0.0):
        raise ValueError(f"attn_drop_rate={section['attn_drop_rate']} is not supported (attention dropout)")
    if section.get('patch_size', 4) != 4:
        raise ValueError(f"patch_size={section['patch_size']}: only 4 is supported (features at strides 4..32)")
    stage_spec = [''.join(stage) for stage in section['stage_spec']]
    for i, letters in enumerate(stage_spec):
        unknown = sorted(set(letters) - set(SUPPORTED_LETTERS))
        if unknown:
            raise ValueError(f'stage {i} uses block letters {unknown}; supported: {list(SUPPORTED_LETTERS)}')
    dims = list(section['dims'])
    for i in range(1, len(dims)):
        if dims[i] != 2 * dims[i - 1]:
            raise ValueError(f'dims={dims}: the official code only runs when each stage doubles the channels')
    conv_stem = bool(section.get('use_conv_patches', False))
    dwconv_mlps = list(section.get('use_dwc_mlps', [False] * 4))
    if generation == 'dat' and (conv_stem or any(dwconv_mlps)):
        raise ValueError('use_conv_patches / use_dwc_mlps of the DAT (2022) code are not supported; '
                         'the DAT++ forms are (pass generation="dat_pp" if this is a DAT++ config)')
    groups = [max(group, 1) for group in section.get('groups', [1] * 4)]
    key_strides = [max(stride, 1) for stride in section.get('strides', [1] * 4)]
    layer_scales = [value if value > 0 else None for value in section.get('layer_scale_values', [-1] * 4)]
    nat_kernel = _uniform(section, 'nat_ksizes', 3, 'neighborhood kernel') if generation == 'dat_pp' else 7
    return dict(
        num_classes=section.get('num_classes', 1000),
        dims=dims,
        depths=list(section['depths']),
        block_types=stage_spec,
        num_heads=list(section['heads']),
        offset_groups=groups,
        window_size=list(section.get('window_sizes', [7] * 4)),
        neighborhood_kernel=nat_kernel,
        key_strides=key_strides,
        offset_kernels=list(section.get('ksizes', [9, 7, 5, 3])),
        offset_range_factors=list(section.get('offset_range_factor', [1, 2, 3, 4])),
        use_rpe=list(section.get('use_pes', [False] * 4)),
        stem='conv' if conv_stem else 'patch',
        stem_dim=section.get('dim_stem', 96),
        dwconv_mlp=dwconv_mlps,
        local_perception=list(section.get('use_lpus', [False] * 4)),
        layer_scale_init=layer_scales,
        mlp_ratio=float(section.get('expansion', 4)),
        generation=generation,
        img_size=section.get('img_size', 224),
        drop_rate=section.get('drop_rate', 0.0),
        drop_path_rate=section.get('drop_path_rate', 0.0),
    )


def load_official(config: Union[str, Path, Mapping], checkpoint: Union[None, str, Path, Mapping] = None,
                  generation: Optional[str] = None, **overrides) -> DeformableAttentionTransformer:
    """A model built from an official config, with an official checkpoint (path or state dict) loaded into it.

    `overrides` replace constructor arguments (e.g. `attn_impl='fused'`, `drop_path_rate=0.1`). The model is
    returned in eval mode when a checkpoint is given.
    """
    args = model_args_from_official(official_model_section(config), generation)
    args.update(overrides)
    model = DeformableAttentionTransformer(**args)
    if checkpoint is not None:
        if isinstance(checkpoint, (str, Path)):
            checkpoint = load_checkpoint_file(checkpoint)
        state_dict = checkpoint_filter_fn(checkpoint, model)
        model.load_state_dict(state_dict, strict=True)
        model.eval()
    return model
