"""DAT / DAT++ as a detection and segmentation backbone.

`DatBackbone` turns any DAT model (a registered name, constructor arguments, an official config or a built
model) into the backbone the official LeapLabTHU/DAT-Detection and DAT-Segmentation code uses: the selected
stage outputs (strides 4, 8, 16, 32) of an image of any size, each through its own LayerNorm (`norms.{i}`).
Its parameter names are those of the classifier without `norm` and `head`, plus `norms.{i}`, so official
classification, detection and segmentation checkpoints all load into it (`load_checkpoint`).

On top of that it has the training switches detection frameworks expect: `frozen_stages` (the stem and the
first n stages stop learning and stay in eval mode), `norm_eval` (normalisation layers stay in eval mode) and
gradient checkpointing (blocks recompute their activations in the backward pass instead of storing them).
"""
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d, get_device_dtype

from dat.checkpoint import OFFICIAL_MARKERS, checkpoint_filter_fn, load_checkpoint_file
from dat.models.dat import DeformableAttentionTransformer, check_image_batch, position_table_names, to_stage_layout
from dat.official import model_args_from_official

__all__ = ['DatBackbone', 'build_dat_model']

# layers `norm_eval` keeps in eval mode; the switch exists for BatchNorm's running statistics (as in mmdet)
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)

ModelSpec = Union[str, Mapping, DeformableAttentionTransformer]


def build_dat_model(model: ModelSpec, pretrained: bool = False, **kwargs) -> DeformableAttentionTransformer:
    """A DAT model without classifier from a registered name (`'dat_tiny'`), a dict of constructor arguments,
    an official `MODEL.DAT` section or detection/segmentation backbone config (recognised by its
    `stage_spec`), or an already built model (returned as it is)."""
    if isinstance(model, DeformableAttentionTransformer):
        if kwargs or pretrained:
            raise ValueError('model arguments and pretrained=True apply to a model built here, not to a built '
                             f'model instance (got {sorted(kwargs) + (["pretrained"] if pretrained else [])})')
        return model
    if isinstance(model, str):
        known = timm.list_models('dat*')
        if model not in known:
            raise ValueError(f'unknown DAT model {model!r}; registered: {known}')
        return timm.create_model(model, pretrained=pretrained, **dict(kwargs, num_classes=0))
    if isinstance(model, Mapping):
        if pretrained:
            raise ValueError('pretrained=True needs a registered model name; load a file with checkpoint=...')
        args = model_args_from_official(model) if 'stage_spec' in model else dict(model)
        return DeformableAttentionTransformer(**dict(args, **kwargs, num_classes=0))
    raise TypeError(f'model must be a registered name, a config dict or a DeformableAttentionTransformer, '
                    f'got {type(model).__name__}')


def _checked_out_indices(out_indices: Sequence[int], num_stages: int) -> Tuple[int, ...]:
    if isinstance(out_indices, int) or not all(isinstance(i, int) for i in out_indices) or not out_indices:
        raise ValueError(f'out_indices must be a non-empty sequence of stage indices, got {out_indices!r}')
    bad = [i for i in out_indices if not -num_stages <= i < num_stages]
    if bad:
        raise ValueError(f'out_indices {list(out_indices)}: {bad} out of range for a model with {num_stages} '
                         f'stages (valid: 0..{num_stages - 1}, or negative from the end)')
    indices = sorted({i % num_stages for i in out_indices})
    if len(indices) != len(out_indices):
        raise ValueError(f'out_indices {list(out_indices)} name a stage twice')
    return tuple(indices)


