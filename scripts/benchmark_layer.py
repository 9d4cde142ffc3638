"""One deformable attention layer against the official DAT++ layer, with the same weights, in one process.

The layer is DAT-B++'s stage 1 (dim 128, 4 heads, 2 offset groups, key stride 8, offset kernel 9, a 111 x 111
bias table) at a detection-sized map, 200 x 336 queries and 25 x 42 keys by default. The official layer is
`DAttentionBaseline` from a checkout of LeapLabTHU/DAT (HEAD, the DAT++ code) that --official-src points at:
it is imported from there at run time (it needs einops), and nothing of it is copied here. Ours is
`dat.layers.DeformableAttention` loaded with the official layer's state_dict, run with the default kernels
(`auto`) and with the pure-PyTorch reference. The variants are timed round-robin (median over --repeats
rounds), so that a disturbance of the machine hits them all alike.

    OMP_NUM_THREADS=2 python scripts/benchmark_layer.py --official-src ~/src/DAT
    python scripts/benchmark_layer.py --official-src ~/src/DAT --size 100 168 --modes forward
"""
import argparse
import os
import sys

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [SCRIPTS, os.path.dirname(SCRIPTS)]  # benchmark_harness, and dat from this checkout
from benchmark_harness import (Column, Table, first_output, import_official_module,  # noqa: E402
                               interleaved_median_seconds, training_or_inference_step)

# DAT-B++ stage 1 (the official dat_pp_base config: dims[0], heads[0], groups[0], strides[0], ksizes[0]) and
# the table its 224-pixel training leaves at stage 1 (56 x 56 queries: 2 * 56 - 1).
DIM, HEADS, GROUPS, KEY_STRIDE, OFFSET_KERNEL, TABLE = 128, 4, 2, 8, 9, (111, 111)
MODES = ('forward', 'forward+backward')


def official_layer(official_src: str):
    """The official DAT++ stage-1 layer, randomly initialised as the official code does."""
    blocks = import_official_module(official_src, 'dat_blocks')
    return blocks.DAttentionBaseline(
        q_size=((TABLE[0] + 1) // 2, (TABLE[1] + 1) // 2), kv_size=None, n_heads=HEADS, n_head_channels=DIM // HEADS,
        n_groups=GROUPS, attn_drop=0.0, proj_drop=0.0, stride=KEY_STRIDE, offset_range_factor=-1, use_pe=True,
        dwc_pe=False, no_off=False, fixed_pe=False, ksize=OFFSET_KERNEL, log_cpb=False)


def our_layer(official_state: dict, impl: str):
    """Ours with the official layer's weights (LayerNormProxy's `norm.` level is the only difference in names)."""
    from dat.layers import DeformableAttention
    layer = DeformableAttention(DIM, HEADS, GROUPS, TABLE, key_stride=KEY_STRIDE, offset_kernel=OFFSET_KERNEL,
                                offset_range_factor=-1, generation='dat_pp', attn_impl=impl)
    layer.load_state_dict({key.replace('conv_offset.1.norm.', 'conv_offset.1.'): value
                           for key, value in official_state.items()})
    return layer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--official-src', required=True, help='a checkout of LeapLabTHU/DAT at HEAD (DAT++)')
    parser.add_argument('--size', nargs=2, type=int, default=[200, 336], help='query map H W')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES)
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()

    import torch
    torch.manual_seed(0)
    official = official_layer(args.official_src)
    layers = {'official': official,
              **{f'ours ({impl})': our_layer(official.state_dict(), impl) for impl in ('auto', 'reference')}}
    # the input takes gradients too, as a layer inside a network does
    x = torch.randn(args.batch, DIM, *args.size).requires_grad_()
    with torch.no_grad():
        expected = first_output(official(x))
        for name, layer in layers.items():
            if name != 'official':
                print(f'{name}: max |output - official| = {(layer(x) - expected).abs().max().item():.1e}')

    table = Table([Column('layer', width=16), Column('mode', width=16), Column('input', width=14),
                   Column('ms', '.1f'), Column('vs official', 'x', width=11)])
    for mode in args.modes:
        seconds = interleaved_median_seconds(
            {name: training_or_inference_step(layer, x, mode == 'forward+backward')
             for name, layer in layers.items()}, 'cpu', args.repeats)
        for name, time in seconds.items():
            table.row({'layer': name, 'mode': mode, 'input': f'{args.batch}x{DIM}x{args.size[0]}x{args.size[1]}',
                       'ms': 1e3 * time, 'vs official': seconds['official'] / time})


if __name__ == '__main__':
    main()
