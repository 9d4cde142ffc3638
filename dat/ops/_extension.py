"""Loading of the optional native extension and the choice between fused and reference kernels."""
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

try:
    from dat import _C  # noqa: F401  - importing registers the dat:: ops with the dispatcher
    NATIVE_IMPORT_ERROR = None
except ImportError as error:  # the extension is optional: the reference ops always work
    NATIVE_IMPORT_ERROR = error

IMPLS = ('auto', 'fused', 'reference')
IMPL_ENV = 'DAT_ATTN_IMPL'


# Kernels are registered once, when dat._C is imported, so torch.compile may fold the answer into
# the graph instead of breaking on the dispatcher query.
@torch.compiler.assume_constant_result
def native_op_available(op_name: str, device_type: str) -> bool:
    """True when `torch.ops.dat.<op_name>` has a kernel for `device_type` ('cpu' or 'cuda')."""
    if NATIVE_IMPORT_ERROR is not None or not hasattr(torch.ops.dat, op_name):
        return False
    dispatch_key = {'cpu': 'CPU', 'cuda': 'CUDA'}.get(device_type)
    if dispatch_key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f'dat::{op_name}', dispatch_key)


def resolve_impl(impl, op_name: str, device_type: str, unsupported: Optional[str] = None) -> str:
    """Return 'fused' or 'reference' for a call.

    `impl` (a model kwarg or a call argument) wins over the `DAT_ATTN_IMPL` environment variable;
    'auto' takes the fused op when it is built for the device and can take this call (`unsupported`,
    when given, says why it cannot, e.g. a dtype it has no kernel for). Asking for 'fused' where it is
    not built or cannot take the call is an error rather than a silent fallback, so benchmarks and
    tests measure what they name.
    """
    choice = (impl or os.environ.get(IMPL_ENV) or 'auto').lower()
    if choice not in IMPLS:
        raise ValueError(f'attention impl must be one of {IMPLS}, got {choice!r} (from argument or ${IMPL_ENV})')
    available = native_op_available(op_name, device_type)
    if choice == 'fused' and not available:
        reason = NATIVE_IMPORT_ERROR or f'dat::{op_name} has no {device_type} kernel in this build'
        raise RuntimeError(f'fused dat::{op_name} requested but not available: {reason}')
    if choice == 'fused' and unsupported is not None:
        raise RuntimeError(f'fused dat::{op_name} requested but it cannot take this call: {unsupported}')
    if choice == 'auto':
        return 'fused' if available and unsupported is None else 'reference'
    return choice


# The half-precision formats: kernels and references take them and accumulate in float32.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that kernels and references compute in for inputs of `dtype` (at::opmath_type's rule): float64
    for float64, float32 for every other floating dtype, whose 8 or 11 bits would lose a softmax or a long sum."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unsupported_dtype(dtype: torch.dtype, device_type: str, fused_dtypes: Dict[str, Tuple[torch.dtype, ...]]
                      ) -> Optional[str]:
    """Why a fused kernel cannot take `dtype` on `device_type` (for `resolve_impl`), or None when it can."""
    supported = fused_dtypes.get(device_type, ())
    if dtype in supported:
        return None
    return f'no {device_type} kernel for {dtype} (supported: {", ".join(map(str, supported)) or "none"})'


@dataclass(frozen=True)
class FusedOpBinding:
    """What autograd and torch.compile need to know of one native op `<namespace>::<name>`, whose gradients
    come from its companion op `<namespace>::<name>_backward`.

    `backward(ctx, backward_op, *grad_outputs)` returns the input gradients, calling `backward_op` (the
    companion op of the same namespace) for them.
    """
    name: str
    fake_forward: Callable
    fake_backward: Callable
    setup_context: Callable
    backward: Callable


_BINDINGS: List[FusedOpBinding] = []


def _register_binding(binding: FusedOpBinding, namespace: str) -> None:
    ops = getattr(torch.ops, namespace)
    qualified_name = f'{namespace}::{binding.name}'
    torch.library.register_fake(qualified_name)(binding.fake_forward)
    torch.library.register_fake(f'{qualified_name}_backward')(binding.fake_backward)
    backward_op = getattr(ops, f'{binding.name}_backward')

    def backward(ctx, *grad_outputs):
        return binding.backward(ctx, backward_op, *grad_outputs)

    torch.library.register_autograd(qualified_name, backward, setup_context=binding.setup_context)


def bind_fused_op(binding: FusedOpBinding) -> FusedOpBinding:
    """Registers fake kernels and autograd for `dat::<name>` when the extension defines it, and keeps the
    binding for other namespaces built from the same sources (`register_fused_ops`)."""
    _BINDINGS.append(binding)
    if NATIVE_IMPORT_ERROR is None and hasattr(torch.ops.dat, binding.name):
        _register_binding(binding, 'dat')
    return binding


def register_fused_ops(namespace: str) -> None:
    """Gives every op that a library loaded under `namespace` defines the fake kernels and autograd of its
    `dat::` twin (the emulated CUDA test tier builds the kernels into `dat_emulated::`)."""
    for binding in _BINDINGS:
        if hasattr(getattr(torch.ops, namespace), binding.name):
            _register_binding(binding, namespace)
