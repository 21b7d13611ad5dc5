"""The one description of the recurrence call (sru_cupy/call.py): its kernel parameter lists are
the kernels' own (read from cuda/sru_recurrence.cu), its arrays and shapes follow the options, the
operators' schemas come from it, and the GPU launch's argument list, built from it, is the host
launch's for every kernel variant (the marshalling CI runs on the CPU is the GPU's)."""

import ctypes
import itertools
import re

import numpy as np
import pytest

from sru_cupy import call, kernels, launch
from sru_cupy.call import BACKWARD, FORWARD, RecurrenceCall

#: The .cu names of the parameters that the description names otherwise.
_SOURCE_NAMES = {"U": "u", "grad_U": "grad_u", "grad_weight_c_partial": "grad_weight_c",
                 "grad_bias_partial": "grad_bias"}


def _source_parameters(kernel):
    """The parameter names of ``kernel`` as declared in the kernel source."""
    source = kernels.assembled_source()
    match = re.search(r"__global__ void " + kernel + r"\((.*?)\)\s*\{", source, re.DOTALL)
    assert match, f"{kernel} not found in the source"
    return [re.search(r"(\w+)\s*$", p.strip()).group(1) for p in match.group(1).split(",")]


@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_kernel_parameters_are_the_sources(kernel):
    described = [_SOURCE_NAMES.get(n, n) for n in call.KERNEL_PARAMETERS[kernel]]
    assert described == _source_parameters(kernel)


def test_every_array_is_described_once_and_every_op_argument_is_known():
    used = {n for k in kernels.KERNELS for n in call.KERNEL_OUTPUTS[k] + call.KERNEL_INPUTS[k]}
    assert used == set(call.ARRAYS)
    for kernel, arguments in call.OP_ARGUMENTS.items():
        names = [name for name, _ in arguments]
        assert len(names) == len(set(names))
        assert set(names) <= set(call.ARRAYS) | set(call.OPTIONS) | {"store_c"}, kernel


