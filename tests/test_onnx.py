"""ONNX export with default settings: the fused ops decompose into their reference math (dat/ops/onnx.py) and the
exported models run in onnxruntime as they do in PyTorch (scripts/export_onnx.py)."""
import pytest
import timm
import torch
import torch._decomp
from torch._dynamo.backends.common import aot_autograd

from conftest import load_script
from dat.layers.neighborhood_attn import NeighborhoodAttention
from dat.layers.window_attn import WindowAttention, window_attention_mask
from dat.ops import multi_scale_deformable_attention, native_op_available
from dat.ops.neighborhood_attn import neighborhood_tables
from dat.ops.onnx import DECOMPOSITIONS
from test_deform_attn_op import make_inputs as deform_attn_inputs
from test_ms_deform_attn import make_inputs as ms_deform_attn_inputs
from test_neighborhood_attn import make_inputs as neighborhood_attn_inputs

onnx = pytest.importorskip('onnx', reason='onnx is not installed (pip install -e ".[test]")')
pytest.importorskip('onnxscript', reason='torch.onnx.export needs onnxscript (pip install -e ".[test]")')
onnxruntime = pytest.importorskip('onnxruntime', reason='onnxruntime is not installed (pip install -e ".[test]")')
export_onnx = load_script('export_onnx')

pytestmark = pytest.mark.skipif(not all(native_op_available(name, 'cpu') for name in DECOMPOSITIONS),
                                reason='dat._C is not built: the models export through the reference ops anyway')

TOLERANCE = 1e-4  # onnxruntime against PyTorch, float32 logits and feature maps
NON_SQUARE = (256, 320)
# Few blocks, every block type of the family, fused kernels required: fast exports through the decompositions.
NARROW = {
    'dat_tiny': dict(depths=(1, 1, 2, 2), block_types=('L', 'S', 'LD', 'SD'), attn_impl='fused'),
    'dat_pp_tiny': dict(depths=(1, 1, 2, 1), block_types=('N', 'D', 'ND', 'D'), attn_impl='fused'),
}


def decomposition(op):
    return torch._decomp.decomposition_table[op.default]


def test_decompositions_match_the_fused_ops_on_every_output():
    deform = deform_attn_inputs(2, 4, 2, 10, 7, 8, (5, 7), key_spread=1.5)
    for rpe in (deform['rpe'], None):
        args = (deform['q'], deform['k'], deform['v'], deform['kpos'], deform['qpos'], rpe, 0.3)
        for fused, decomposed in zip(torch.ops.dat.deform_attn(*args), decomposition(torch.ops.dat.deform_attn)(*args)):
            assert decomposed.dtype == fused.dtype
            torch.testing.assert_close(decomposed, fused, rtol=1e-10, atol=1e-10)

    args = (*neighborhood_attn_inputs(2, 2, 9, 11, 4, 3), 3, 2, 0.5)
    fused_out, fused_attn = torch.ops.dat.neighborhood_attn(*args)
    out, attn = decomposition(torch.ops.dat.neighborhood_attn)(*args)
    torch.testing.assert_close(out, fused_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn, fused_attn, rtol=1e-10, atol=1e-10)
    assert attn.shape == (2, 2, 9, 11, 9) and fused_attn.sum(-1).sub(1).abs().max() < 1e-12

    args = ms_deform_attn_inputs([(6, 7), (3, 4)], 2, 5, 2, 3, 2)
    torch.testing.assert_close(decomposition(torch.ops.dat.ms_deform_attn)(*args), torch.ops.dat.ms_deform_attn(*args),
                               rtol=1e-10, atol=1e-10)


def test_tracing_uses_the_fake_kernels_and_compiled_code_the_fused_op():
    """The decomposition is for ONNX only: torch.compile with symbolic shapes still propagates through the fake
    kernel (registered as the op's meta) and calls the fused op."""
    calls = []
    table = torch._decomp.decomposition_table
    op = torch.ops.dat.deform_attn.default
    original = table[op]
    graphs = []

    def count_calls(*args):
        calls.append(args)
        return original(*args)

    def keep_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module

    inputs = deform_attn_inputs(2, 4, 2, 10, 7, 8, (5, 7), dtype=torch.float32)
    table[op] = count_calls
    try:
        compiled = torch.compile(lambda *args: torch.ops.dat.deform_attn(*args)[0], dynamic=True,
                                 backend=aot_autograd(fw_compiler=keep_graph))
        out = compiled(*inputs.values(), 0.3)
    finally:
        table[op] = original
    assert calls == []
    assert any(node.target is op for graph in graphs for node in graph.graph.nodes)
    torch.testing.assert_close(out, torch.ops.dat.deform_attn(*inputs.values(), 0.3)[0], rtol=0, atol=0)


