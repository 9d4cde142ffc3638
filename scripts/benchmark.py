"""Whole-model throughput and peak memory, fused attention ops vs the pure-PyTorch reference, in one run.

Each measurement runs in a fresh subprocess so that peak memory is its own: on the CPU the growth of the
process's resident set over its size before the passes, on CUDA that of `torch.cuda.max_memory_allocated`.
Throughput is from the median pass of --repeats, after one warm-up pass.

    python scripts/benchmark.py                                  # DAT and DAT++ classifiers at 224, batch 8
    python scripts/benchmark.py --train                          # forward + backward
    python scripts/benchmark.py --device cuda --precisions bf16  # on a GPU, bf16 autocast only
    python scripts/benchmark.py --compile                        # torch.compile(model) beside eager
    python scripts/benchmark.py --models dat_tiny dat_pp_tiny swin_tiny_patch4_window7_224   # any timm model
    python scripts/benchmark.py --baseline official --official-src ~/DAT --models dat_tiny --train
    python scripts/benchmark.py --baseline swin_tiny_patch4_window7_224 --models dat_tiny dat_pp_tiny

A model that is not dat's (no attention kernels to choose) is measured once, in the `impl` column as '-'.
`--baseline official` times our models against the official LeapLabTHU/DAT code (DAT v1: DIR/models/dat.py,
built from DIR/configs/<model>.yaml; it needs `einops`) with the same random weights, loaded into ours through
`dat.load_official`: both in one process, passes interleaved (the median of --repeats rounds), drop path off in
both so that every pass runs the same blocks, and the two models' logits compared. `--baseline MODEL`, any other
timm model, times our models against it the same way: both in one process, interleaved, drop path off, fp32.

Detection backbones (the feature pyramid at 800x1333, gradient checkpointing): scripts/benchmark_backbone.py.
Prints a table with images/s and peak memory per implementation and precision (fp32; bf16 or fp16: under
torch.autocast, by default bf16), the autocast speed against fp32 of the same implementation ('vs fp32'), and
the fused implementation's speed and memory against the reference's at the same precision.
"""
import argparse
import os
import sys

import torch

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [SCRIPTS, os.path.dirname(SCRIPTS)]  # benchmark_harness, and dat from this checkout
from benchmark_harness import (Column, PeakMemory, Table, first_output, import_official_module,  # noqa: E402
                               interleaved_median_seconds, median_seconds, run_isolated, serve_worker,
                               training_or_inference_step)

DEFAULT_MODELS = ['dat_tiny', 'dat_small', 'dat_base', 'dat_pp_tiny', 'dat_pp_small', 'dat_pp_base']
# what each precision runs under: nothing (fp32 weights and inputs), or autocast to a half-precision dtype
AUTOCAST_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def is_dat_model(model_name):
    import dat  # noqa: F401  (registers the models with timm)
    import timm
    return model_name.split('.')[0] in timm.list_models(module='dat')


def measure(model_name, impl, size, batch, train, device, precision, repeats, compiled=False):
    """Runs in the worker: images/s and peak memory growth of one model with one attention implementation (None
    for a model that is not dat's) at one precision (a key of AUTOCAST_DTYPES), eager or under torch.compile (its
    compilation happens in the warm-up pass, which is not timed but counts towards the peak memory)."""
    import timm
    from dat.ops import native_op_available

    if impl == 'fused' and not native_op_available('deform_attn', device):
        return {'error': 'fused op not built for ' + device}
    torch.manual_seed(0)
    model = timm.create_model(model_name, **({'attn_impl': impl} if impl else {})).to(device)
    model.train(train)
    if compiled:
        model = torch.compile(model, fullgraph=True)
    images = torch.randn(batch, 3, *size, device=device)
    autocast_dtype = AUTOCAST_DTYPES[precision]
    autocast = torch.autocast(device, dtype=autocast_dtype) if autocast_dtype else None
    step = training_or_inference_step(model, images, train, autocast)
    # the warm-up pass is inside the measured region: on the CPU it already reaches the peak
    with PeakMemory(device) as memory:
        seconds = median_seconds(step, device, repeats=repeats, warmup=1)
    return {'images_per_s': batch / seconds, 'peak_mb': memory.growth / 2 ** 20}


def official_and_ours(official_src, model_name):
    """The official DAT v1 model of `model_name` (DIR/configs/<model_name>.yaml, random weights) and ours with
    the same weights, loaded through `dat.load_official`; drop path off in both."""
    from dat.official import load_official, official_model_section

    section = official_model_section(os.path.join(official_src, 'configs', f'{model_name}.yaml'))
    section['drop_path_rate'] = 0.0
    torch.manual_seed(0)
    official = import_official_module(official_src, 'dat').DAT(**section)
    return official, load_official(section, {'model': official.state_dict()})


def measure_against_official(model_name, official_src, size, batch, train, device, repeats):
    """Runs in the worker: images/s of the official model and of ours, interleaved, and how far their logits are
    apart (they must compute the same function for the comparison to mean anything)."""
    models = dict(zip(('baseline', 'ours'), official_and_ours(official_src, model_name)))
    images = torch.randn(batch, 3, *size, device=device)
    with torch.no_grad():
        logits = {name: first_output(model.to(device).eval()(images)) for name, model in models.items()}
    return {'images_per_s': interleaved_images_per_s(models, images, train, device, repeats),
            'max_logit_difference': (logits['ours'] - logits['baseline']).abs().max().item()}


