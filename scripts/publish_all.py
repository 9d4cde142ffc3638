"""Publish every pretrained tag whose official checkpoint is at hand: convert, validate, upload, record.

    python scripts/publish_all.py ~/official --org dat-zoo --dry-run   # everything but the upload
    python scripts/publish_all.py ~/official --org dat-zoo             # ... and the upload

OFFICIAL_DIR holds official release files under their manifest names (`official_filename`, e.g.
dat_tiny_in1k_224.pth). For each tag of the manifest that has an official release whose file is there:

1. the file is checked against the manifest's `file_size` / `sha256` where those are known (another file is
   refused);
2. scripts/convert_official.py converts it into OUT/<tag> and checks that the converted weights reproduce the
   original's logits (an official YAML config beside the file, `<name>.yaml`, builds the original with
   `dat.load_official`; otherwise the registered architecture does);
3. the folder is validated as scripts/push_to_hub.py does, and uploaded to ORG/<tag> (not with --dry-run);
4. the manifest records the official file's `file_size` and `sha256` (also with --dry-run: they describe the
   official download) and, once uploaded, `hf_hub_id` = ORG/<tag>.

Tags whose file is absent are listed and skipped; a tag that fails does not stop the others, and the exit
status is 1 when any failed. Uploading needs a token with write access (`huggingface-cli login`, or HF_TOKEN).
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'scripts'))

import convert_official  # noqa: E402
import push_to_hub  # noqa: E402
from dat.pretrained import file_sha256, verify_file  # noqa: E402
from dat.weights import update_entry  # noqa: E402

MANIFEST = ROOT / 'weights' / 'manifest.json'


def publish(tag: str, entry: dict, checkpoint: Path, org: str, out: Path, manifest: Path, dry_run: bool) -> str:
    """Steps 1-4 of the module docstring for one tag; returns what was done."""
    verify_file(checkpoint, entry.get('file_size'), entry.get('sha256'))
    config = checkpoint.with_suffix('.yaml')
    repo_id = f'{org}/{tag}'
    max_abs_diff = convert_official.convert(checkpoint, tag, out / tag, config if config.is_file() else None,
                                            repo_id=repo_id)
    push_to_hub.validate_folder(out / tag)
    recorded = {'file_size': checkpoint.stat().st_size, 'sha256': file_sha256(checkpoint)}
    if dry_run:
        done = f'converted and validated into {out / tag} (logits within {max_abs_diff:.1e}); not uploaded (dry run)'
    else:
        done = f'uploaded to {push_to_hub.upload(out / tag, repo_id)} (logits within {max_abs_diff:.1e})'
        recorded['hf_hub_id'] = repo_id
    update_entry(manifest, tag, recorded)
    return done


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('official_dir', type=Path, help='folder of official checkpoints, under their manifest names')
    parser.add_argument('--org', required=True, help='Hub organisation (or user) the repositories go to: ORG/<tag>')
    parser.add_argument('--dry-run', action='store_true', help='everything but the upload')
    parser.add_argument('--out', type=Path, default=Path('hub'), help='folder for the converted Hub folders')
    parser.add_argument('--manifest', type=Path, default=MANIFEST, help=f'manifest to read and update ({MANIFEST})')
    args = parser.parse_args(argv)
    entries = json.loads(args.manifest.read_text(encoding='utf-8'))['weights']
    results = {}
    for tag, entry in entries.items():
        if not entry.get('official_filename'):
            continue
        checkpoint = args.official_dir / entry['official_filename']
        if not checkpoint.is_file():
            results[tag] = f'skipped: {checkpoint} is absent'
            continue
        try:
            results[tag] = publish(tag, entry, checkpoint, args.org, args.out, args.manifest, args.dry_run)
        except (RuntimeError, ValueError, OSError) as error:  # a bad file, a failed conversion or upload
            results[tag] = f'FAILED: {error}'
        print(f'{tag}: {results[tag]}', flush=True)
    print(f'\n{"tag":<24}result')
    for tag, result in results.items():
        print(f'{tag:<24}{result}')
    print(f'manifest: {args.manifest}' + ('' if args.dry_run else '; commit it with the uploads'))
    if any(result.startswith('FAILED') for result in results.values()):
        raise SystemExit(1)
    return results


if __name__ == '__main__':
    main()
