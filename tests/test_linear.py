"""The CPU paths of the linear layers: oneDNN's fp32 matmul (`dat.layers.linear`) against an fp64 `F.linear`, its
fallbacks, and MLPs run over row blocks (`dat.layers.blocking`) against the whole batch."""
import pytest
import timm
import torch
import torch.nn.functional as F

from dat.layers import blocking
from dat.layers import linear as linear_module
from dat.layers.linear import Linear, linear, onednn_linear_applies
from dat.layers.mlp import Mlp

needs_onednn = pytest.mark.skipif(
    linear_module._ONEDNN_LINEAR is None,
    reason='this PyTorch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise); F.linear runs instead')


@pytest.fixture
def onednn_calls(monkeypatch):
    """How many times the oneDNN op ran (the real op, counted)."""
    calls = []
    real = linear_module._ONEDNN_LINEAR

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)
    monkeypatch.setattr(linear_module, '_ONEDNN_LINEAR', counted)
    return calls


def _operands(shape, fan_out, bias, transposed):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    if transposed:  # a strided input: the last two dims swapped in memory
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    weight = torch.randn(fan_out, shape[-1], dtype=torch.float64) * shape[-1] ** -0.5
    return x, weight, torch.randn(fan_out, dtype=torch.float64) if bias else None


@needs_onednn
@pytest.mark.parametrize('shape', [(37, 24), (2, 5, 7, 24)])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('transposed', [False, True])
def test_onednn_linear_and_its_gradients_match_fp64(shape, bias, transposed, onednn_calls):
    x64, weight64, bias64 = _operands(shape, 40, bias, transposed)
    leaves64 = [t.requires_grad_() for t in (x64, weight64, bias64) if t is not None]
    leaves = [t.detach().float().requires_grad_() for t in leaves64]
    x, weight, bias32 = leaves[0], leaves[1], leaves[2] if bias else None
    assert onednn_linear_applies(x, weight)

    out64, out = F.linear(x64, weight64, bias64), linear(x, weight, bias32)
    grad = torch.randn_like(out64)
    grads64 = torch.autograd.grad(out64, leaves64, grad)
    grads = torch.autograd.grad(out, leaves, grad.float())

    assert len(onednn_calls) == 2  # the forward and the input gradient
    torch.testing.assert_close(out, out64.float(), atol=2e-5, rtol=1e-5)
    for name, ours, reference in zip(('x', 'weight', 'bias'), grads, grads64):
        torch.testing.assert_close(ours, reference.float(), atol=1e-4, rtol=1e-5, msg=f'gradient of {name}')


@needs_onednn
def test_onednn_linear_without_grad_and_its_double_backward(onednn_calls):
    x64, weight64, bias64 = _operands((9, 16), 12, True, False)
    x, weight, bias = (t.float() for t in (x64, weight64, bias64))
    with torch.no_grad():
        torch.testing.assert_close(linear(x, weight, bias), F.linear(x64, weight64, bias64).float(),
                                   atol=1e-5, rtol=1e-5)
    assert len(onednn_calls) == 1

    def second_order(apply, x, weight, bias):
        # a gradient penalty: d/dW of |d(sum out^2)/dx|^2
        x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
        grad_x, = torch.autograd.grad(apply(x, weight, bias).pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.pow(2).sum(), weight)[0]
    torch.testing.assert_close(second_order(linear, x, weight, bias),
                               second_order(F.linear, x64, weight64, bias64).float(), atol=1e-3, rtol=1e-5)


@pytest.mark.filterwarnings('ignore:TF32 acceleration on top of oneDNN')  # from torch.backends.mkldnn.flags
def test_linear_falls_back_to_f_linear_where_onednn_does_not_apply(onednn_calls):
    x, weight = torch.randn(5, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert not onednn_linear_applies(x, weight)
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight), atol=0, rtol=0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not onednn_linear_applies(x.float(), weight.float())
        assert linear(x.float(), weight.float()).dtype == torch.bfloat16  # autocast casts it as it casts F.linear
    with torch.backends.mkldnn.flags(enabled=False):
        assert not onednn_linear_applies(x.float(), weight.float())
    assert not onednn_linear_applies(x.bfloat16(), weight.bfloat16())
    assert not onednn_calls


def test_layers_keep_torch_and_timm_state_dicts():
    assert Linear(8, 4).state_dict().keys() == torch.nn.Linear(8, 4).state_dict().keys()
    assert isinstance(Linear(8, 4), torch.nn.Linear)
    assert Mlp(8, 32).state_dict().keys() == timm.layers.Mlp(8, 32).state_dict().keys()


def test_scripted_mlp_matches_eager():
    torch.manual_seed(0)
    mlp, x = Mlp(8, 32).eval(), torch.randn(3, 5, 8)
    torch.testing.assert_close(torch.jit.script(mlp)(x), mlp(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('rows', [1, 7, 50])
def test_mlp_over_row_blocks_matches_the_whole_batch(rows, monkeypatch):
    """Inference runs over blocks of at most `rows` rows, of equal size give or take one; a forward that records
    gradients runs the whole batch; both give the same rows."""
    torch.manual_seed(0)
    mlp, x = Mlp(8, 32).double(), torch.randn(2, 25, 8, dtype=torch.float64)
    whole = mlp(x)
    monkeypatch.setattr(blocking, 'BLOCK_ELEMENTS', rows * 32)
    seen = []
    original = mlp._mlp
    monkeypatch.setattr(mlp, '_mlp', lambda block: seen.append(block.shape[0]) or original(block))
    with torch.no_grad():
        blocked = mlp(x)
    torch.testing.assert_close(blocked, whole.detach(), atol=1e-12, rtol=0)
    assert sum(seen) == 50 and max(seen) <= rows and max(seen) - min(seen) <= 1
