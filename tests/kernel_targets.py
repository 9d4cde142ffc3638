"""Where the tests run dat's CUDA kernels: on a GPU, and emulated on the CPU.

The emulated tier compiles the very same `csrc/*/cuda/*.cu` sources as C++ against AMD's HIP-CPU
(`tests/emulated/hip_cpu_prelude.h` maps the CUDA spellings), registers them as the `dat_emulated::` ops
on CPU tensors, and gives them the fake kernels and autograd of the real ops. Every CUDA test runs on
both targets; test ids name the target, so `pytest tests -k emulated` runs exactly the emulated tier.

HIP-CPU is found at $DAT_HIPCPU_DIR, else at ../shared/third_party/hip-cpu beside the checkout; TBB
(Debian's libtbb-dev) must be installed. Where either is missing the tier skips with that reason, unless
$DAT_REQUIRE_EMULATION is 1 (CI sets it), which makes that a failure; where both are there, a build
failure is an error, never a skip.
"""
import functools
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dat.ops import register_fused_ops
from dat.ops._extension import native_op_available, read_kernel_limits

REPO = Path(__file__).resolve().parents[1]
EMULATION_DIR = REPO / 'tests' / 'emulated'
EMULATED_NAMESPACE = 'dat_emulated'
TBB_HEADER_CANDIDATES = ('tbb/tbb.h', 'oneapi/tbb.h')


def hipcpu_dir() -> Path:
    return Path(os.environ.get('DAT_HIPCPU_DIR', REPO.parent / 'shared' / 'third_party' / 'hip-cpu'))


def emulation_unavailable_reason():
    """Why the emulated tier cannot be built on this machine, or None when it can."""
    hip_runtime = hipcpu_dir() / 'include' / 'hip' / 'hip_runtime.h'
    if not hip_runtime.is_file():
        return f'HIP-CPU not found ({hip_runtime} is absent; set DAT_HIPCPU_DIR)'
    include_dirs = [Path('/usr/include'), Path('/usr/local/include'), Path(sysconfig.get_paths()['include'])]
    if not any((d / header).is_file() for d in include_dirs for header in TBB_HEADER_CANDIDATES):
        return 'TBB headers not found (install libtbb-dev); HIP-CPU needs them'
    return None


def _write_if_changed(path: Path, text: str) -> None:
    # An unchanged file keeps its timestamp, so ninja does not rebuild it.
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


@functools.lru_cache(maxsize=None)
def load_emulated_ops() -> str:
    """Builds (incrementally, under .cache/) and loads the emulated library; returns its op namespace."""
    from torch.utils import cpp_extension

    build_dir = REPO / '.cache' / 'emulated-cuda'
    wrapper_dir = build_dir / 'sources'
    wrapper_dir.mkdir(parents=True, exist_ok=True)
    csrc = REPO / 'csrc'
    wrappers = []
    # g++ compiles a file named .cu only through an #include; one wrapper per kernel file.
    for kernel_source in sorted(csrc.glob('*/cuda/*.cu')):
        wrapper = wrapper_dir / f'{kernel_source.stem}.cpp'
        _write_if_changed(wrapper, f'#include "{kernel_source.relative_to(csrc).as_posix()}"\n')
        wrappers.append(str(wrapper))
    schemas = [str(p) for p in sorted(csrc.glob('*/*.cpp'))]
    cpp_extension.load(
        name='dat_emulated',
        sources=schemas + wrappers,
        extra_include_paths=[str(EMULATION_DIR / 'include'), str(hipcpu_dir() / 'include'), str(csrc)],
        extra_cflags=['-std=c++20', '-O1', '-include', str(EMULATION_DIR / 'hip_cpu_prelude.h'),
                      f'-DDAT_OP_NAMESPACE={EMULATED_NAMESPACE}'],
        extra_ldflags=['-ltbb'],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    register_fused_ops(EMULATED_NAMESPACE)
    return EMULATED_NAMESPACE


@dataclass(frozen=True)
class KernelTarget:
    """A place the CUDA kernels run: `device` holds the tensors, `namespace` names the ops."""
    name: str
    device: str
    namespace: str

    def op(self, name: str):
        return getattr(getattr(torch.ops, self.namespace), name)

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    def limits(self, op_name: str) -> dict:
        """What the CUDA kernel of `op_name` exports about the calls it takes (the `limits` of its `fused_refusal`)."""
        return read_kernel_limits(op_name, self.namespace)['cuda']


def _cuda_target() -> KernelTarget:
    if not torch.cuda.is_available():
        pytest.skip('needs a CUDA device')
    if not native_op_available('deform_attn', 'cuda'):
        pytest.skip('dat._C is not built with CUDA kernels')
    return KernelTarget('cuda', 'cuda', 'dat')


def _emulated_target() -> KernelTarget:
    reason = emulation_unavailable_reason()
    if reason is not None:
        if os.environ.get('DAT_REQUIRE_EMULATION') == '1':
            pytest.fail(f'the emulated CUDA tier is required here (DAT_REQUIRE_EMULATION=1): {reason}')
        pytest.skip(reason)
    return KernelTarget('emulated', 'cpu', load_emulated_ops())


@pytest.fixture(params=['cuda', 'emulated'])
def cuda_target(request) -> KernelTarget:
    """Each CUDA kernel test, once on a GPU and once emulated on the CPU."""
    return _cuda_target() if request.param == 'cuda' else _emulated_target()
