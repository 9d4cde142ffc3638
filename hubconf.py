"""torch.hub entry points: one per registered DAT / DAT++ architecture.

    model = torch.hub.load('<owner>/<repo>', 'dat_tiny', pretrained=True)              # from GitHub
    model = torch.hub.load('/path/to/checkout', 'dat_tiny', source='local', num_classes=10)

Each entry takes `pretrained=False` and timm's keyword arguments (num_classes, features_only, out_indices,
drop_path_rate, pretrained_cfg_overlay, ...). The entries are generated from timm's registry, so every
architecture registered by `dat` appears here without edits.
"""
import timm

import dat  # noqa: F401 - registers the architectures with timm

dependencies = ['torch', 'timm', 'huggingface_hub', 'safetensors']


def _entry_point(architecture: str):
    def entry(pretrained: bool = False, **kwargs):
        return timm.create_model(architecture, pretrained=pretrained, **kwargs)

    tags = [name.split('.', 1)[1] for name in timm.list_models(architecture, pretrained=True)]
    entry.__name__ = entry.__qualname__ = architecture
    entry.__doc__ = (f"timm.create_model('{architecture}', pretrained, **kwargs); pretrained weights: "
                     f"{', '.join(tags) or 'none'} (the first is loaded by pretrained=True).")
    return entry


globals().update({name: _entry_point(name) for name in timm.list_models('dat_*')})
