"""GPU acceptance run: build the CUDA kernels, test them, check them under compute-sanitizer, benchmark them,
and write one markdown report with pass/fail, times and figures.

    python3 scripts/gpu_check.py              # the report in $OUT when set, else in the repository root
    python3 scripts/gpu_check.py --out DIR
    python3 scripts/gpu_check.py --dry-run    # print the steps and run none (works without a GPU)

Every step runs in its own process group under its own timeout, and the run goes on after a failed step.
The steps share one wall-time budget (--budget-seconds, 9 minutes by default, so that the whole run fits in
10 minutes on one modern GPU); a step starts with at most what is left of it. The folder gets `gpu_report.md`,
rewritten after each step so that an interrupted run still leaves one, and `gpu_check.log` with the whole
output of every step.

Exit status: 0 when every required step passed, 1 when one did not, 2 when there is no CUDA device.
"""
import argparse
import datetime
import glob
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT_NAME = 'gpu_report.md'
LOG_NAME = 'gpu_check.log'
# 9 minutes for the steps leave room for the start (imports, GPU query) in the 10 minutes.
DEFAULT_BUDGET_SECONDS = 540
# With less than this left of the budget a step is not started: it could not finish.
MIN_STEP_SECONDS = 10
# compute-sanitizer's exit status when it found errors; pytest's own statuses are 1 to 5.
SANITIZER_ERROR_EXIT = 99
NATIVE_OPS = ('deform_attn', 'neighborhood_attn', 'ms_deform_attn')

# The real-GPU tests: the `cuda` target of the cuda_target fixture (not its CPU `emulated` twin), and every
# test whose name, parameters or markers say cuda.
CUDA_TESTS = 'cuda and not emulated'
OP_TEST_FILES = ['tests/test_deform_attn_op.py', 'tests/test_neighborhood_attn.py', 'tests/test_ms_deform_attn.py']
# Under the sanitizers the torch.compile tests would only compile again, instrumented and slowly, graphs around
# the kernels that the eager tests already run.
SANITIZED_TESTS = CUDA_TESTS + ' and not compile'
# racecheck looks for hazards on shared memory, and is the slow tool: only the deform_attn and neighborhood_attn
# kernels use shared memory (ms_deform_attn's use none), so it runs their tests alone.
RACECHECK_TEST_FILES = OP_TEST_FILES[:2]
# The sanitizers instrument only the project's kernels: the ops' host code only allocates, and PyTorch's kernels,
# which the tests' references run, are not under test here and would multiply the time. One substring names
# them all, in their mangled and demangled names alike (deform_attn, neighborhood_attn, ms_deform_attn), since
# NVIDIA's tools differ on whether repeated --kernel-name filters add up.
OWN_KERNELS = '_attn'
PYTEST_ARGS = ['-q', '-rfEs', '-p', 'no:cacheprovider']

KERNEL_CHECK = f"""
from dat.ops._extension import NATIVE_IMPORT_ERROR, native_op_available
missing = [op for op in {json.dumps(NATIVE_OPS)} if not native_op_available(op, "cuda")]
if missing:
    raise SystemExit(f"no CUDA kernel for {{missing}} (import error: {{NATIVE_IMPORT_ERROR}})")
print("CUDA kernels registered:", *{json.dumps(NATIVE_OPS)})
"""


@dataclass
class Verdict:
    passed: bool
    headline: str  # one line, for the summary table
    details: str = ''  # the key output (test summary, sanitizer summary, benchmark tables), under the step's heading


@dataclass
class Step:
    name: str
    command: List[str]
    timeout: float
    judge: Callable[[int, str, str], Verdict]  # (exit status, stdout, stderr) -> verdict
    env: Dict[str, str] = field(default_factory=dict)
    required: bool = True
    unavailable: Optional[str] = None  # why the step cannot run on this machine: it is then skipped, not failed

    def shell_form(self) -> str:
        return ' '.join([f'{name}={shlex.quote(value)}' for name, value in self.env.items()]
                        + [shlex.quote(part) for part in self.command])


