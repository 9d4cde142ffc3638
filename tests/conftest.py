import os
from pathlib import Path

import pytest
import torch

import dat  # noqa: F401 - registers the models with timm

FIXTURES = Path(os.environ.get('DAT_OFFICIAL_FIXTURES', Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 'official'))


def official_fixture(name: str) -> Path:
    """Path of a file made by the official code; skips the test when the shared fixtures are absent."""
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f'official reference data {path} is absent (set DAT_OFFICIAL_FIXTURES to its folder)')
    return path


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
