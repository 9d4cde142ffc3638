"""Running row-wise layers over cache-sized blocks of their rows, in eager mode.

A layer that widens its input writes intermediates several times the size of that input: an MLP's hidden
activations are 4x its tokens, window attention's qkv 3x and its logits tokens x window area. Over a whole
batch these are tens of MiB (DAT-T's first stage at batch 8, 224x224: 37 MiB per hidden activation). They
miss every cache, and glibc serves allocations above its mmap threshold (32 MiB at most) with fresh pages from
the kernel, which fault on first write, on every pass. On the 2-core machine of the benchmarks a 37 MiB GELU
took 16.6 ms into a fresh tensor and 4.1 ms into reused memory.

Applied to blocks of `BLOCK_ELEMENTS` intermediate elements, the same layer keeps each intermediate in cache
and in memory the allocator reuses. Each row's result is computed by the same operations as over the whole
batch. Blocks run only where no gradient is recorded: a training step keeps every intermediate for the
backward anyway, and there the blocks' separate weight gradients and the concatenation of their input
gradients cost more than the blocks save (dat_tiny's training step measured 0.90x blocked). Tracers
(torch.compile, torch.export, ONNX) see the unblocked layer: compilers fuse and tile on their own, and a loop
over a batch-dependent number of blocks would fix the batch size of an exported graph.
"""
from typing import Callable, List

import torch

from dat.tracing import is_tracing

# Elements of the widest intermediate of one block (4 MiB in fp32). dat_tiny inference at batch 8, 224x224,
# interleaved with the unblocked model: 1.06x to 1.12x from 2^19 to 2^22 elements, best at 2^20. Blocks help
# even where the whole intermediate is under the mmap threshold (DAT-T's second and third stages): measured
# alone, those MLPs ran 0.95x blocked, but in the model, blocking every layer beat blocking only those above
# 32 MiB (1.12x against 1.08x).
BLOCK_ELEMENTS = 1 << 20


def row_block_sizes(rows: int, width: int) -> List[int]:
    """The sizes of the blocks `rows` rows are run in when their widest intermediate has `width` elements per row:
    as few blocks of at most `BLOCK_ELEMENTS` elements (one row at least) as hold them, of equal size give or take
    a row (no small remainder block)."""
    count = -(-rows // max(1, BLOCK_ELEMENTS // width))
    return [rows // count + (index < rows % count) for index in range(count)]


def map_row_blocks(layer: Callable[[torch.Tensor, int], torch.Tensor], rows: torch.Tensor, width: int
                   ) -> torch.Tensor:
    """`layer(rows, 0)` for a layer that treats the rows of dim 0 independently, as the concatenation of
    `layer(block, index of its first row)` over the blocks of `row_block_sizes`; the whole tensor at once where
    autograd records or a tracer runs."""
    # autograd and tracers before the sizes, which a tracer would guard on
    if torch.is_grad_enabled() or is_tracing():
        return layer(rows, 0)
    sizes = row_block_sizes(rows.shape[0], width)
    if len(sizes) <= 1:  # one block, or no rows
        return layer(rows, 0)
    firsts = [sum(sizes[:index]) for index in range(len(sizes))]
    return torch.cat([layer(part, first) for part, first in zip(rows.split(sizes), firsts)])