PASSED, FAILED, TIMED_OUT, SKIPPED, OUT_OF_TIME = 'pass', 'FAIL', 'timed out', 'skipped', 'not run: budget spent'


@dataclass
class Result:
    step: Step
    status: str
    seconds: float
    verdict: Verdict

    @property
    def failed(self) -> bool:
        return self.step.required and self.status in (FAILED, TIMED_OUT, OUT_OF_TIME)


# ------------------------------------------------------------------------------------------------ verdicts

def _lines(text: str) -> List[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def _tail(text: str, count: int = 30) -> str:
    return '\n'.join(_lines(text)[-count:])


def judge_exit_status(returncode: int, stdout: str, stderr: str) -> Verdict:
    """Passed when the command exits 0. The headline is the last line of stdout when it passed (what it did;
    stderr then holds warnings), else of stderr (why it failed); the details are the tail of a failure."""
    passed = returncode == 0
    lines = (_lines(stdout) or _lines(stderr)) if passed else (_lines(stderr) or _lines(stdout))
    headline = lines[-1][:160] if lines else f'exit status {returncode}'
    return Verdict(passed, headline, '' if passed else _tail(stdout + '\n' + stderr))


PYTEST_SUMMARY = re.compile(r'^=*\s*((?:\d+ \w+(?:, )?)+ in [\d.]+s.*?|no tests ran.*?)\s*=*$')


def pytest_outcome(output: str):
    """pytest's closing summary ('24 passed, 2 skipped in 31.20s'), None when it has none (it crashed or was
    killed), and its lines on failed, erroring and skipped tests."""
    summaries = [match.group(1) for match in map(PYTEST_SUMMARY.match, _lines(output)) if match]
    reported = [line for line in _lines(output) if line.startswith(('FAILED ', 'ERROR ', 'SKIPPED '))]
    return (summaries[-1] if summaries else None), reported


def judge_pytest(returncode: int, stdout: str, stderr: str) -> Verdict:
    summary, reported = pytest_outcome(stdout + '\n' + stderr)
    if summary is None:
        return Verdict(False, f'no pytest summary (exit status {returncode})', _tail(stdout + '\n' + stderr))
    return Verdict(returncode == 0, summary, '\n'.join(reported))


def judge_sanitizer(returncode: int, stdout: str, stderr: str) -> Verdict:
    """Passed when pytest passed and every ERROR SUMMARY of compute-sanitizer counts 0 errors; its first reports
    (which access, which kernel, which line) are the details."""
    output = stdout + '\n' + stderr
    errors = [int(count) for count in re.findall(r'ERROR SUMMARY: (\d+) error', output)]
    summary, reported = pytest_outcome(output)
    sanitizer_lines = [line for line in _lines(output) if line.startswith('========= ')]
    details = '\n'.join(sanitizer_lines[:40] + reported)
    if not errors:
        return Verdict(False, f'no ERROR SUMMARY from compute-sanitizer (exit status {returncode})',
                       _tail(output))
    headline = f'ERROR SUMMARY: {sum(errors)} errors; pytest: {summary or "no summary"}'
    return Verdict(returncode == 0 and sum(errors) == 0, headline, details)


# How the benchmark scripts print a row they could not measure: the worker's error (its last stderr line, e.g.
# 'torch.OutOfMemoryError: ...' or 'exit status -9') after 'unavailable:', 'failed:' or the implementation's name.
UNMEASURED_ROW = re.compile(r'\b(unavailable|failed):|Error\b|exit status -?\d+')


def judge_benchmark(returncode: int, stdout: str, stderr: str) -> Verdict:
    """Passed when the script exits 0 and measured every row; its tables are the details."""
    unmeasured = [line for line in _lines(stdout) if UNMEASURED_ROW.search(line)]
    if returncode != 0:
        return Verdict(False, f'exit status {returncode}', stdout.rstrip() + '\n' + _tail(stderr))
    if unmeasured:
        return Verdict(False, f'rows not measured: {len(unmeasured)}', stdout.rstrip())
    return Verdict(True, 'figures below', stdout.rstrip())


# ------------------------------------------------------------------------------------------------ the plan

def find_compute_sanitizer() -> Optional[str]:
    """compute-sanitizer on PATH, else in a CUDA toolkit folder (it is often not on PATH)."""
    candidates = [shutil.which('compute-sanitizer')]
    for home in filter(None, [os.environ.get('CUDA_HOME'), os.environ.get('CUDA_PATH')]):
        candidates.append(os.path.join(home, 'bin', 'compute-sanitizer'))
    candidates += sorted(glob.glob('/usr/local/cuda*/bin/compute-sanitizer'), reverse=True)
    candidates += sorted(glob.glob('/opt/nvidia/*/compute-sanitizer'), reverse=True)
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


def sanitizer_step(tool: str, sanitizer: Optional[str], test_files: List[str], timeout: float) -> Step:
    command = [sanitizer or 'compute-sanitizer', '--tool', tool, '--error-exitcode', str(SANITIZER_ERROR_EXIT),
               '--print-limit', '20', '--kernel-name', f'kns={OWN_KERNELS}',
               sys.executable, '-m', 'pytest', *test_files, '-k', SANITIZED_TESTS, *PYTEST_ARGS]
    # PyTorch's caching allocator hands out slices of larger blocks, inside which memcheck sees no bounds.
    return Step(tool, command, timeout, judge_sanitizer, env={'PYTORCH_NO_CUDA_MEMORY_CACHING': '1'},
                unavailable=None if sanitizer else 'compute-sanitizer is not installed')


def plan_steps(arch: str, sanitizer: Optional[str]) -> List[Step]:
    python = sys.executable
    build_env = {'DAT_BUILD_CUDA': '1', 'DAT_REQUIRE_EXT': '1', 'TORCH_CUDA_ARCH_LIST': arch,
                 'MAX_JOBS': str(os.cpu_count() or 1)}
    return [
        # --force: a CPU-only dat/_C*.so newer than the sources would otherwise be taken as up to date; ninja
        # still recompiles only the objects whose sources or flags changed.
        Step('build', [python, 'setup.py', 'build_ext', '--inplace', '--force'], 360, judge_exit_status,
             env=build_env),
        Step('cuda-kernels', [python, '-c', KERNEL_CHECK], 60, judge_exit_status),
        Step('tests', [python, '-m', 'pytest', 'tests', '-k', CUDA_TESTS, *PYTEST_ARGS], 240, judge_pytest),
        sanitizer_step('memcheck', sanitizer, OP_TEST_FILES, 240),
        sanitizer_step('racecheck', sanitizer, RACECHECK_TEST_FILES, 180),
        # Every row is two fresh worker processes: short timing windows keep the 24 rows near a minute and a half.
        Step('benchmark-op', [python, 'scripts/benchmark_op.py', '--device', 'cuda', '--min-seconds', '0.2',
                              '--max-repeats', '10'], 180, judge_benchmark),
        # The two model generations at their smallest size, at a batch that keeps a large GPU busy.
        Step('benchmark-models', [python, 'scripts/benchmark.py', '--device', 'cuda', '--precisions', 'bf16',
                                  '--models', 'dat_tiny', 'dat_pp_tiny', '--batch', '32', '--repeats', '5'],
             120, judge_benchmark),
        # The other two ops' benchmarks run last, with what is left of the budget.
        Step('benchmark-nat', [python, 'scripts/benchmark_nat.py', '--device', 'cuda'], 90, judge_benchmark,
             required=False),
        Step('benchmark-msda', [python, 'scripts/benchmark_msda.py', '--device', 'cuda', '--dtypes', 'float16',
                                '--repeats', '20', '--warmup', '3'], 90, judge_benchmark, required=False),
    ]


# ------------------------------------------------------------------------------------------------ running

def step_environment(step: Step) -> Dict[str, str]:
    """This process's environment, the step's variables, and this checkout first on the import path (the
    scripts' worker processes import `dat`, which need not be installed); unbuffered output, so that a killed
    step leaves what it printed."""
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')]))
    return dict(os.environ, **step.env, PYTHONPATH=path, PYTHONUNBUFFERED='1')


def run_step(step: Step, timeout: float):
    """Run `step` in its own process group; past `timeout` the whole group is killed. Returns
    (exit status, timed out, seconds, stdout, stderr)."""
    start = time.monotonic()
    try:
        process = subprocess.Popen(step.command, cwd=ROOT, env=step_environment(step), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, errors='replace', start_new_session=True)
    except OSError as error:
        return 127, False, time.monotonic() - start, '', f'could not start: {error}'
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the group: build jobs, sanitized processes, benchmark workers
        except ProcessLookupError:  # it ended in the meantime
            pass
        stdout, stderr = process.communicate()
        timed_out = True
    return process.returncode, timed_out, time.monotonic() - start, stdout, stderr


def run_steps(steps: List[Step], deadline: float,
              on_result: Callable[[List[Result], str, str], None]) -> List[Result]:
    """Run every step in order, each with its timeout cut to what is left before `deadline` (time.monotonic());
    after each, `on_result(the results so far, its stdout, its stderr)`."""
    results = []
    for step in steps:
        left = deadline - time.monotonic()
        stdout = stderr = ''
        if step.unavailable:
            result = Result(step, SKIPPED, 0.0, Verdict(True, step.unavailable))
        elif left < MIN_STEP_SECONDS:
            result = Result(step, OUT_OF_TIME, 0.0, Verdict(False, f'{max(left, 0):.0f} s of the budget left'))
        else:
            returncode, timed_out, seconds, stdout, stderr = run_step(step, min(step.timeout, left))
            verdict = step.judge(returncode, stdout, stderr)
            if timed_out:
                verdict = Verdict(False, f'killed after {seconds:.0f} s; {verdict.headline}', verdict.details)
            status = TIMED_OUT if timed_out else PASSED if verdict.passed else FAILED
            result = Result(step, status, seconds, verdict)
        results.append(result)
        on_result(results, stdout, stderr)
    return results


# ------------------------------------------------------------------------------------------------ the report

def _command_output(command: List[str]) -> Optional[str]:
    """The stripped stdout of a short query command, or None when it fails or is missing."""
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def describe_machine(sanitizer: Optional[str]) -> List[str]:
    gpu = torch.cuda.get_device_properties(0)
    driver = _command_output(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader', '--id=0'])
    commit = _command_output(['git', 'rev-parse', '--short', 'HEAD'])
    if commit and _command_output(['git', 'status', '--porcelain', '--untracked-files=no']):
        commit += ' with uncommitted changes'
    return [f'GPU: {gpu.name}, compute capability {gpu.major}.{gpu.minor}, {gpu.total_memory / 2 ** 30:.0f} GiB, '
            f'driver {driver or "unknown"}',
            f'torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}, '
            f'{os.cpu_count()} CPU cores',
            f'commit: {commit or "unknown (not a git checkout)"}',
            f'compute-sanitizer: {sanitizer or "not installed"}']


def _table_cell(text: str) -> str:
    return text.replace('|', '\\|').replace('\n', ' ')


def format_report(steps: List[Step], results: List[Result], machine: List[str], started: datetime.datetime,
                  elapsed: float, budget: float) -> str:
    """The markdown report: the verdict, the machine, one table row per step (steps not yet run are pending),
    then per step that ran its command and key output."""
    failed = [result.step.name for result in results if result.failed]
    verdict = 'FAIL' if failed else 'PASS' if len(results) == len(steps) else \
        f'INCOMPLETE ({len(results)} of {len(steps)} steps run)'
    lines = [f'# GPU acceptance run: {verdict}', '',
             f'Started {started:%Y-%m-%d %H:%M} UTC; {elapsed:.0f} s of a {budget:.0f} s budget.'
             + (f' Required steps that did not pass: {", ".join(failed)}.' if failed else ''), '']
    lines += [f'- {line}' for line in machine]
    lines += ['', '| step | result | time | summary |', '| --- | --- | --- | --- |']
    for index, step in enumerate(steps):
        result = results[index] if index < len(results) else None
        status = result.status if result else 'pending'
        seconds = f'{result.seconds:.0f} s' if result and result.seconds else ''
        optional = '' if step.required else ' (optional)'
        lines.append(f'| {step.name} | {status}{optional} | {seconds} | '
                     f'{_table_cell(result.verdict.headline) if result else ""} |')
    lines += ['', f'Each step runs from the repository root with this checkout first on PYTHONPATH; `{LOG_NAME}` '
              'beside this report holds the whole output of every step.']
    for result in results:
        lines += ['', f'## {result.step.name}: {result.status}', '', '```sh', result.step.shell_form(), '```']
        if result.verdict.details:
            lines += ['', '```text', result.verdict.details, '```']
    return '\n'.join(lines) + '\n'


def write_atomically(path: str, text: str) -> None:
    """Replace `path` whole, so that a run killed while writing leaves the previous report, not half of one."""
    with open(path + '.tmp', 'w') as file:
        file.write(text)
    os.replace(path + '.tmp', path)


def append_log(path: str, result: Result, stdout: str, stderr: str) -> None:
    with open(path, 'a') as log:
        log.write(f'==== {result.step.name}: {result.status}, {result.seconds:.0f} s\n'
                  f'$ {result.step.shell_form()}\n---- stdout\n{stdout}\n---- stderr\n{stderr}\n')


def format_plan(steps: List[Step], budget: float, report_path: str) -> str:
    lines = [f'The steps, in order, each in its own process group, from {ROOT}, with this checkout first on '
             f'PYTHONPATH; {budget:.0f} s in all:']
    for number, step in enumerate(steps, 1):
        kind = 'required' if step.required else 'optional'
        skipped = f'; skipped here: {step.unavailable}' if step.unavailable else ''
        lines += [f'{number}. {step.name} ({kind}, at most {step.timeout:.0f} s{skipped})', f'   {step.shell_form()}']
    lines.append(f'report: {report_path}')
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default=os.environ.get('OUT') or ROOT,
                        help=f'folder for {REPORT_NAME} and {LOG_NAME} '
                             '(default: $OUT when set, else the repository root)')
    parser.add_argument('--budget-seconds', type=float, default=DEFAULT_BUDGET_SECONDS,
                        help='wall time for all the steps together (default %(default)s)')
    parser.add_argument('--dry-run', action='store_true', help='print the steps and run none')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    has_gpu = torch.cuda.is_available()
    if not has_gpu and not args.dry_run:
        print('no CUDA device: torch.cuda.is_available() is False; nothing was built or run '
              '(--dry-run prints the steps)', file=sys.stderr)
        return 2
    arch = '%d.%d' % torch.cuda.get_device_capability() if has_gpu else '<GPU compute capability>'
    sanitizer = find_compute_sanitizer()
    steps = plan_steps(arch, sanitizer)
    report_path = os.path.join(os.path.abspath(args.out), REPORT_NAME)
    if args.dry_run:
        print(format_plan(steps, args.budget_seconds, report_path))
        return 0

    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, LOG_NAME)
    open(log_path, 'w').close()
    machine = describe_machine(sanitizer)
    started, start = datetime.datetime.now(datetime.timezone.utc), time.monotonic()

    def report(results):
        return format_report(steps, results, machine, started, time.monotonic() - start, args.budget_seconds)

    def record(results, stdout, stderr):
        result = results[-1]
        append_log(log_path, result, stdout, stderr)
        write_atomically(report_path, report(results))
        print(f'[{len(results)}/{len(steps)}] {result.step.name}: {result.status} ({result.seconds:.0f} s) '
              f'{result.verdict.headline}', flush=True)

    print(f'GPU acceptance run: {", ".join(step.name for step in steps)}', flush=True)
    write_atomically(report_path, report([]))
    results = run_steps(steps, start + args.budget_seconds, record)
    print('\n' + report(results))
    print(f'report: {report_path}')
    return 1 if any(result.failed for result in results) else 0


if __name__ == '__main__':
    sys.exit(main())
