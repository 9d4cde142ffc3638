"""Caching of tensors that depend only on sizes (attention masks, index tables) that is safe under tracing.

torch.export, torch.onnx.export and `ExportedProgram.run_decompositions` run the model on fake tensors; a
plain `functools.lru_cache` around a tensor factory would keep the fake tensors built there and return them
to later eager calls of the same size, whose results then come out as fake tensors too. The caches here are
bypassed while a trace runs, which also lets traces with symbolic sizes (unhashable SymInts) build the tensors
in the graph.
"""
import functools

import torch


def is_tracing() -> bool:
    """True inside torch.compile / torch.export / torch.jit.trace tracing and wherever a FakeTensorMode is
    active."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None)


def eager_lru_cache(maxsize: int):
    """`functools.lru_cache(maxsize)` for eager calls; while tracing, the function runs uncached."""
    def decorate(build):
        cached = functools.lru_cache(maxsize=maxsize)(build)

        @functools.wraps(build)
        def call(*args):
            return build(*args) if is_tracing() else cached(*args)

        call.cache_info = cached.cache_info
        call.cache_clear = cached.cache_clear
        return call
    return decorate
