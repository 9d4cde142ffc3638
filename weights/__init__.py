"""The manifest of pretrained weights (`manifest.json` beside this file), installed as `dat.weights`.

This folder also holds the weights small enough to ship with the package (`dat_nano_digits.safetensors`) and
the model-card template (`MODEL_CARD.md`) of `scripts/convert_official.py`.
"""
import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Dict, Mapping


@lru_cache(maxsize=None)
def manifest() -> Dict[str, dict]:
    """Tag (e.g. 'dat_tiny.in1k') -> its entry: sources, expected accuracy, preprocessing, licence."""
    return json.loads((resources.files(__name__) / 'manifest.json').read_text(encoding='utf-8'))['weights']


def bundled_path(name: str) -> Path:
    """Path of a file shipped in this folder (a bundled checkpoint, the model-card template)."""
    return Path(str(resources.files(__name__) / name))


def update_entry(path: Path, tag: str, values: Mapping[str, object]) -> None:
    """Set fields of the entry `tag` in the manifest file `path` (each present there once) to `values`, leaving
    the rest of the file, and its layout, untouched."""
    text = path.read_text(encoding='utf-8')
    start = text.index(f'"{tag}"')
    end = text.index('}', start)
    entry = text[start:end]
    for key, value in values.items():
        entry, count = re.subn(rf'"{key}": [^,\n}}]+', lambda _: f'"{key}": {json.dumps(value)}', entry)
        if count != 1:
            raise ValueError(f'the manifest entry {tag} has {count} "{key}" fields, expected one')
    path.write_text(text[:start] + entry + text[end:], encoding='utf-8')
    manifest.cache_clear()
