import importlib
import os
from pathlib import Path

import pytest
import torch

import dat  # noqa: F401 - registers the models with timm
from kernel_limits import reduced_shared_memory_limit, shared_memory_limit  # noqa: F401 - fixtures
from kernel_targets import cuda_target  # noqa: F401 - the fixture that runs CUDA tests on a GPU and emulated

FIXTURES = Path(os.environ.get('DAT_OFFICIAL_FIXTURES', Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 'official'))
# wheels of detectron2 and mmcv built for this stack, which scripts/install_frameworks.sh installs from
FRAMEWORK_WHEELS = Path(os.environ.get('DAT_WHEELS_DIR', Path(__file__).resolve().parents[2] / 'shared' / 'wheels'))


def official_fixture(name: str) -> Path:
    """Path of a file made by the official code; skips the test when the shared fixtures are absent."""
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f'official reference data {path} is absent (set DAT_OFFICIAL_FIXTURES to its folder)')
    return path


def import_framework(module_name: str):
    """Import a module of detectron2 / mmcv / mmengine / mmdet / mmseg. Skips only where the framework wheels are
    absent; where they are present, `bash scripts/dev.sh` installed the frameworks, so an import error fails."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        if FRAMEWORK_WHEELS.is_dir():
            pytest.fail(f'{module_name} does not import although the framework wheels are in {FRAMEWORK_WHEELS}: '
                        f'{error} (bash scripts/install_frameworks.sh installs them)')
        pytest.skip(f'{module_name} is not installed and the framework wheels folder {FRAMEWORK_WHEELS} is absent '
                    '(set DAT_WHEELS_DIR to the folder of the wheels)')


def synthetic_detection_batch(num_classes=3):
    """Two 128x160 images, each with two boxes and their instance masks."""
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 128, 160, generator=generator) for _ in range(2)]
    targets = []
    for offset in (0, 20):
        boxes = torch.tensor([[10. + offset, 12., 70. + offset, 90.], [80., 30. + offset, 150., 110.]])
        masks = torch.zeros(2, 128, 160, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
            mask[y0:y1, x0:x1] = 1
        targets.append(dict(boxes=boxes, labels=torch.tensor([1, num_classes - 1]), masks=masks))
    return images, targets


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def load_script(name: str):
    """A script of scripts/ imported as a module (scripts/ is not a package)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / 'scripts' / f'{name}.py'
    spec = importlib.util.spec_from_file_location(f'dat_script_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch.hub caches under tmp_path, with the Hub in offline mode: the real download
    code runs, and finds only what a test lays out (see `add_to_hf_cache`) or serves from file:// URLs."""
    import huggingface_hub.constants
    hub_cache = tmp_path / 'hf' / 'hub'
    hub_cache.mkdir(parents=True)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    monkeypatch.setenv('HF_HUB_CACHE', str(hub_cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    # huggingface_hub reads its environment once, at import: point the module's settings at the same values
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    return hub_cache


def add_to_hf_cache(hub_cache: Path, repo_id: str, files: dict) -> None:
    """Lay out `files` (name -> local path) as the main revision of `repo_id` in a Hugging Face cache."""
    import shutil
    snapshot_id = '0123456789abcdef0123456789abcdef01234567'
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(snapshot_id)
    snapshot = repo / 'snapshots' / snapshot_id
    snapshot.mkdir(parents=True)
    for name, path in files.items():
        shutil.copy(path, snapshot / name)


def official_mini_checkpoint(folder: Path):
    """The narrow DAT of the shared fixtures as an official training checkpoint (`{'model': state_dict, ...}`)
    written into `folder`: its path, official config (MODEL.DAT dict), input and the official code's logits."""
    import json
    from safetensors import safe_open
    handle = safe_open(str(official_fixture('dat_v1_mini_seed0.safetensors')), 'pt')
    config = json.loads(handle.metadata()['config'])
    state_dict = {key[len('model.'):]: handle.get_tensor(key) for key in handle.keys() if key.startswith('model.')}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / 'dat_mini_official.pth'
    torch.save({'model': state_dict, 'epoch': 300}, path)
    return path, config, handle.get_tensor('input_224'), handle.get_tensor('logits_224')


def official_detector_checkpoint(out_indices=(0, 1, 2, 3), wrapper='state_dict'):
    """An official DAT-Detection/Segmentation-style checkpoint made from the official classification fixture:
    its backbone keys (classifier keys without `cls_*`, plus `norms.{i}.norm.*` of the returned stages)
    under `backbone.`, next to neck and head keys."""
    import json
    from safetensors import safe_open
    handle = safe_open(str(official_fixture('dat_v1_mini_seed0.safetensors')), 'pt')
    config = json.loads(handle.metadata()['config'])
    generator = torch.Generator().manual_seed(3)
    detector = {f'backbone.{key[len("model."):]}': handle.get_tensor(key) for key in handle.keys()
                if key.startswith('model.') and not key.startswith(('model.cls_head', 'model.cls_norm'))}
    for i in out_indices:
        for name in ('weight', 'bias'):
            detector[f'backbone.norms.{i}.norm.{name}'] = torch.randn(config['dims'][i], generator=generator)
    detector['neck.lateral_convs.0.conv.weight'] = torch.randn(256, config['dims'][0], 1, 1)
    detector['roi_head.bbox_head.fc_cls.weight'] = torch.randn(81, 1024)
    references = {i: handle.get_tensor(f'stage{i}_224') for i in range(4)}
    return config, {wrapper: detector, 'meta': {'epoch': 12}}, references, handle.get_tensor('input_224')
