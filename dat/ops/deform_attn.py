"""Deformable attention with a bilinear relative-position bias (the attention core of DAT and DAT++).

    out[b, m, i] = sum_j softmax_j(scale * <q[b, m, i], k[b, m, j]> + bias[b, m, i, j]) * v[b, m, j]

`bias[b, m, i, j]` is `grid_sample(rpe[m], (qpos[i] - kpos[b, g(m), j]) * 0.5)` with bilinear
interpolation, `align_corners=True` and zeros outside the table, where g(m) = m // (M // G) is the
offset group of head m. Positions are (y, x) pairs normalised to [-1, 1]; the table may have any
size (it is trained at one resolution and used at every other).

Shapes: q (B, M, Nq, D); k, v (B, M, Nk, D); kpos (B, G, Nk, 2); qpos (Nq, 2); rpe (M, Th, Tw) or None.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ._extension import resolve_impl

# Elements of one (queries x keys) score block in the reference; bounds its peak memory.
REFERENCE_BLOCK_ELEMENTS = 1 << 22


def check_deformable_attention_inputs(q, k, v, kpos, qpos, rpe) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f'q, k, v must be (B, heads, N, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, '
                         f'{tuple(v.shape)}')
    B, M, Nq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != M or k.shape[3] != D:
        raise ValueError(f'k and v must be (B={B}, heads={M}, Nk, head_dim={D}); got {tuple(k.shape)}, '
                         f'{tuple(v.shape)}')
    if kpos.dim() != 4 or kpos.shape[0] != B or kpos.shape[2] != k.shape[2] or kpos.shape[3] != 2:
        raise ValueError(f'kpos must be (B={B}, groups, Nk={k.shape[2]}, 2); got {tuple(kpos.shape)}')
    if M % kpos.shape[1] != 0:
        raise ValueError(f'{M} heads cannot be split evenly into {kpos.shape[1]} offset groups')
    if qpos.shape != (Nq, 2):
        raise ValueError(f'qpos must be (Nq={Nq}, 2); got {tuple(qpos.shape)}')
    if rpe is not None and (rpe.dim() != 3 or rpe.shape[0] != M):
        raise ValueError(f'rpe must be (heads={M}, Th, Tw); got {tuple(rpe.shape)}')
    if not q.is_floating_point():
        raise TypeError(f'deformable attention needs floating-point tensors, got {q.dtype}')
    tensors = [k, v, kpos, qpos] + ([rpe] if rpe is not None else [])
    if any(t.dtype != q.dtype for t in tensors) or any(t.device != q.device for t in tensors):
        raise TypeError('q, k, v, kpos, qpos and rpe must share one dtype and device; got '
                        + ', '.join(f'{t.dtype}@{t.device}' for t in [q] + tensors))


def relative_position_bias(rpe: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """Bias (B, M, Nq, Nk) sampled from rpe (M, Th, Tw) at (qpos - kpos) / 2, the official rule."""
    B, G, Nk, _ = kpos.shape
    M = rpe.shape[0]
    displacement = (qpos[None, None, :, None, :] - kpos[:, :, None, :, :]) * 0.5  # B, G, Nq, Nk, (y, x)
    table = rpe.unsqueeze(0).expand(B, -1, -1, -1).reshape(B * G, M // G, rpe.shape[1], rpe.shape[2])
    bias = F.grid_sample(table, displacement.flip(-1).reshape(B * G, -1, Nk, 2),
                         mode='bilinear', padding_mode='zeros', align_corners=True)
    return bias.reshape(B, M, -1, Nk)


def deformable_attention_reference(q, k, v, kpos, qpos, rpe: Optional[torch.Tensor], scale: float,
                                   block_elements: int = REFERENCE_BLOCK_ELEMENTS) -> torch.Tensor:
    """The official math, evaluated over blocks of queries so that no (Nq x Nk) tensor is whole."""
    B, M, Nq, _ = q.shape
    Nk = k.shape[2]
    chunk = max(1, block_elements // max(1, B * M * Nk))
    outputs = []
    for start in range(0, Nq, chunk):
        stop = min(start + chunk, Nq)
        scores = torch.matmul(q[:, :, start:stop], k.transpose(-1, -2)) * scale
        if rpe is not None:
            scores = scores + relative_position_bias(rpe, qpos[start:stop], kpos)
        outputs.append(torch.matmul(scores.softmax(dim=-1), v))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def deformable_attention(q, k, v, kpos, qpos, rpe: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                         impl: Optional[str] = None) -> torch.Tensor:
    """Dispatch to the fused `dat::deform_attn` op or the pure-PyTorch reference (see module docstring)."""
    check_deformable_attention_inputs(q, k, v, kpos, qpos, rpe)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if resolve_impl(impl, 'deform_attn', q.device.type) == 'fused':
        raise NotImplementedError('the fused deformable-attention op is not wired in yet')
    return deformable_attention_reference(q, k, v, kpos, qpos, rpe, scale)
