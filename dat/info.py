"""`python -m dat info`: what this installation runs, and with which kernels.

Versions of dat, torch and timm; the CUDA devices torch sees; whether the native extension `dat._C` is built,
how (the configuration the binary recorded: torch, compiler, CUDA version and architectures, CPU instruction
sets) and for which devices; and which kernel `auto` (`DAT_ATTN_IMPL`) takes for each op, device and dtype here.
"""
import argparse
import importlib.util
import os
import platform
import re
import sys
from typing import List, Optional, Sequence, Tuple

import timm
import torch

import dat
from dat.ops import _extension, deform_attn, ms_deform_attn, neighborhood_attn

DEVICE_TYPES = ('cpu', 'cuda')
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# each names its op (OP = 'dat::<name>') and holds the limits its fused kernels export (KERNEL_LIMITS)
OP_MODULES = (deform_attn, neighborhood_attn, ms_deform_attn)


def auto_choice(op_module, device_type: str, dtype: torch.dtype) -> str:
    """'fused' or 'reference': what `impl='auto'` runs for a `device_type` tensor of `dtype` in this process, at
    sizes within the kernels' other limits."""
    op_name = op_module.OP.split('::', 1)[1]
    return _extension.resolve_impl('auto', op_name, device_type, lambda: _extension.dtype_refusal(
        op_module.OP, device_type, dtype, op_module.KERNEL_LIMITS.get(device_type)))


def has_code_for(cuda_arch_list: str, capability: Tuple[int, int]) -> Optional[bool]:
    """Whether a build for `cuda_arch_list` (TORCH_CUDA_ARCH_LIST) has code a GPU of `capability` runs: a binary of
    the same major and a lower or equal minor version, or PTX (compiled when loaded) of an older architecture.
    None when the list names an architecture this cannot read (e.g. 'Hopper')."""
    has_code = False
    for entry in re.split(r'[;\s]+', cuda_arch_list.strip()):
        match = re.fullmatch(r'(\d+)\.(\d+)(a?)(\+PTX)?', entry)
        if match is None:
            return None
        arch = (int(match.group(1)), int(match.group(2)))
        # 'a' binaries (sm_90a) run on exactly their own architecture
        binary_runs = arch == capability if match.group(3) else arch[0] == capability[0] and arch <= capability
        has_code |= binary_runs or bool(match.group(4)) and arch <= capability
    return has_code


def _extension_lines() -> List[str]:
    error = _extension.NATIVE_IMPORT_ERROR
    if error is not None:
        spec = importlib.util.find_spec('dat._C')
        how_to = ('build it with `pip install --no-build-isolation .` (or -e .) on a machine with a C++ compiler, '
                  'and nvcc for the CUDA kernels; see the README, Install')
        if spec is None:
            return [f'native extension dat._C: not built ({error}): every op runs its pure-PyTorch reference',
                    f'  {how_to}']
        return [f'native extension dat._C: present ({spec.origin}) but does not load: {error}',
                '  every op runs its pure-PyTorch reference; rebuild it against this torch: ' + how_to]
    from dat import _C
    lines = [f'native extension dat._C: built ({_C.__file__})']
    config = getattr(_C, 'build_config', None)
    if config is None:
        return lines + ['  built before it recorded its configuration: rebuild it to see how it was built']
    lines.append(f"  built against torch {config['torch_version']} with {config['compiler']}")
    if config['torch_version'] != torch.__version__:
        lines.append(f"  WARNING: torch is now {torch.__version__}: rebuild dat._C against it")
    if config['cuda_version'] is None:
        lines.append('  CUDA kernels: not built (no nvcc, or DAT_BUILD_CUDA=0, at build time)')
    else:
        lines.append(f"  CUDA kernels: CUDA {config['cuda_version']}, architectures {config['cuda_arch_list']} "
                     '(TORCH_CUDA_ARCH_LIST at build time)')
    lines.append(f"  CPU kernels: compiled for {config['cpu_isas']}; this CPU runs the {config['cpu_isa_in_use']} "
                 'ones')
    return lines


def _device_lines(cuda_arch_list: Optional[str]) -> List[str]:
    if not torch.cuda.is_available():
        return ['CUDA devices: none visible']
    lines = ['CUDA devices:']
    for index in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(index)
        line = f'  cuda:{index} {torch.cuda.get_device_name(index)}, compute capability {capability[0]}.{capability[1]}'
        if cuda_arch_list is not None:
            runs = has_code_for(cuda_arch_list, capability)
            line += {True: '; dat._C has code for it', False: '; dat._C has NO code for it (rebuild with '
                     f'TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]})', None: ''}[runs]
        lines.append(line)
    return lines


def _choice_lines() -> List[str]:
    dtype_names = [str(dtype).replace('torch.', '') for dtype in DTYPES]
    rows = [['op', 'device', 'fused kernels', *dtype_names]]
    for op_module in OP_MODULES:
        op_name = op_module.OP.split('::', 1)[1]
        for device_type in DEVICE_TYPES:
            built = 'built' if _extension.native_op_available(op_name, device_type) else 'not built'
            rows.append([op_module.OP, device_type, built,
                         *(auto_choice(op_module, device_type, dtype) for dtype in DTYPES)])
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    table = ['  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    env = os.environ.get(_extension.IMPL_ENV)
    notes = [f'${_extension.IMPL_ENV}: ' + (f'{env} (calls that do not pass impl= take it instead of auto)' if env
                                             else 'unset (auto)')]
    if not torch.cuda.is_available():
        notes.append('no CUDA device is visible: the cuda rows say what a CUDA tensor would run')
    return ['kernel that impl="auto" runs, by op, device and dtype:', *table, *notes]


def report() -> str:
    config = getattr(sys.modules.get('dat._C'), 'build_config', None) or {}
    lines = [
        f'dat {dat.__version__} ({os.path.dirname(dat.__file__)})',
        f'python {platform.python_version()}, {platform.platform()}',
        f'torch {torch.__version__} (' + (f'CUDA {torch.version.cuda} build' if torch.version.cuda else 'CPU build')
        + f'), timm {timm.__version__}',
        *_device_lines(config.get('cuda_arch_list')),
        *_extension_lines(),
        '',
        *_choice_lines(),
    ]
    return '\n'.join(lines)


def main(argv: Sequence[str] = ()) -> None:
    argparse.ArgumentParser(prog='python -m dat info', description=__doc__.split('\n')[0]).parse_args(argv)
    print(report())
