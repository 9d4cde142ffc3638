"""Export a registered DAT / DAT++ model to ONNX and check it against onnxruntime.

    python scripts/export_onnx.py dat_tiny --out dat_tiny.onnx --check
    python scripts/export_onnx.py dat_pp_tiny.in1k --pretrained --out dat_pp_tiny.onnx --size 256 320 --check
    python scripts/export_onnx.py dat_tiny --features-only --out dat_tiny_features.onnx --check

This is `torch.onnx.export(model, (images,), dynamo=True)` with a dynamic batch dimension: the native ops
decompose into their reference math during the export (dat/ops/onnx.py), so the fused kernels need not be
switched off. The graph takes `images` (batch, 3, H, W) at the exported H x W only: the architecture
specialises on the size of every stage's map (window padding, the shift mask, key strides, the grids of the
deformable blocks), so a graph exported at one size is wrong at most others and torch.export records those
sizes as guards, which ONNX cannot carry. Export once per input size.

Outputs: `logits` (batch, classes), or with --features-only the four stage maps `features_0` ... `features_3`
(strides 4 to 32). --check runs the file in onnxruntime on a batch of another size than the export's and
fails when an output differs from PyTorch's by more than --atol.
"""
import argparse
import sys
import time
from pathlib import Path
from typing import List, Tuple

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dat  # noqa: E402,F401 - registers the models and the ops' ONNX decompositions

EXPORT_BATCH = 2  # batch 0 or 1 would let torch.export specialise the batch dimension
CHECK_BATCH = 3  # differs from EXPORT_BATCH, so that --check exercises the dynamic batch


def model_outputs(model: torch.nn.Module, images: torch.Tensor) -> List[torch.Tensor]:
    """The model's outputs as a list (a classifier has one, a features_only model one per stage)."""
    with torch.no_grad():
        outputs = model(images)
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def output_names(model: torch.nn.Module, size: Tuple[int, int]) -> List[str]:
    """Names of the graph's outputs: 'logits', or 'features_<i>' for each stage map of a features_only model."""
    count = len(model_outputs(model, torch.zeros(1, 3, *size)))
    return [f'features_{i}' for i in range(count)] if count > 1 else ['logits']


def export_onnx(model: torch.nn.Module, size: Tuple[int, int], out: Path) -> float:
    """Write `model` (in eval mode) to `out` for (batch, 3, *size) images; returns the seconds it took."""
    started = time.perf_counter()
    images = torch.randn(EXPORT_BATCH, 3, *size)
    program = torch.onnx.export(model, (images,), dynamo=True, input_names=['images'],
                                output_names=output_names(model, size),
                                dynamic_shapes=({0: torch.export.Dim('batch')},), verbose=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out))
    return time.perf_counter() - started


def onnx_max_difference(model: torch.nn.Module, path: Path, size: Tuple[int, int], batch: int = CHECK_BATCH,
                        seed: int = 0) -> float:
    """Largest |onnxruntime - PyTorch| over all outputs of `path` for a random batch of `batch` images."""
    import onnxruntime  # only --check needs it

    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    expected = model_outputs(model, images)
    if len(got) != len(expected):
        raise AssertionError(f'{path} has {len(got)} outputs but the model returns {len(expected)}')
    return max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('model', help='registered model, optionally with its tag (dat_tiny, dat_pp_tiny.in1k, ...)')
    parser.add_argument('--out', type=Path, required=True, help='the .onnx file to write')
    parser.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'), help="image size (default: the model's)")
    parser.add_argument('--pretrained', action='store_true', help='load the pretrained weights of the model tag')
    parser.add_argument('--features-only', action='store_true', help='export the four stage maps, not the logits')
    parser.add_argument('--check', action='store_true', help='compare onnxruntime with PyTorch after exporting')
    parser.add_argument('--atol', type=float, default=1e-4, help='largest difference --check accepts')
    args = parser.parse_args(argv)
    if args.model.split('.')[0] not in timm.list_models('dat*'):
        parser.error(f'unknown model {args.model!r}; registered: {", ".join(timm.list_models("dat*"))}')

    model = timm.create_model(args.model, pretrained=args.pretrained, features_only=args.features_only).eval()
    size = tuple(args.size or model.pretrained_cfg['input_size'][-2:])
    seconds = export_onnx(model, size, args.out)
    result = dict(out=args.out, size=size, export_seconds=seconds)
    print(f'exported {args.model} at {size[0]}x{size[1]} (dynamic batch) to {args.out} in {seconds:.1f} s')
    if args.check:
        result['max_difference'] = difference = onnx_max_difference(model, args.out, size)
        print(f'onnxruntime vs PyTorch on a batch of {CHECK_BATCH}: max |difference| {difference:.2e} '
              f'(tolerance {args.atol:g})')
        if not difference <= args.atol:
            raise SystemExit(f'{args.out} differs from PyTorch by {difference:.2e} > --atol {args.atol:g}')
    return result


if __name__ == '__main__':
    main()
