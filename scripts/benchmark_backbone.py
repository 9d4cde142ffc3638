"""Time and peak memory of a DAT detection backbone's forward + backward pass.

    OMP_NUM_THREADS=2 python scripts/benchmark_backbone.py --device cpu --batch 2 --warmup 0 --repeats 1
    python scripts/benchmark_backbone.py --device cuda --batch 2

The one place for backbone (feature pyramid, detection-size) benchmarks; scripts/benchmark.py times classifiers.
Every combination of attention kernels (`DAT_ATTN_IMPL=reference|fused`) and gradient checkpointing (off|on)
runs in its own subprocess, so each peak is that configuration's alone: on CUDA the peak of
`torch.cuda.max_memory_allocated` over the passes, on the CPU the process's peak resident memory over the
passes minus what it held before the first pass (the model and the input). Times are the median over
`--repeats` passes after `--warmup` passes. A kernel set that is not built for the device is reported with
the error that says so. Ratios are against reference kernels without checkpointing, measured in the same run.
"""
import argparse
import os
import sys

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [SCRIPTS, os.path.dirname(SCRIPTS)]  # benchmark_harness, and dat from this checkout
from benchmark_harness import Column, PeakMemory, Table, median_seconds, run_isolated, serve_worker  # noqa: E402

CONFIGS = [(impl, checkpointing) for impl in ('reference', 'fused') for checkpointing in (False, True)]


def measure(model, device, batch, size, warmup, repeats, checkpointing) -> dict:
    """One configuration, in the worker: the environment already names the attention kernels."""
    import torch
    import dat  # noqa: F401 - registers the models
    from dat.backbone import DatBackbone

    torch.manual_seed(0)
    backbone = DatBackbone(model, grad_checkpointing=checkpointing).to(device).train()
    images = torch.randn(batch, 3, *size, device=device)

    def step():
        backbone.zero_grad(set_to_none=True)
        features = backbone(images)
        sum(feature.float().mean() for feature in features).backward()

    # the warm-up passes are inside the measured region: on the CPU the first pass already reaches the peak
    with PeakMemory(device) as memory:
        seconds = median_seconds(step, device, repeats=repeats, warmup=warmup)
    result = dict(seconds=seconds, peak_mib=memory.growth / 2 ** 20)
    if not memory.on_cuda:
        result['process_peak_mib'] = memory.peak / 2 ** 20
    return result


def main() -> None:
    if serve_worker(measure):
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='dat_tiny')
    parser.add_argument('--device', default='cuda' if _cuda_available() else 'cpu')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--size', type=int, nargs=2, default=(800, 1333), metavar=('H', 'W'))
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()

    print(f'{args.model} backbone, {args.batch}x3x{args.size[0]}x{args.size[1]}, forward + backward on {args.device} '
          f'(threads: OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS", "unset")}), '
          f'median of {args.repeats} after {args.warmup} warm-up')
    table = Table([Column('attention', width=9), Column('checkpointing', width=13), Column('time (s)', '.2f'),
                   Column('time vs base', 'x'), Column('peak (MiB)', '.0f'), Column('peak vs base', 'x'),
                   *([Column('process peak (MiB)', '.0f')] if args.device == 'cpu' else [])])
    base = None
    for impl, checkpointing in CONFIGS:
        result = run_isolated(__file__, dict(
            model=args.model, device=args.device, batch=args.batch, size=args.size, warmup=args.warmup,
            repeats=args.repeats, checkpointing=checkpointing), env=dict(DAT_ATTN_IMPL=impl))
        row = {'attention': impl, 'checkpointing': 'on' if checkpointing else 'off'}
        if 'error' in result:
            table.row(row, note=f'failed: {result["error"]}')
            continue
        base = base or result
        table.row(dict(row, **{'time (s)': result['seconds'], 'time vs base': result['seconds'] / base['seconds'],
                               'peak (MiB)': result['peak_mib'], 'peak vs base': result['peak_mib'] / base['peak_mib'],
                               'process peak (MiB)': result.get('process_peak_mib')}))


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == '__main__':
    main()
