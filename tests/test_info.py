"""What an installation tells its user: `python -m dat info`, the warning of an import without the native
extension, and the top-level names the README uses."""
import importlib.util
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dat
import dat.official
from dat.__main__ import main
from dat.info import DTYPES, OP_MODULES, has_code_for
from dat.ops import _extension

REPO = Path(__file__).resolve().parents[1]
UNAVAILABLE = 'the native kernels (dat._C) are unavailable'


def choice_table(out: str) -> dict:
    """{(op, device): (fused kernels built?, [auto's choice per dtype of DTYPES])} from the report's table."""
    table = {}
    for line in out.splitlines():
        match = re.match(r'(dat::\w+)\s+(cpu|cuda)\s+(built|not built)\s+(.*)$', line)
        if match:
            table[match.group(1), match.group(2)] = (match.group(3) == 'built', match.group(4).split())
    return table


def expected_choices(op_module, device_type: str, native: bool) -> list:
    """auto's choice from the dtypes the kernel itself exports (dat::<op>_<device>_limits)."""
    built = native and _extension.native_op_available(op_module.OP.split('::')[1], device_type)
    dtypes = op_module.KERNEL_LIMITS[device_type]['dtypes'] if built else ()
    return ['fused' if _extension.dtype_name(dtype) in dtypes else 'reference' for dtype in DTYPES]


def test_info_reports_versions_the_extension_and_autos_choice_per_op(capsys, monkeypatch):
    monkeypatch.delenv(_extension.IMPL_ENV, raising=False)
    main(['info'])
    out = capsys.readouterr().out
    assert f'torch {torch.__version__}' in out and f'dat {dat.__version__}' in out and 'timm ' in out
    native = _extension.NATIVE_IMPORT_ERROR is None
    table = choice_table(out)
    assert set(table) == {(module.OP, device) for module in OP_MODULES for device in ('cpu', 'cuda')}
    for module in OP_MODULES:
        for device in ('cpu', 'cuda'):
            assert table[module.OP, device][1] == expected_choices(module, device, native), (module.OP, device)
    if not native:
        pytest.skip(f'dat._C is not built here ({_extension.NATIVE_IMPORT_ERROR}): the subprocess test covers that')
    # the binary's own record of how it was built
    assert f'built against torch {torch.__version__} with ' in out
    config = sys.modules['dat._C'].build_config
    assert ('CUDA kernels: not built' in out) == (config['cuda_version'] is None)
    assert all(table[module.OP, 'cpu'][0] for module in OP_MODULES)
    assert all(table[module.OP, 'cuda'][0] == (config['cuda_version'] is not None) for module in OP_MODULES)


def test_without_the_extension_info_says_so_and_the_import_warns_once():
    # a fresh interpreter in which `import dat._C` fails, as in an install that did not build it; the model
    # runs three times, so any warning per call would show
    script = ("import sys; sys.modules['dat._C'] = None\n"
              "import timm, torch, dat\n"
              "model = timm.create_model('dat_nano').eval()\n"
              "for _ in range(3): model(torch.zeros(1, 3, 56, 56))\n"
              "from dat.__main__ import main; main(['info'])\n")
    env = {name: value for name, value in os.environ.items() if name != _extension.IMPL_ENV}
    result = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(UNAVAILABLE) == 1, result.stderr
    assert 'native extension dat._C: not built' in result.stdout and '--no-build-isolation' in result.stdout
    table = choice_table(result.stdout)
    assert len(table) == 2 * len(OP_MODULES)
    assert all(not built and choices == ['reference'] * len(DTYPES) for built, choices in table.values())


def test_the_import_warning_is_logged(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, 'dat._C', None)
    with caplog.at_level(logging.WARNING, logger=_extension.LOGGER.name):
        error = _extension.import_native_extension()
    assert isinstance(error, ImportError)
    [record] = caplog.records
    assert record.levelno == logging.WARNING and UNAVAILABLE in record.getMessage()
    assert 'python -m dat info' in record.getMessage()


@pytest.mark.parametrize('arch_list, capability, expected', [
    ('8.0;9.0', (9, 0), True),
    ('8.0;9.0', (8, 6), True),        # an sm_80 binary runs on sm_86
    ('8.0;9.0', (7, 5), False),
    ('8.0;9.0', (10, 0), False),      # no binary of that major version, no PTX
    ('8.0;9.0+PTX', (10, 0), True),   # PTX, compiled when loaded
    ('9.0a', (9, 0), True),
    ('8.0 9.0a', (10, 0), False),     # 'a' binaries run on their own architecture only
    ('Hopper', (9, 0), None),
])
def test_which_gpus_a_build_has_code_for(arch_list, capability, expected):
    assert has_code_for(arch_list, capability) is expected


def test_top_level_names():
    assert dat.load_official is dat.official.load_official
    readme = (REPO / 'README.md').read_text(encoding='utf-8')
    names = set(re.findall(r'(?<![\w/.])dat\.([A-Za-z]\w*)', readme))
    assert 'load_official' in names
    missing = [name for name in names if not hasattr(dat, name) and importlib.util.find_spec(f'dat.{name}') is None]
    assert not missing, f'the README uses dat.{missing}, which do not exist'
