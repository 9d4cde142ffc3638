"""The models against data produced by the official LeapLabTHU/DAT code (see shared/fixtures/official/README.md)."""
import json

import pytest
import torch
from safetensors import safe_open

from dat.checkpoint import checkpoint_filter_fn
from dat.official import detect_generation, load_official, official_model_section
from conftest import official_fixture

DAT_ARCHS = {'dat_tiny_224': 'dat_tiny', 'dat_small_224': 'dat_small', 'dat_base_224': 'dat_base',
             'dat_base_384': 'dat_base_384', 'dat_pp_tiny_224': 'dat_pp_tiny', 'dat_pp_small_224': 'dat_pp_small',
             'dat_pp_base_224': 'dat_pp_base', 'dat_pp_base_384': 'dat_pp_base.in1k_384'}


def _load_fixture(name):
    handle = safe_open(str(official_fixture(name)), 'pt')
    config = json.loads(handle.metadata()['config'])
    tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    state_dict = {key[len('model.'):]: value for key, value in tensors.items() if key.startswith('model.')}
    return config, state_dict, tensors


def _layouts():
    return json.loads(official_fixture('official_layouts.json').read_text())


@pytest.mark.parametrize('fixture,generation,stage_tolerance', [
    ('dat_v1_mini_seed0.safetensors', 'dat', 1e-5),
    # the deep DAT++ stages carry larger magnitudes (see the fixture README)
    ('dat_pp_mini_seed0.safetensors', 'dat_pp', 1e-4),
])
def test_fixture_logits_and_stages(fixture, generation, stage_tolerance):
    config, state_dict, tensors = _load_fixture(fixture)
    assert detect_generation(config) == generation
    model = load_official(config, {'model': state_dict})
    with torch.no_grad():
        final, stages = model.forward_intermediates(tensors['input_224'])
        logits = model.forward_head(final)
    torch.testing.assert_close(logits, tensors['logits_224'], atol=1e-5, rtol=0)
    for i, stage in enumerate(stages):
        torch.testing.assert_close(stage, tensors[f'stage{i}_224'], atol=stage_tolerance, rtol=0)


def test_dat_fixture_deformed_positions():
    config, state_dict, tensors = _load_fixture('dat_v1_mini_seed0.safetensors')
    model = load_official(config, {'model': state_dict})
    captured = {}

    def capture(stage_index):
        def hook(module, inputs, output):
            captured.setdefault(stage_index, module.sampling_positions(inputs[0])[0])
        return hook

    for stage_index in (2, 3):
        first_deformable = next(block.attn for block in model.stages[stage_index].blocks
                                if type(block.attn).__name__ == 'DeformableAttention')
        first_deformable.register_forward_hook(capture(stage_index))
    with torch.no_grad():
        model(tensors['input_224'])
    for stage_index in (2, 3):
        torch.testing.assert_close(captured[stage_index], tensors[f'pos_stage{stage_index}_first_dblock_224'],
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize('official_name', sorted(DAT_ARCHS))
def test_official_layout_maps_one_to_one(official_name):
    """Every key of the released checkpoint maps onto the registered model, with the official parameter count."""
    import timm
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
    import timm
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