def test_op_schemas_are_the_published_ones():
    """Saved TorchScript modules and exported programs name these schemas: they never change."""
    assert call.op_schema(FORWARD) == (
        "(Tensor U, Tensor? x, Tensor? weight_c, Tensor bias, Tensor? c0, Tensor? mask_h, "
        "Tensor? mask_pad, SymInt hidden_size, bool bidirectional, bool has_skip_term, "
        "bool use_tanh, float scale_x, bool store_c, Tensor? V=None) -> (Tensor, Tensor, Tensor)")
    assert call.op_schema(BACKWARD) == (
        "(Tensor grad_h, Tensor? grad_c_last, Tensor U, Tensor? x, Tensor? weight_c, Tensor bias, "
        "Tensor? c0, Tensor c, Tensor? mask_h, Tensor? mask_pad, SymInt hidden_size, "
        "bool bidirectional, bool has_skip_term, bool use_tanh, float scale_x, Tensor? V=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def test_bind_op_arguments_by_position_keyword_and_default():
    names = [n for n, _ in call.OP_ARGUMENTS[FORWARD]]
    values = list(range(len(names) - 1))  # V, the trailing default, left out
    bound = call.bind_op_arguments(FORWARD, values, {})
    assert [bound[n] for n in names] == values + [None]
    bound = call.bind_op_arguments(FORWARD, values[:3], dict(zip(names[3:-1], values[3:]), V=7))
    assert bound["V"] == 7 and bound["bias"] == 3
    with pytest.raises(TypeError, match="missing argument 'store_c'"):
        call.bind_op_arguments(FORWARD, values[:-1], {})
    with pytest.raises(TypeError, match="unexpected or repeated argument 'U'"):
        call.bind_op_arguments(FORWARD, values, {"U": 1})


@pytest.mark.parametrize("k,skip,with_v,store_c", list(itertools.product(
    (3, 4), (True, False), (False, True), (True, False))))
def test_which_arrays_take_part(k, skip, with_v, store_c):
    if k == 4 and not skip:
        with pytest.raises(ValueError, match="k = 4 .* needs has_skip_term=True"):
            RecurrenceCall.describe((5, 2, 4 * 6), "float32", 3, True, skip)
        return
    c = RecurrenceCall.describe((5, 2, k * 6), "float16", 3, True, skip, with_v=with_v,
                                store_c=store_c)
    assert (c.L, c.B, c.D, c.k, c.dirs) == (5, 2, 6, k, 2)
    assert c.reads_x == (skip and k == 3)
    assert c.required("x") == c.reads_x == c.takes_part("grad_x")
    assert c.required("V") == with_v == c.takes_part("grad_V")
    assert c.takes_part("c") == store_c
    assert not c.required("c0") and c.takes_part("c0")
    assert c.shape("U") == (5, 2, 6 * k) and c.shape("grad_weight_c_partial") == (2, 2, 6)
    assert c.dtype_of("U") == "float16" and c.dtype_of("bias") == "float32"
    assert c.dtype_of("mask_pad") == "uint8"
    assert set(c.outputs(FORWARD)) == {"h", "c_last"} | ({"c"} if store_c else set())


@pytest.mark.parametrize("shape,hidden,error,match", [
    ((5, 2), 3, ValueError, r"^U: expected rank 3"),
    ((5, 2, 10), 3, ValueError, r"^U: expected last axis D\*3 = 9 or D\*4 = 12"),
    ((5, 2, 9), 0, ValueError, r"^hidden_size: expected a positive int below 2\*\*31"),
    ((5, 2, 9), 2 ** 31, ValueError, r"^hidden_size: expected a positive int below 2\*\*31"),
    ((5, 2, 9), 3.0, ValueError, r"^hidden_size: expected a positive int"),
    ((5, 2, 9), True, ValueError, r"^hidden_size: expected a positive int"),
])
def test_describe_names_what_is_wrong(shape, hidden, error, match):
    with pytest.raises(error, match=match):
        RecurrenceCall.describe(shape, "float32", hidden)


def test_check_names_the_array():
    c = RecurrenceCall.describe((5, 2, 9), "float32", 3)
    arrays = {"U": np.zeros((5, 2, 9)), "x": np.zeros((5, 2, 3)), "bias": np.zeros(6)}
    c.check(FORWARD, arrays)
    with pytest.raises(ValueError, match=r"^x: required when the skip term reads it"):
        c.check(FORWARD, dict(arrays, x=None))
    with pytest.raises(ValueError, match=r"^bias: required for these options, got None"):
        c.check(FORWARD, dict(arrays, bias=None))
    with pytest.raises(ValueError, match=r"^mask_pad: expected shape \(L, B\) = \(5, 2\), got "
                                         r"\(2, 5\)"):
        c.check(FORWARD, dict(arrays, mask_pad=np.zeros((2, 5))))
    seen = []
    c.check(BACKWARD, dict(arrays, c=np.zeros((5, 2, 3)), grad_h=np.zeros((5, 2, 3))),
            lambda name, array, kind: seen.append((name, kind)))
    assert seen == [("U", "data"), ("x", "data"), ("bias", "param"), ("c", "data"),
                    ("grad_h", "data")]


# -- the GPU launch's argument list is the host launch's ------------------------------------------


class _Recording:
    """A backend that records its launches instead of running them."""

    def __init__(self, name, convert_scalar):
        self.name = name
        self.scalar_argument = convert_scalar
        self.launched = []

    def columns_per_thread(self):
        return kernels.GPU_COLUMNS_PER_THREAD

    def block_size(self, threads):
        return 64

    def launch(self, name, grid, block, args, work=None):
        self.launched.append((name, grid, block, list(args)))

    def launch_on(self, name, grid, block, args, stream):
        self.launched.append((name, grid, block, list(args)))


def _plain(value):
    """An argument as (kind, value, size in bytes): a pointer's address, or a scalar's value."""
    if value is None:
        return ("pointer", 0, 8)
    if isinstance(value, ctypes.c_void_p):
        return ("pointer", value.value or 0, 8)
    if isinstance(value, np.uint64):
        return ("pointer", int(value), 8)
    if isinstance(value, ctypes._SimpleCData):
        return ("scalar", value.value, ctypes.sizeof(value))
    return ("scalar", value.item(), value.dtype.itemsize)


#: Every launch the package makes: each kernel, dtype, k, skip term, V and (forward) store_c; the
#: backward always reads c, and k = 4 always has the skip term.
VARIANTS = [v for v in itertools.product(kernels.KERNELS, kernels.STORAGE_TYPES, (3, 4),
                                         (True, False), (False, True), (True, False))
            if not (v[2] == 4 and not v[3]) and not (v[0] == BACKWARD and not v[5])]


@pytest.mark.parametrize("kernel,dtype,k,skip,with_v,store_c", VARIANTS)
def test_gpu_argument_list_matches_the_host_one(kernel, dtype, k, skip, with_v, store_c):
    """For every kernel variant, the PyTorch op's two launches (host: ctypes addresses and
    scalars; GPU: 8-byte integers and NumPy scalars) pass the same values in the same order, with
    the sizes the kernel's parameters have."""
    from sru_cupy.backends import host
    c = RecurrenceCall.describe((3, 2, k * 4), dtype, 2, True, skip, True, 1.5, with_v=with_v,
                                store_c=store_c)
    names = call.KERNEL_OUTPUTS[kernel] + call.KERNEL_INPUTS[kernel]
    addresses = {n: 0x1000 * (i + 1) for i, n in enumerate(names)
                 if c.takes_part(n) and (c.required(n) or n in ("c0", "weight_c"))}
    host_backend = _Recording("host", host.scalar_argument)
    gpu_backend = _Recording("cupy", lambda value: value)
    launch.run_checked(kernel, c, {n: ctypes.c_void_p(a) for n, a in addresses.items()},
                       host_backend, None)
    launch.run_checked(kernel, c, {n: np.uint64(a) for n, a in addresses.items()}, gpu_backend,
                       None, stream=(0, 1))
    (host_name, *host_shape, host_args), = host_backend.launched
    (gpu_name, *gpu_shape, gpu_args), = gpu_backend.launched
    assert host_name == gpu_name == c.kernel_name(kernel) and host_shape == gpu_shape
    assert [_plain(a) for a in host_args] == [_plain(a) for a in gpu_args]
    assert len(host_args) == len(call.KERNEL_PARAMETERS[kernel])
    expected = [("pointer", addresses.get(n, 0), 8) for n in names]
    assert [_plain(a) for a in host_args][:len(names)] == expected
    scalars = [_plain(a) for a in host_args][len(names):]
    size = 8 if dtype == "float64" else 4
    assert scalars == [("scalar", 1.5, size), ("scalar", 3, 8), ("scalar", 2, 8), ("scalar", 2, 4),
                       ("scalar", 2, 4), ("scalar", c.flags, 4)]
