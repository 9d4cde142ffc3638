"""Whole-model throughput and peak memory, fused attention ops vs the pure-PyTorch reference, in one run.

Each measurement runs in a fresh subprocess so that peak memory is its own: on the CPU the growth of the
process's resident set over its size before the passes, on CUDA that of `torch.cuda.max_memory_allocated`.
Throughput is from the median pass of --repeats, after one warm-up pass.

    python scripts/benchmark.py                                  # DAT and DAT++ classifiers at 224, batch 8
    python scripts/benchmark.py --train                          # forward + backward
    python scripts/benchmark.py --device cuda --precisions bf16  # on a GPU, bf16 autocast only
    python scripts/benchmark.py --compile                        # torch.compile(model) beside eager
    python scripts/benchmark.py --baseline official --official-src ~/DAT --models dat_tiny --train

`--baseline official` times our models against the official LeapLabTHU/DAT code (DAT v1: DIR/models/dat.py,
built from DIR/configs/<model>.yaml; it needs `einops`) with the same random weights, loaded into ours through
`dat.load_official`: both in one process, passes interleaved, the median of --repeats each; drop path is off in
both so that every pass runs the same blocks.

Detection backbones (the feature pyramid at 800x1333, gradient checkpointing): scripts/benchmark_backbone.py.
Prints a table with images/s and peak memory per implementation and precision (fp32; bf16 or fp16: under
torch.autocast, by default bf16), the autocast speed against fp32 of the same implementation ('vs fp32'), and
the fused implementation's speed and memory against the reference's at the same precision.
"""
import argparse
import contextlib
import importlib
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_harness import PeakMemory, median_seconds, run_isolated, serve_worker  # noqa: E402

DEFAULT_MODELS = ['dat_tiny', 'dat_small', 'dat_base', 'dat_pp_tiny', 'dat_pp_small', 'dat_pp_base']
# what each precision runs under: nothing (fp32 weights and inputs), or autocast to a half-precision dtype
AUTOCAST_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def training_or_inference_step(model, images, train, autocast, logits_of=lambda output: output):
    """One forward (and with `train`, backward) pass of `model` as a callable for `median_seconds`; `logits_of`
    picks the logits from what the model returns."""
    def step():
        with autocast, torch.set_grad_enabled(train):
            loss = logits_of(model(images)).float().mean()
        if train:
            loss.backward()
            model.zero_grad(set_to_none=True)
    return step


