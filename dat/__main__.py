"""`python -m dat`: the model zoo, and a pretrained DAT at work, offline.

    python -m dat                                        # zoo table; dat_nano.digits on held-out digits
    python -m dat --model dat_tiny.in1k --image PATH     # classify an image (ImageNet class names)
    python -m dat visualize IMAGE --model M --out points.png   # draw where the deformable blocks sample
    python -m dat info                                   # versions, the native kernels built, what auto runs

The default demo needs no network: `dat_nano.digits` ships with the package and the digits with
scikit-learn. Other tags download their weights (Hugging Face Hub, else the official release) once.
"""
import argparse
from importlib import resources
from typing import List, Optional

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import dat  # noqa: F401 - registers the models

DEMO_MODEL = 'dat_nano.digits'


def count_gmacs(model: torch.nn.Module) -> float:
    """Multiply-accumulates of one forward pass at the model's default input size (a meta-device model costs
    nothing to count)."""
    device = next(model.parameters()).device
    image = torch.empty(1, *model.pretrained_cfg['input_size'], device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(image)
    return counter.get_total_flops() / 2e9


def print_zoo() -> None:
    print(f'{"model":<16}{"params (M)":>12}{"GMACs":>8}  {"input":<12}{"feature channels":<24}{"reductions":<16}'
          'pretrained tags')
    for name in timm.list_models('dat_*'):
        model = timm.create_model(name, device='meta')
        params = sum(p.numel() for p in model.parameters()) / 1e6
        size = 'x'.join(str(s) for s in model.pretrained_cfg['input_size'][1:])
        channels = [info['num_chs'] for info in model.feature_info]
        reductions = [info['reduction'] for info in model.feature_info]
        tags = ', '.join(tag.split('.', 1)[1] for tag in timm.list_models(name, pretrained=True))
        print(f'{name:<16}{params:>12.2f}{count_gmacs(model):>8.2f}  {size:<12}{str(channels):<24}'
              f'{str(reductions):<16}{tags}')


def class_names(model) -> List[str]:
    """Readable names of the model's classes: its cfg's label names, else ImageNet's, else the indices."""
    cfg = model.pretrained_cfg
    if cfg.get('label_names'):
        return list(cfg['label_names'])
    from timm.data import ImageNetInfo, infer_imagenet_subset
    subset = infer_imagenet_subset(model)
    if subset:
        info = ImageNetInfo(subset)
        return [info.index_to_description(i) for i in range(model.num_classes)]
    return [str(i) for i in range(model.num_classes)]


def classify_image(model_name: str, image_path: Optional[str], top: int = 5) -> None:
    from PIL import Image
    model = timm.create_model(model_name, pretrained=True).eval()
    source = image_path or resources.files('dat') / 'assets' / 'sample.png'
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with Image.open(source) as image:
        batch = transform(image.convert('RGB')).unsqueeze(0)
    with torch.no_grad():
        probabilities = model(batch).softmax(-1)[0]
    names = class_names(model)
    print(f'\n{model_name} on {image_path or "the bundled sample image"}:')
    for probability, index in zip(*probabilities.topk(min(top, len(names)))):
        print(f'  {100 * float(probability):6.2f}%  {names[index]}')


def digits_demo(model_name: str) -> None:
    from dat.digits import digit_tensors, predict, top1_top5
    model = timm.create_model(model_name, pretrained=True)
    images, labels = digit_tensors('held_out', model)
    logits = predict(model, images)
    top1, top5 = top1_top5(logits, labels)
    predicted = logits.argmax(-1)
    wrong = [(int(t), int(p)) for t, p in zip(labels, predicted) if t != p]
    print(f'\n{model_name}: {len(labels)} held-out handwritten digits (scikit-learn, never seen in training), '
          f'{tuple(images.shape[-2:])} inputs')
    print(f'  top-1 {top1:.2f}%  top-5 {top5:.2f}%  ({len(labels) - len(wrong)} of {len(labels)} right)')
    if wrong:
        print('  mistakes (true -> predicted): ' + ', '.join(f'{t}->{p}' for t, p in wrong))


def visualize_main(argv: List[str]) -> None:
    from dat.visualize import visualize
    parser = argparse.ArgumentParser(prog='python -m dat visualize',
                                     description='draw the deformed sampling points of each deformable block')
    parser.add_argument('image', help='image file')
    parser.add_argument('--model', default=DEMO_MODEL, help=f'pretrained model (default: {DEMO_MODEL})')
    parser.add_argument('--out', default='points.png', help='output PNG (the size of the image)')
    parser.add_argument('--blocks', type=int, nargs='+', help='draw only these deformable blocks (0 = first)')
    args = parser.parse_args(argv)
    model = timm.create_model(args.model, pretrained=True)
    records = visualize(args.image, model, args.out, args.blocks)
    print(f'{args.out}: sampling points of {args.model} over {args.image}; hollow dot = reference point, '
          'line to filled dot = where it moved to')
    for number, record in enumerate(records):
        shift = (record['position'] - record['reference']).norm(dim=-1).mean()
        drawn = '' if args.blocks is None or number in args.blocks else ' (not drawn)'
        print(f'  block {number}: {record["name"]}, {record["map_size"][0]}x{record["map_size"][1]} map, '
              f'{record["position"].shape[0]} group(s) x {record["position"].shape[1]} keys, '
              f'mean shift {float(shift):.1f} px{drawn}')


def main(argv: Optional[List[str]] = None) -> None:
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(argv)
    except dat.PretrainedWeightsError as error:  # no weights reachable: the message says what to do
        raise SystemExit(f'error: {error}') from None


def run(argv: List[str]) -> None:
    if argv[:1] == ['visualize']:
        return visualize_main(argv[1:])
    if argv[:1] == ['info']:
        from dat.info import main as info_main
        return info_main(argv[1:])
    parser = argparse.ArgumentParser(prog='python -m dat', description=__doc__.split('\n')[0],
                                     epilog='python -m dat visualize -h: the sampling-point drawing; '
                                            'python -m dat info: the installation and its kernels')
    parser.add_argument('--model', default=DEMO_MODEL, help=f'pretrained model and tag (default: {DEMO_MODEL})')
    parser.add_argument('--image', help='classify this image (default: the held-out digits for a digits model, '
                                        'else the bundled sample image)')
    args = parser.parse_args(argv)
    if args.image is None and args.model == DEMO_MODEL:
        print_zoo()
        digits_demo(args.model)
    else:
        classify_image(args.model, args.image)


if __name__ == '__main__':
    main()
