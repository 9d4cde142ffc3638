"""Top-1 / top-5 accuracy of a registered model on an image folder, with timm's data pipeline.

    python scripts/validate.py /data/imagenet/val --model dat_tiny.in1k
    python scripts/validate.py digits/ --model dat_nano.digits --batch-size 128

The folder holds one sub-folder per class, in the order of the classifier's outputs when sorted by name
(ImageNet's synset folders; '0'..'9' for the digits). Images are preprocessed with the eval transform of the
model's pretrained cfg (resize, centre crop at crop_pct, interpolation, mean/std). --checkpoint loads weights
from a file instead of the pretrained sources.
"""
import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import timm
import torch
from timm.data import ImageDataset, create_transform, resolve_data_config
from timm.utils import AverageMeter, accuracy
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dat  # noqa: E402,F401 - registers the models


def validate(data: Path, model_name: str, checkpoint: Optional[Path] = None, batch_size: int = 64,
             workers: int = 0, limit: Optional[int] = None) -> dict:
    """{'top1', 'top5', 'images', 'seconds'} of `model_name` on the image folder `data`."""
    overlay = dict(file=str(checkpoint)) if checkpoint else None
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    config = resolve_data_config({}, model=model)
    dataset = ImageDataset(str(data), transform=create_transform(**config))
    if len(dataset) == 0:
        raise ValueError(f'{data} holds no images (expected one sub-folder of images per class)')
    if limit:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    top1, top5 = AverageMeter(), AverageMeter()
    topk = (1, min(5, model.num_classes))
    started = time.time()
    with torch.no_grad(), tqdm(loader, desc=f'{model_name} on {data}', unit='batch') as progress:
        for images, targets in progress:
            first, fifth = accuracy(model(images), targets, topk=topk)
            top1.update(float(first), len(targets))
            top5.update(float(fifth), len(targets))
            progress.set_postfix(top1=f'{top1.avg:.2f}', top5=f'{top5.avg:.2f}')
    return dict(top1=top1.avg, top5=top5.avg, images=top1.count, seconds=time.time() - started)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('data', type=Path, help='image folder: one sub-folder per class')
    parser.add_argument('--model', default='dat_tiny.in1k', help='registered model with its tag')
    parser.add_argument('--checkpoint', type=Path, help='weights file (official .pth or safetensors)')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--limit', type=int, help='evaluate only the first N images')
    args = parser.parse_args(argv)
    result = validate(args.data, args.model, args.checkpoint, args.batch_size, args.workers, args.limit)
    print(f"{args.model}: top-1 {result['top1']:.3f}%  top-5 {result['top5']:.3f}%  on {result['images']} images "
          f"({result['seconds']:.1f} s)")
    return result


if __name__ == '__main__':
    main()
