"""Convert an official DAT / DAT++ checkpoint into a folder ready for the Hugging Face Hub.

    python scripts/convert_official.py dat_tiny_in1k_224.pth --model dat_tiny.in1k --out hub/dat_tiny.in1k
    python scripts/convert_official.py my_run.pth --model dat_tiny --config configs/dat_tiny.yaml --out hub/mine

writes `model.safetensors` (timm's layout), `config.json` (timm's model config: architecture, num_classes,
pretrained_cfg) and `README.md` (the model card of `weights/MODEL_CARD.md`, filled from the manifest). Before
anything is written to --out, the converted file is loaded back through timm's pretrained path and must
reproduce the logits of the original checkpoint on a fixed input: the original is run with
`dat.official.load_official` and the official YAML when --config is given, else with the architecture's
registered config. Upload the folder with scripts/push_to_hub.py.
"""
import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dat.__main__ import count_gmacs  # noqa: E402
from dat.checkpoint import checkpoint_filter_fn, load_checkpoint_file, unwrap_state_dict  # noqa: E402
from dat.models import MODEL_CONFIGS, DeformableAttentionTransformer  # noqa: E402
from dat.official import load_official, model_args_from_official, official_model_section  # noqa: E402
from dat.pretrained import file_sha256  # noqa: E402
from dat.weights import bundled_path, manifest  # noqa: E402


def classifier_size(state_dict: dict) -> int:
    for key in ('cls_head.weight', 'head.fc.weight'):
        if key in state_dict:
            return state_dict[key].shape[0]
    raise ValueError('the checkpoint has no classifier (cls_head.weight / head.fc.weight)')


def reference_model(checkpoint: dict, architecture: str, config: Optional[Path], num_classes: int, img_size):
    """The original checkpoint, loaded without the timm pretrained path that the converted file goes through."""
    if config is not None:
        return load_official(config, checkpoint)
    model = DeformableAttentionTransformer(**dict(MODEL_CONFIGS[architecture], num_classes=num_classes,
                                                  img_size=img_size))
    model.load_state_dict(checkpoint_filter_fn(checkpoint, model))
    return model.eval()


def fixed_input(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, *model.pretrained_cfg['input_size'], generator=generator)


def write_model_card(folder: Path, model, tag: str, repo_id: str, max_abs_diff: float, checkpoint: Path,
                     model_args: dict) -> None:
    cfg = model.pretrained_cfg
    entry = dict(manifest().get(tag, {}))
    architecture = cfg['architecture']
    values = dict(
        entry, tag=tag, repo_id=repo_id, architecture=architecture,
        family='DAT++' if entry.get('generation', MODEL_CONFIGS[architecture]['generation']) == 'dat_pp' else 'DAT',
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        gmacs=count_gmacs(timm.create_model(architecture, device='meta', **model_args)),
        input_size='x'.join(map(str, cfg['input_size'][1:])), crop_pct=cfg['crop_pct'],
        interpolation=cfg['interpolation'], mean=tuple(cfg['mean']), std=tuple(cfg['std']),
        dataset=entry.get('dataset', 'unknown'), license=entry.get('license', cfg.get('license', 'unknown')),
        paper=entry.get('paper', cfg.get('paper_ids', 'unknown')),
        official_url=entry.get('official_url') or 'no public URL', official_filename=checkpoint.name,
        official_sha256=file_sha256(checkpoint), max_abs_diff=max_abs_diff)
    for key in ('top1', 'top5'):
        values[key] = 'n/a' if values.get(key) is None else values[key]
    template = bundled_path('MODEL_CARD.md').read_text(encoding='utf-8')
    (folder / 'README.md').write_text(template.format(**values), encoding='utf-8')


def convert(checkpoint_path: Path, model_name: str, out: Path, config: Optional[Path] = None,
            repo_id: Optional[str] = None, atol: float = 1e-5) -> float:
    """Write the Hub folder for `checkpoint_path` into `out`; returns the largest logit difference."""
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf  # timm exports it from its hub module only
    checkpoint = load_checkpoint_file(checkpoint_path)
    num_classes = classifier_size(unwrap_state_dict(checkpoint))
    # a variant defined by an official YAML keeps its constructor arguments in config.json ('model_args'),
    # which timm applies when the folder is loaded ('hf-hub:' / 'local-dir:' models)
    model_args = model_args_from_official(official_model_section(config)) if config else {}
    model_args['num_classes'] = num_classes
    overlay = dict(file=str(checkpoint_path), num_classes=num_classes)
    converted = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **model_args).eval()
    architecture, tag = converted.pretrained_cfg['architecture'], converted.pretrained_cfg['tag']
    full_tag = f'{architecture}.{tag}'
    repo_id = repo_id or manifest().get(full_tag, {}).get('hf_hub_id') or f'dat-zoo/{full_tag}'
    reference = reference_model(checkpoint, architecture, config, num_classes,
                                tuple(converted.pretrained_cfg['input_size'][1:]))

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{out.name}-', dir=out.parent))
    try:
        save_file({k: v.contiguous() for k, v in converted.state_dict().items()}, str(staging / 'model.safetensors'))
        save_config_for_hf(converted, staging / 'config.json')
        reloaded = timm.create_model(f'local-dir:{staging}', pretrained=True).eval()
        image = fixed_input(reloaded)
        with torch.no_grad():
            expected, actual = reference(image), reloaded(image)
        max_abs_diff = float((expected - actual).abs().max())
        if not max_abs_diff <= atol:
            raise RuntimeError(f'the converted weights do not reproduce the original logits: max abs difference '
                               f'{max_abs_diff:.3e} > {atol:g}; nothing was written to {out}')
        write_model_card(staging, reloaded, full_tag, repo_id, max_abs_diff, checkpoint_path, model_args)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return max_abs_diff


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('checkpoint', type=Path, help='official .pth (or a checkpoint in this package\'s layout)')
    parser.add_argument('--model', required=True, help="registered architecture, with its tag: 'dat_tiny.in1k'")
    parser.add_argument('--config', type=Path, help='official YAML config: the original is run with load_official')
    parser.add_argument('--out', type=Path, required=True, help='folder to write (replaced if it exists)')
    parser.add_argument('--repo-id', help='Hub repository named in the model card (default: the manifest\'s)')
    parser.add_argument('--atol', type=float, default=1e-5, help='largest logit difference accepted')
    args = parser.parse_args(argv)
    diff = convert(args.checkpoint, args.model, args.out, args.config, args.repo_id, args.atol)
    print(f'{args.checkpoint} -> {args.out} (model.safetensors, config.json, README.md); logits reproduced '
          f'within {diff:.2e}')
    print(json.dumps(json.loads((args.out / 'config.json').read_text()), indent=2)[:600])


if __name__ == '__main__':
    main()
