"""Linear layers that run their fp32 CPU matmuls on oneDNN.

PyTorch computes an fp32 `nn.Linear` on the CPU with MKL's sgemm (`at::addmm`: the bias is first copied into
every row of the output, which the product is then accumulated into). oneDNN, which PyTorch already uses for
convolutions and half-precision matmuls, JIT-compiles its matmul for the CPU it runs on and adds the bias
while it writes the output. On the 2-core AMD EPYC (Zen 4, AVX-512) of the benchmarks, DAT-T's linear layers
at batch 8, 224x224 ran 1.06x to 1.40x faster forward and their input gradients 1.09x to 1.38x faster
(`scripts/benchmark_linear.py`). The weight gradient, a product of two transposed operands, stays on MKL:
oneDNN took 0.25x to 1.07x of its speed there. Both compute in fp32 with fp32 accumulation: no precision is
traded.

The oneDNN path runs where it applies (an fp32 input on an x86 CPU, oneDNN available and enabled, no
autocast, eager mode) and `F.linear` everywhere else: other dtypes, devices and autocast, and torch.compile,
torch.export and ONNX traces, which keep the standard op for their own lowering. Double backward runs through
differentiable ops.
"""
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

from dat.tracing import is_tracing

# x86 only: where it was measured (ARM builds run oneDNN on other backends, unmeasured here)
_ONEDNN_LINEAR = (getattr(getattr(torch.ops, 'mkldnn', None), '_linear_pointwise', None)
                  if torch.backends.mkldnn.is_available() and platform.machine().lower() in ('x86_64', 'amd64')
                  else None)


def onednn_linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` runs `x` through oneDNN: see the module docstring."""
    # tracers first: they see F.linear, and never the rest of these checks
    return (not is_tracing() and _ONEDNN_LINEAR is not None and torch._C._get_mkldnn_enabled()
            and x.device.type == 'cpu' and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled('cpu'))


def _onednn_matmul(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    # oneDNN reads strided operands itself: a transposed weight is not copied
    return _ONEDNN_LINEAR(x, weight, bias, 'none', [], '')


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias):
        x = x.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_matmul(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():  # double backward: differentiable ops
                grad_x = grad_out.matmul(weight)
            else:
                grad_x = _onednn_matmul(grad_out, weight.t())
        if ctx.needs_input_grad[1]:
            grad_weight = grad_rows.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, on oneDNN where `onednn_linear_applies`."""
    if not onednn_linear_applies(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDnnLinear.apply(x, weight, bias)
    return _onednn_matmul(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) whose forward is `dat.layers.linear.linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.linear(x, self.weight, self.bias)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
