"""The manifest of pretrained weights (`manifest.json` beside this file), installed as `dat.weights`."""
import json
from functools import lru_cache
from importlib import resources
from typing import Dict


@lru_cache(maxsize=None)
def manifest() -> Dict[str, dict]:
    """Tag (e.g. 'dat_tiny.in1k') -> its entry: sources, expected accuracy, preprocessing, licence."""
    return json.loads((resources.files(__name__) / 'manifest.json').read_text(encoding='utf-8'))['weights']