def measure_against_model(model_name, baseline_model, size, batch, train, device, repeats):
    """Runs in the worker: images/s of our model and of the timm model `baseline_model`, interleaved."""
    import dat  # noqa: F401  (registers the models with timm)
    import timm
    torch.manual_seed(0)
    models = {key: timm.create_model(name, drop_path_rate=0.0).to(device)
              for key, name in (('baseline', baseline_model), ('ours', model_name))}
    images = torch.randn(batch, 3, *size, device=device)
    return {'images_per_s': interleaved_images_per_s(models, images, train, device, repeats)}


def interleaved_images_per_s(models, images, train, device, repeats):
    steps = {name: training_or_inference_step(model.train(train), images, train) for name, model in models.items()}
    seconds = interleaved_median_seconds(steps, device, repeats)
    return {name: images.shape[0] / time for name, time in seconds.items()}


WORKER_TASKS = {'model': measure, 'official': measure_against_official, 'timm': measure_against_model}


def run_worker_task(task, **payload):
    return WORKER_TASKS[task](**payload)


def compare_with_baseline(args, mode, shape):
    """Each of our models interleaved in one process with the official code's (`--baseline official`) or with
    a timm model (`--baseline MODEL`)."""
    official = args.baseline == 'official'
    label = 'official' if official else args.baseline
    table = Table([Column('model', width=14), Column('mode', width=7), Column('input', width=11),
                   Column('code', width=max(8, len(label))), Column('img/s', '.2f'),
                   Column('vs baseline', 'x', width=11)]
                  + ([Column('max |logit diff|', '.1e')] if official else []))
    for model_name in args.models:
        task = (dict(task='official', official_src=args.official_src) if official
                else dict(task='timm', baseline_model=args.baseline))
        result = run_isolated(__file__, dict(task, model_name=model_name, size=args.size, batch=args.batch,
                                             train=args.train, device=args.device, repeats=args.repeats))
        row = {'model': model_name, 'mode': mode, 'input': shape}
        if 'error' in result:
            table.row(row, note=f'failed: {result["error"]}')
            continue
        speeds = result['images_per_s']
        table.row(dict(row, code=label, **{'img/s': speeds['baseline']}))
        table.row(dict(row, code='ours', **{'img/s': speeds['ours'], 'vs baseline': speeds['ours'] / speeds['baseline'],
                                             'max |logit diff|': result.get('max_logit_difference')}))


def compare_implementations(args, mode, shape):
    """Each dat model with the fused kernels and with the reference, at each precision, eager (and compiled);
    ratios against the same implementation in fp32 and eager, and of fused against the reference."""
    variants = ['eager', 'compiled'] if args.compile else ['eager']
    table = Table([Column('model', width=14), Column('mode', width=7), Column('input', width=11),
                   Column('impl', width=9), Column('precision', width=9), Column('variant', width=8),
                   Column('img/s', '.2f'), Column('peak MB', '.0f'), Column('vs fp32', 'x'),
                   Column('vs eager', 'x'), Column('vs reference', 'x', width=12),
                   Column('memory /', 'x', width=8)])
    for model_name in args.models:
        impls = ('reference', 'fused') if is_dat_model(model_name) else (None,)
        results = {(impl, precision, variant): run_isolated(__file__, dict(
            task='model', model_name=model_name, impl=impl, size=args.size, batch=args.batch, train=args.train,
            device=args.device, precision=precision, repeats=args.repeats, compiled=variant == 'compiled'),
            env=dict(DAT_ATTN_IMPL=impl) if impl else None)
            for impl in impls for precision in args.precisions for variant in variants}
        for (impl, precision, variant), result in results.items():
            row = {'model': model_name, 'mode': mode, 'input': shape, 'impl': impl or '-', 'precision': precision,
                   'variant': variant}
            if 'error' in result:
                table.row(row, note=f'failed: {result["error"]}')
                continue

            def versus(baseline_key):
                baseline = results.get(baseline_key, {})
                if baseline_key == (impl, precision, variant) or 'images_per_s' not in baseline:
                    return None
                return result['images_per_s'] / baseline['images_per_s']

            reference = results.get(('reference', precision, variant), {})
            memory = (reference['peak_mb'] / max(result['peak_mb'], 1e-9)
                      if impl == 'fused' and 'peak_mb' in reference else None)
            table.row(dict(row, **{'img/s': result['images_per_s'], 'peak MB': result['peak_mb'],
                                   'vs fp32': versus((impl, 'fp32', variant)),
                                   'vs eager': versus((impl, precision, 'eager')),
                                   'vs reference': versus(('reference', precision, variant)),
                                   'memory /': memory}))


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
    parser.add_argument('--baseline', default='reference',
                        help='reference: the fused ops against the pure-PyTorch reference (default); official: our '
                             'models against the official DAT code in --official-src, fp32; any other timm model '
                             'name: our models against that model, fp32')
    parser.add_argument('--official-src', help='a checkout of the official LeapLabTHU/DAT code (DAT v1)')
    args = parser.parse_args()
    if args.baseline == 'official' and not args.official_src:
        parser.error('--baseline official needs --official-src DIR')
    if args.baseline not in ('reference', 'official'):
        import dat  # noqa: F401  (registers the models with timm)
        import timm
        if not timm.is_model(args.baseline):
            parser.error(f'--baseline {args.baseline!r}: not reference, official or a timm model name')

    mode = 'fwd+bwd' if args.train else 'fwd'
    shape = f'{args.batch}x{args.size[0]}x{args.size[1]}'
    if args.baseline == 'reference':
        compare_implementations(args, mode, shape)
    else:
        compare_with_baseline(args, mode, shape)


if __name__ == '__main__':
    main()
