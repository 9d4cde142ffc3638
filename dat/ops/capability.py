"""Which kernel `auto` takes for a call of each op, asked by sizes instead of tensors (for reports such as
`python -m dat info`)."""
from typing import Optional, Union

import torch

from . import deform_attn, ms_deform_attn, neighborhood_attn
from ._extension import unavailable_reason

FUSED_REFUSALS = {module.OP_NAME: module.fused_refusal for module in (deform_attn, ms_deform_attn, neighborhood_attn)}


def why_not_fused(op_name: str, device: Union[str, torch.device], dtype: torch.dtype, **problem) -> Optional[str]:
    """Why `auto` takes the reference for a call of `dat::<op_name>` on `device` with `dtype` and the sizes
    `problem` (the keywords of `dat.ops.<op_name>.fused_refusal`), or None when it takes the fused kernel.

        why_not_fused('deform_attn', 'cuda', torch.float16, batch=8, heads=4, queries=3136, keys=49, head_dim=32)
    """
    if op_name not in FUSED_REFUSALS:
        raise ValueError(f'no dat op {op_name!r}; the ops are {", ".join(FUSED_REFUSALS)}')
    device = torch.device(device)
    reason = unavailable_reason(op_name, device.type)
    if reason is not None:
        return reason
    refusal = FUSED_REFUSALS[op_name](device, dtype, **problem)
    return None if refusal is None else refusal.message
