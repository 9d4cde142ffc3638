"""Pretrained weights: their sources, checks, caches, and the fallback from one source to the next.

A pretrained cfg names up to three kinds of source, tried in timm's order of priority:

* an in-memory `state_dict` or a local `file` (`pretrained_cfg_overlay=dict(file=...)`, or a tag whose
  weights ship with the package, like `dat_nano.digits`): when given, the only source;
* otherwise the converted safetensors on the Hugging Face Hub (`hf_hub_id`, cached in the HF cache),
* then the official release (`url`, downloaded into torch.hub's cache and converted on load).

A source that fails (no network, not found, a checksum that does not match the manifest, a file for another
architecture) is recorded and the next one is tried; when all fail, one `PretrainedWeightsError` names every
source, why it failed, and how to load the weights by hand. Sizes and SHA-256 sums come from the manifest
(`dat.weights`) and are checked for the file the manifest names, before anything is unpickled.
"""
import hashlib
import logging
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlparse

import torch

from dat.checkpoint import CheckpointError, checkpoint_filter_fn, load_checkpoint_file
from dat.weights import bundled_path, manifest

_logger = logging.getLogger(__name__)

HF_WEIGHTS_FILENAME = 'model.safetensors'


class PretrainedWeightsError(CheckpointError):
    """No source of a model's pretrained weights could be loaded; the message names each source and why."""


class ChecksumMismatchError(CheckpointError):
    """A weight file whose size or SHA-256 differs from the manifest's."""


@dataclass(frozen=True)
class WeightSource:
    """One place the weights of a pretrained cfg can come from.

    kind: 'state_dict', 'file', 'hf-hub' or 'url'. location: the path, Hub repo id ('org/name[@revision]') or
    URL. filename: the file in the Hub repo, or the name the URL's download is cached under. file_size and
    sha256: the expected file, checked when known.
    """
    kind: str
    location: str
    filename: Optional[str] = None
    file_size: Optional[int] = None
    sha256: Optional[str] = None

    def describe(self) -> str:
        if self.kind == 'hf-hub':
            return f'Hugging Face Hub {self.location} ({self.filename})'
        if self.kind == 'url':
            return f'download {self.location} (cached as {self.filename})'
        if self.kind == 'file':
            return f'local file {self.location}'
        return 'the state dict given in pretrained_cfg'

    def fetch(self) -> Path:
        """The source's file on this machine, downloaded into the cache first when needed, and checked."""
        if self.kind == 'hf-hub':
            from huggingface_hub import hf_hub_download
            repo_id, _, revision = self.location.partition('@')
            return Path(hf_hub_download(repo_id, self.filename, revision=revision or None))
        if self.kind == 'file':
            path = Path(self.location).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f'{path} does not exist')
            verify_file(path, self.file_size, self.sha256)
            return path
        if self.kind == 'url':
            return self._download()
        raise ValueError(f'a {self.kind} source has no file')

    def _download(self) -> Path:
        cached = Path(torch.hub.get_dir()) / 'checkpoints' / self.filename
        if not cached.is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            _logger.info('downloading %s to %s', self.location, cached)
            torch.hub.download_url_to_file(self.location, str(cached), progress=True)
            try:
                verify_file(cached, self.file_size, self.sha256)
            except ChecksumMismatchError:
                cached.unlink()  # a bad download must not be found in the cache next time
                raise
            return cached
        try:
            verify_file(cached, self.file_size, self.sha256)
        except ChecksumMismatchError as error:
            raise ChecksumMismatchError(f'{error}; it is a cached download: delete it to download it again') from None
        return cached

    def state_dict(self, pretrained_cfg: Mapping) -> Dict[str, torch.Tensor]:
        if self.kind == 'state_dict':
            return dict(pretrained_cfg['state_dict'])
        return load_checkpoint_file(self.fetch())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path, file_size: Optional[int], sha256: Optional[str]) -> None:
    """Raise `ChecksumMismatchError` when `path`'s size or SHA-256 differs from the expected (known) values."""
    if file_size is not None and path.stat().st_size != file_size:
        raise ChecksumMismatchError(f'{path} has {path.stat().st_size} bytes, expected {file_size} (a truncated or '
                                    'different file)')
    if sha256 is not None:
        actual = file_sha256(path)
        if actual != sha256.lower():
            raise ChecksumMismatchError(f'{path} has SHA-256 {actual}, expected {sha256}')


def manifest_entry(pretrained_cfg: Mapping) -> dict:
    """The manifest entry of the cfg's tag ({} for a cfg that is not in the manifest)."""
    return manifest().get(f"{pretrained_cfg.get('architecture')}.{pretrained_cfg.get('tag')}", {})


def _url_filename(url: str, entry: Mapping) -> str:
    if url == entry.get('official_url') and entry.get('official_filename'):
        return entry['official_filename']
    name = os.path.basename(urlparse(url).path)
    # links such as .../f/<id>/?dl=1 have no file name: name the cache file after the URL itself
    return name or 'download-' + hashlib.sha256(url.encode()).hexdigest()[:16]


