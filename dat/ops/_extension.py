"""Loading of the optional native extension and the choice between fused and reference kernels.

Every fused kernel declares its limits once, in C++ (csrc/common/kernel_limits.h): it checks them before it
allocates anything, and exports them as JSON through `dat::<op>_<device type>_limits()`. Each op module reads
that JSON at import and states its kernels' checks over it as `fused_refusal(...)`, which `resolve_impl` asks
before it picks the fused op. The tests of each op call its kernels just beyond every limit and assert that
they raise exactly what `fused_refusal` says (tests/kernel_limits.py).
"""
import importlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

# The import-time warning, and one debug line per call that `auto` sends to the reference (op, device, reason).
LOGGER = logging.getLogger('dat.ops')


def import_native_extension() -> Optional[ImportError]:
    """Imports `dat._C`, which registers the dat:: ops with the dispatcher; returns None, or the ImportError of an
    extension that is not built or does not load, after logging it (a warning: without one the user could not
    tell that every op runs its slower pure-PyTorch reference)."""
    try:
        importlib.import_module('dat._C')
    except ImportError as error:  # the extension is optional: the reference ops always work
        LOGGER.warning('dat: the native kernels (dat._C) are unavailable (%s); every op runs its pure-PyTorch '
                        'reference, with the same results but slower. `python -m dat info` shows what is built; '
                        "the README's Install section says how to build them.", error)
        return error
    return None


NATIVE_IMPORT_ERROR = import_native_extension()  # once per process: this module is imported once

IMPLS = ('auto', 'fused', 'reference')
IMPL_ENV = 'DAT_ATTN_IMPL'
KERNEL_DEVICE_TYPES = ('cpu', 'cuda')


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


def unavailable_reason(op_name: str, device_type: str) -> Optional[str]:
    """Why `dat::<op_name>` has no fused kernel for `device_type` here, or None when it has one."""
    if native_op_available(op_name, device_type):
        return None
    return str(NATIVE_IMPORT_ERROR or f'dat::{op_name} has no {device_type} kernel in this build')


@dataclass(frozen=True)
class Refusal:
    """Why a fused kernel refuses a call: the message of its C++ check, and the exception that check raises
    (TypeError for a dtype, ValueError for a size)."""
    message: str
    error: type = ValueError


def resolve_impl(impl, op_name: str, device_type: str, refusal: Callable[[], Optional[Refusal]]) -> str:
    """Return 'fused' or 'reference' for a call.

    `impl` (a model kwarg or a call argument) wins over the `DAT_ATTN_IMPL` environment variable. 'auto' takes
    the fused op when it is built for the device and its kernel takes the call; `refusal()`, the op's
    `fused_refusal` for this call, says why it would not, and is asked only when the op is built. Each call
    that 'auto' sends to the reference logs why, at debug level on the `dat.ops` logger. Asking for 'fused'
    where it is not built or where its kernel refuses the call is an error (the kernel's own one) rather than a
    silent fallback, so benchmarks and tests measure what they name.
    """
    choice = (impl or os.environ.get(IMPL_ENV) or 'auto').lower()
    if choice not in IMPLS:
        raise ValueError(f'attention impl must be one of {IMPLS}, got {choice!r} (from argument or ${IMPL_ENV})')
    if choice == 'reference':
        return choice
    reason = unavailable_reason(op_name, device_type)
    if reason is not None:
        if choice == 'fused':
            raise RuntimeError(f'fused dat::{op_name} requested but not available: {reason}')
    else:
        refused = refusal()
        if refused is None:
            return 'fused'
        if choice == 'fused':
            raise refused.error(refused.message)
        reason = refused.message
    # Logging inside a torch.compile graph would break it; the choice is made once, when it is traced.
    if not torch.compiler.is_compiling():
        LOGGER.debug('auto takes the reference for dat::%s on %s: %s', op_name, device_type, reason)
    return 'reference'


def read_kernel_limits(op_name: str, namespace: str = 'dat') -> Dict[str, dict]:
    """The limits that the kernels of `<namespace>::<op_name>` export, per device type they are built for: the
    JSON of `<namespace>::<op_name>_<device type>_limits()`. Empty where the extension is not built."""
    if namespace == 'dat' and NATIVE_IMPORT_ERROR is not None:
        return {}
    ops = getattr(torch.ops, namespace)
    return {device_type: json.loads(getattr(ops, f'{op_name}_{device_type}_limits')())
            for device_type in KERNEL_DEVICE_TYPES if hasattr(ops, f'{op_name}_{device_type}_limits')}


def check_input(op: str, condition, message: Callable[[], str], kind=torch._check_value) -> None:
    """One input check of `op`: raises ValueError (`kind` torch._check_value) or TypeError (torch._check_type)
    with f'{op}: {message()}' unless `condition`. A plain bool is tested in Python, which torch.compile traces
    without a graph break (Dynamo cannot trace torch._check with a message closure); a symbolic one (fake
    tensors with dynamic shapes) goes through `kind`, which records it as a guard."""
    if not isinstance(condition, bool):
        kind(condition, lambda: f'{op}: {message()}')
    elif not condition:
        raise (TypeError if kind is torch._check_type else ValueError)(f'{op}: {message()}')


def autograd_will_run(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd will call the backward of an op taking `tensors` (None for an absent optional one)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a dtype without its module (float32), the name the kernels' limits and messages use."""
    return str(dtype).removeprefix('torch.')


def dtype_refusal(op: str, device_type: str, dtype: torch.dtype, limits: Optional[dict]) -> Optional[Refusal]:
    """The first check of every kernel (check_kernel_dtype in csrc/common/kernel_limits.h): its dtypes. Also
    refuses where the build exports no limits for the kernel (dat._C built before kernels exported them)."""
    if limits is None:
        return Refusal(f'{op}: this build of dat._C exports no limits for its {device_type} kernel; rebuild it',
                       RuntimeError)
    if dtype_name(dtype) in limits['dtypes']:
        return None
    return Refusal(f'{op}: the {device_type.upper()} kernel supports {", ".join(limits["dtypes"])}; '
                   f'got {dtype_name(dtype)}', TypeError)


def grid_refusal(op: str, items: int, items_per_block: int, what: str, max_blocks: int) -> Optional[Refusal]:
    """check_grid_blocks (csrc/common/kernel_limits.h): `items` in blocks of `items_per_block` must fit one
    launch's grid."""
    if -(-items // items_per_block) <= max_blocks:
        return None
    return Refusal(f'{op}: {items} {what} are more than one CUDA launch can cover')


@torch.compiler.assume_constant_result
def _shared_memory_per_block_optin(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin


def shared_memory_refusal(op: str, need: int, limits: dict, device: torch.device,
                          shared_memory_limit: Optional[int] = None) -> Optional[Refusal]:
    """check_shared_bytes (csrc/common/cuda_kernel.h): a block may use `need` bytes of dynamic shared memory up to
    the default every GPU grants, and beyond it up to what the device lets it opt in to: `shared_memory_limit`,
    by default `device`'s (the current CUDA device where it has no index)."""
    if need <= limits['default_shared_bytes']:
        return None
    if shared_memory_limit is None:
        shared_memory_limit = _shared_memory_per_block_optin(
            torch.cuda.current_device() if device.index is None else device.index)
    if need <= shared_memory_limit:
        return None
    return Refusal(f'{op}: needs {need} bytes of shared memory per block on this GPU, which allows '
                   f'{shared_memory_limit}')


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
