"""The launch layer on the CuPy backend (a CUDA GPU): the same kernel cases as test_launch.py, run on
CuPy arrays and checked against the float64 NumPy reference. Skipped, with the reason, where CuPy or
a GPU is missing (tests/conftest.py)."""

import numpy as np
import pytest

from sru_cupy.launch import recurrence_backward, recurrence_forward
from sru_cupy.reference import recurrence_backward_reference, recurrence_forward_reference
from test_launch import (ARITH, DESIGN_CASES, DTYPES, SIZE_CASES, _arguments, _assert_close, _f64,
                         _inputs, _padded_steps)

pytestmark = pytest.mark.gpu


def _to_device(array):
    """A CuPy copy; bfloat16 travels as its uint16 bits (the kernels get storage_dtype)."""
    import cupy
    if array is None:
        return None
    if array.dtype == DTYPES["bf16"]:
        array = array.view(np.uint16)
    return cupy.asarray(array)


def _to_host(array, dtype):
    import cupy
    if array is None:
        return None
    host = cupy.asnumpy(array)
    return host.view(dtype) if dtype == DTYPES["bf16"] else host


def _poisoned(shape, dtype):
    import cupy
    if dtype == DTYPES["bf16"]:
        return cupy.full(shape, 0x7FC0, dtype=cupy.uint16)  # a bfloat16 NaN
    return cupy.full(shape, np.nan, dtype=dtype)


def _check_case_on_gpu(case):
    inputs = _inputs(case)
    dtype, arith = DTYPES[case.dtype], ARITH[case.dtype]
    L, B, D, k = case.L, case.B, case.D, case.k
    reads_x = case.k == 3 and case.has_skip_term
    # Every array argument, V included, moves to the GPU (and to float64 for the reference)
    # through one helper.
    args, gpu_options, grad_args = _arguments(case, inputs, _to_device)
    ref_args, ref_options, ref_grad_args = _arguments(case, inputs, _f64)
    if case.dtype == "bf16":
        gpu_options["storage_dtype"] = "bfloat16"
    padded = _padded_steps(inputs["mask_pad"])

    out = {"h": _poisoned((L, B, D), dtype), "c": _poisoned((L, B, D), dtype),
           "c_last": _poisoned((B, D), dtype)}
    h, c, c_last = recurrence_forward(*args, **gpu_options, out=dict(out))
    ref_h, ref_c, ref_c_last = recurrence_forward_reference(*ref_args, **ref_options)
    for name, value, ref in (("h", h, ref_h), ("c", c, ref_c), ("c_last", c_last, ref_c_last)):
        _assert_close(name, _to_host(value, dtype), ref, case.dtype)
    if padded is not None:
        assert np.all(_to_host(h, dtype).astype(np.float64)[padded] == 0)

    h_inf, c_inf, c_last_inf = recurrence_forward(*args, **gpu_options, store_c=False)
    assert c_inf is None
    assert np.array_equal(_to_host(h_inf, dtype).view(np.uint8), _to_host(h, dtype).view(np.uint8))
    assert np.array_equal(_to_host(c_last_inf, dtype).view(np.uint8),
                          _to_host(c_last, dtype).view(np.uint8))

    gout = {"U": _poisoned((L, B, D * k), dtype), "c0": _poisoned((B, D), dtype),
            "weight_c_partial": _poisoned((2, B, D), arith),
            "bias_partial": _poisoned((2, B, D), arith)}
    if reads_x:
        gout["x"] = _poisoned((L, B, D), dtype)
    if case.V == "V":
        gout["V"] = _poisoned((L, B, 2 * D), dtype)
    grads = recurrence_backward(*grad_args, *args, c, **gpu_options, out=dict(gout))
    c_host = _to_host(c, dtype)
    ref = recurrence_backward_reference(*ref_grad_args, *ref_args, _f64(c_host), **ref_options)
    _assert_close("grad U", _to_host(grads["U"], dtype), ref["U"], case.dtype)
    _assert_close("grad c0", _to_host(grads["c0"], dtype), ref["c0"], case.dtype)
    if reads_x:
        _assert_close("grad x", _to_host(grads["x"], dtype), ref["x"], case.dtype)
    if case.V == "V":
        _assert_close("grad V", _to_host(grads["V"], dtype), ref["V"], case.dtype)
    param_kind = "f64" if case.dtype == "f64" else "f32"
    for name in ("weight_c", "bias"):
        _assert_close(f"grad {name}", _to_host(grads[name], arith), ref[name], param_kind)


@pytest.mark.parametrize("case", DESIGN_CASES + SIZE_CASES,
                         ids=[c.id for c in DESIGN_CASES + SIZE_CASES])
def test_cupy_backend_against_reference(case):
    _check_case_on_gpu(case)


def test_cupy_backend_matches_host_backend_float32():
    """The same float32 problem on both backends agrees to float32 rounding. The GPU build
    contracts a*b+c into fused multiply-adds and the host build does not (-ffp-contract=off), so
    the two differ by about one rounding per operation and step: the tolerance grows with L."""
    case = next(c for c in DESIGN_CASES if c.dtype == "f32" and c.bidirectional and c.V == "V")
    inputs = _inputs(case)
    args, options, _ = _arguments(case, inputs)
    h_host, _, c_last_host = recurrence_forward(*args, **options)
    gpu_args, gpu_options, _ = _arguments(case, inputs, _to_device)
    h_gpu, _, c_last_gpu = recurrence_forward(*gpu_args, **gpu_options)
    tolerance = max(1e-6, 8 * case.L * float(np.finfo(np.float32).eps))
    np.testing.assert_allclose(_to_host(h_gpu, np.float32), h_host, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(_to_host(c_last_gpu, np.float32), c_last_host, rtol=tolerance,
                               atol=tolerance)