def measure(model_name, impl, size, batch, train, device, precision, repeats, compiled=False):
    """Runs in the worker: images/s and peak memory growth of one model with one attention implementation at
    one precision (a key of AUTOCAST_DTYPES), eager or under torch.compile (its compilation happens in the
    warm-up pass, which is not timed but counts towards the peak memory)."""
    import timm
    import dat  # noqa: F401
    from dat.ops import native_op_available

    if impl == 'fused' and not native_op_available('deform_attn', device):
        return {'error': 'fused op not built for ' + device}
    torch.manual_seed(0)
    model = timm.create_model(model_name, attn_impl=impl).to(device)
    model.train(train)
    if compiled:
        model = torch.compile(model, fullgraph=True)
    images = torch.randn(batch, 3, *size, device=device)
    autocast_dtype = AUTOCAST_DTYPES[precision]
    autocast = torch.autocast(device, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    step = training_or_inference_step(model, images, train, autocast)
    # the warm-up pass is inside the measured region: on the CPU it already reaches the peak
    with PeakMemory(device) as memory:
        seconds = median_seconds(step, device, repeats=repeats, warmup=1)
    return {'images_per_s': batch / seconds, 'peak_mb': memory.growth / 2 ** 20, 'seconds': seconds}


def official_and_ours(official_src, model_name):
    """The official DAT v1 model of `model_name` (DIR/configs/<model_name>.yaml, random weights) and ours with
    the same weights, loaded through `dat.load_official`; drop path off in both."""
    from dat.official import load_official, official_model_section

    section = official_model_section(os.path.join(official_src, 'configs', f'{model_name}.yaml'))
    section['drop_path_rate'] = 0.0
    sys.path.insert(0, os.path.abspath(official_src))
    # the official code imports its model as `models.dat`, a package name ours does not use
    official_dat = importlib.import_module('models.dat')
    torch.manual_seed(0)
    official = official_dat.DAT(**section)
    ours = load_official(section, {'model': official.state_dict()})
    return official, ours


def measure_against_official(model_name, official_src, size, batch, train, device, repeats):
    """Runs in the worker: images/s of the official model and of ours, passes interleaved so that both see the
    same state of the machine."""
    import dat  # noqa: F401

    models = dict(zip(('official', 'ours'), official_and_ours(official_src, model_name)))
    # the official model returns (logits, deformed positions, reference points)
    logits_of = {'official': lambda output: output[0], 'ours': lambda output: output}
    images = torch.randn(batch, 3, *size, device=device)
    steps = {}
    for name, model in models.items():
        model.to(device).train(train)
        steps[name] = training_or_inference_step(model, images, train, contextlib.nullcontext(), logits_of[name])
    with torch.no_grad():
        logits = {name: logits_of[name](model.eval()(images)) for name, model in models.items()}
    for model in models.values():
        model.train(train)
    seconds = {name: [] for name in models}
    for _ in range(repeats):
        for name, step in steps.items():
            seconds[name].append(median_seconds(step, device, repeats=1, warmup=0 if seconds[name] else 1))
    speeds = {name: batch / statistics.median(times) for name, times in seconds.items()}
    # the two must compute the same function for the comparison to mean anything
    return dict(speeds, max_logit_difference=(logits['ours'] - logits['official']).abs().max().item())


WORKER_TASKS = {'model': measure, 'official': measure_against_official}


def run_worker_task(task, **payload):
    return WORKER_TASKS[task](**payload)


def compare_with_official(args, mode, shape):
    print(f'{"model":<14}{"mode":<9}{"input":<14}{"code":<10}{"img/s":>9}{"vs official":>13}{"max |logit diff|":>18}')
    for model_name in args.models:
        result = run_isolated(__file__, dict(
            task='official', model_name=model_name, official_src=args.official_src, size=args.size,
            batch=args.batch, train=args.train, device=args.device, repeats=args.repeats))
        label = f'{model_name:<14}{mode:<9}{shape:<14}'
        if 'error' in result:
            print(f'{label}  unavailable: {result["error"]}')
            continue
        for code in ('official', 'ours'):
            difference = f'{result["max_logit_difference"]:>18.1e}' if code == 'ours' else ''
            print(f'{label}{code:<10}{result[code]:>9.2f}{result[code] / result["official"]:>13.2f}{difference}',
                  flush=True)


def main():
    if serve_worker(run_worker_task):
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=DEFAULT_MODELS)
    parser.add_argument('--size', nargs=2, type=int, default=[224, 224])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--train', action='store_true', help='forward + backward instead of inference')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--precisions', nargs='+', default=['fp32', 'bf16'], choices=list(AUTOCAST_DTYPES),
                        help='fp32, and autocast to bf16 or fp16 (default: fp32 bf16)')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--compile', action='store_true', help='also time torch.compile(model, fullgraph=True)')
    parser.add_argument('--baseline', choices=['reference', 'official'], default='reference',
                        help='reference: the fused ops against the pure-PyTorch reference (default); official: our '
                             'models against the official DAT code in --official-src, fp32')
    parser.add_argument('--official-src', help='a checkout of the official LeapLabTHU/DAT code (DAT v1)')
    args = parser.parse_args()
    if args.baseline == 'official' and not args.official_src:
        parser.error('--baseline official needs --official-src DIR')

    mode = 'fwd+bwd' if args.train else 'fwd'
    shape = f'{args.batch}x{args.size[0]}x{args.size[1]}'
    if args.baseline == 'official':
        compare_with_official(args, mode, shape)
        return
    variants = ['eager', 'compiled'] if args.compile else ['eager']
    print(f'{"model":<14}{"mode":<9}{"input":<14}{"impl":<11}{"precision":<11}{"variant":<10}{"img/s":>9}'
          f'{"peak MB":>10}{"vs fp32":>9}{"vs eager":>10}{"speed x":>9}{"memory /":>10}')
    for model_name in args.models:
        results = {(impl, precision, variant): run_isolated(__file__, dict(
            task='model', model_name=model_name, impl=impl, size=args.size, batch=args.batch, train=args.train,
            device=args.device, precision=precision, repeats=args.repeats, compiled=variant == 'compiled'),
            env=dict(DAT_ATTN_IMPL=impl))
            for impl in ('reference', 'fused') for precision in args.precisions for variant in variants}
        for (impl, precision, variant), result in results.items():
            label = f'{model_name:<14}{mode:<9}{shape:<14}{impl:<11}{precision:<11}{variant:<10}'
            if 'error' in result:
                print(f'{label}  unavailable: {result["error"]}')
                continue
            speed = result['images_per_s']

            def versus(baseline_key, width):
                baseline = results.get(baseline_key, {})
                if baseline_key == (impl, precision, variant) or 'images_per_s' not in baseline:
                    return f'{"":>{width}}'
                return f'{speed / baseline["images_per_s"]:>{width}.2f}'

            ratio = ''
            reference = results[('reference', precision, variant)]
            if impl == 'fused' and 'error' not in reference:
                ratio = f'{versus(("reference", precision, variant), 9)}' \
                        f'{reference["peak_mb"] / max(result["peak_mb"], 1e-9):>10.2f}'
            print(f'{label}{speed:>9.2f}{result["peak_mb"]:>10.0f}{versus((impl, "fp32", variant), 9)}'
                  f'{versus((impl, precision, "eager"), 10)}{ratio}', flush=True)


if __name__ == '__main__':
    main()
