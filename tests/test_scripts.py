"""scripts/: official checkpoint -> Hub folder (convert_official), its dry-run upload check (push_to_hub), and
accuracy on an image folder (validate)."""
import json
import re

import pytest
import timm
import torch
import yaml

from conftest import add_to_hf_cache, load_script, official_mini_checkpoint
from dat.digits import digit_images

convert_official = load_script('convert_official')
push_to_hub = load_script('push_to_hub')
validate = load_script('validate')


def test_official_checkpoint_to_hub_folder_to_hf_hub_model(tmp_path, offline_caches, capsys):
    checkpoint, config, image, official_logits = official_mini_checkpoint(tmp_path / 'official')
    config_file = tmp_path / 'dat_mini.yaml'
    config_file.write_text(yaml.safe_dump({'MODEL': {'TYPE': 'dat', 'DAT': config}}))
    out = tmp_path / 'hub' / 'dat_mini'
    convert_official.main([str(checkpoint), '--model', 'dat_tiny', '--config', str(config_file), '--out', str(out),
                           '--repo-id', 'dat-zoo/dat_mini'])
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    hf_config = json.loads((out / 'config.json').read_text())
    assert hf_config['architecture'] == 'dat_tiny' and hf_config['num_classes'] == config['num_classes']
    assert hf_config['model_args']['dims'] == config['dims']  # the YAML's variant, rebuilt from config.json
    card = (out / 'README.md').read_text()
    assert 'dat-zoo/dat_mini' in card and 'library_name: timm' in card and checkpoint.name in card
    assert not re.search(r'\{[a-z_0-9]+(:[^}]*)?\}', card), 'a template field was left unfilled'

    push_to_hub.main([str(out), '--repo-id', 'dat-zoo/dat_mini', '--dry-run'])
    assert 'dry run: nothing uploaded' in capsys.readouterr().out

    # the folder, published, is a timm 'hf-hub:' model giving the official logits
    add_to_hf_cache(offline_caches, 'dat-zoo/dat_mini', {p.name: p for p in out.iterdir()})
    model = timm.create_model('hf-hub:dat-zoo/dat_mini', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(image), official_logits, rtol=1e-4, atol=1e-4)


def test_convert_by_architecture_and_refusals(tmp_path):
    trained = timm.create_model('dat_nano.digits', pretrained=True)
    checkpoint = tmp_path / 'nano.pth'
    torch.save({'model': trained.state_dict()}, checkpoint)
    out = tmp_path / 'nano'
    assert convert_official.convert(checkpoint, 'dat_nano.digits', out) == 0.0
    assert push_to_hub.validate_folder(out)['architecture'] == 'dat_nano'

    # a conversion that does not reproduce the logits writes nothing
    with pytest.raises(RuntimeError, match='do not reproduce the original logits'):
        convert_official.convert(checkpoint, 'dat_nano.digits', tmp_path / 'refused', atol=-1.0)
    assert not (tmp_path / 'refused').exists() and sorted(p.name for p in tmp_path.iterdir()) == ['nano', 'nano.pth']

    # folders the dry run refuses: weights for another architecture, a missing file
    config = json.loads((out / 'config.json').read_text())
    (out / 'config.json').write_text(json.dumps(dict(config, architecture='dat_tiny')))
    with pytest.raises(push_to_hub.InvalidFolderError, match='do not load into dat_tiny'):
        push_to_hub.main([str(out), '--repo-id', 'dat-zoo/x', '--dry-run'])
    (out / 'README.md').unlink()
    with pytest.raises(push_to_hub.InvalidFolderError, match='README.md'):
        push_to_hub.validate_folder(out)


def test_validate_on_an_image_folder_of_held_out_digits(tmp_path, capsys):
    images, labels = digit_images('held_out')
    for index, (image, label) in enumerate(list(zip(images, labels))[:150]):
        (tmp_path / str(label)).mkdir(exist_ok=True)
        image.save(tmp_path / str(label) / f'{index}.png')
    result = validate.main([str(tmp_path), '--model', 'dat_nano.digits', '--batch-size', '50'])
    assert result['images'] == 150
    assert result['top1'] >= 95.0 and result['top5'] >= result['top1']
    assert 'top-1' in capsys.readouterr().out
