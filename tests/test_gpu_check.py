"""scripts/gpu_check.py, the GPU acceptance run, without a GPU: how it reads the steps' output, runs them under
timeouts and a budget, writes its report, and refuses to start where there is no CUDA device."""
import subprocess
import sys
import time

import torch

from conftest import load_script

gpu_check = load_script('gpu_check')

SANITIZED_PYTEST_WITH_ERRORS = """\
========= COMPUTE-SANITIZER
.....
========= Invalid __global__ read of size 4 bytes
=========     at dat::deform_attn::deform_attn_forward_kernel<float>(...)+0x1a0 in deform_attn_cuda.cu:201
=========     by thread (5,0,0) in block (3,0,0)
F.....
FAILED tests/test_deform_attn_op.py::test_cuda_opcheck - RuntimeError: CUDA error: unspecified launch failure
1 failed, 9 passed in 41.50s
========= ERROR SUMMARY: 1 error
"""


def python_step(name, code, timeout=30, required=True):
    return gpu_check.Step(name, [sys.executable, '-c', code], timeout, gpu_check.judge_exit_status,
                          required=required)


def test_pytest_summary_and_its_failed_and_skipped_tests():
    verdict = gpu_check.judge_pytest(1, '..F\nFAILED tests/t.py::test_a[cuda-32] - AssertionError\n'
                                        'SKIPPED [1] tests/t.py:9: no fixtures\n'
                                        '===== 1 failed, 22 passed, 1 skipped, 284 deselected in 30.12s =====\n', '')
    assert not verdict.passed
    assert verdict.headline == '1 failed, 22 passed, 1 skipped, 284 deselected in 30.12s'
    assert verdict.details.splitlines() == ['FAILED tests/t.py::test_a[cuda-32] - AssertionError',
                                            'SKIPPED [1] tests/t.py:9: no fixtures']
    assert gpu_check.judge_pytest(0, '24 passed in 3.20s (0:00:03)\n', '').passed
    assert not gpu_check.judge_pytest(5, 'no tests ran in 0.50s\n', '').passed
    crashed = gpu_check.judge_pytest(-11, 'collecting ...\n', 'Fatal Python error: Segmentation fault\n')
    assert not crashed.passed and 'no pytest summary' in crashed.headline and 'Segmentation fault' in crashed.details


def test_sanitizer_verdict_counts_its_errors_and_shows_the_first_reports():
    clean = gpu_check.judge_sanitizer(0, '========= COMPUTE-SANITIZER\n24 passed in 50.10s\n'
                                         '========= ERROR SUMMARY: 0 errors\n', '')
    assert clean.passed and clean.headline == 'ERROR SUMMARY: 0 errors; pytest: 24 passed in 50.10s'

    found = gpu_check.judge_sanitizer(gpu_check.SANITIZER_ERROR_EXIT, SANITIZED_PYTEST_WITH_ERRORS, '')
    assert not found.passed and found.headline.startswith('ERROR SUMMARY: 1 errors; pytest: 1 failed, 9 passed')
    assert 'Invalid __global__ read of size 4 bytes' in found.details
    assert 'deform_attn_cuda.cu:201' in found.details and 'FAILED tests/test_deform_attn_op.py' in found.details

    # the sanitizer never got to its summary (e.g. it refused the device): that is no pass
    refused = gpu_check.judge_sanitizer(1, '', '========= Error: Device not supported\n')
    assert not refused.passed and 'no ERROR SUMMARY' in refused.headline and 'Device not supported' in refused.details


def test_benchmark_verdict_fails_a_table_with_unmeasured_rows():
    table = 'model  impl  img/s\ndat_tiny  reference  812.30\ndat_tiny  fused  1400.20\n'
    assert gpu_check.judge_benchmark(0, table, 'a warning\n') == gpu_check.Verdict(True, 'figures below',
                                                                                    table.rstrip())
    unmeasured = table + 'dat_pp_tiny  fused  unavailable: torch.OutOfMemoryError: CUDA out of memory\n'
    assert gpu_check.judge_benchmark(0, unmeasured, '').headline == 'rows not measured: 1'
    crashed = gpu_check.judge_benchmark(1, table, 'Traceback ...\nRuntimeError: no GPU\n')
    assert not crashed.passed and crashed.details.endswith('RuntimeError: no GPU')


def test_failed_steps_do_not_stop_the_run_and_only_required_ones_fail_it():
    steps = [python_step('fails', 'raise SystemExit("broken")'),
             python_step('passes', 'print("done")'),
             python_step('optional', 'raise SystemExit(1)', required=False),
             gpu_check.Step('absent tool', ['compute-sanitizer'], 30, gpu_check.judge_sanitizer,
                            unavailable='compute-sanitizer is not installed')]
    seen = []
    results = gpu_check.run_steps(steps, time.monotonic() + 60, lambda results, *_: seen.append(len(results)))
    assert seen == [1, 2, 3, 4]
    assert [(r.status, r.failed, r.verdict.headline) for r in results] == [
        ('FAIL', True, 'broken'), ('pass', False, 'done'), ('FAIL', False, 'exit status 1'),
        ('skipped', False, 'compute-sanitizer is not installed')]


