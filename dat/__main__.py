"""`python -m dat`: the model zoo at a glance, and one model run on an image.

Lists every registered DAT/DAT++ architecture with its parameter count, GMACs at its default input size,
feature channels and reductions; then runs a model (default `dat_tiny`, random weights unless
`--pretrained`) on an image (default: the bundled sample) and prints its feature pyramid. Works offline.
"""
import argparse
from importlib import resources
from typing import List, Optional

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import dat  # noqa: F401 - registers the models


def count_gmacs(model_name: str) -> float:
    """Multiply-accumulates of one forward pass at the default input size, counted on the meta device."""
    model = timm.create_model(model_name, device='meta').eval()
    image = torch.empty(1, *model.pretrained_cfg['input_size'], device='meta')
    with FlopCounterMode(display=False) as counter:
        model(image)
    return counter.get_total_flops() / 2e9


def print_zoo() -> None:
    print(f'{"model":<16}{"params (M)":>12}{"GMACs":>8}  {"input":<12}{"feature channels":<24}reductions')
    for name in timm.list_models('dat_*'):
        model = timm.create_model(name, device='meta')
        params = sum(p.numel() for p in model.parameters()) / 1e6
        size = 'x'.join(str(s) for s in model.pretrained_cfg['input_size'][1:])
        channels = [info['num_chs'] for info in model.feature_info]
        reductions = [info['reduction'] for info in model.feature_info]
        print(f'{name:<16}{params:>12.2f}{count_gmacs(name):>8.2f}  {size:<12}{str(channels):<24}{reductions}')


def load_image(path: Optional[str], model) -> torch.Tensor:
    from PIL import Image
    source = path or resources.files('dat') / 'assets' / 'sample.png'
    with Image.open(source) as image:
        config = timm.data.resolve_data_config({}, model=model)
        transform = timm.data.create_transform(**config)
        return transform(image.convert('RGB')).unsqueeze(0)


def print_pyramid(model_name: str, image_path: Optional[str], pretrained: bool) -> None:
    model = timm.create_model(model_name, pretrained=pretrained).eval()
    image = load_image(image_path, model)
    with torch.no_grad():
        features = model.forward_intermediates(image, intermediates_only=True)
    print(f'\n{model_name} on {image_path or "the bundled sample image"} ({tuple(image.shape)}):')
    for info, feature in zip(model.feature_info, features):
        print(f'  stride {info["reduction"]:>2}: {tuple(feature.shape)}  mean {feature.mean():+.4f}  '
              f'std {feature.std():.4f}')


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m dat', description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='dat_tiny', help='registered model to run (default: dat_tiny)')
    parser.add_argument('--image', help='image file (default: the bundled sample)')
    parser.add_argument('--pretrained', action='store_true', help='download and use pretrained weights')
    args = parser.parse_args(argv)
    print_zoo()
    print_pyramid(args.model, args.image, args.pretrained)


if __name__ == '__main__':
    main()
