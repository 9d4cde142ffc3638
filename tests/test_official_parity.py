"""The models against outputs of the official LeapLabTHU/DAT code, in two tiers of reference data.

* Compact goldens, committed in tests/data/official/ (narrow DAT and DAT++ models at 64x64, random weights; the
  README there says how they were made): these parity tests run on every checkout.
* The workspace's shared fixtures (`../shared/fixtures/official/`, see conftest.FIXTURES), when present: narrow
  models at the 224x224 geometry, and the official layouts of every released architecture.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

from dat import load_official
from dat.checkpoint import checkpoint_filter_fn
from dat.layers.deform_attn import DeformableAttention
from dat.models import MODEL_CONFIGS
from dat.official import official_model_section
from conftest import official_fixture

COMPACT_GOLDENS = Path(__file__).resolve().parent / 'data' / 'official'
DAT_ARCHS = {'dat_tiny_224': 'dat_tiny', 'dat_small_224': 'dat_small', 'dat_base_224': 'dat_base',
             'dat_base_384': 'dat_base_384', 'dat_pp_tiny_224': 'dat_pp_tiny', 'dat_pp_small_224': 'dat_pp_small',
             'dat_pp_base_224': 'dat_pp_base', 'dat_pp_base_384': 'dat_pp_base.in1k_384'}
# Bound on max|diff| as a fraction of the golden tensor's largest value. The goldens are fp32: run in fp64, the
# official code moves by up to 3e-7 (logits, |x| <= 1.2) and 2.4e-6 (stage outputs, |x| <= 4.8), about 5e-7 of
# the largest value (tests/data/official/README.md), and an fp64 run cannot come closer to an fp32 golden than
# that rounding. This package was measured within 1.0e-6 of it, in fp32 and fp64 alike; 1e-5 leaves a tenfold
# margin and stays far below what one wrong grid, offset or shift rule gave in the cases tried (3e-2 and more).
RELATIVE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Golden:
    """Inputs and outputs of the official code with random weights, stored in one safetensors file."""
    file: str
    committed: bool  # in tests/data/official (every checkout) or else in the workspace's shared fixtures
    size: int  # the input side, which suffixes the names of the stored tensors
    registered: str  # the timm variant whose fixed design choices (grids, offsets, stem, MLP) the model shares
    sizes: dict  # create_model arguments that give the variant the golden model's sizes; it has the rest

    def path(self) -> Path:
        return COMPACT_GOLDENS / self.file if self.committed else official_fixture(self.file)


GOLDENS = [
    Golden('dat_v1_compact.safetensors', True, 64, 'dat_tiny', dict(
        dims=(6, 12, 24, 48), depths=(2, 2, 4, 2), block_types=('LS', 'LS', 'LDLD', 'LD'), num_heads=(1, 2, 4, 8),
        offset_groups=(1, 1, 2, 4), window_size=(4, 4, 4, 2))),
    Golden('dat_pp_compact.safetensors', True, 64, 'dat_pp_tiny', dict(
        dims=(6, 12, 24, 48), depths=(2, 2, 2, 2), block_types=('ND', 'ND', 'ND', 'DD'), num_heads=(1, 2, 4, 8),
        offset_groups=(1, 1, 2, 4), key_strides=(4, 2, 1, 1), neighborhood_kernel=3)),
    Golden('dat_v1_mini_seed0.safetensors', False, 224, 'dat_tiny', dict(
        dims=(32, 64, 128, 256), depths=(2, 2, 4, 2), block_types=('LS', 'LS', 'LDLD', 'LD'), num_heads=(1, 2, 4, 8),
        offset_groups=(1, 1, 2, 4))),
    Golden('dat_pp_mini_seed0.safetensors', False, 224, 'dat_pp_tiny', dict(
        dims=(32, 64, 128, 256), depths=(2, 2, 2, 2), block_types=('ND', 'ND', 'ND', 'DD'), num_heads=(1, 2, 4, 8),
        offset_groups=(1, 1, 2, 4))),
]
GOLDEN_PARAMS = [pytest.param(golden, id=golden.file.split('.')[0]) for golden in GOLDENS]


def _read_golden(golden: Golden):
    """The official config (MODEL.DAT section), the official state_dict, and the other tensors by name without
    their size suffix: 'input', 'logits', 'stage0'..'stage3' and, for DAT, 'pos_stage{2,3}_first_dblock'."""
    handle = safe_open(str(golden.path()), 'pt')
    config = json.loads(handle.metadata()['config'])
    suffix = f'_{golden.size}'
    state_dict = {key[len('model.'):]: handle.get_tensor(key) for key in handle.keys() if key.startswith('model.')}
    tensors = {key[:-len(suffix)]: handle.get_tensor(key) for key in handle.keys() if key.endswith(suffix)}
    return config, state_dict, tensors


def _layouts():
    return json.loads(official_fixture('official_layouts.json').read_text())


def _through_load_official(golden, config, state_dict, attn_impl):
    return load_official(config, {'model': state_dict}, attn_impl=attn_impl)


def _through_timm(golden, config, state_dict, attn_impl):
    model = timm.create_model(golden.registered, num_classes=config['num_classes'], img_size=golden.size,
                              attn_impl=attn_impl, **golden.sizes)
    model.load_state_dict(checkpoint_filter_fn({'model': state_dict}, model), strict=True)
    return model.eval()


LOADERS = {'load_official': _through_load_official, 'timm': _through_timm}


def _outputs_as_stored(model, inputs, position_stages):
    """The model's logits, stage outputs and deformed positions of the first D block of each of
    `position_stages`, named as the golden files name the official code's."""
    positions = {}

    def record_positions(stage_index):
        def hook(module, args, output):  # returns None: the block's output is left as it is
            positions[stage_index] = module.sampling_positions(args[0])[0]
        return hook

    for stage_index in position_stages:
        first_deformable = next(block.attn for block in model.stages[stage_index].blocks
                                if isinstance(block.attn, DeformableAttention))
        first_deformable.register_forward_hook(record_positions(stage_index))
    with torch.no_grad():
        final, stages = model.forward_intermediates(inputs)
        outputs = {'logits': model.forward_head(final)}
    outputs.update({f'stage{i}': stage for i, stage in enumerate(stages)})
    outputs.update({f'pos_stage{i}_first_dblock': stage_positions for i, stage_positions in positions.items()})
    return outputs


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64], ids=['fp32', 'fp64'])
@pytest.mark.parametrize('attn_impl', [None, 'reference'], ids=['default_kernels', 'reference'])
@pytest.mark.parametrize('loader', LOADERS)
@pytest.mark.parametrize('golden', GOLDEN_PARAMS)
def test_parity_with_official_outputs(golden, loader, attn_impl, dtype):
    """Logits, stage outputs and (DAT) deformed positions of the official code, within the goldens' precision."""
    config, state_dict, expected = _read_golden(golden)
    model = LOADERS[loader](golden, config, state_dict, attn_impl).to(dtype)
    assert model.generation == MODEL_CONFIGS[golden.registered]['generation']
    position_stages = [int(name[len('pos_stage')]) for name in expected if name.startswith('pos_stage')]
    got = _outputs_as_stored(model, expected['input'].to(dtype), position_stages)
    assert {name: tensor.shape for name, tensor in got.items()} == \
        {name: tensor.shape for name, tensor in expected.items() if name != 'input'}
    too_far = []
    for name, tensor in got.items():
        error = (tensor.double() - expected[name].double()).abs().max().item()
        bound = RELATIVE_TOLERANCE * expected[name].abs().max().item()
        if error > bound:
            too_far.append(f'{name}: max|diff| {error:.1e} > {bound:.1e}')
    assert not too_far, '; '.join(too_far)


