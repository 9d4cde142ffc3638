"""The manifest of pretrained weights (`manifest.json` beside this file), installed as `dat.weights`.

This folder also holds the weights small enough to ship with the package (`dat_nano_digits.safetensors`) and
the model-card template (`MODEL_CARD.md`) of `scripts/convert_official.py`.
"""
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Dict


@lru_cache(maxsize=None)
def manifest() -> Dict[str, dict]:
    """Tag (e.g. 'dat_tiny.in1k') -> its entry: sources, expected accuracy, preprocessing, licence."""
    return json.loads((resources.files(__name__) / 'manifest.json').read_text(encoding='utf-8'))['weights']


def bundled_path(name: str) -> Path:
    """Path of a file shipped in this folder (a bundled checkpoint, the model-card template)."""
    return Path(str(resources.files(__name__) / name))
