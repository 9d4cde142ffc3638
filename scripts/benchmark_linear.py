"""The linear layers of DAT-T at batch 8, 224x224: `F.linear` (MKL on the CPU) against `dat.layers.linear`
(oneDNN), and DAT-T's MLPs over the whole batch against row blocks (`dat.layers.blocking`).

Linear rows time the forward and the input gradient (the weight gradient is MKL's in both); MLP rows time the
inference forward. Each pair is timed round-robin in this process (`interleaved_median_seconds`), so their
ratio holds on a busy machine. fp32 on the CPU, where both choices apply.

    OMP_NUM_THREADS=2 python scripts/benchmark_linear.py
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [SCRIPTS, os.path.dirname(SCRIPTS)]  # benchmark_harness, and dat from this checkout
from benchmark_harness import Column, Table, interleaved_median_seconds  # noqa: E402
from dat.layers import blocking  # noqa: E402
from dat.layers.linear import linear  # noqa: E402
from dat.layers.mlp import Mlp  # noqa: E402

# DAT-T's stages at batch 8, 224x224: name, tokens, channels (the MLP's hidden layer is 4x, qkv 3x)
STAGES = [('stage1', 8 * 56 * 56, 96), ('stage2', 8 * 28 * 28, 192), ('stage3', 8 * 14 * 14, 384),
          ('stage4', 8 * 7 * 7, 768)]


def linear_rows(table: Table, repeats: int) -> None:
    for stage, tokens, dim in STAGES:
        for layer, (fan_in, fan_out) in (('qkv', (dim, 3 * dim)), ('fc1', (dim, 4 * dim)), ('fc2', (4 * dim, dim))):
            x = torch.randn(tokens, fan_in)
            weight, bias = torch.randn(fan_out, fan_in) * fan_in ** -0.5, torch.randn(fan_out)
            grad = torch.randn(tokens, fan_out)
            times = interleaved_median_seconds({
                'mkl forward': lambda: F.linear(x, weight, bias),
                'onednn forward': lambda: linear(x, weight, bias),
                'mkl input grad': lambda: grad.mm(weight),
                'onednn input grad': lambda: linear(grad, weight.t()),
            }, 'cpu', repeats)
            diff = (linear(x, weight, bias) - F.linear(x, weight, bias)).abs().max().item()
            table.row({'case': f'{stage} {layer} {tokens}x{fan_in}->{fan_out}',
                       'baseline ms': times['mkl forward'] * 1e3, 'dat ms': times['onednn forward'] * 1e3,
                       'baseline grad ms': times['mkl input grad'] * 1e3,
                       'dat grad ms': times['onednn input grad'] * 1e3, 'max |diff|': f'{diff:.1e}'})


def mlp_rows(table: Table, repeats: int) -> None:
    default = blocking.BLOCK_ELEMENTS
    for stage, tokens, dim in STAGES:
        mlp = Mlp(dim, 4 * dim).eval()
        x = torch.randn(tokens, dim)

        def run(block_elements):
            def step():
                blocking.BLOCK_ELEMENTS = block_elements
                with torch.no_grad():
                    mlp(x)
            return step
        try:
            times = interleaved_median_seconds({'whole': run(tokens * 4 * dim), 'blocked': run(default)},
                                               'cpu', repeats)
        finally:
            blocking.BLOCK_ELEMENTS = default
        blocks = len(blocking.row_block_sizes(tokens, 4 * dim))
        table.row({'case': f'{stage} MLP {tokens}x{dim}, {blocks} blocks',
                   'baseline ms': times['whole'] * 1e3, 'dat ms': times['blocked'] * 1e3})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeats', type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    print('linear layers: baseline F.linear (MKL), dat oneDNN; grad: the input gradient')
    table = Table([Column('case', width=34), Column('baseline ms', '.2f'), Column('dat ms', '.2f'),
                   Column('speed-up', 'x', ratio=('baseline ms', 'dat ms')), Column('baseline grad ms', '.2f'),
                   Column('dat grad ms', '.2f'),
                   Column('grad speed-up', 'x', ratio=('baseline grad ms', 'dat grad ms')),
                   Column('max |diff|', width=10)])
    linear_rows(table, args.repeats)
    print(f'\nMLP inference: baseline the whole batch at once, dat blocks of {blocking.BLOCK_ELEMENTS} hidden elements')
    table = Table([Column('case', width=34), Column('baseline ms', '.2f'), Column('dat ms', '.2f'),
                   Column('speed-up', 'x', ratio=('baseline ms', 'dat ms'))])
    mlp_rows(table, args.repeats)


if __name__ == '__main__':
    main()
