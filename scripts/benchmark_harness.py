"""What the benchmark scripts share: a measurement in a fresh process, its timing and its peak memory.

A fresh process per measurement keeps one measurement's allocations (the caching allocator on CUDA, the
resident set on the CPU) from inflating or hiding another's. The scripts put their own folder on sys.path
to import this module (it is not part of the `dat` package), so they run from any working directory.
"""
import json
import os
import statistics
import subprocess
import sys
import time

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


def format_bytes(count: float) -> str:
    """A byte count in the largest binary unit that keeps it at 1 or more, e.g. '73.0 MiB'."""
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if count < 1024 or unit == 'GiB':
            return f'{count:.0f} {unit}' if unit == 'B' else f'{count:.1f} {unit}'
        count /= 1024
