"""Mixed precision: what dat's ops and layers compute in under autocast and with half-precision weights.

Under `torch.autocast(device, dtype=torch.bfloat16 or torch.float16)` convolutions and linear layers run in
half precision while parameters stay fp32, so an attention op receives half-precision activations next to
fp32 bias tables; a model cast with `model.to(torch.bfloat16)` has half-precision tables as well. Three rules,
the same on every device, forward and backward, make both work:

1. Coordinates are computed in `full_precision` (fp32; fp64 in a fp64 model) whatever the activations'
   dtype: sampling grids, reference points, offsets, deformed positions, the query grid, the relative-position
   displacements and Deformable DETR's sampling locations. They lie in [-1, 1] (or [0, 1]), where bf16's 8
   significant bits round by up to 2^-9: a quarter of a pixel on a 256-wide map in [-1, 1], half a pixel in
   [0, 1]; and `arange` in bf16 cannot count past 256.
   Offset networks therefore run through `run_in_full_precision`, grids are built in fp32, and feature maps
   are sampled by `F.grid_sample` in fp32 (the samples are cast back to the activations' dtype), which keeps
   the bilinear weights accurate. Sampling in half precision is also broken on the CPU: PyTorch's
   vectorised CPU `grid_sample` indexes 16-bit dtypes with 16-bit integer offsets, so a sample more than
   32767 elements from the start of its (batch, channel) plane reads a wrong row, or memory outside the
   tensor. A channels-last map (LayerNorm2d returns one) has a row stride of W * C: at 56 x 56 x 64 most
   rows are out of reach. That is what turned bf16 DAT++ outputs into NaN.
2. Softmaxes run in at least fp32 on logits taken to `full_precision` before the bias and mask are added;
   the probabilities return to the values' dtype for the weighted sum, whose matmul accumulates in fp32.
3. The ops decide their compute dtype from their inputs, not from the autocast state, and accept the mix
   of dtypes that autocast and half-precision weights produce: activations in one half-precision dtype next
   to coordinates, attention weights and bias tables in fp32 or that dtype.

    op                                 may be fp32 next to half activations   computes in   output
    deformable_attention               kpos, qpos, rpe                        fp32          q's dtype
    multi_scale_deformable_attention   sampling_locations, attention_weights  fp32          value's dtype
    neighborhood_attention             rpb (cast to q's dtype)                fp32          q's dtype

   The native kernels take the positions, attention weights and tables in fp32 beside fp16 or bf16
   activations, read the activations in their own dtype, accumulate in fp32 and round each result once; so do
   the pure-PyTorch references, with autocast disabled, i.e. what the kernels compute. A bias table is as
   accurate in half precision as the logits it is added to, so neighborhood attention casts an fp32 rpb to its
   activations' dtype (gradients reach the fp32 parameter through the cast). Any other mix of dtypes is an
   error, as in the native ops.
"""
import contextlib
from typing import ContextManager, Optional, Tuple

import torch
import torch.nn as nn

# The half-precision formats: kernels and references take them and compute in fp32.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def full_precision(dtype: torch.dtype) -> torch.dtype:
    """The dtype coordinates, softmaxes and the ops' accumulations are computed in for activations of `dtype`
    (at::opmath_type's rule, which the kernels follow): fp32 for fp16 and bf16, fp32 and fp64 themselves."""
    return torch.promote_types(dtype, torch.float32)


def autocast_disabled(device_type: str) -> ContextManager:
    """A region where autocast recasts no op on `device_type` (a no-op context where autocast does not exist,
    e.g. on the meta device), for code that chooses its dtypes itself."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def cast_floating(dtype: torch.dtype, *tensors: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """`tensors` in `dtype`, None left as it is."""
    return tuple(None if tensor is None else tensor.to(dtype) for tensor in tensors)


def run_in_full_precision(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` computed in `full_precision(x.dtype)` with its parameters cast to it and autocast disabled,
    for modules whose outputs are coordinates (offset networks). Gradients reach the parameters through the
    casts, in their own dtype."""
    dtype = full_precision(x.dtype)
    parameters = {name: parameter.to(dtype) for name, parameter in module.named_parameters()}
    with autocast_disabled(x.device.type):
        return torch.func.functional_call(module, parameters, (x.to(dtype),))