def test_ms_deform_attn_reads_the_level_layout_at_run_time(tmp_path):
    """Spatial shapes and level starts are graph inputs: one exported graph serves every layout of S rows."""
    class Attention(torch.nn.Module):
        def forward(self, value, spatial_shapes, level_start_index, locations, weights):
            return multi_scale_deformable_attention(value, spatial_shapes, level_start_index, locations, weights,
                                                    impl='fused')

    exported_args = [t.float() if t.is_floating_point() else t
                     for t in ms_deform_attn_inputs([(8, 10), (4, 5)], 2, 6, 4, 8, 3)]
    path = tmp_path / 'ms_deform_attn.onnx'
    torch.onnx.export(Attention().eval(), tuple(exported_args), dynamo=True, verbose=False).save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for layout in ([(8, 10), (4, 5)], [(10, 8), (5, 4)], [(5, 16), (2, 10)]):  # 100 rows each
        args = [t.float() if t.is_floating_point() else t for t in ms_deform_attn_inputs(layout, 2, 6, 4, 8, 3, seed=1)]
        got = session.run(None, {node.name: arg.numpy() for node, arg in zip(session.get_inputs(), args)})[0]
        assert abs(got - Attention()(*args).numpy()).max() < 1e-5


def test_export_caches_no_fake_tensors(tmp_path):
    """Masks and index tables built while tracing are fake tensors: cached, they would become the results of later
    eager calls of the same size."""
    layers = torch.nn.Sequential(WindowAttention(8, 2, window_size=4, shift_size=2),
                                 NeighborhoodAttention(8, 2, kernel_size=3, attn_impl='fused')).eval()
    images = torch.randn(2, 8, 10, 13)
    window_attention_mask.cache_clear()
    neighborhood_tables.cache_clear()
    torch.onnx.export(layers, (images,), dynamo=True, verbose=False)
    assert window_attention_mask.cache_info().currsize == neighborhood_tables.cache_info().currsize == 0
    with torch.no_grad():
        out = layers(images)
    assert type(out) is torch.Tensor and out.abs().max() > 0


def check_export(model, size, tmp_path):
    """Export `model` at batch 2 and compare onnxruntime with PyTorch at batches 1 and 3."""
    path = tmp_path / 'model.onnx'
    export_onnx.export_onnx(model, size, path)
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == 'batch'
    assert {node.domain for node in graph.node} == {''}  # standard ONNX only: every dat:: op was decomposed
    assert 'GridSample' in {node.op_type for node in graph.node}
    for batch in (1, 3):
        difference = export_onnx.onnx_max_difference(model, path, size, batch=batch)
        assert difference < TOLERANCE, f'batch {batch}: onnxruntime differs from PyTorch by {difference}'


def test_narrow_dat_at_a_non_square_size(tmp_path):
    check_export(timm.create_model('dat_tiny', **NARROW['dat_tiny']).eval(), NON_SQUARE, tmp_path)


def test_features_only_narrow_dat_pp_at_a_non_square_size(tmp_path):
    model = timm.create_model('dat_pp_tiny', features_only=True, **NARROW['dat_pp_tiny']).eval()
    assert export_onnx.output_names(model, NON_SQUARE) == [f'features_{i}' for i in range(4)]
    check_export(model, NON_SQUARE, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['dat_tiny', 'dat_pp_tiny'])
def test_full_model_at_224(name, tmp_path):
    check_export(timm.create_model(name).eval(), (224, 224), tmp_path)


def test_script_exports_and_checks_dat_nano_at_its_size(tmp_path, capsys):
    result = export_onnx.main(['dat_nano', '--out', str(tmp_path / 'nano.onnx'), '--check'])
    assert result['size'] == (56, 56) and result['max_difference'] < TOLERANCE
    assert 'max |difference|' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        export_onnx.main(['dat_huge', '--out', str(tmp_path / 'huge.onnx')])
