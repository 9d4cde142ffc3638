"""The offline demo: dat_nano trained on scikit-learn's digits, `python -m dat`, and the sampling-point drawing."""
import re

import pytest
import timm
import torch

from conftest import load_script
from dat.__main__ import class_names, main
from dat.digits import digit_images, digit_tensors, evaluate
from dat.layers.deform_attn import DeformableAttention
from dat.visualize import sampling_points
from dat.weights import manifest

train_digits = load_script('train_digits')


def test_a_short_training_run_learns_and_moves_the_deformable_offsets():
    torch.manual_seed(0)
    model = timm.create_model('dat_nano')
    images, labels = digit_tensors('train', model)
    offsets = {name: [p.detach().clone() for p in module.conv_offset.parameters()]
               for name, module in model.named_modules() if isinstance(module, DeformableAttention)}
    assert len(offsets) == 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches this small gain nothing from threads, and lose much on a busy machine
    try:
        train_digits.train(model, images[:320], labels[:320], epochs=2, batch_size=32)  # 20 steps: ~80% held out
    finally:
        torch.set_num_threads(threads)
    top1, _ = evaluate(model, *digit_tensors('held_out', model))
    assert top1 >= 40.0, f'held-out accuracy {top1:.1f}% after a short run (chance: 10%)'
    for name, module in model.named_modules():
        if isinstance(module, DeformableAttention):
            for before, after in zip(offsets[name], module.conv_offset.parameters()):
                assert after.grad is not None and after.grad.abs().sum() > 0, f'{name}: no gradient reaches the offsets'
                assert not torch.equal(before, after), f'{name}: the offset network did not move'


def test_bundled_checkpoint_matches_the_manifest_on_held_out_digits():
    model = timm.create_model('dat_nano.digits', pretrained=True)
    top1, top5 = evaluate(model, *digit_tensors('held_out', model))
    entry = manifest()['dat_nano.digits']
    assert top1 >= 97.0
    # the recorded figures were measured with the reference attention; fused kernels may flip a borderline image
    one_image = 100.0 / len(digit_images('held_out')[1])
    assert (top1, top5) == pytest.approx((entry['top1'], entry['top5']), abs=1.01 * one_image)


def test_main_job_lists_the_zoo_and_classifies_held_out_digits(capsys):
    main([])
    out = capsys.readouterr().out
    assert all(name in out for name in timm.list_models('dat_*'))
    top1 = float(re.search(r'top-1 ([\d.]+)%', out).group(1))
    assert top1 >= 97.0


def test_classify_an_image_with_class_names(tmp_path, capsys):
    images, labels = digit_images('held_out')
    images[0].save(tmp_path / 'digit.png')
    main(['--model', 'dat_nano.digits', '--image', str(tmp_path / 'digit.png')])
    first = capsys.readouterr().out.strip().splitlines()[1]
    assert first.split()[-1] == str(labels[0]) and float(first.split('%')[0]) > 50
    # ImageNet models name their classes with timm's ImageNet descriptions
    assert class_names(timm.create_model('dat_tiny', device='meta'))[0].startswith('tench')


def test_visualize_draws_the_sampling_points_over_the_image(tmp_path, capsys):
    from PIL import Image
    image = Image.fromarray(
        (torch.linspace(0, 1, 90)[:, None] * torch.linspace(0.2, 0.6, 120)[None, :] * 255).byte().numpy()).convert('RGB')
    image.save(tmp_path / 'plain.png')
    main(['visualize', str(tmp_path / 'plain.png'), '--model', 'dat_nano.digits', '--out', str(tmp_path / 'points.png')])
    assert 'block 2' in capsys.readouterr().out
    drawn = Image.open(tmp_path / 'points.png').convert('RGB')
    assert drawn.size == image.size
    records = sampling_points(timm.create_model('dat_nano.digits', pretrained=True), image)
    assert [tuple(r['position'].shape) for r in records] == [(1, 49, 2), (2, 16, 2), (4, 4, 2)]
    moved = sum(float((r['position'] - r['reference']).norm(dim=-1).mean()) for r in records)
    assert moved > 0.5, 'the trained offsets should move the points'
    for record in records:
        for x, y in record['position'].flatten(0, 1).tolist():
            pixel = (min(int(x), 119), min(int(y), 89))
            assert drawn.getpixel(pixel) != image.getpixel(pixel), f'no point drawn at {pixel}'
