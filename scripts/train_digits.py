"""Train dat_nano on scikit-learn's bundled digits on the CPU: the `dat_nano.digits` checkpoint.

    python scripts/train_digits.py                       # writes weights/dat_nano_digits.safetensors
    python scripts/train_digits.py --update-manifest     # ... and records its size, SHA-256 and accuracy

The split, preprocessing and held-out evaluation are those of `dat.digits` (the same as `python -m dat`).
Everything is seeded: with the same torch build and thread count the script writes the same file.
"""
import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dat  # noqa: E402,F401 - registers the models
from dat.digits import digit_tensors, evaluate  # noqa: E402
from dat.pretrained import file_sha256  # noqa: E402
from dat.weights import bundled_path, update_entry  # noqa: E402

TAG = 'dat_nano.digits'


def random_shifts(images: torch.Tensor, max_shift: int, background: float, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random whole-pixel shift of up to `max_shift`, the uncovered border filled
    with the background value (handwriting is not centred the same way twice)."""
    size_h, size_w = images.shape[-2:]
    padded = F.pad(images, (max_shift,) * 4, value=background)
    starts = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    return torch.stack([padded[i, :, y:y + size_h, x:x + size_w] for i, (y, x) in enumerate(starts.tolist())])


def train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: float, batch_size: int = 32,
          lr: float = 2e-3, weight_decay: float = 0.05, seed: int = 0,
          log: Optional[Callable[[int, float], None]] = None) -> None:
    """AdamW with a one-cycle schedule over `epochs` passes (a fraction trains that share of a pass)."""
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(labels) // batch_size
    total_steps = max(1, int(round(epochs * steps_per_epoch)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=total_steps, pct_start=0.15)
    background = float(images.amin())
    max_shift = images.shape[-1] // 14
    model.train()
    step = 0
    while step < total_steps:
        order = torch.randperm(len(labels), generator=generator)
        for first in range(0, steps_per_epoch * batch_size, batch_size):
            batch = order[first:first + batch_size]
            loss = F.cross_entropy(model(random_shifts(images[batch], max_shift, background, generator)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if log is not None:
                log(step, loss.item())
            if step == total_steps:
                break
    model.eval()


def update_manifest(path: Path, top1: float, top5: float, weights: Path) -> None:
    """Record the checkpoint's size, SHA-256 and held-out accuracy in the manifest entry of `TAG`."""
    update_entry(path, TAG, {'top1': round(top1, 3), 'top5': round(top5, 3), 'file_size': weights.stat().st_size,
                             'sha256': file_sha256(weights)})


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--epochs', type=float, default=8)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=1, help='CPU threads (the result is reproducible per count)')
    parser.add_argument('--out', type=Path, default=bundled_path('dat_nano_digits.safetensors'))
    parser.add_argument('--update-manifest', action='store_true',
                        help=f'record the new file\'s size, SHA-256 and accuracy in the manifest entry {TAG}')
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = timm.create_model('dat_nano', num_classes=10)
    train_images, train_labels = digit_tensors('train', model)
    held_out_images, held_out_labels = digit_tensors('held_out', model)
    steps_per_epoch = len(train_labels) // args.batch_size
    started = time.time()

    def log(step: int, loss: float) -> None:
        if step % steps_per_epoch == 0:
            print(f'epoch {step // steps_per_epoch:>3}  loss {loss:.4f}  {time.time() - started:6.0f} s', flush=True)

    train(model, train_images, train_labels, args.epochs, args.batch_size, args.lr, seed=args.seed, log=log)
    seconds = time.time() - started
    top1, top5 = evaluate(model, held_out_images, held_out_labels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    # no other metadata: safetensors writes a metadata dict in no fixed order, and the file must be reproducible
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out), metadata={'format': 'pt'})
    print(f'trained {args.epochs:g} epochs on {len(train_labels)} digits in {seconds:.0f} s '
          f'({args.threads} threads); held-out top-1 {top1:.2f}% top-5 {top5:.2f}% '
          f'({len(held_out_labels)} images) -> {args.out}')
    if args.update_manifest:
        update_manifest(bundled_path('manifest.json'), top1, top5, args.out)
        print(f'recorded in {bundled_path("manifest.json")}')
    return top1


if __name__ == '__main__':
    main()
