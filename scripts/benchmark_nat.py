"""Neighborhood attention: fused `dat::neighborhood_attn`, and `impl='auto'` (what models run), vs the pure-PyTorch
reference.

Times the forward (no autograd) and forward+backward at DAT++-T stage sizes (224 input) and at a
detection size, and reports peak memory: on CUDA from the caching allocator, on CPU as the growth of
the process's resident set, each (impl, size) measured in a fresh subprocess so that watermarks
do not carry over, and each implementation's largest difference from the reference's output. Times
are the median call over at least a second of calls (3 to 50). `--with-flex` adds FlexAttention
(block mask + rpb score_mod, torch.compile'd) as a further contender, the alternative
fast path considered for this op.

    OMP_NUM_THREADS=2 python scripts/benchmark_nat.py
    python scripts/benchmark_nat.py --device cuda --with-flex
"""
import argparse
import os
import sys

import torch

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [SCRIPTS, os.path.dirname(SCRIPTS)]  # benchmark_harness, and dat from this checkout
from benchmark_harness import Column, PeakMemory, Table, median_seconds, run_isolated, serve_worker  # noqa: E402
from dat.ops import neighborhood_attention  # noqa: E402

# name, batch, heads, height, width (head_dim 32, kernel 7 throughout, as in DAT++-T)
SIZES = [
    ('stage1 56x56', 8, 2, 56, 56),
    ('stage2 28x28', 8, 4, 28, 28),
    ('stage3 14x14', 8, 8, 14, 14),
    ('detection 100x168', 2, 2, 100, 168),
]
HEAD_DIM = 32
KERNEL_SIZE = 7
# the worker's result keys of each mode's time and peak memory
MODE_KEYS = {'forward': ('forward_ms', 'forward_mib'), 'forward+backward': ('train_ms', 'train_mib')}
# the memory passes before the timings are their warm-up
TIMING = dict(repeats=3, warmup=0, min_seconds=1.0, max_repeats=50)


def flex_neighborhood_attention(dilation, height, width, heads, device):
    """FlexAttention over the flattened map: the window rule as a block mask, rpb as a score_mod."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    k = KERNEL_SIZE

    def window_start(index, length):
        group = index % dilation
        group_length = (length - group + dilation - 1) // dilation
        return torch.clamp(torch.minimum(index // dilation - k // 2, group_length - k), min=0) * dilation + group

    def axis_in_window(query, key, length):
        offset = key - window_start(query, length)
        return (key % dilation == query % dilation) & (offset >= 0) & (offset < k * dilation)

    def mask_mod(b, h, q_idx, kv_idx):
        return (axis_in_window(q_idx // width, kv_idx // width, height)
                & axis_in_window(q_idx % width, kv_idx % width, width))

    tokens = height * width
    block_mask = create_block_mask(mask_mod, None, None, tokens, tokens, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def attend(q, k_, v, rpb, scale):
        def score_mod(score, b, h, q_idx, kv_idx):
            # evaluated on masked-out pairs too (then discarded), so keep the table index in range
            dy = ((kv_idx // width - q_idx // width) // dilation + k - 1).clamp(0, 2 * k - 2)
            dx = ((kv_idx % width - q_idx % width) // dilation + k - 1).clamp(0, 2 * k - 2)
            return score + rpb[h, dy, dx]

        B, M, H, W, D = q.shape
        out = compiled(*(t.reshape(B, M, H * W, D) for t in (q, k_, v)), score_mod=score_mod,
                       block_mask=block_mask, scale=scale)
        return out.reshape(B, M, H, W, D)

    return attend


def measure(impl, size_index, device, dilation):
    """Runs in a fresh process: peak memory first (fwd, then fwd+bwd), then the timings."""
    _, B, M, H, W = SIZES[size_index]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, M, H, W, HEAD_DIM, generator=generator).to(device) for _ in range(3))
    rpb = (0.02 * torch.randn(M, 2 * KERNEL_SIZE - 1, 2 * KERNEL_SIZE - 1, generator=generator)).to(device)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, rpb)]
    grad_out = torch.randn_like(q)
    scale = HEAD_DIM ** -0.5
    if impl == 'flex':
        attention = flex_neighborhood_attention(dilation, H, W, M, device)
    else:
        def attention(q, k, v, rpb, scale):
            return neighborhood_attention(q, k, v, rpb, KERNEL_SIZE, dilation, scale=scale, impl=impl)

    def forward():
        with torch.no_grad():
            return attention(q, k, v, rpb, scale)

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        attention(*leaves, scale).backward(grad_out)

    # torch 2.14's FlexAttention has no CPU backward ("does not support backward on CPU").
    trains = not (impl == 'flex' and device == 'cpu')
    if impl == 'flex':  # compile outside the measured region
        forward()
        if trains:
            forward_backward()
    result = {}
    with PeakMemory(device) as memory:
        forward()
    result['forward_mib'] = memory.growth / 2 ** 20
    if trains:
        with PeakMemory(device) as memory:
            forward_backward()
        result['train_mib'] = memory.growth / 2 ** 20
    result['forward_ms'] = 1e3 * median_seconds(forward, device, **TIMING)
    if trains:
        result['train_ms'] = 1e3 * median_seconds(forward_backward, device, **TIMING)
    if impl != 'reference':
        reference = neighborhood_attention(q, k, v, rpb, KERNEL_SIZE, dilation, scale=scale, impl='reference')
        result['max_abs_diff'] = (forward() - reference).abs().max().item()
    return result


def main():
    if serve_worker(measure):
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--dilation', type=int, default=1)
    parser.add_argument('--with-flex', action='store_true', help='also measure FlexAttention (torch.compile)')
    args = parser.parse_args()

    # reference, the baseline of every ratio, comes last
    impls = ['fused', 'auto'] + (['flex'] if args.with_flex else []) + ['reference']
    print(f'device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} '
          f'head_dim={HEAD_DIM} kernel={KERNEL_SIZE} dilation={args.dilation}; x = times faster than reference')
    table = Table([Column('size', width=17), Column('B x M', width=5), Column('mode', width=16),
                   *(Column(f'{impl} ms', '.1f') for impl in impls),
                   *(Column(f'{impl} x', 'x', ratio=('reference ms', f'{impl} ms')) for impl in impls[:-1]),
                   *(Column(f'{impl} MiB', '.0f', width=9) for impl in impls),
                   *(Column(f'{impl} max diff', '.1e', width=9) for impl in impls[:-1])])
    for index, (name, B, M, _, _) in enumerate(SIZES):
        results = {impl: run_isolated(__file__, dict(impl=impl, size_index=index, device=args.device,
                                                     dilation=args.dilation)) for impl in impls}
        failures = '; '.join(f'{impl} failed: {r["error"]}' for impl, r in results.items() if 'error' in r)
        for mode, (time_key, memory_key) in MODE_KEYS.items():
            row = {'size': name, 'B x M': f'{B} x {M}', 'mode': mode}
            for impl, result in results.items():
                row[f'{impl} max diff'] = result.get('max_abs_diff')
                row[f'{impl} ms'] = result.get(time_key)
                row[f'{impl} MiB'] = result.get(memory_key)
            table.row(row, note=failures)


if __name__ == '__main__':
    main()