def _layout_signature(shapes) -> dict:
    """Each key with the block index of the per-block lists of its stage wildcarded ('stages.2.attns.*.rpe_table'),
    with the ranks of its tensors: the official code's layout, whatever the depths and widths."""
    signature = {}
    for key, shape in shapes.items():
        signature.setdefault(re.sub(r'^(stages\.\d+\.\w+)\.\d+\.', r'\1.*.', key), set()).add(len(shape))
    return signature


@pytest.mark.parametrize('golden', GOLDEN_PARAMS)
def test_golden_state_dict_has_the_official_layout(golden):
    """A golden's official state_dict is laid out as the released checkpoints of its family are."""
    official_name = next(name for name, registered in DAT_ARCHS.items() if registered == golden.registered)
    official_shapes = _layouts()[official_name]['state_dict']
    _, state_dict, _ = _read_golden(golden)
    assert _layout_signature({key: value.shape for key, value in state_dict.items()}) == \
        _layout_signature(official_shapes)


@pytest.mark.parametrize('official_name', sorted(DAT_ARCHS))
def test_official_layout_maps_one_to_one(official_name):
    """Every key of the released checkpoint maps onto the registered model, with the official parameter count."""
    layout = _layouts()[official_name]
    model = timm.create_model(DAT_ARCHS[official_name], device='meta')
    assert sum(p.numel() for p in model.parameters()) == layout['params']
    official = {key: torch.empty(shape, device='meta') for key, shape in layout['state_dict'].items()}
    converted = checkpoint_filter_fn({'model': official}, model)
    assert set(converted) == set(model.state_dict())
    assert {k: tuple(v.shape) for k, v in converted.items()} == \
        {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize('official_name', sorted(DAT_ARCHS))
def test_official_config_builds_registered_architecture(official_name):
    """load_official on the official config gives the same architecture as the timm registration."""
    layout = _layouts()[official_name]
    built = load_official({'MODEL': {'DAT': layout['official_config']}}, device='meta')
    assert built.generation == ('dat_pp' if official_name.startswith('dat_pp') else 'dat')
    registered = timm.create_model(DAT_ARCHS[official_name], device='meta')
    assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in registered.state_dict().items()}


def test_official_section_accepts_all_config_shapes(tmp_path):
    section = _layouts()['dat_tiny_224']['official_config']
    yaml_path = tmp_path / 'dat_tiny.yaml'
    import yaml
    yaml_path.write_text(yaml.safe_dump({'MODEL': {'TYPE': 'dat', 'DAT': section}}))
    for given in (yaml_path, str(yaml_path), {'MODEL': {'DAT': section}}, {'DAT': section}, section):
        assert official_model_section(given)['dims'] == section['dims']
