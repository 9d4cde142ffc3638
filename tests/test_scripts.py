"""scripts/: official checkpoint -> Hub folder (convert_official), its dry-run upload check (push_to_hub), both for
every tag of the manifest (publish_all), accuracy on an image folder (validate), and the one table format of the
benchmarks (benchmark_harness.Table)."""
import io
import json
import re
import shutil

import pytest
import timm
import torch
import yaml

from conftest import add_to_hf_cache, load_script, official_mini_checkpoint
from dat.digits import digit_images
from dat.pretrained import file_sha256
from dat.weights import bundled_path

convert_official = load_script('convert_official')
push_to_hub = load_script('push_to_hub')
publish_all = load_script('publish_all')
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


def test_publish_all_dry_run_converts_validates_and_records_every_tag_at_hand(tmp_path, capsys):
    # the narrow official DAT stands in for dat_tiny's official release, with its official YAML beside it
    mini, config, _, _ = official_mini_checkpoint(tmp_path / 'mini')
    official = tmp_path / 'official'
    official.mkdir()
    shutil.copy(mini, official / 'dat_tiny_in1k_224.pth')
    (official / 'dat_tiny_in1k_224.yaml').write_text(yaml.safe_dump({'MODEL': {'TYPE': 'dat', 'DAT': config}}))
    # a file that is not the official release the manifest describes
    (official / 'dat_small_in1k_224.pth').write_bytes(b'not the release')
    manifest = tmp_path / 'manifest.json'
    text = bundled_path('manifest.json').read_text(encoding='utf-8')
    manifest.write_text(text.replace('"official_filename": "dat_small_in1k_224.pth",\n      "file_size": null',
                                     '"official_filename": "dat_small_in1k_224.pth",\n      "file_size": 1234'))
    before = json.loads(manifest.read_text())['weights']

    with pytest.raises(SystemExit, match='1'):  # dat_small.in1k failed
        publish_all.main([str(official), '--org', 'me', '--dry-run', '--out', str(tmp_path / 'hub'),
                          '--manifest', str(manifest)])
    out = capsys.readouterr().out
    assert re.search(r'dat_tiny.in1k: converted and validated .* not uploaded \(dry run\)', out)
    assert re.search(r'dat_small.in1k: FAILED: .* has 15 bytes, expected 1234', out)
    assert re.search(r'dat_base.in1k\s+skipped: .*dat_base_in1k_224.pth is absent', out)
    folder = tmp_path / 'hub' / 'dat_tiny.in1k'
    assert push_to_hub.validate_folder(folder)['architecture'] == 'dat_tiny'
    assert 'me/dat_tiny.in1k' in (folder / 'README.md').read_text()
    after = json.loads(manifest.read_text())['weights']
    # the official file's size and checksum are recorded; nothing was uploaded, so hf_hub_id stays
    assert after['dat_tiny.in1k'] == dict(before['dat_tiny.in1k'], file_size=(official / 'dat_tiny_in1k_224.pth')
                                          .stat().st_size, sha256=file_sha256(official / 'dat_tiny_in1k_224.pth'))
    assert {tag: entry for tag, entry in after.items() if tag != 'dat_tiny.in1k'} == \
        {tag: entry for tag, entry in before.items() if tag != 'dat_tiny.in1k'}
    # only those two fields changed in the file, and its layout is kept
    assert len(manifest.read_text().splitlines()) == len(text.splitlines())


def test_validate_on_an_image_folder_of_held_out_digits(tmp_path, capsys):
    images, labels = digit_images('held_out')
    for index, (image, label) in enumerate(list(zip(images, labels))[:150]):
        (tmp_path / str(label)).mkdir(exist_ok=True)
        image.save(tmp_path / str(label) / f'{index}.png')
    result = validate.main([str(tmp_path), '--model', 'dat_nano.digits', '--batch-size', '50'])
    assert result['images'] == 150
    assert result['top1'] >= 95.0 and result['top5'] >= result['top1']
    assert 'top-1' in capsys.readouterr().out


def test_benchmark_table_aligns_columns_computes_ratios_and_notes_unmeasured_rows():
    harness = load_script('benchmark_harness')
    gpu_check = load_script('gpu_check')
    out = io.StringIO()
    table = harness.Table([harness.Column('case', width=9), harness.Column('fused s', '.4f'),
                           harness.Column('reference s', '.4f'),
                           harness.Column('fused x', 'x', ratio=('reference s', 'fused s'))], out=out)
    table.row({'case': 'detection', 'fused s': 3.0332, 'reference s': 12.0935})
    table.row({'case': 'stage1', 'reference s': 0.1586}, note='fused failed: torch.OutOfMemoryError: no memory')
    assert out.getvalue().splitlines() == [
        'case        fused s  reference s   fused x',
        '---------  --------  -----------  --------',
        'detection    3.0332      12.0935     3.99x',
        'stage1          n/a       0.1586       n/a  fused failed: torch.OutOfMemoryError: no memory',
    ]
    # scripts/gpu_check.py counts the row with a note as not measured, and only that one
    assert gpu_check.judge_benchmark(0, out.getvalue(), '').headline == 'rows not measured: 1'


def test_benchmark_table_takes_ratios_against_a_baseline_row():
    # the rows of scripts/benchmark.py: one per variant, its ratio against the reference variant's row
    harness = load_script('benchmark_harness')
    out = io.StringIO()
    table = harness.Table([harness.Column('model', width=11), harness.Column('mode'), harness.Column('input'),
                           harness.Column('variant', width=9), harness.Column('img/s', '.2f'),
                           harness.Column('peak MB', '.0f'), harness.Column('ratio', 'x')], out=out)
    table.row(dict(model='dat_tiny', mode='fwd', input='8x224x224', variant='reference', **{'img/s': 40.0,
                                                                                          'peak MB': 812.4}))
    table.row(dict(model='dat_tiny', mode='fwd', input='8x224x224', variant='fused', ratio=1.5, **{'img/s': 60.0,
                                                                                                 'peak MB': 406.0}))
    assert out.getvalue().splitlines()[2:] == [
        'dat_tiny     fwd       8x224x224  reference     40.00       812       n/a',
        'dat_tiny     fwd       8x224x224  fused         60.00       406     1.50x',
    ]


def test_official_module_imports_without_the_official_package_init(tmp_path):
    # the official models/__init__.py builds every family (DAT++'s imports natten); the baselines skip it
    models = tmp_path / 'DAT' / 'models'
    models.mkdir(parents=True)
    (models / '__init__.py').write_text('raise ImportError("natten")\n')
    (models / 'helpers.py').write_text('SCALE = 3\n')
    (models / 'dat_blocks.py').write_text('from .helpers import SCALE\n\ndef triple(x):\n    return SCALE * x\n')
    harness = load_script('benchmark_harness')
    assert harness.import_official_module(str(tmp_path / 'DAT'), 'dat_blocks').triple(2) == 6
    with pytest.raises(SystemExit, match='no models/dat.py there; point it at a checkout of LeapLabTHU/DAT'):
        harness.import_official_module(str(tmp_path / 'DAT'), 'dat')


def test_interleaved_median_seconds_times_every_step_each_round():
    harness = load_script('benchmark_harness')
    calls = []
    seconds = harness.interleaved_median_seconds({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')},
                                                 'cpu', repeats=3, warmup=1)
    assert calls == ['a', 'b'] * 4 and set(seconds) == {'a', 'b'}
