"""Pretrained weights through the real download code (huggingface_hub, torch.hub), offline.

Every test runs with a private, empty Hugging Face cache in offline mode and a private torch.hub folder; the
Hub "has" a repository only when a test lays it out in that cache, and official downloads are file:// URLs.
"""
import logging

import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import add_to_hf_cache, official_mini_checkpoint
from dat.checkpoint import CheckpointError
from dat.official import load_official, model_args_from_official
from dat.pretrained import PretrainedWeightsError, WeightSource, file_sha256, verify_file, weight_sources
from dat.weights import manifest

NARROW = dict(dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), offset_groups=(1, 1, 2, 4))


@pytest.fixture(autouse=True)
def _offline(offline_caches):
    return offline_caches


def save_safetensors(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def logits(model, size=56):
    with torch.no_grad():
        return model.eval()(torch.linspace(-1, 1, 3 * size * size).reshape(1, 3, size, size))


def test_weights_load_from_the_hugging_face_cache(tmp_path, offline_caches):
    trained = timm.create_model('dat_nano').eval()
    add_to_hf_cache(offline_caches, 'dat-zoo/dat_nano.test', {'model.safetensors': save_safetensors(
        trained, tmp_path / 'model.safetensors')})
    model = timm.create_model('dat_nano', pretrained=True,
                              pretrained_cfg_overlay=dict(file=None, hf_hub_id='dat-zoo/dat_nano.test'))
    assert torch.equal(logits(model), logits(trained))


def test_features_only_and_a_new_classifier_keep_the_pretrained_body(tmp_path):
    trained = timm.create_model('dat_nano', pretrained=True).eval()
    backbone = timm.create_model('dat_nano', pretrained=True, features_only=True).eval()
    image = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        for ours, reference in zip(backbone(image), trained.forward_intermediates(image, intermediates_only=True)):
            torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    five_classes = timm.create_model('dat_nano', pretrained=True, num_classes=5)
    assert five_classes.get_classifier().out_features == 5
    assert torch.equal(five_classes.stem.conv.weight, trained.stem.conv.weight)


def test_official_url_is_the_fallback_when_the_hub_is_unavailable(tmp_path, caplog):
    path, config, image, official_logits = official_mini_checkpoint(tmp_path / 'official')
    args = model_args_from_official(config)
    overlay = dict(hf_hub_id='dat-zoo/not-in-the-cache', url=path.as_uri(), num_classes=args['num_classes'])
    with caplog.at_level(logging.WARNING, logger='dat.pretrained'):
        model = timm.create_model('dat_tiny', pretrained=True, pretrained_cfg_overlay=overlay, **args).eval()
    assert 'dat-zoo/not-in-the-cache' in caplog.text and 'no network' in caplog.text
    with torch.no_grad():
        ours = model(image)
        reference = load_official(config, path)(image)
    assert torch.equal(ours, reference)
    torch.testing.assert_close(ours, official_logits, rtol=1e-4, atol=1e-4)
    # downloaded once into torch.hub's cache, under the URL's file name
    assert (tmp_path / 'torch' / 'hub' / 'checkpoints' / path.name).is_file()


def test_official_download_is_cached_under_the_manifest_file_name(tmp_path):
    """The official links (.../f/<id>/?dl=1) name no file: the cache file is the manifest's official_filename,
    and a cached download loads with no network at all."""
    trained = timm.create_model('dat_tiny', **NARROW).eval()
    entry = manifest()['dat_tiny.in1k']
    source = weight_sources(trained.pretrained_cfg)[-1]
    assert (source.kind, source.location, source.filename) == ('url', entry['official_url'], entry['official_filename'])
    cache = tmp_path / 'torch' / 'hub' / 'checkpoints'
    cache.mkdir(parents=True)
    torch.save({'model': trained.state_dict()}, cache / entry['official_filename'])
    model = timm.create_model('dat_tiny', pretrained=True, **NARROW)
    assert torch.equal(logits(model, 64), logits(trained, 64))


def test_when_every_source_fails_one_error_names_them_all(tmp_path):
    missing = (tmp_path / 'missing' / 'dat_tiny.pth').as_uri()
    with pytest.raises(PretrainedWeightsError) as raised:
        timm.create_model('dat_tiny', pretrained=True, pretrained_cfg_overlay=dict(url=missing), **NARROW)
    message = str(raised.value)
    assert 'every source failed' in message
    assert 'Hugging Face Hub dat-zoo/dat_tiny.in1k' in message and 'no network' in message
    assert missing in message and 'unreachable' in message
    assert 'load_official' in message and 'pretrained_cfg_overlay=dict(file=' in message


@pytest.mark.parametrize('field', ['sha256', 'file_size'])
def test_a_file_that_differs_from_the_manifest_is_refused(monkeypatch, field):
    entry = manifest()['dat_nano.digits']
    assert entry['sha256'] and entry['file_size'], 'the bundled digits checkpoint must be recorded in the manifest'
    monkeypatch.setitem(entry, field, '0' * 64 if field == 'sha256' else entry['file_size'] - 1)
    with pytest.raises(CheckpointError, match='checksum mismatch'):
        timm.create_model('dat_nano', pretrained=True)


def test_checksums_are_checked_and_a_bad_download_is_not_cached(tmp_path):
    path = tmp_path / 'weights.bin'
    path.write_bytes(b'DAT weights')
    verify_file(path, path.stat().st_size, file_sha256(path))  # the matching values pass
    source = WeightSource('url', path.as_uri(), 'weights.bin', sha256='f' * 64)
    with pytest.raises(CheckpointError, match='SHA-256'):
        source.fetch()
    assert not (tmp_path / 'torch' / 'hub' / 'checkpoints' / 'weights.bin').exists()


def test_a_checkpoint_of_another_architecture_is_a_clear_checkpoint_error(tmp_path):
    other = save_safetensors(timm.create_model('dat_nano'), tmp_path / 'dat_nano.safetensors')
    with pytest.raises(CheckpointError, match='another architecture') as raised:
        timm.create_model('dat_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(other)), **NARROW)
    assert 'does not fit this architecture' in str(raised.value) and str(other) in str(raised.value)


def test_a_model_with_no_weights_anywhere_says_so():
    with pytest.raises(PretrainedWeightsError, match='has no pretrained weights'):
        timm.create_model('dat_nano', pretrained=True, pretrained_cfg_overlay=dict(file=None))


def test_in_memory_state_dict_and_other_input_channels():
    trained = timm.create_model('dat_nano', pretrained=True).eval()
    grey = torch.randn(2, 1, 56, 56)
    from_memory = timm.create_model('dat_nano', pretrained=True,
                                    pretrained_cfg_overlay=dict(state_dict=trained.state_dict()))
    assert torch.equal(logits(from_memory), logits(trained))
    # timm folds the RGB stem into one channel: a grey image repeated thrice gives the same logits
    one_channel = timm.create_model('dat_nano', pretrained=True, in_chans=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(one_channel(grey), trained(grey.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)
