"""scikit-learn's bundled handwritten digits: an offline data set small enough to train and test DAT on a CPU.

1797 grey 8x8 images of the digits 0-9 (values 0-16) ship inside scikit-learn, so nothing is downloaded.
Each is turned into an RGB PIL image and goes through the same timm preprocessing as any photograph
(`timm.data.create_transform` with the model's pretrained cfg), so the `dat_nano.digits` checkpoint is
evaluated exactly like the ImageNet ones. The held-out split is fixed by a seed and never used in training.
"""
from typing import List, Tuple

import numpy as np
import torch

NUM_CLASSES = 10
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2
SPLITS = ('train', 'held_out')


def _require_sklearn():
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError('the digits data ships with scikit-learn: pip install scikit-learn '
                          '(or pip install "dat[demo]")') from error
    return load_digits


def digit_images(split: str) -> Tuple[List['PIL.Image.Image'], List[int]]:  # noqa: F821 - PIL imported lazily
    """RGB 8x8 PIL images and labels of one split ('train' or 'held_out')."""
    from PIL import Image
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    digits = _require_sklearn()()
    order = np.random.RandomState(SPLIT_SEED).permutation(len(digits.target))
    num_held_out = int(round(HELD_OUT_FRACTION * len(order)))
    indices = order[:num_held_out] if split == 'held_out' else order[num_held_out:]
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = [Image.fromarray(pixels[i], mode='L').convert('RGB') for i in indices]
    return images, [int(digits.target[i]) for i in indices]


def digit_tensors(split: str, model) -> Tuple[torch.Tensor, torch.Tensor]:
    """A split as a batch (N, 3, H, W) preprocessed with `model`'s eval transform, and its labels (N,)."""
    import timm.data
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    images, labels = digit_images(split)
    return torch.stack([transform(image) for image in images]), torch.tensor(labels)


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of `model` (put in eval mode) for a preprocessed batch."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def top1_top5(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of logits."""
    from timm.utils import accuracy
    top1, top5 = accuracy(logits, labels, topk=(1, 5))
    return float(top1), float(top5)


def evaluate(model, images: torch.Tensor, labels: torch.Tensor) -> Tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of `model` on a preprocessed batch."""
    return top1_top5(predict(model, images), labels)
