"""Whole-model throughput and peak memory, fused attention ops vs the pure-PyTorch reference, in one run.

Each measurement runs in a fresh subprocess so that peak memory is its own: on the CPU the growth of the
process's peak RSS over its size before the timed passes, on CUDA `torch.cuda.max_memory_allocated`.

    python scripts/benchmark.py                                  # DAT and DAT++ classifiers at 224, batch 8
    python scripts/benchmark.py --backbone --size 800 1333 --batch 1 --models dat_tiny dat_pp_tiny
    python scripts/benchmark.py --train                          # forward + backward
    python scripts/benchmark.py --device cuda --amp              # on a GPU, bf16 autocast

Prints a table with images/s and peak memory per implementation and their ratios (fused / reference).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

DEFAULT_MODELS = ['dat_tiny', 'dat_small', 'dat_base', 'dat_pp_tiny', 'dat_pp_small', 'dat_pp_base']


def measure(model_name, impl, size, batch, train, backbone, device, amp, repeats):
    import timm
    import torch
    import dat  # noqa: F401
    from dat.ops import native_op_available

    if impl == 'fused' and not native_op_available('deform_attn', device):
        return {'error': 'fused op not built for ' + device}
    torch.manual_seed(0)
    model = timm.create_model(model_name, features_only=backbone, attn_impl=impl).to(device)
    model.train(train)
    images = torch.randn(batch, 3, *size, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=amp)

    def step():
        with autocast, torch.set_grad_enabled(train):
            out = model(images)
            loss = sum(o.float().mean() for o in out) if backbone else out.float().mean()
        if train:
            loss.backward()
            model.zero_grad(set_to_none=True)

    # the peak is measured from before the warm-up pass: on the CPU, peak RSS never goes back down
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up (kernels, caches, allocator)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device == 'cuda':
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    elapsed = (time.perf_counter() - start) / repeats
    return {'images_per_s': batch / elapsed, 'peak_mb': max(peak, 0) / 2 ** 20, 'seconds': elapsed}


def run_case(args, model_name, impl):
    """One measurement in a fresh interpreter; returns its result dict."""
    cmd = [sys.executable, __file__, '--child', json.dumps(dict(
        model_name=model_name, impl=impl, size=args.size, batch=args.batch, train=args.train,
        backbone=args.backbone, device=args.device, amp=args.amp, repeats=args.repeats))]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, DAT_ATTN_IMPL=impl))
    if done.returncode != 0:
        return {'error': done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f'exit {done.returncode}'}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=DEFAULT_MODELS)
    parser.add_argument('--size', nargs=2, type=int, default=[224, 224])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--train', action='store_true', help='forward + backward instead of inference')
    parser.add_argument('--backbone', action='store_true', help='features_only backbone instead of classifier')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return

    mode = 'fwd+bwd' if args.train else 'fwd'
    print(f'{"model":<14}{"mode":<9}{"input":<14}{"impl":<11}{"img/s":>9}{"peak MB":>10}'
          f'{"speed x":>9}{"memory /":>10}')
    for model_name in args.models:
        results = {impl: run_case(args, model_name, impl) for impl in ('reference', 'fused')}
        reference = results['reference']
        for impl, result in results.items():
            shape = f'{args.batch}x{args.size[0]}x{args.size[1]}'
            if 'error' in result:
                print(f'{model_name:<14}{mode:<9}{shape:<14}{impl:<11}  unavailable: {result["error"]}')
                continue
            ratio = ''
            if impl == 'fused' and 'error' not in reference:
                ratio = (f'{result["images_per_s"] / reference["images_per_s"]:>9.2f}'
                         f'{reference["peak_mb"] / max(result["peak_mb"], 1e-9):>10.2f}')
            print(f'{model_name:<14}{mode:<9}{shape:<14}{impl:<11}{result["images_per_s"]:>9.2f}'
                  f'{result["peak_mb"]:>10.0f}{ratio}', flush=True)


if __name__ == '__main__':
    main()
