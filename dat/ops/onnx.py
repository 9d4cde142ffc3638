"""ONNX export of the native ops: while torch.onnx exports, each `dat::` op decomposes into its reference math.

`torch.onnx.export(model, (x,), dynamo=True)` first captures the model with torch.export, where a fused op stays
one `dat::` node (its fake kernel gives the output shapes), then calls `ExportedProgram.run_decompositions` with
a table built from `torch._decomp.decomposition_table` (less the ops that have an ONNX translation) and
translates the resulting ATen graph node by node. Importing this module (`import dat` does) registers each op's
reference math in that table, so the user's plain call works with the extension built and the fused kernels
selected: the op turns into MatMul, Softmax, GridSample, Gather... in the ONNX graph. No ONNX translation is
written by hand: the decompositions are the reference math the kernels are tested against.

Outside that export nothing changes. Eager calls run the kernels; Inductor (torch.compile) takes its
decompositions from its own table, so compiled graphs still call the fused ops; torch.export keeps the `dat::`
nodes (its default table has no entries for custom ops). One more table entry keeps it so: with symbolic
shapes FakeTensor runs an op's decomposition in place of its fake kernel unless the op has a "Python meta",
so each op's fake kernel is registered as that too, and tracing (torch.compile(dynamic=True), torch.export with
dynamic shapes) keeps using the fake kernel.

The decompositions take all queries in one block (the reference's query blocking would put a Python loop
over the sizes into the graph). `dat::ms_deform_attn` reads the level layout from `spatial_shapes` and
`level_start_index`: the exported graph reads it at run time, so those may be graph inputs.
"""
import torch
import torch._decomp

from dat.precision import cast_floating, full_precision
from ._extension import _BINDINGS, NATIVE_IMPORT_ERROR
from .deform_attn import check_deformable_attention_inputs, reference_logits
from .ms_deform_attn import check_ms_deform_attn_inputs, ms_deform_attn_reference
from .neighborhood_attn import check_neighborhood_attention_inputs, neighborhood_tables, window_attention_block


def deform_attn_decomposition(q, k, v, kpos, qpos, rpe, scale):
    """`dat::deform_attn` in ATen ops: (out, logsumexp of the logits over the keys), computed in full precision
    as the kernels do (dat.precision)."""
    check_deformable_attention_inputs(q, k, v, kpos, qpos, rpe)
    out_dtype = q.dtype
    q, k, v, kpos, qpos, rpe = cast_floating(full_precision(out_dtype), q, k, v, kpos, qpos, rpe)
    logits = reference_logits(q, k, kpos, qpos, rpe, scale)
    return torch.matmul(logits.softmax(dim=-1), v).to(out_dtype), logits.logsumexp(dim=-1)


def neighborhood_attn_decomposition(q, k, v, rpb, kernel_size, dilation, scale):
    """`dat::neighborhood_attn` in ATen ops: (out, softmax probabilities over each query's window), computed in
    full precision as the kernels do (dat.precision)."""
    check_neighborhood_attention_inputs(q, k, v, rpb, kernel_size, dilation)
    B, M, H, W, D = q.shape
    out_dtype = q.dtype
    q, k, v, rpb = cast_floating(full_precision(out_dtype), q, k, v, rpb)
    key_index, bias_index = neighborhood_tables(H, W, kernel_size, dilation, q.device)
    flat_q, flat_k, flat_v = (t.reshape(B, M, H * W, D) for t in (q, k, v))
    out, probabilities = window_attention_block(flat_q, flat_k, flat_v, key_index, rpb.reshape(M, -1)[:, bias_index],
                                                scale)
    return out.reshape(B, M, H, W, D).to(out_dtype), probabilities.reshape(B, M, H, W, -1)


def ms_deform_attn_decomposition(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """`dat::ms_deform_attn` in ATen ops."""
    check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


DECOMPOSITIONS = {
    'deform_attn': deform_attn_decomposition,
    'neighborhood_attn': neighborhood_attn_decomposition,
    'ms_deform_attn': ms_deform_attn_decomposition,
}


def register_decompositions() -> None:
    """Register the decomposition of every fused op the extension defines, and its fake kernel as its meta."""
    for binding in _BINDINGS:
        if hasattr(torch.ops.dat, binding.name):
            op = getattr(torch.ops.dat, binding.name).default
            torch._decomp.register_decomposition(op)(DECOMPOSITIONS[binding.name])
            torch._decomp.register_decomposition(op, registry=torch._decomp.meta_table)(binding.fake_forward)


if NATIVE_IMPORT_ERROR is None:
    register_decompositions()
