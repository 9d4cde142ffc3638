"""torch.compile(fullgraph=True) of whole models, one per family (DAT, DAT++, dat_nano), with the default kernels
and with the pure-PyTorch reference (what a build without the extension runs): no graph break anywhere, and
outputs and gradients equal to eager.

The aot_eager backend runs everything fullgraph needs (Dynamo tracing the whole model, the ops' fake kernels and
autograd formulas in AOTAutograd's joint graph) without inductor's code generation, which takes 3 to 6 minutes
per model on two cores; `scripts/benchmark.py --compile` runs the default inductor backend."""
import pytest
import timm
import torch
import torch.nn.functional as F

NARROW = dict(dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), offset_groups=(1, 1, 2, 4))
# Two blocks a stage keep every block type of a family (DAT: L, S, D; DAT++: N, D, its conv stem, local perception
# units and depth-wise-conv MLPs) at a fraction of the compile time of the real depths; dat_nano is the real model.
FAMILIES = {
    'dat': lambda impl: timm.create_model('dat_tiny', num_classes=10, **NARROW, depths=(2, 2, 2, 2),
                                          block_types=('LS', 'LS', 'LD', 'LD'), attn_impl=impl),
    'dat_pp': lambda impl: timm.create_model('dat_pp_tiny', num_classes=10, **NARROW, depths=(2, 2, 2, 2),
                                             block_types=('ND', 'ND', 'ND', 'DD'), attn_impl=impl),
    'dat_nano': lambda impl: timm.create_model('dat_nano', num_classes=10, attn_impl=impl),
}
# At 64x64 the stage maps are 16, 8, 4 and 2 pixels: shifted windows are padded and masked, neighborhoods padded.
INPUT_SHAPE = (2, 3, 64, 64)


def loss_and_gradients(model, images, labels):
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    gradients = torch.autograd.grad(loss, [parameter for parameter in model.parameters()])
    return logits.detach(), gradients


@pytest.mark.parametrize('impl', ['auto', 'reference'])
@pytest.mark.parametrize('family', list(FAMILIES))
def test_fullgraph_compile_matches_eager(family, impl):
    torch._dynamo.reset()
    model = FAMILIES[family](impl).train()  # train(): drop path and dropout are 0, so the outputs are deterministic
    images = torch.randn(INPUT_SHAPE)
    labels = torch.arange(INPUT_SHAPE[0])
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')

    eager_logits, eager_gradients = loss_and_gradients(model, images, labels)
    compiled_logits, compiled_gradients = loss_and_gradients(compiled, images, labels)

    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-4, atol=1e-5)
    names = [name for name, _ in model.named_parameters()]
    for name, compiled_gradient, eager_gradient in zip(names, compiled_gradients, eager_gradients):
        scale = eager_gradient.abs().max().item()
        torch.testing.assert_close(compiled_gradient, eager_gradient, rtol=1e-3, atol=1e-4 * max(scale, 1e-3),
                                   msg=lambda message: f'{family}: gradient of {name}: {message}')
