"""What the tests of the fused kernels' limits share.

Each limit is tested from both sides: the kernel (dat._C's CPU kernel, or a CUDA kernel on a GPU or emulated)
refuses a call just beyond it with exactly the refusal that the op's Python `fused_refusal` predicts, and
`fused_refusal` takes the call just inside it (which the kernel then runs, where that is cheap). `auto` takes
the reference for a refused call and logs why; `fused` raises the kernel's error.
"""
import logging

import pytest
import torch

from dat.ops import _extension
from dat.ops._extension import LOGGER, Refusal, resolve_impl

SHARED_OPTIN_ENV = 'DAT_EMULATED_SHARED_OPTIN_BYTES'
H100_SHARED_OPTIN = 227 * 1024
# The emulated device's opt-in shared memory in the shared-memory tests: less than a GPU's, so that calls of
# small sizes reach it, and more than the default 48 KB, so that the kernels opt in below it.
REDUCED_SHARED_OPTIN = 56000


def assert_kernel_refuses(call, refusal: Refusal) -> None:
    """`call`, a kernel's op, raises exactly `refusal`: its exception type and message."""
    assert refusal is not None, 'fused_refusal takes the call that the kernel is expected to refuse'
    with pytest.raises(refusal.error) as raised:
        call()
    assert str(raised.value) == refusal.message


def assert_auto_takes_reference(caplog, run, op_name: str, device_type: str, refusal: Refusal):
    """`run()`, a call with impl='auto', takes the reference and logs one debug line saying why; returns its
    result."""
    with caplog.at_level(logging.DEBUG, logger=LOGGER.name):
        result = run()
    logged = [record.getMessage() for record in caplog.records if record.name == LOGGER.name]
    assert logged == [f'auto takes the reference for dat::{op_name} on {device_type}: {refusal.message}']
    return result


def assert_cuda_choice(monkeypatch, caplog, op_name: str, refusal: Refusal) -> None:
    """Where the op's CUDA kernel is built (pretended when it is not), `resolve_impl` sends a call that the kernel
    refuses to the reference under 'auto', logging why, and raises the kernel's error under 'fused'."""
    monkeypatch.setattr(_extension, 'native_op_available', lambda op, device_type: True)
    choice = assert_auto_takes_reference(caplog, lambda: resolve_impl('auto', op_name, 'cuda', lambda: refusal),
                                         op_name, 'cuda', refusal)
    assert choice == 'reference'
    with pytest.raises(refusal.error) as raised:
        resolve_impl('fused', op_name, 'cuda', lambda: refusal)
    assert str(raised.value) == refusal.message


def _device_shared_memory_limit(target, monkeypatch, emulated_bytes: int) -> int:
    """The opt-in shared memory per block of `target`'s device: a GPU's own, or `emulated_bytes`, which the
    emulated device is given."""
    if target.name == 'cuda':
        return torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin
    monkeypatch.setenv(SHARED_OPTIN_ENV, str(emulated_bytes))
    return emulated_bytes


@pytest.fixture
def shared_memory_limit(cuda_target, monkeypatch) -> int:
    """The opt-in shared memory per block of `cuda_target`'s device; an H100's when emulated."""
    return _device_shared_memory_limit(cuda_target, monkeypatch, H100_SHARED_OPTIN)


@pytest.fixture
def reduced_shared_memory_limit(cuda_target, monkeypatch) -> int:
    """As `shared_memory_limit`, but REDUCED_SHARED_OPTIN when emulated, where small calls reach it."""
    return _device_shared_memory_limit(cuda_target, monkeypatch, REDUCED_SHARED_OPTIN)