class DatBackbone(nn.Module):
    """Multi-scale features of a DAT / DAT++ model for detection and segmentation heads.

    Args:
        model: a registered name ('dat_tiny', ...), constructor arguments, an official config section, or a
            built `DeformableAttentionTransformer` (see `build_dat_model`).
        out_indices: stages whose outputs are returned (0..3: strides 4, 8, 16, 32). Stages after the last one
            are not built.
        output_norms: a LayerNorm on each returned feature (`norms.{i}`), as in the official detection and
            segmentation code.
        frozen_stages: -1: nothing frozen; 0: the stem; n: the stem and stages 0..n-1 (with the norms of their
            outputs). Frozen parameters do not require gradients and frozen modules stay in eval mode.
        norm_eval: keep every normalisation layer in eval mode while training (mmdet's switch; it matters for
            BatchNorm running statistics: DAT's LayerNorms have none, so for DAT it changes no numbers).
        grad_checkpointing: recompute block activations in the backward pass to lower peak memory.
        checkpoint: a file or state dict (official classification / detection / segmentation, or this
            package's layout) loaded with `load_checkpoint`.
        pretrained: timm pretrained weights of a registered model name.
        **model_kwargs: constructor arguments of the model (drop_path_rate, attn_impl, dims, ...).
    """

    def __init__(self, model: ModelSpec = 'dat_tiny', out_indices: Sequence[int] = (0, 1, 2, 3),
                 output_norms: bool = True, frozen_stages: int = -1, norm_eval: bool = False,
                 grad_checkpointing: bool = False, checkpoint: Union[None, str, Path, Mapping] = None,
                 pretrained: bool = False, **model_kwargs):
        super().__init__()
        trunk = build_dat_model(model, pretrained, **model_kwargs)
        num_stages = len(trunk.stages)
        self.out_indices = _checked_out_indices(out_indices, num_stages)
        kept_stages = self.out_indices[-1] + 1
        if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or \
                not -1 <= frozen_stages <= kept_stages:
            raise ValueError(f'frozen_stages must be an int from -1 (nothing) to {kept_stages} (the stem and all '
                             f'{kept_stages} stages this backbone runs), got {frozen_stages!r}')
        self.in_chans = trunk.in_chans
        self.num_model_stages = num_stages
        self.stem = trunk.stem
        self.stages = trunk.stages[:kept_stages]
        factory = get_device_dtype(trunk)
        self.norms = nn.ModuleList([
            LayerNorm2d(trunk.feature_info[i]['num_chs'], eps=1e-5, **factory)
            if output_norms and i in self.out_indices else nn.Identity()
            for i in range(kept_stages)])
        self.feature_info: List[Dict] = [
            dict(trunk.feature_info[i], module=f'norms.{i}' if output_norms else f'stages.{i}', index=i)
            for i in self.out_indices]
        self.out_channels: List[int] = [info['num_chs'] for info in self.feature_info]
        self.strides: List[int] = [info['reduction'] for info in self.feature_info]
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.set_grad_checkpointing(grad_checkpointing)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def load_checkpoint(self, checkpoint: Union[str, Path, Mapping]) -> List[str]:
        """Load a checkpoint file or dict: an official DAT/DAT++ classification checkpoint, an official
        DAT-Detection / DAT-Segmentation checkpoint (whole detector or backbone; `backbone.` keys), or this
        package's layout. Returns the output-norm parameters the checkpoint does not hold (a classification
        checkpoint has none): they keep their initial values, as in the official code. A checkpoint of
        another architecture raises `CheckpointError` naming the keys that do not fit."""
        if isinstance(checkpoint, (str, Path)):
            checkpoint = load_checkpoint_file(checkpoint)
        missing, _ = self.load_state_dict(self._fitted_state_dict(checkpoint), strict=False)
        return missing

    def _fitted_state_dict(self, checkpoint: Mapping) -> Dict[str, torch.Tensor]:
        """`checkpoint` in this backbone's layout, checked against it (see `checkpoint_filter_fn`)."""
        unbuilt_stages = tuple(f'stages.{i}.' for i in range(len(self.stages), self.num_model_stages))
        return checkpoint_filter_fn(
            checkpoint, self, optional_keys=('norms.',),
            # the classifier's final norm and head, norms of outputs not returned here, stages not built here
            extra_keys=('norm.', 'head.', 'norms.') + unbuilt_stages)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Loaders that walk the module tree (torch's `load_state_dict`; mmengine's, which its `load_checkpoint`
        and `Pretrained` initialiser use) hand this backbone the keys under its `prefix`. Official-layout keys
        there (the `backbone.*` of a DAT-Detection / DAT-Segmentation model) are converted and checked here as
        `load_checkpoint` does: unconverted, those non-strict loaders would only warn about them and leave the
        backbone as it was."""
        own_keys = [key for key in state_dict if key.startswith(prefix)]
        if any(key[len(prefix):].startswith(OFFICIAL_MARKERS) for key in own_keys):
            official = {key[len(prefix):]: state_dict.pop(key) for key in own_keys}
            state_dict.update({prefix + key: value for key, value in self._fitted_state_dict(official).items()})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.stem] + [module for i in range(self.frozen_stages) for module in (self.stages[i], self.norms[i])]

    def train(self, mode: bool = True) -> 'DatBackbone':
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for module in self.modules():
                    if isinstance(module, NORM_LAYERS):
                        module.eval()
        return self

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return position_table_names(self)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The features of `out_indices` (NCHW); a stride-s feature of an H x W image is ceil(H/s) x ceil(W/s)."""
        check_image_batch(x, self.in_chans)
        x = self.stem(to_stage_layout(x))
        features = []
        for index, (stage, norm) in enumerate(zip(self.stages, self.norms)):
            x = stage(x)
            if index in self.out_indices:
                features.append(norm(x))
        return features
