"""Build and install `dat`.

The native extension `dat._C` is optional: every op has a pure-PyTorch reference, so a plain
`pip install .` succeeds on a machine with no compiler. Environment switches:

* ``DAT_BUILD_EXT=0``      skip the extension entirely.
* ``DAT_BUILD_CUDA=auto|0|1``  build the CUDA kernels (auto: when nvcc and a CUDA build of torch are present).
* ``DAT_REQUIRE_EXT=1``    fail the install when the extension does not build (CI sets this, so a
                           compile error in ``csrc/`` fails CI instead of being silently skipped).
* ``TORCH_CUDA_ARCH_LIST`` CUDA architectures, default ``8.0;9.0``.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default):
    return os.environ.get(name, default).strip().lower()


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'csrc', pattern), recursive=True))


def _locate_cuda_home():
    """torch guesses CUDA_HOME from the directory above `nvcc` on PATH; where that is a wrapper script the
    guess has no libraries, so prefer a toolkit folder that has them."""
    if 'CUDA_HOME' in os.environ or 'CUDA_PATH' in os.environ:
        return
    for candidate in ('/usr/local/cuda',):
        if os.path.isfile(os.path.join(candidate, 'bin', 'nvcc')):
            os.environ['CUDA_HOME'] = candidate
            return


def _extensions():
    if _flag('DAT_BUILD_EXT', '1') in ('0', 'false', 'no'):
        return [], {}
    _locate_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print('dat: torch is not importable at build time; installing without the native extension', file=sys.stderr)
        return [], {}

    cpu_sources = _sources('*.cpp') + _sources('*/*.cpp') + _sources('*/cpu/*.cpp')
    cuda_sources = _sources('*/cuda/*.cu')
    want_cuda = _flag('DAT_BUILD_CUDA', 'auto')
    has_cuda_toolchain = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    build_cuda = want_cuda in ('1', 'true', 'yes') or (want_cuda == 'auto' and has_cuda_toolchain)
    os.environ.setdefault('TORCH_CUDA_ARCH_LIST', '8.0;9.0')

    cxx_flags = ['-O3', '-std=c++20', '-fopenmp', '-fno-trapping-math']
    extra_compile_args = {'cxx': cxx_flags}
    if build_cuda and cuda_sources:
        extra_compile_args['nvcc'] = ['-O3', '-std=c++20', '--use_fast_math', '-lineinfo']
        ext = cpp_extension.CUDAExtension(
            'dat._C', cpu_sources + cuda_sources, include_dirs=[os.path.join(ROOT, 'csrc')],
            extra_compile_args=extra_compile_args, extra_link_args=['-fopenmp'])
    else:
        ext = cpp_extension.CppExtension(
            'dat._C', cpu_sources, include_dirs=[os.path.join(ROOT, 'csrc')],
            extra_compile_args={'cxx': cxx_flags}, extra_link_args=['-fopenmp'])

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any compiler failure means "no extension"
                if _flag('DAT_REQUIRE_EXT', '0') in ('1', 'true', 'yes'):
                    raise
                print(f'dat: native extension not built ({error}); the pure-PyTorch reference ops will be used',
                      file=sys.stderr)

    return [ext], {'build_ext': OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name='dat',
    version='0.1.0',
    description='Deformable Attention Transformer (DAT, DAT++) models for timm, with fused deformable-attention ops',
    long_description=open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read() if os.path.exists(
        os.path.join(ROOT, 'README.md')) else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    packages=find_packages(include=['dat', 'dat.*']) + ['dat.weights'],
    package_dir={'dat': 'dat', 'dat.weights': 'weights'},
    package_data={'dat': ['assets/*'], 'dat.weights': ['*.json', '*.safetensors', '*.md']},
    python_requires='>=3.10',
    install_requires=['torch>=2.4', 'timm>=1.0.15', 'huggingface_hub>=0.23', 'safetensors>=0.4'],
    # scikit-learn ships the handwritten digits of the offline demo (python -m dat) and of the tests;
    # transformers: tests/test_adapters.py runs DAT inside transformers' detection and segmentation models
    extras_require={'test': ['pytest>=8', 'scikit-learn>=1.0', 'transformers>=5', 'onnx', 'onnxruntime', 'onnxscript'],
                    'demo': ['scikit-learn>=1.0']},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
