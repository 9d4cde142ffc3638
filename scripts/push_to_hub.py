"""Upload a folder written by scripts/convert_official.py to the Hugging Face Hub.

    python scripts/push_to_hub.py hub/dat_tiny.in1k --repo-id dat-zoo/dat_tiny.in1k --dry-run   # check only
    python scripts/push_to_hub.py hub/dat_tiny.in1k --repo-id dat-zoo/dat_tiny.in1k             # upload

The folder is validated first (and only validated with --dry-run): model.safetensors, config.json and
README.md are present, config.json parses and names a registered architecture, and the weights load into it
through timm's pretrained path (`timm.create_model('local-dir:<folder>', pretrained=True)`) and give finite
logits. Uploading needs a token with write access (`huggingface-cli login`, or HF_TOKEN).
"""
import argparse
import json
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dat  # noqa: E402,F401 - registers the architectures

REQUIRED_FILES = ('model.safetensors', 'config.json', 'README.md')
DEFAULT_MESSAGE = 'Add converted DAT weights'


class InvalidFolderError(ValueError):
    """A folder that is not ready for the Hub; the message names what is wrong."""


def validate_folder(folder: Path) -> dict:
    """Check `folder` as described in the module docstring; return its parsed config.json."""
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise InvalidFolderError(f'{folder} lacks {missing}')
    try:
        config = json.loads((folder / 'config.json').read_text(encoding='utf-8'))
    except json.JSONDecodeError as error:
        raise InvalidFolderError(f'{folder / "config.json"} is not valid JSON: {error}') from error
    architecture = config.get('architecture')
    if architecture not in timm.list_models('dat_*'):
        raise InvalidFolderError(f'config.json names architecture {architecture!r}, not a registered DAT model '
                                 f'({", ".join(timm.list_models("dat_*"))})')
    try:
        model = timm.create_model(f'local-dir:{folder.resolve()}', pretrained=True).eval()
    except (RuntimeError, ValueError, OSError) as error:
        raise InvalidFolderError(f'the weights of {folder} do not load into {architecture}: {error}') from error
    with torch.no_grad():
        logits = model(torch.zeros(1, *model.pretrained_cfg['input_size']))
    if logits.shape[-1] != config.get('num_classes') or not torch.isfinite(logits).all():
        raise InvalidFolderError(f'{folder}: logits of shape {tuple(logits.shape)} (finite: '
                                 f'{bool(torch.isfinite(logits).all())}) for num_classes {config.get("num_classes")}')
    return config


def upload(folder: Path, repo_id: str, private: bool = False, message: str = DEFAULT_MESSAGE) -> str:
    """Upload `folder` to the Hub repository `repo_id`, created when it does not exist; returns the commit's URL."""
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message)
    return commit.commit_url if hasattr(commit, 'commit_url') else repo_id


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('folder', type=Path)
    parser.add_argument('--repo-id', required=True, help='organisation/name on the Hub')
    parser.add_argument('--dry-run', action='store_true', help='validate the folder and upload nothing')
    parser.add_argument('--private', action='store_true')
    parser.add_argument('--message', default=DEFAULT_MESSAGE)
    args = parser.parse_args(argv)
    config = validate_folder(args.folder)
    print(f'{args.folder}: valid ({config["architecture"]}, {config["num_classes"]} classes; '
          f'{", ".join(REQUIRED_FILES)})')
    if args.dry_run:
        print(f'dry run: nothing uploaded to {args.repo_id}')
        return
    print(f'uploaded to {upload(args.folder, args.repo_id, args.private, args.message)}')


if __name__ == '__main__':
    main()
