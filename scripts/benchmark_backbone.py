"""Time and peak memory of a DAT detection backbone's forward + backward pass.

    OMP_NUM_THREADS=2 python scripts/benchmark_backbone.py --device cpu --batch 2 --warmup 0 --repeats 1
    python scripts/benchmark_backbone.py --device cuda --batch 2

Every combination of attention kernels (`DAT_ATTN_IMPL=reference|fused`) and gradient checkpointing (off|on)
runs in its own subprocess, so each peak is that configuration's alone: on CUDA the peak of
`torch.cuda.max_memory_allocated` over the timed passes, on the CPU the process's peak resident memory
(`ru_maxrss`) minus what it held before the first pass (the model and the input). Times are the median over
`--repeats` passes after `--warmup` passes. A kernel set that is not built for the device is reported as
unavailable. Ratios are against reference kernels without checkpointing, measured in the same run.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = [(impl, checkpointing) for impl in ('reference', 'fused') for checkpointing in (False, True)]


def measure(args) -> dict:
    """One configuration, in this process: the environment already names the attention kernels."""
    import torch
    import dat  # noqa: F401 - registers the models
    from dat.backbone import DatBackbone

    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = DatBackbone(args.model, grad_checkpointing=args.checkpointing).to(device).train()
    images = torch.randn(args.batch, 3, *args.size, device=device)

    def step():
        backbone.zero_grad(set_to_none=True)
        features = backbone(images)
        sum(feature.float().mean() for feature in features).backward()

    def synchronize():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    # ru_maxrss is the process's high-water mark: read before the warm-up, which already reaches the peak
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        for _ in range(args.warmup):
            step()
        synchronize()
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
            baseline_cuda = torch.cuda.memory_allocated()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            synchronize()
            times.append(time.perf_counter() - start)
    except RuntimeError as error:
        if 'requested but not available' in str(error):  # dat.ops refuses 'fused' where it is not built
            return dict(status='unavailable', reason=str(error).splitlines()[0])
        raise
    result = dict(status='ok', seconds=statistics.median(times))
    if device.type == 'cuda':
        result['peak_mib'] = (torch.cuda.max_memory_allocated() - baseline_cuda) / 2 ** 20
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result['peak_mib'] = (peak_kib - baseline_kib) / 1024
        result['process_peak_mib'] = peak_kib / 1024
    return result


def run_child(args, impl: str, checkpointing: bool) -> dict:
    command = [sys.executable, __file__, '--child', '--model', args.model, '--device', args.device,
               '--batch', str(args.batch), '--size', *map(str, args.size), '--warmup', str(args.warmup),
               '--repeats', str(args.repeats)] + (['--checkpointing'] if checkpointing else [])
    env = dict(os.environ, DAT_ATTN_IMPL=impl)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return dict(status='failed', reason=(done.stderr.strip().splitlines() or ['?'])[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='dat_tiny')
    parser.add_argument('--device', default='cuda' if _cuda_available() else 'cpu')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--size', type=int, nargs=2, default=(800, 1333), metavar=('H', 'W'))
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--checkpointing', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    print(f'{args.model} backbone, {args.batch}x3x{args.size[0]}x{args.size[1]}, forward + backward on {args.device} '
          f'(threads: OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS", "unset")}), '
          f'median of {args.repeats} after {args.warmup} warm-up')
    print(f'{"attention":<11}{"checkpointing":<15}{"time (s)":>10}{"vs base":>9}{"peak (MiB)":>12}{"vs base":>9}')
    base = None
    for impl, checkpointing in CONFIGS:
        result = run_child(args, impl, checkpointing)
        label = f'{impl:<11}{"on" if checkpointing else "off":<15}'
        if result['status'] != 'ok':
            print(f'{label}{result["status"]}: {result["reason"]}')
            continue
        base = base or result
        print(f'{label}{result["seconds"]:>10.2f}{result["seconds"] / base["seconds"]:>8.2f}x'
              f'{result["peak_mib"]:>12.0f}{result["peak_mib"] / base["peak_mib"]:>8.2f}x'
              + (f'   (process peak {result["process_peak_mib"]:.0f} MiB)' if 'process_peak_mib' in result else ''))


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == '__main__':
    main()
