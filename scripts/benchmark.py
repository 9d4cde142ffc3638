"""Whole-model throughput and peak memory, fused attention ops vs the pure-PyTorch reference, in one run.

Each measurement runs in a fresh subprocess so that peak memory is its own: on the CPU the growth of the
process's resident set over its size before the passes, on CUDA that of `torch.cuda.max_memory_allocated`.
Throughput is from the median pass of --repeats, after one warm-up pass.

    python scripts/benchmark.py                                  # DAT and DAT++ classifiers at 224, batch 8
    python scripts/benchmark.py --train                          # forward + backward
    python scripts/benchmark.py --device cuda --precisions bf16  # on a GPU, bf16 autocast only

Detection backbones (the feature pyramid at 800x1333, gradient checkpointing): scripts/benchmark_backbone.py.
Prints a table with images/s and peak memory per implementation and precision (fp32; bf16 or fp16: under
torch.autocast, by default bf16), the autocast speed against fp32 of the same implementation ('vs fp32'), and
the fused implementation's speed and memory against the reference's at the same precision.
"""
import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_harness import PeakMemory, median_seconds, run_isolated, serve_worker  # noqa: E402

DEFAULT_MODELS = ['dat_tiny', 'dat_small', 'dat_base', 'dat_pp_tiny', 'dat_pp_small', 'dat_pp_base']
# what each precision runs under: nothing (fp32 weights and inputs), or autocast to a half-precision dtype
AUTOCAST_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def measure(model_name, impl, size, batch, train, device, precision, repeats):
    """Runs in the worker: images/s and peak memory growth of one model with one attention implementation at
    one precision (a key of AUTOCAST_DTYPES)."""
    import timm
    import dat  # noqa: F401
    from dat.ops import native_op_available

    if impl == 'fused' and not native_op_available('deform_attn', device):
        return {'error': 'fused op not built for ' + device}
    torch.manual_seed(0)
    model = timm.create_model(model_name, attn_impl=impl).to(device)
    model.train(train)
    images = torch.randn(batch, 3, *size, device=device)
    autocast_dtype = AUTOCAST_DTYPES[precision]
    autocast = torch.autocast(device, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()

    def step():
        with autocast, torch.set_grad_enabled(train):
            loss = model(images).float().mean()
        if train:
            loss.backward()
            model.zero_grad(set_to_none=True)

    # the warm-up pass is inside the measured region: on the CPU it already reaches the peak
    with PeakMemory(device) as memory:
        seconds = median_seconds(step, device, repeats=repeats, warmup=1)
    return {'images_per_s': batch / seconds, 'peak_mb': memory.growth / 2 ** 20, 'seconds': seconds}


def main():
    if serve_worker(measure):
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=DEFAULT_MODELS)
    parser.add_argument('--size', nargs=2, type=int, default=[224, 224])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--train', action='store_true', help='forward + backward instead of inference')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--precisions', nargs='+', default=['fp32', 'bf16'], choices=list(AUTOCAST_DTYPES),
                        help='fp32, and autocast to bf16 or fp16 (default: fp32 bf16)')
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()

    mode = 'fwd+bwd' if args.train else 'fwd'
    shape = f'{args.batch}x{args.size[0]}x{args.size[1]}'
    print(f'{"model":<14}{"mode":<9}{"input":<14}{"impl":<11}{"precision":<11}{"img/s":>9}{"peak MB":>10}'
          f'{"vs fp32":>9}{"speed x":>9}{"memory /":>10}')
    for model_name in args.models:
        results = {(impl, precision): run_isolated(__file__, dict(
            model_name=model_name, impl=impl, size=args.size, batch=args.batch, train=args.train,
            device=args.device, precision=precision, repeats=args.repeats), env=dict(DAT_ATTN_IMPL=impl))
            for impl in ('reference', 'fused') for precision in args.precisions}
        for (impl, precision), result in results.items():
            label = f'{model_name:<14}{mode:<9}{shape:<14}{impl:<11}{precision:<11}'
            if 'error' in result:
                print(f'{label}  unavailable: {result["error"]}')
                continue
            fp32 = results.get((impl, 'fp32'), {})
            versus_fp32 = (f'{result["images_per_s"] / fp32["images_per_s"]:>9.2f}'
                           if precision != 'fp32' and 'images_per_s' in fp32 else f'{"":>9}')
            reference = results[('reference', precision)]
            ratio = ''
            if impl == 'fused' and 'error' not in reference:
                ratio = (f'{result["images_per_s"] / reference["images_per_s"]:>9.2f}'
                         f'{reference["peak_mb"] / max(result["peak_mb"], 1e-9):>10.2f}')
            print(f'{label}{result["images_per_s"]:>9.2f}{result["peak_mb"]:>10.0f}{versus_fp32}{ratio}', flush=True)

if __name__ == '__main__':
    main()
