"""Reading official DAT / DAT++ checkpoints safely and converting them to this package's layout.

The official files are `torch.save({'model': state_dict, ...})` pickles. They are read with
`weights_only=True`; any extra non-tensor object in them (a training config, say) is replaced by an inert
placeholder instead of being unpickled, so loading never imports or executes code named by the file.
"""
import math
import pickle
import re
import types
import zipfile
from pathlib import Path
from typing import Dict, Mapping, Tuple, Union

import torch
from timm.layers import resize_rel_pos_bias_table_simple

# buffers of the official modules that this package rebuilds for the actual input size
REBUILT_BUFFERS = ('relative_position_index', 'attn_mask')
# position tables: trained at one size, resampled (bicubic, as the official loader does) to another
RESIZABLE_TABLES = ('rpe_table', 'relative_position_bias_table')
OFFICIAL_MARKERS = ('patch_proj.', 'down_projs.', 'cls_head.', 'cls_norm.')
STEM_INPUT_CONVS = ('stem.conv.weight', 'stem.conv1.weight')  # the first conv of the DAT / DAT++ stems


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


class _InertObject(dict):
    """Stands in for every non-tensor object of a checkpoint; holds nothing and runs nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setitem__(self, key, value):
        pass

    def __setstate__(self, state):
        pass


class _InertUnpickler(pickle.Unpickler):
    """Resolves only the globals that torch's weights_only loader allows; any other global (a training
    config class, a function) resolves to `_InertObject`, so nothing from the file is imported or called."""

    def find_class(self, module, name):
        from torch._weights_only_unpickler import _get_allowed_globals
        return _get_allowed_globals().get(f'{module}.{name}', _InertObject)


_inert_pickle = types.ModuleType('dat_inert_pickle')
_inert_pickle.Unpickler = _InertUnpickler
_inert_pickle.load = lambda file, **kwargs: _InertUnpickler(file, **kwargs).load()


def load_checkpoint_file(path: Union[str, Path]) -> dict:
    """Read a `.pth`/`.pt` or `.safetensors` file into a dict, with errors that name the file.

    Pickles are read with `weights_only=True`; one that carries other objects (official training checkpoints
    hold a yacs config) is re-read with an unpickler that replaces those objects by inert placeholders.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for bad headers and short files
            raise CheckpointError(f'{path} is not a readable safetensors file: {error}') from error
    try:
        try:
            return torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError:
            return torch.load(path, map_location='cpu', weights_only=False, pickle_module=_inert_pickle)
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(f'{path} is truncated or not a PyTorch checkpoint: {error}') from error


def unwrap_state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The state dict inside `{'model': ...}` / `{'state_dict': ...}` or a bare one, without `module.`/`backbone.`
    prefixes (DataParallel, detection and segmentation checkpoints). Of a whole detector or segmentor (some keys
    under `backbone.`) only the backbone is kept: its neck and heads are no part of a DAT model."""
    for key in ('model', 'state_dict', 'model_state'):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    tensors = {key[len('module.'):] if key.startswith('module.') else key: value
               for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if any(key.startswith('backbone.') for key in tensors):
        tensors = {key: value for key, value in tensors.items() if key.startswith('backbone.')}
    state_dict = {key[len('backbone.'):] if key.startswith('backbone.') else key: value
                  for key, value in tensors.items()}
    if not state_dict:
        raise CheckpointError('the checkpoint holds no tensors (expected a state dict or {"model": state_dict})')
    return state_dict


_BLOCK_RULES = [
    (re.compile(r'layer_norms\.(\d+)\.norm\.(.+)'), lambda n, rest: f'blocks.{int(n) // 2}.norm{int(n) % 2 + 1}.{rest}'),
    (re.compile(r'layer_scales\.(\d+)\.weight'), lambda n: f'blocks.{int(n) // 2}.ls{int(n) % 2 + 1}.gamma'),
    (re.compile(r'mlps\.(\d+)\.chunk\.linear([12])\.(.+)'), lambda d, i, rest: f'blocks.{d}.mlp.fc{i}.{rest}'),
    (re.compile(r'mlps\.(\d+)\.linear([12])\.0\.(.+)'), lambda d, i, rest: f'blocks.{d}.mlp.fc{i}.{rest}'),
    (re.compile(r'mlps\.(\d+)\.dwc\.(.+)'), lambda d, rest: f'blocks.{d}.mlp.dwconv.{rest}'),
    (re.compile(r'local_perception_units\.(\d+)\.(.+)'), lambda d, rest: f'blocks.{d}.lpu.{rest}'),
    (re.compile(r'attns\.(\d+)\.conv_offset\.1\.norm\.(.+)'), lambda d, rest: f'blocks.{d}.attn.conv_offset.1.{rest}'),
    (re.compile(r'attns\.(\d+)\.(.+)'), lambda d, rest: f'blocks.{d}.attn.{rest}'),
    (re.compile(r'proj\.(.+)'), lambda rest: f'downsample.{rest}'),
]


def _official_key(key: str, conv_stem: bool) -> str:
    """This package's name for an official key, or '' when there is none."""
    match = re.fullmatch(r'patch_proj\.(\d)\.(?:norm\.)?(.+)', key)
    if match:
        index, rest = match.groups()
        names = {'0': 'conv1', '1': 'norm1', '3': 'conv2', '4': 'norm2'} if conv_stem else {'0': 'conv', '1': 'norm'}
        return f'stem.{names[index]}.{rest}' if index in names else ''
    match = re.fullmatch(r'down_projs\.(\d+)\.([01])\.(?:norm\.)?(.+)', key)
    if match:
        stage, index, rest = match.groups()
        return f'stages.{int(stage) + 1}.downsample.{"conv" if index == "0" else "norm"}.{rest}'
    match = re.fullmatch(r'cls_norm\.norm\.(.+)', key)
    if match:
        return f'norm.{match.group(1)}'
    match = re.fullmatch(r'norms\.(\d+)\.norm\.(.+)', key)  # per-output norms of the detection/segmentation code
    if match:
        return f'norms.{match.group(1)}.{match.group(2)}'
    match = re.fullmatch(r'cls_head\.(.+)', key)
    if match:
        return f'head.fc.{match.group(1)}'
    match = re.fullmatch(r'stages\.(\d+)\.(.+)', key)
    if match:
        stage, rest = match.groups()
        for pattern, rename in _BLOCK_RULES:
            found = pattern.fullmatch(rest)
            if found:
                return f'stages.{stage}.{rename(*found.groups())}'
    return ''


