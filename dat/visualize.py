"""Where deformable attention looks: the sampled key positions of each deformable block, drawn over an image.

Forward hooks on the `DeformableAttention` modules capture each block's input during one forward pass; the
block's `sampling_positions` turns it into the regular reference grid of keys and the deformed positions the
keys are actually sampled at, per offset group. Positions are normalised (y, x) in [-1, 1] over the block's
feature map (sampled with align_corners=True); they are mapped back to pixels of the original image. Drawn
with PIL: each reference point is a hollow dot joined by a line to its deformed position, a filled dot; one
colour per block and offset group.
"""
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from dat.layers.deform_attn import DeformableAttention

PALETTE = ('#ff1744', '#00e5ff', '#ffea00', '#76ff03', '#d500f9', '#ff9100', '#2979ff', '#1de9b6')


def model_input(image, model) -> torch.Tensor:
    """`image` (PIL) resized to the model's input size without cropping, so every pixel maps back linearly."""
    import timm.data
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**dict(config, crop_pct=1.0, crop_mode='squash'))
    return transform(image.convert('RGB')).unsqueeze(0)


def _to_pixels(points: torch.Tensor, map_size, image_size) -> torch.Tensor:
    """(1, G, Hk, Wk, 2) normalised (y, x) on a feature map -> (G, Hk * Wk, 2) image pixels (x, y): the map index
    (align_corners=True, as sampled), then the centre of that map cell in the image."""
    (map_h, map_w), (width, height) = map_size, image_size
    index = (points[0].flatten(1, 2) + 1) / 2 * torch.tensor([map_h - 1.0, map_w - 1.0])
    return ((index + 0.5) * torch.tensor([height / map_h, width / map_w])).flip(-1)


@torch.no_grad()
def sampling_points(model: torch.nn.Module, image) -> List[dict]:
    """For each deformable block of `model` run on the PIL `image`: {'name', 'reference', 'position', 'map_size'},
    reference and position being (G, K, 2) tensors of (x, y) pixel coordinates in `image`."""
    batch = model_input(image, model)
    captured = []
    hooks = [module.register_forward_hook(lambda module, inputs, output, name=name: captured.append(
        (name, module, inputs[0]))) for name, module in model.named_modules() if isinstance(module, DeformableAttention)]
    try:
        model.eval()(batch)
    finally:
        for hook in hooks:
            hook.remove()
    records = []
    for name, module, features in captured:
        position, reference = module.sampling_positions(features)
        map_size = tuple(features.shape[-2:])
        records.append(dict(name=name, reference=_to_pixels(reference, map_size, image.size),
                            position=_to_pixels(position, map_size, image.size), map_size=map_size))
    if not records:
        raise ValueError(f'{type(model).__name__} has no deformable attention blocks to draw')
    return records


def draw_sampling_points(image, records: Sequence[dict], blocks: Optional[Sequence[int]] = None):
    """A copy of the PIL `image` with the points of `records` (all, or the deformable blocks numbered `blocks`)."""
    from PIL import ImageDraw
    canvas = image.convert('RGB')
    draw = ImageDraw.Draw(canvas)
    radius = max(1.0, min(canvas.size) / 150)
    colour_index = 0
    for number, record in enumerate(records):
        groups = record['position'].shape[0]
        if blocks is not None and number not in blocks:
            colour_index += groups
            continue
        for group in range(groups):
            colour = PALETTE[colour_index % len(PALETTE)]
            colour_index += 1
            for (rx, ry), (px, py) in zip(record['reference'][group].tolist(), record['position'][group].tolist()):
                draw.line([(rx, ry), (px, py)], fill=colour, width=1)
                draw.ellipse([rx - radius, ry - radius, rx + radius, ry + radius], outline=colour)
                draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=colour)
    return canvas


def visualize(image_path: Union[str, Path], model: torch.nn.Module, out: Union[str, Path],
              blocks: Optional[Sequence[int]] = None) -> List[dict]:
    """Draw the sampling points of `model` on the image at `image_path` into `out` (same size); return them."""
    from PIL import Image
    with Image.open(image_path) as image:
        image = image.convert('RGB')
    records = sampling_points(model, image)
    if blocks is not None and not set(blocks) <= set(range(len(records))):
        raise ValueError(f'blocks {list(blocks)}: the model has deformable blocks 0..{len(records) - 1}')
    draw_sampling_points(image, records, blocks).save(out)
    return records