def test_a_step_past_its_timeout_is_killed_with_its_children_and_keeps_its_output():
    # the child holds the output pipe open: the step returns at once only if the whole process group is killed
    spawner = ('import subprocess, sys, time; print("started"); '
               'subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]); time.sleep(60)')
    start = time.monotonic()
    [result] = gpu_check.run_steps([python_step('hangs', spawner, timeout=2)], time.monotonic() + 60,
                                   lambda *_: None)
    assert time.monotonic() - start < 20
    assert result.status == 'timed out' and result.failed
    assert result.verdict.headline == 'killed after 2 s; started'


def test_steps_beyond_the_budget_are_not_started_and_count_as_failed():
    steps = [python_step('late', 'print(1)'), python_step('late optional', 'print(1)', required=False)]
    results = gpu_check.run_steps(steps, time.monotonic() + 5, lambda *_: None)
    assert [(r.status, r.failed) for r in results] == [('not run: budget spent', True),
                                                       ('not run: budget spent', False)]


def test_report_gives_the_verdict_a_row_per_step_and_each_step_s_command_and_key_output():
    steps = gpu_check.plan_steps('9.0', '/usr/local/cuda/bin/compute-sanitizer')
    found = gpu_check.judge_sanitizer(gpu_check.SANITIZER_ERROR_EXIT, SANITIZED_PYTEST_WITH_ERRORS, '')
    results = [gpu_check.Result(steps[0], 'pass', 95.2, gpu_check.Verdict(True, 'copying dat/_C.so -> dat')),
               gpu_check.Result(steps[1], 'pass', 4.0, gpu_check.Verdict(True, 'CUDA kernels registered: a | b')),
               gpu_check.Result(steps[2], 'pass', 41.0, gpu_check.Verdict(True, '24 passed in 30.00s')),
               gpu_check.Result(steps[3], 'FAIL', 80.0, found)]
    report = gpu_check.format_report(steps, results, ['GPU: NVIDIA H200', 'commit: abc1234'],
                                     gpu_check.datetime.datetime(2026, 1, 2, 3, 4), 220.4, 540)
    lines = report.splitlines()
    assert lines[0] == '# GPU acceptance run: FAIL'
    assert 'Started 2026-01-02 03:04 UTC; 220 s of a 540 s budget. Required steps that did not pass: memcheck.' in lines
    assert '- GPU: NVIDIA H200' in lines and '- commit: abc1234' in lines
    assert '| build | pass | 95 s | copying dat/_C.so -> dat |' in lines
    assert '| cuda-kernels | pass | 4 s | CUDA kernels registered: a \\| b |' in lines
    assert f'| memcheck | FAIL | 80 s | {found.headline} |' in lines
    assert '| racecheck | pending |  |  |' in lines
    assert '| benchmark-nat | pending (optional) |  |  |' in lines
    memcheck = lines.index('## memcheck: FAIL')
    assert lines[memcheck + 2] == '```sh' and lines[memcheck + 3].startswith(
        'PYTORCH_NO_CUDA_MEMORY_CACHING=1 /usr/local/cuda/bin/compute-sanitizer --tool memcheck')
    assert '========= ERROR SUMMARY: 1 error' in lines[memcheck:]
    assert '## racecheck: pending' not in report

    passed = [gpu_check.Result(step, 'pass', 1.0, gpu_check.Verdict(True, 'ok')) for step in steps]
    assert gpu_check.format_report(steps, passed, [], gpu_check.datetime.datetime(2026, 1, 2), 9, 540).startswith(
        '# GPU acceptance run: PASS\n')


def test_a_run_writes_its_report_and_log_and_exits_1_when_a_required_step_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda: (9, 0))
    monkeypatch.setattr(gpu_check, 'describe_machine', lambda sanitizer: ['GPU: a test double'])
    monkeypatch.setattr(gpu_check, 'plan_steps', lambda arch, sanitizer: [
        python_step('build', f'print("built for {arch}")'), python_step('tests', 'raise SystemExit("1 failed")')])
    assert gpu_check.main(['--out', str(tmp_path / 'out')]) == 1
    report = (tmp_path / 'out' / 'gpu_report.md').read_text()
    assert report.startswith('# GPU acceptance run: FAIL') and '| build | pass |' in report
    assert '| tests | FAIL |' in report and '- GPU: a test double' in report
    log = (tmp_path / 'out' / 'gpu_check.log').read_text()
    assert '==== build: pass' in log and 'built for 9.0' in log and '1 failed' in log
    assert capsys.readouterr().out.rstrip().endswith(f'report: {tmp_path / "out" / "gpu_report.md"}')


def test_without_a_gpu_it_stops_at_once_and_builds_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(gpu_check, 'run_steps', None)  # calling it would fail the test
    assert gpu_check.main(['--out', str(tmp_path)]) == 2
    assert 'no CUDA device: torch.cuda.is_available() is False' in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_dry_run_prints_every_step_and_runs_none():
    done = subprocess.run([sys.executable, str(gpu_check.ROOT) + '/scripts/gpu_check.py', '--dry-run'],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for step in ('build', 'cuda-kernels', 'tests', 'memcheck', 'racecheck', 'benchmark-op', 'benchmark-models',
                 'benchmark-nat', 'benchmark-msda'):
        assert f'. {step} (' in done.stdout
    assert 'setup.py build_ext --inplace --force' in done.stdout and "-k 'cuda and not emulated'" in done.stdout
    assert done.stdout.rstrip().endswith('gpu_report.md')
