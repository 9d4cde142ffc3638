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
