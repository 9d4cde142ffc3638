"""Attention ops: fused native kernels (`dat._C`, when built) and their pure-PyTorch references."""
from ._extension import IMPLS, Refusal, native_op_available, register_fused_ops, resolve_impl
from .capability import why_not_fused
from .deform_attn import deformable_attention, deformable_attention_reference, relative_position_bias
from .ms_deform_attn import ms_deform_attn_reference, multi_scale_deformable_attention
from .neighborhood_attn import neighborhood_attention, neighborhood_attention_reference
from . import onnx  # noqa: F401 - registers the ops' decompositions, which torch.onnx.export uses
