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


def test_a_bare_checkout_loads_without_being_installed(tmp_path):
    """torch.hub.load from GitHub runs hubconf.py from a downloaded checkout that pip never installed: the
    package must find its weights manifest and bundled weights there, not through an install."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    checkout = tmp_path / 'hub_checkout'
    for part in ('dat', 'weights'):
        shutil.copytree(root / part, checkout / part, ignore=shutil.ignore_patterns('*.so', '__pycache__'))
    shutil.copy(root / 'hubconf.py', checkout / 'hubconf.py')
    script = (
        'import sys\n'
        # the test machine has this repository installed in editable mode: hide that install
        "sys.meta_path = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', type(f).__name__)]\n"
        'import torch, dat, dat.weights\n'
        f'assert dat.weights.__file__.startswith({str(checkout)!r}), dat.weights.__file__\n'
        f"model = torch.hub.load({str(checkout)!r}, 'dat_nano', source='local', pretrained=True)\n"
        'print(sum(p.numel() for p in model.parameters()))\n'
    )
    done = subprocess.run([sys.executable, '-c', script], cwd=checkout, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) > 1_000_000
