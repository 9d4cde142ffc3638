"""timm's own model test suite (tests/test_models.py of the installed timm's source release) run on our models.

timm parametrises its generic tests over `timm.list_models(...)`, some of them filtered by the module a model
lives in, so a third-party family never appears in them. This file imports that suite and calls every generic
test (one parametrised over the model registry, not over a fixed list of timm models) with each `dat` model.
The suite is not part of this repository: `scripts/dev.sh` downloads the source release matching the
installed timm and points DAT_TIMM_TESTS at its `tests/` folder.
"""
import importlib.util
import itertools
import os
import sys
from pathlib import Path

import pytest
import timm

SUITE = Path(os.environ.get('DAT_TIMM_TESTS', Path(__file__).resolve().parents[1] / '.cache' / f'timm-{timm.__version__}' / 'tests'))
# a test is generic when its models come from the registry (timm's standard resnet50 among them); the
# pretrained-weight tests download from the Hub and are replaced by our offline download tests
STANDARD_MODEL = 'resnet50'
NEEDS_NETWORK = ('test_model_load_pretrained', 'test_model_features_pretrained')
FIXTURE_VALUES = {'cfg_device': 'meta'}


def _load_suite():
    path = SUITE / 'test_models.py'
    if not path.is_file():
        return None
    sys.path.insert(0, str(SUITE))
    spec = importlib.util.spec_from_file_location('timm_suite_test_models', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cases(module):
    for name in sorted(vars(module)):
        test = getattr(module, name)
        if not name.startswith('test_') or not callable(test):
            continue
        params = [mark for mark in getattr(test, 'pytestmark', []) if mark.name == 'parametrize']
        by_name = {mark.args[0]: list(mark.args[1]) for mark in params}
        registry = by_name.get('model_name', [])
        if STANDARD_MODEL not in {model.split('.')[0] for model in registry} or name in NEEDS_NETWORK:
            continue
        ours = timm.list_models('dat_*', include_tags=any('.' in model for model in registry))
        others = {key: values for key, values in by_name.items() if key != 'model_name'}
        for combo in itertools.product(*others.values()):
            for model_name in ours:
                kwargs = dict(zip(others, combo), model_name=model_name)
                yield pytest.param(name, kwargs, id=f'{name}[{model_name}' + ''.join(f'-{v}' for v in combo) + ']')


SUITE_MODULE = _load_suite()
CASES = list(_cases(SUITE_MODULE)) if SUITE_MODULE else []


@pytest.mark.skipif(SUITE_MODULE is None, reason=f'timm test suite not found at {SUITE}; scripts/dev.sh test '
                                                 'downloads it (set DAT_TIMM_TESTS to use another copy)')
def test_suite_covers_our_models():
    covered = {case.values[0] for case in CASES}
    for required in ('test_model_forward', 'test_model_backward', 'test_model_default_cfgs',
                     'test_model_forward_torchscript', 'test_model_forward_features',
                     'test_model_forward_intermediates', 'test_model_forward_fx'):
        assert required in covered, f'{required} was not found in the timm suite'


@pytest.mark.parametrize('test_name,kwargs', CASES or [pytest.param(None, None, marks=pytest.mark.skip('no suite'))])
def test_timm_suite(test_name, kwargs):
    test = getattr(SUITE_MODULE, test_name)
    wanted = set(test.__code__.co_varnames[:test.__code__.co_argcount])
    call = {key: value for key, value in {**FIXTURE_VALUES, **kwargs}.items() if key in wanted}
    test(**call)
