"""What the benchmark scripts share: a measurement in a fresh process, its timing and its peak memory, and the
table they print (`Table`).

A fresh process per measurement keeps one measurement's allocations (the caching allocator on CUDA, the
resident set on the CPU) from inflating or hiding another's. The scripts put their own folder on sys.path
to import this module (it is not part of the `dat` package), so they run from any working directory.
"""
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

WORKER_FLAG = '--worker'


def run_isolated(script_path: str, payload: dict, env: dict = None) -> dict:
    """Run `script_path` in a fresh interpreter as a worker for `payload` (see `serve_worker`).

    `env` adds variables to this process's environment for the worker. Returns the worker's result, or
    {'error': last line of its stderr} when it fails, so that a table can say why a row is missing.
    """
    command = [sys.executable, os.path.abspath(script_path), WORKER_FLAG, json.dumps(payload)]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {'error': lines[-1] if lines else f'exit status {done.returncode}'}
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve_worker(measure) -> bool:
    """The worker side of `run_isolated`: if this command line holds the worker flag, print
    `measure(**payload)` as the last line of stdout and return True; otherwise return False."""
    if WORKER_FLAG not in sys.argv:
        return False
    payload = json.loads(sys.argv[sys.argv.index(WORKER_FLAG) + 1])
    print(json.dumps(measure(**payload)))
    return True


def synchronize(device) -> None:
    """Wait for queued CUDA work, so that a clock or a memory reading covers it."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def median_seconds(step, device, repeats: int, warmup: int = 1, min_seconds: float = 0.0,
                   max_repeats: int = None) -> float:
    """Median wall time of one `step()` call.

    `warmup` untimed calls first pay the one-time costs (kernel selection, caches, allocator growth). Then
    `repeats` timed calls, and more while their total is under `min_seconds`, up to `max_repeats`: fast calls
    get enough samples, slow ones are not repeated needlessly. The median, as one call disturbed by the rest
    of the machine does not move it.
    """
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    while len(times) < repeats or (len(times) < (max_repeats or repeats) and sum(times) < min_seconds):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_output(output):
    """The output a benchmark's loss is taken of: the first of a tuple (the official DAT models and layers also
    return their deformed and reference points), else the output itself."""
    return output[0] if isinstance(output, tuple) else output


def training_or_inference_step(model, inputs, train, autocast=None):
    """One forward (and with `train`, backward) pass of `model` on `inputs` as a callable to time, under
    `autocast` (a context manager; None: none), the loss taken of its `first_output`."""
    def step():
        with autocast or contextlib.nullcontext(), torch.set_grad_enabled(train):
            loss = first_output(model(inputs)).float().mean()
        if train:
            loss.backward()
            model.zero_grad(set_to_none=True)
    return step


def interleaved_median_seconds(steps: Dict[str, Callable[[], None]], device, repeats: int,
                               warmup: int = 1) -> Dict[str, float]:
    """Median wall time of one call of each of `steps`, timed round-robin: each round calls every step once, so
    that a disturbance of the machine (another process, a frequency change) hits all of them alike, and their
    ratios hold where their absolute times would not."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    synchronize(device)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def import_official_module(official_src: str, module_name: str):
    """The official DAT code's `models/<module_name>.py` (e.g. 'dat_blocks') imported from a checkout of
    LeapLabTHU/DAT at `official_src`, for baselines measured against it; nothing of that code is copied here.

    Its `models` folder is imported as a package without running its `__init__.py`, which builds every model
    family (DAT++'s pulls in natten); the module's own relative imports still resolve.
    """
    import importlib
    import types
    models = os.path.join(os.path.abspath(os.path.expanduser(official_src)), 'models')
    if not os.path.isfile(os.path.join(models, module_name + '.py')):
        raise SystemExit(f'--official-src {official_src}: no models/{module_name}.py there; point it at a checkout '
                         'of LeapLabTHU/DAT')
    package = f'official_dat_models_{abs(hash(models))}'
    if package not in sys.modules:
        sys.modules[package] = types.ModuleType(package)
        sys.modules[package].__path__ = [models]
    return importlib.import_module(f'{package}.{module_name}')


