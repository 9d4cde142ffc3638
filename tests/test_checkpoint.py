"""Reading checkpoints safely, converting official layouts, and refusing checkpoints that do not fit."""
import os
import sys
import types

import pytest
import timm
import torch
from safetensors.torch import save_file

from dat.checkpoint import CheckpointError, checkpoint_filter_fn, load_checkpoint_file
from dat.official import load_official

NARROW = dict(dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), offset_groups=(1, 1, 2, 4))
NARROW_OFFICIAL = {'img_size': 224, 'dim_stem': 16, 'dims': [16, 32, 64, 128], 'depths': [2, 2, 6, 2],
                   'stage_spec': [['L', 'S'], ['L', 'S'], ['L', 'D', 'L', 'D', 'L', 'D'], ['L', 'D']],
                   'heads': [1, 2, 4, 8], 'groups': [-1, -1, 2, 4], 'use_pes': [False, False, True, True],
                   'strides': [-1, -1, 1, 1], 'offset_range_factor': [-1, -1, 2, 2], 'window_sizes': [7] * 4}


def _official_mini():
    """The official-layout state dict and config of the narrow DAT model in the shared fixtures."""
    import json
    from safetensors import safe_open
    from conftest import official_fixture
    handle = safe_open(str(official_fixture('dat_v1_mini_seed0.safetensors')), 'pt')
    state_dict = {key[len('model.'):]: handle.get_tensor(key) for key in handle.keys() if key.startswith('model.')}
    return json.loads(handle.metadata()['config']), state_dict


@pytest.fixture
def narrow():
    return timm.create_model('dat_tiny', **NARROW).eval()


def test_safetensors_and_bare_and_prefixed_state_dicts_load(tmp_path, narrow):
    state_dict = narrow.state_dict()
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp_path / 'w.safetensors'))
    loaded = load_checkpoint_file(tmp_path / 'w.safetensors')
    for wrapped in (loaded, {'model': loaded}, {'state_dict': {f'module.{k}': v for k, v in loaded.items()}}):
        converted = checkpoint_filter_fn(wrapped, narrow)
        assert all(torch.equal(converted[k], state_dict[k]) for k in state_dict)


def test_extra_pickled_objects_become_inert_placeholders(tmp_path, narrow, monkeypatch):
    """Official training checkpoints carry a yacs config object; it is skipped, never imported or run."""
    config_module = types.ModuleType('yacs_like_config')

    class CfgNode(dict):
        def __setstate__(self, state):
            raise AssertionError('the foreign class must never run')

    CfgNode.__module__ = config_module.__name__
    CfgNode.__qualname__ = 'CfgNode'
    config_module.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, config_module.__name__, config_module)
    node = CfgNode(MODEL={'TYPE': 'dat'})
    node.__dict__['frozen'] = True
    path = tmp_path / 'official.pth'
    torch.save({'model': narrow.state_dict(), 'config': node, 'epoch': 300}, path)
    monkeypatch.delitem(sys.modules, config_module.__name__)
    checkpoint = load_checkpoint_file(path)
    assert torch.equal(checkpoint['model']['stem.conv.weight'], narrow.state_dict()['stem.conv.weight'])
    assert checkpoint['epoch'] == 300 and type(checkpoint['config']).__name__ == '_InertObject'


def test_code_in_a_checkpoint_is_never_run(tmp_path, narrow):
    marker = tmp_path / 'executed'

    class Exploit:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)

    path = tmp_path / 'evil.pth'
    torch.save({'model': narrow.state_dict(), 'config': Exploit()}, path)
    checkpoint = load_checkpoint_file(path)
    assert not marker.exists()
    assert type(checkpoint['config']).__name__ == '_InertObject'
    assert torch.equal(checkpoint['model']['stem.conv.weight'], narrow.state_dict()['stem.conv.weight'])


def test_truncated_and_corrupt_files_are_named(tmp_path, narrow):
    path = tmp_path / 'w.pth'
    torch.save({'model': narrow.state_dict()}, path)
    (tmp_path / 'cut.pth').write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match='cut.pth.*truncated'):
        load_checkpoint_file(tmp_path / 'cut.pth')
    (tmp_path / 'bad.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1')
    with pytest.raises(CheckpointError, match='bad.safetensors'):
        load_checkpoint_file(tmp_path / 'bad.safetensors')
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        load_checkpoint_file(tmp_path / 'missing.pth')


def test_checkpoint_of_another_architecture_is_refused(narrow):
    other = timm.create_model('dat_tiny', dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), offset_groups=(1, 1, 2, 4))
    with pytest.raises(CheckpointError, match='shape mismatches'):
        checkpoint_filter_fn(other.state_dict(), narrow)
    deeper = timm.create_model('dat_small', **NARROW)
    with pytest.raises(CheckpointError, match='unexpected keys.*stages.2.blocks.6'):
        checkpoint_filter_fn(deeper.state_dict(), narrow)
    with pytest.raises(CheckpointError, match='holds no tensors'):
        checkpoint_filter_fn({'model': {}}, narrow)


def test_unknown_official_keys_are_named():
    config, official = _official_mini()
    official['stages.2.attns.1.mystery.weight'] = torch.zeros(1)
    with pytest.raises(CheckpointError, match='mystery'):
        load_official(config, {'model': official})


def test_official_tables_are_resampled_for_another_training_size():
    config, official = _official_mini()
    model_224 = load_official(config, {'model': official})
    model_384 = load_official(dict(config, img_size=384), {'model': official})
    table_224 = model_224.stages[3].blocks[1].attn.rpe_table.detach()
    table_384 = model_384.stages[3].blocks[1].attn.rpe_table.detach()
    assert table_224.shape == (8, 13, 13) and table_384.shape == (8, 23, 23)
    # bicubic resampling of an odd grid to an odd grid keeps the centre (zero displacement) value
    torch.testing.assert_close(table_384[:, 11, 11], table_224[:, 6, 6], atol=1e-5, rtol=1e-5)
    window_224 = model_224.stages[0].blocks[0].attn.relative_position_bias_table.detach()
    model_w12 = load_official(dict(config, window_sizes=[12] * 4), {'model': official})
    window_12 = model_w12.stages[0].blocks[0].attn.relative_position_bias_table.detach()
    assert window_12.shape == (23 * 23, 1)
    torch.testing.assert_close(window_12[11 * 23 + 11], window_224[6 * 13 + 6], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('change,message', [
    ({'stage_spec': [['L', 'S'], ['L', 'P'], ['L', 'D', 'L', 'D', 'L', 'D'], ['L', 'D']]}, "block letters \\['P'\\]"),
    ({'fixed_pes': [False, False, True, True]}, 'fixed_pes'),
    ({'dims': [16, 48, 64, 128]}, 'doubles the channels'),
    ({'patch_size': 8}, 'patch_size'),
    ({'use_conv_patches': True}, 'use_conv_patches'),
])
def test_unsupported_official_options_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        load_official(dict(NARROW_OFFICIAL, **change))
