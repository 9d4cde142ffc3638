"""Benchmark the fused `dat::deform_attn` op, and `impl='auto'` (what models run), against the official (unchunked)
deformable-attention math.

All three run in the same invocation, on the same inputs, forward and forward+backward, at DAT / DAT++ shapes.
Every measurement runs in a fresh subprocess, so that peak memory is that of the measured calls alone:
on CPU the peak resident set size over the resident size once the inputs exist; on CUDA
torch.cuda.max_memory_allocated over the allocated bytes once the inputs exist. Time is the median call
after one warm-up call, over at least --min-seconds of calls (at most --max-repeats).

    OMP_NUM_THREADS=2 python scripts/benchmark_op.py                 # CPU, float32
    python scripts/benchmark_op.py --device cuda --dtypes float32 float16
    python scripts/benchmark_op.py --cases detection --modes forward  # a subset
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_harness import (Column, PeakMemory, Table, median_seconds, run_isolated,  # noqa: E402
                               serve_worker)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (batch, heads, groups, query grid, key grid, head_dim, table)
CASES = {
    'dat-t-stage3': (8, 12, 3, (14, 14), (14, 14), 32, (27, 27)),
    'datpp-b-stage1': (8, 4, 2, (56, 56), (7, 7), 32, (111, 111)),
    'detection': (1, 4, 2, (200, 336), (25, 42), 32, (111, 111)),
}
# auto: what a model runs (impl='auto'); reference, the baseline of every ratio, comes last
IMPLS = ('fused', 'auto', 'reference')
MODES = ('forward', 'forward+backward')


def make_inputs(case, dtype, device, requires_grad):
    import torch
    batch, heads, groups, query_grid, key_grid, head_dim, table = CASES[case]
    queries, keys = query_grid[0] * query_grid[1], key_grid[0] * key_grid[1]
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape, low=None):
        values = torch.rand(*shape, generator=generator) * 2 - 1 if low is not None else torch.randn(
            *shape, generator=generator)
        return values.to(device=device, dtype=dtype)

    inputs = dict(q=tensor(batch, heads, queries, head_dim), k=tensor(batch, heads, keys, head_dim),
                  v=tensor(batch, heads, keys, head_dim), kpos=tensor(batch, groups, keys, 2, low=-1),
                  qpos=tensor(queries, 2, low=-1), rpe=tensor(heads, *table) * 0.1)
    for name in ('q', 'k', 'v', 'kpos', 'rpe'):
        inputs[name].requires_grad_(requires_grad)
    grad_out = tensor(batch, heads, queries, head_dim) if requires_grad else None
    return inputs, grad_out


def fused_io_bytes(case, dtype_bytes, backward):
    """Bytes the fused op must move at least: every input read once, every output written once."""
    batch, heads, groups, query_grid, key_grid, head_dim, table = CASES[case]
    queries, keys = query_grid[0] * query_grid[1], key_grid[0] * key_grid[1]
    query_side = batch * heads * queries * head_dim * dtype_bytes  # one of q, out, grad_out, grad_q
    key_side = batch * heads * keys * head_dim * dtype_bytes  # one of k, v, grad_k, grad_v
    positions = (batch * groups * keys + queries) * 2 * dtype_bytes
    table_bytes = heads * table[0] * table[1] * dtype_bytes
    logsumexp = batch * heads * queries * 4
    forward = 2 * query_side + 2 * key_side + positions + table_bytes + logsumexp
    if not backward:
        return forward
    # backward reads grad_out, q, k, v, out, logsumexp, positions, table; writes grad_q, grad_k, grad_v,
    # grad_kpos and grad_rpe.
    return forward + (3 * query_side + 4 * key_side + positions + batch * groups * keys * 2 * dtype_bytes
                      + 2 * table_bytes + logsumexp)


def measure(case, impl, mode, dtype_name, device, min_seconds, max_repeats):
    """Runs in the worker subprocess: median seconds per call and peak bytes over the inputs."""
    import torch
    sys.path.insert(0, ROOT)
    from dat.ops.deform_attn import deformable_attention, deformable_attention_reference

    dtype = getattr(torch, dtype_name)
    backward = mode == 'forward+backward'
    inputs, grad_out = make_inputs(case, dtype, device, backward)
    scale = inputs['q'].shape[-1] ** -0.5

    def call():
        if impl in ('fused', 'auto'):
            out = deformable_attention(**inputs, scale=scale, impl=impl)
        else:  # the official math, in one piece, as the original implementation evaluates it
            out = deformable_attention_reference(**inputs, scale=scale, block_elements=None)
        if backward:
            grads = torch.autograd.grad(out, [inputs[n] for n in ('q', 'k', 'v', 'kpos', 'rpe')], grad_out)
            del grads
        del out

    with torch.set_grad_enabled(backward), PeakMemory(device) as memory:
        # a call slower than the budget is timed once, after its warm-up call
        seconds = median_seconds(call, device, repeats=1, warmup=1, min_seconds=min_seconds,
                                 max_repeats=max_repeats)
    return dict(seconds=seconds, peak_bytes=memory.growth)


def main():
    if serve_worker(measure):
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--dtypes', nargs='+', default=None,
                        help='default: float32 on CPU, float32 and float16 on CUDA')
    parser.add_argument('--cases', nargs='+', default=list(CASES), choices=list(CASES))
    parser.add_argument('--modes', nargs='+', default=list(MODES), choices=list(MODES))
    parser.add_argument('--min-seconds', type=float, default=2.0, help='time budget per measurement')
    parser.add_argument('--max-repeats', type=int, default=20)
    args = parser.parse_args()

    import torch
    dtypes = args.dtypes or (['float32'] if args.device == 'cpu' else ['float32', 'float16'])
    threads = torch.get_num_threads() if args.device == 'cpu' else None
    device_name = f'CPU, {threads} threads' if threads else torch.cuda.get_device_name()
    print(f'dat::deform_attn vs official math on {device_name} (torch {torch.__version__}); '
          'time = median seconds per call, memory = peak growth over the inputs; x = times faster than ref')
    columns = [Column('case', width=14), Column('dtype'), Column('mode', width=16),
               *(Column(f'{impl} s', '.4f') for impl in IMPLS),
               *(Column(f'{impl} x', 'x', ratio=('reference s', f'{impl} s')) for impl in IMPLS[:-1]),
               *(Column(f'{impl} MiB', '.1f', width=9) for impl in IMPLS),
               Column('mem ratio', 'x', ratio=('reference MiB', 'fused MiB'))]
    if args.device == 'cuda':
        columns.append(Column('fused GB/s', '.1f'))
    table = Table(columns)
    for case in args.cases:
        for dtype_name in dtypes:
            for mode in args.modes:
                payload = dict(case=case, mode=mode, dtype_name=dtype_name, device=args.device,
                               min_seconds=args.min_seconds, max_repeats=args.max_repeats)
                row = dict(case=case, dtype=dtype_name, mode=mode)
                failures = []
                for impl in IMPLS:
                    result = run_isolated(__file__, dict(payload, impl=impl))
                    if 'error' in result:
                        failures.append(f'{impl} failed: {result["error"]}')
                        continue
                    row[f'{impl} s'] = result['seconds']
                    row[f'{impl} MiB'] = result['peak_bytes'] / 2 ** 20
                if args.device == 'cuda' and 'fused s' in row:
                    element = torch.empty((), dtype=getattr(torch, dtype_name)).element_size()
                    row['fused GB/s'] = fused_io_bytes(case, element, mode == 'forward+backward') / row['fused s'] / 1e9
                table.row(row, note='; '.join(failures))


if __name__ == '__main__':
    main()
