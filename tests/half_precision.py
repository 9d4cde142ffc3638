"""The accuracy criterion of the ops' float16 and bfloat16 tests.

A kernel or reference given half-precision inputs computes in float32 and rounds each result to the
format once. Measured against a float64 evaluation of the same op on the *same rounded inputs* (so the
inputs' own rounding is not counted), its error is that final rounding, at most u |x| with u the format's
unit roundoff (2^-11 for float16, 2^-8 for bfloat16), plus float32 rounding inside the op (about 6e-8
relative per operation, amplified by the problem's condition; small next to u). Errors are measured
normwise, relative to the largest magnitude of the expected tensor: elementwise relative errors of
entries near zero say nothing about the op.
"""
import pytest
import torch

from dat.precision import HALF_DTYPES

UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def roundoff_units(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    """max |actual - expected| / max |expected|, in units of `dtype`'s unit roundoff."""
    expected = expected.detach().double().cpu()
    error = (actual.detach().double().cpu() - expected).abs().max() / expected.abs().max()
    return float(error) / UNIT_ROUNDOFF[dtype]


def assert_within_roundoff(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, units: float,
                           name: str) -> None:
    """The error of `actual` (a result of a `dtype` computation) is at most `units` unit roundoffs of `dtype`."""
    assert expected.abs().max() > 0, f'{name}: the expected result is all zero, which measures nothing'
    error = roundoff_units(actual, expected, dtype)
    assert error <= units, f'{name}: error {error:.3f} u exceeds {units} u of {dtype}'


def parametrize_half_cases(cases, mixed_inputs: str):
    """Parametrizes a test's (case, dtype, mixed_dtype) over `cases` x HALF_DTYPES x (None: every input in
    `dtype`; float32: the inputs named by `mixed_inputs`, which the op takes in float32 beside half-precision
    activations, in float32)."""
    return pytest.mark.parametrize('case, dtype, mixed_dtype', [
        pytest.param(case, dtype, mixed_dtype,
                     id=f'{case}-{str(dtype).split(".")[1]}-{mixed_inputs}-{"float32" if mixed_dtype else "same"}')
        for case in cases for dtype in HALF_DTYPES for mixed_dtype in (None, torch.float32)])