def _resize_table(table: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A position table resampled to `shape`: (heads, 2h - 1, 2w - 1) for deformable attention, ((2w - 1)^2, heads)
    for window attention. Interpolated in float32, so half-precision checkpoints lose no more than rounding."""
    sides = shape[1:] if table.ndim == 3 else (math.isqrt(shape[0]),) * 2
    window = tuple((side + 1) // 2 for side in sides)
    return resize_rel_pos_bias_table_simple(table.float(), window, tuple(shape)).to(table.dtype)


def checkpoint_filter_fn(checkpoint: Mapping, model: torch.nn.Module, optional_keys: Tuple[str, ...] = (),
                         extra_keys: Tuple[str, ...] = ()) -> Dict[str, torch.Tensor]:
    """Convert an official DAT/DAT++ checkpoint (or one already in this layout) for `model`.

    Every official tensor must map to a model tensor of the same shape and every model tensor must be
    filled, except: buffers the model rebuilds, position tables (resampled when the size differs) and the
    classifier (whose size timm reconciles with `num_classes`). Anything else raises `CheckpointError`
    naming the keys. A model that is not the whole classifier names key prefixes it may lack in the checkpoint
    (`optional_keys`: those parameters keep their initial values) and checkpoint key prefixes it has no place
    for (`extra_keys`: dropped from the result).
    """
    state_dict = unwrap_state_dict(checkpoint)
    if any(key.startswith(OFFICIAL_MARKERS) for key in state_dict):
        conv_stem = hasattr(model.stem, 'conv1')
        converted, unmapped = {}, []
        for key, value in state_dict.items():
            if key.endswith(REBUILT_BUFFERS):
                continue
            new_key = _official_key(key, conv_stem)
            if new_key:
                converted[new_key] = value
            else:
                unmapped.append(key)
        if unmapped:
            raise CheckpointError(f'{len(unmapped)} official keys have no place in this model: {unmapped[:10]}')
        state_dict = converted

    expected = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if k in expected or not k.startswith(extra_keys)}
    is_head = lambda key: key.startswith('head.')  # noqa: E731 - timm drops/reshapes the classifier itself
    # timm's pretrained loader adapts the stem to another number of input channels (in_chans) after this filter
    is_input_conv = lambda key, value: (  # noqa: E731
        key in STEM_INPUT_CONVS and value.shape[:1] + value.shape[2:] == expected[key].shape[:1] + expected[key].shape[2:])
    unexpected = [k for k in state_dict if k not in expected and not is_head(k)]
    missing = [k for k in expected if k not in state_dict and not is_head(k) and not k.startswith(optional_keys)]
    mismatched = []
    for key, value in state_dict.items():
        if key in expected and value.shape != expected[key].shape and not is_head(key):
            if is_input_conv(key, value):
                continue
            if key.endswith(RESIZABLE_TABLES):
                state_dict[key] = _resize_table(value, expected[key].shape)
            else:
                mismatched.append(f'{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}')
    if unexpected or missing or mismatched:
        raise CheckpointError(
            'checkpoint does not fit this architecture (is it for another variant?):'
            + (f'\n  unexpected keys: {unexpected[:10]}' if unexpected else '')
            + (f'\n  missing keys: {missing[:10]}' if missing else '')
            + (f'\n  shape mismatches: {mismatched[:10]}' if mismatched else ''))
    return state_dict