def weight_sources(pretrained_cfg: Mapping) -> List[WeightSource]:
    """The sources of a (resolved) pretrained cfg, in the order they are tried."""
    entry = manifest_entry(pretrained_cfg)
    # the manifest's size and checksum describe its own local file / official download, not a user's override
    manifest_file = str(bundled_path(entry['file'])) if entry.get('file') else None
    checks = dict(file_size=entry.get('file_size'), sha256=entry.get('sha256'))
    if pretrained_cfg.get('state_dict') is not None:
        return [WeightSource('state_dict', 'state_dict')]
    if pretrained_cfg.get('file'):
        file = Path(pretrained_cfg['file'])
        if file.is_dir():  # timm's 'local-dir:' models: a folder laid out like a Hub repository
            file = file / HF_WEIGHTS_FILENAME
        return [WeightSource('file', str(file), **(checks if str(file) == manifest_file else {}))]
    sources = []
    if pretrained_cfg.get('hf_hub_id'):
        sources.append(WeightSource('hf-hub', pretrained_cfg['hf_hub_id'],
                                    pretrained_cfg.get('hf_hub_filename') or HF_WEIGHTS_FILENAME))
    url = pretrained_cfg.get('url')
    if url:
        sources.append(WeightSource('url', url, _url_filename(url, entry),
                                    **(checks if url == entry.get('official_url') else {})))
    return sources


def failure_reason(error: BaseException) -> str:
    """A short account of why a source failed: the kind of failure, then the error itself."""
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError)
    if isinstance(error, ChecksumMismatchError):
        kind = 'checksum mismatch'
    elif isinstance(error, CheckpointError):
        kind = 'unusable file (another architecture, or not a checkpoint)'
    elif isinstance(error, RepositoryNotFoundError):
        kind = 'not found (404: no such repository, or it is private)'
    elif isinstance(error, RemoteEntryNotFoundError):
        kind = 'not found (404: the repository has no such file)'
    elif isinstance(error, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        kind = 'no network (offline, or the Hub unreachable) and not in the Hugging Face cache'
    elif isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, 'response', None), 'status_code', None)
        kind = f'HTTP error {status}' if status else 'HTTP error'
    elif isinstance(error, urllib.error.HTTPError):
        kind = 'not found (404)' if error.code == 404 else f'HTTP error {error.code}'
    elif isinstance(error, urllib.error.URLError):
        kind = 'unreachable (no network, or no such file)'
    elif isinstance(error, FileNotFoundError):
        kind = 'no such file'
    elif isinstance(error, (ConnectionError, TimeoutError)):
        kind = 'no network'
    else:
        kind = type(error).__name__
    return f'{kind}: {error}'


def _manual_instructions(sources: List[WeightSource], architecture: str) -> str:
    download = next((source for source in sources if source.kind == 'url'), None)
    filename = download.filename if download else 'checkpoint.pth'
    lines = ['To load the weights by hand:']
    if download:
        lines.append(f'  download {download.location} as {filename}, then either')
    lines += [f"  timm.create_model('{architecture}', pretrained=True, "
              f"pretrained_cfg_overlay=dict(file='{filename}'))  # official or converted file, or",
              f"  dat.load_official('<official config>.yaml', '{filename}')  # with the official YAML config"]
    return '\n'.join(lines)


def load_pretrained_weights(model: torch.nn.Module, pretrained_cfg: Mapping) -> WeightSource:
    """Load the weights of `pretrained_cfg` into `model` from its first source that works; return that source.

    Each source's state dict goes through timm's `load_pretrained` (official layouts converted by
    `checkpoint_filter_fn`, the classifier dropped when `num_classes` differs, the stem adapted to `in_chans`).
    """
    from timm.models import load_pretrained
    architecture = '.'.join(filter(None, (pretrained_cfg.get('architecture'), pretrained_cfg.get('tag'))))
    sources = weight_sources(pretrained_cfg)
    if not sources:
        raise PretrainedWeightsError(f'{architecture} has no pretrained weights (no file, Hub repo or URL in its '
                                     'pretrained cfg); use pretrained=False')
    failures: List[Tuple[WeightSource, str]] = []
    for source in sources:
        try:
            state_dict = source.state_dict(pretrained_cfg)
            # hand timm the state dict itself, so that it does not look for a source of its own
            single = dict(pretrained_cfg, state_dict=state_dict, source=None, file=None, url=None, hf_hub_id=None)
            load_pretrained(model, single, num_classes=model.num_classes, in_chans=model.in_chans,
                            filter_fn=checkpoint_filter_fn)
        except (OSError, ValueError, RuntimeError) as error:  # network, HTTP, file and checkpoint errors
            failures.append((source, failure_reason(error)))
            if source is not sources[-1]:
                _logger.warning('pretrained weights of %s: %s failed (%s); trying the next source', architecture,
                                source.describe(), failures[-1][1])
            continue
        if failures:
            _logger.warning('pretrained weights of %s loaded from %s', architecture, source.describe())
        return source
    report = '\n'.join(f'  {i}. {source.describe()}: {reason}' for i, (source, reason) in enumerate(failures, 1))
    raise PretrainedWeightsError(f'could not load the pretrained weights of {architecture}; every source failed:\n'
                                 f'{report}\n{_manual_instructions(sources, architecture)}')
