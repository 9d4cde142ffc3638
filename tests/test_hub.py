"""torch.hub entry points (hubconf.py at the repository root), loaded with torch.hub's own local loader."""
from pathlib import Path

import timm
import torch

from dat.models import DeformableAttentionTransformer

CHECKOUT = str(Path(__file__).resolve().parents[1])


def test_every_registered_architecture_is_an_entry_point():
    for name in timm.list_models('dat_*'):
        model = torch.hub.load(CHECKOUT, name, source='local', device='meta')
        assert model.pretrained_cfg['architecture'] == name


def test_entry_points_pass_timm_arguments_through():
    model = torch.hub.load(CHECKOUT, 'dat_tiny', source='local', num_classes=3, dims=(16, 32, 64, 128),
                           num_heads=(1, 2, 4, 8), offset_groups=(1, 1, 2, 4))
    assert isinstance(model, DeformableAttentionTransformer)
    assert model.get_classifier().out_features == 3
    backbone = torch.hub.load(CHECKOUT, 'dat_nano', source='local', features_only=True, out_indices=(1, 3))
    assert [f.shape[1] for f in backbone(torch.randn(1, 3, 64, 64))] == [64, 256]


def test_pretrained_entry_point_loads_the_same_weights_as_timm():
    from_hub = torch.hub.load(CHECKOUT, 'dat_nano', source='local', pretrained=True).eval()
    from_timm = timm.create_model('dat_nano.digits', pretrained=True).eval()
    image = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(from_hub(image), from_timm(image))
