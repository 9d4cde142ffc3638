"""Fused `dat::ms_deform_attn`, and `impl='auto'` (what models run), vs the pure-PyTorch reference, at Deformable
DETR's usual sizes.

Four levels from an 800x1333 image (strides 8/16/32/64), d_model 256 in 8 heads (32 channels),
4 points per level, batch 1; 300 and 900 queries (the decoder) and one query per pixel (the encoder).
Times forward and forward+backward (the median of --repeats calls after --warmup calls) and the peak
memory of one call after a first one: `torch.cuda.max_memory_allocated` on a GPU; on the CPU the growth
of the process's resident memory, measured in a fresh subprocess per row (Linux only).

    OMP_NUM_THREADS=2 python scripts/benchmark_msda.py
    python scripts/benchmark_msda.py --device cuda --dtypes float32 float16
"""
import argparse
import os
import sys

import torch

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [SCRIPTS, os.path.dirname(SCRIPTS)]  # benchmark_harness, and dat from this checkout
from benchmark_harness import Column, PeakMemory, Table, median_seconds, run_isolated, serve_worker  # noqa: E402
from dat.layers import level_pixel_centres  # noqa: E402
from dat.ops.ms_deform_attn import multi_scale_deformable_attention  # noqa: E402

LEVEL_SHAPES = [(100, 167), (50, 84), (25, 42), (13, 21)]
HEADS, CHANNELS, POINTS = 8, 32, 4
SPREAD_PIXELS = 4.0  # standard deviation of the sampling offsets, in pixels of each level
VALUE_LEN = sum(h * w for h, w in LEVEL_SHAPES)
CASES = {'decoder-300': 300, 'decoder-900': 900, 'encoder': VALUE_LEN}
# auto: what a model runs (impl='auto'); reference, the baseline of every ratio, comes last
IMPLS = ('fused', 'auto', 'reference')
MODES = ('forward', 'forward+backward')


def make_inputs(case, dtype, device, seed=0):
    queries = CASES[case]
    generator = torch.Generator().manual_seed(seed)
    # The level geometry stays on the host: neither implementation then waits on the GPU to read it.
    spatial_shapes = torch.tensor(LEVEL_SHAPES, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    levels = len(LEVEL_SHAPES)
    value = torch.randn(1, VALUE_LEN, HEADS, CHANNELS, generator=generator)
    # Like a trained model's: each query samples a few pixels (of every level) around a reference point.
    if case == 'encoder':  # one query per pixel, at its own centre
        reference = level_pixel_centres(spatial_shapes)
    else:
        reference = torch.rand(queries, 2, generator=generator)
    pixel_size = 1 / spatial_shapes.flip(-1).float().view(1, 1, levels, 1, 2)
    offsets = torch.randn(queries, HEADS, levels, POINTS, 2, generator=generator) * SPREAD_PIXELS * pixel_size
    locations = (reference.view(queries, 1, 1, 1, 2) + offsets).unsqueeze(0)
    weights = torch.rand(1, queries, HEADS, levels * POINTS, generator=generator).softmax(-1)
    weights = weights.view(1, queries, HEADS, levels, POINTS)
    value, locations, weights = (t.to(device=device, dtype=dtype) for t in (value, locations, weights))
    return value, spatial_shapes, level_start_index, locations, weights


def make_step(case, impl, mode, dtype, device):
    """A closure running one call of `mode`, with its inputs already built."""
    value, shapes, starts, locations, weights = make_inputs(case, dtype, device)
    if mode == 'forward':
        def step():
            with torch.no_grad():
                return multi_scale_deformable_attention(value, shapes, starts, locations, weights, impl=impl)
        return step
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    grad_output = torch.randn(1, CASES[case], HEADS * CHANNELS, dtype=dtype, device=device)

    def step():
        output = multi_scale_deformable_attention(inputs[0], shapes, starts, inputs[1], inputs[2], impl=impl)
        output.backward(grad_output)
        for t in inputs:  # gradients die with the call, so no call starts with the last one's alive
            t.grad = None
    return step


def measure_peak_bytes(case, impl, mode, dtype, device):
    """Peak memory one call adds, after a first call has set up the autograd and allocator state."""
    step = make_step(case, impl, mode, getattr(torch, dtype), device)
    step()
    with PeakMemory(device) as memory:
        step()
    return {'peak_bytes': memory.growth}


def peak_bytes(case, impl, mode, dtype, device):
    """`measure_peak_bytes`, on the CPU in a fresh process, whose resident set holds nothing of the other rows."""
    if device == 'cuda':
        return measure_peak_bytes(case, impl, mode, dtype, device)['peak_bytes']
    # A fixed mmap threshold makes glibc map every tensor-sized block on its own and unmap it when it
    # is freed, so freed memory does not stay resident and hide the next call's allocations.
    result = run_isolated(__file__, dict(case=case, impl=impl, mode=mode, dtype=dtype, device=device),
                          env=dict(MALLOC_MMAP_THRESHOLD_='65536'))
    if 'error' in result:
        raise RuntimeError(f'peak memory of {case} {impl} {mode}: {result["error"]}')
    return result['peak_bytes']


def memory_ratio(reference_mib, fused_mib):
    # Resident-size growth below a MiB is within the kernel's lazy RSS accounting: no ratio.
    if min(reference_mib, fused_mib) < 1:
        return None
    return reference_mib / fused_mib


def main():
    if serve_worker(measure_peak_bytes):
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--dtypes', nargs='+', default=None, help='default: float32 (cpu), float32 float16 (cuda)')
    parser.add_argument('--cases', nargs='+', default=list(CASES), choices=list(CASES))
    parser.add_argument('--repeats', type=int, default=None, help='timed calls per row (default 5 cpu, 50 cuda)')
    parser.add_argument('--warmup', type=int, default=None, help='untimed calls first (default 1 cpu, 10 cuda)')
    args = parser.parse_args()

    on_gpu = args.device == 'cuda'
    dtypes = args.dtypes or (['float32', 'float16'] if on_gpu else ['float32'])
    repeats = args.repeats or (50 if on_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    device_name = torch.cuda.get_device_name() if on_gpu else f'CPU, {torch.get_num_threads()} threads'
    print(f'# multi-scale deformable attention, {device_name}, torch {torch.__version__}')
    print(f'# levels {LEVEL_SHAPES} (S={VALUE_LEN}), heads {HEADS}, channels {CHANNELS}, points {POINTS}, batch 1; '
          f'median of {repeats} after {warmup} warm-up; x = times faster than reference')
    table = Table([Column('case', width=11), Column('queries', 'd', width=7), Column('dtype'), Column('mode', width=16),
                   *(Column(f'{impl} ms', '.2f') for impl in IMPLS),
                   *(Column(f'{impl} x', 'x', ratio=('reference ms', f'{impl} ms')) for impl in IMPLS[:-1]),
                   *(Column(f'{impl} MiB', '.1f', width=9) for impl in IMPLS), Column('mem ratio', 'x', width=9)])
    for dtype in dtypes:
        for case in args.cases:
            for mode in MODES:
                row = dict(case=case, queries=CASES[case], dtype=dtype, mode=mode)
                for impl in IMPLS:
                    step = make_step(case, impl, mode, getattr(torch, dtype), args.device)
                    row[f'{impl} ms'] = median_seconds(step, args.device, repeats=repeats, warmup=warmup) * 1e3
                    del step
                    row[f'{impl} MiB'] = peak_bytes(case, impl, mode, dtype, args.device) / 2**20
                row['mem ratio'] = memory_ratio(row['reference MiB'], row['fused MiB'])
                table.row(row)


if __name__ == '__main__':
    main()