def _proc_status_bytes(field: str) -> int:
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f'/proc/self/status has no {field}')


class PeakMemory:
    """`with PeakMemory(device) as memory:` then `memory.growth` is the most memory the block held at once
    beyond what was held when it started, in bytes (`memory.peak`: the absolute peak).

    CUDA: the caching allocator's allocated bytes. CPU (Linux): the resident set size, its high-water mark
    reset on entry (/proc/self/clear_refs) so that peaks reached before the block do not count.
    """

    def __init__(self, device):
        self.on_cuda = torch.device(device).type == 'cuda'

    def __enter__(self):
        if self.on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open('/proc/self/clear_refs', 'w') as clear_refs:
                clear_refs.write('5')  # 5: reset the peak resident set size to the current one
            self.start = _proc_status_bytes('VmRSS')
        return self

    def __exit__(self, *exc_info):
        if self.on_cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = _proc_status_bytes('VmHWM')
        self.growth = max(self.peak - self.start, 0)


@dataclass(frozen=True)
class Column:
    """A column of a `Table`: its title and how its numbers are written.

    `spec` is a format spec for numbers ('.4f'); 'x' makes a ratio column, written '1.23x'. A ratio column with
    `ratio=(numerator, denominator)` (titles of other columns) computes its cell from the row, e.g. the speed-up
    over a baseline `('ref s', 'fused s')`; without it the caller gives the ratio (e.g. against a baseline row).
    `width` is the least width of the column; a row whose cell is wider than its column widens that row only.
    """
    title: str
    spec: str = ''
    ratio: Optional[Tuple[str, str]] = None
    width: int = 8

    def cell(self, row: dict) -> str:
        """This column's text in `row` (titles to values): 'n/a' where it has no value."""
        value = row.get(self.title)
        if value is None and self.ratio is not None:
            numerator, denominator = (row.get(title) for title in self.ratio)
            if isinstance(numerator, (int, float)) and isinstance(denominator, (int, float)) and denominator:
                value = numerator / denominator
        if value is None:
            return 'n/a'
        if isinstance(value, str):
            return value
        return f'{value:.2f}x' if self.spec == 'x' else format(value, self.spec)


class Table:
    """The one table format of the benchmark scripts: aligned columns (text to the left, numbers to the right),
    printed a row at a time as each is measured, so that a long run shows its rows as it goes.

        table = Table([Column('case', width=12), Column('fused s', '.4f'), Column('ref s', '.4f'),
                       Column('speed-up', 'x', ratio=('ref s', 'fused s'))])
        table.row({'case': 'detection', 'fused s': 3.03, 'ref s': 12.09})   # speed-up 3.99x
        table.row({'case': 'stage1'}, note='failed: out of memory')          # the cells it has, then why not

    A row's `note` follows its cells: an unmeasured row says why there ('failed: <error>', which
    scripts/gpu_check.py counts as a row not measured).
    """

    def __init__(self, columns: List[Column], out=None):
        self.columns = columns
        self.out = out or sys.stdout
        self.widths = [max(column.width, len(column.title)) for column in columns]
        self._print([column.title for column in columns])
        self._print(['-' * width for width in self.widths])

    def row(self, values: dict, note: str = '') -> None:
        """Print a row: `values` maps column titles to numbers or text; a missing cell prints as 'n/a'."""
        self._print([column.cell(values) for column in self.columns], note)

    def _print(self, cells: List[str], note: str = '') -> None:
        aligned = [cell.ljust(width) if not column.spec else cell.rjust(width)
                   for cell, width, column in zip(cells, self.widths, self.columns)]
        print('  '.join(aligned + ([note] if note else [])).rstrip(), file=self.out, flush=True)
