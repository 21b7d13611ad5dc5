"""Launch layer: checks arguments, allocates outputs, sizes the grid and runs the SRU kernels.

Arrays are NumPy arrays (run by the host backend, the C++ build of the kernels; where no C++
compiler exists, by ``numpy_fallback``) or CuPy arrays (run by the CuPy backend on the current
stream of the arrays' device). The same code serves both; the kernels themselves are in
``cuda/sru_recurrence.cu`` and their math is documented there.

Shapes, with D = dirs * hidden_size and k = 3 or 4:
    U (L, B, D*k)  x (L, B, D)  weight_c, bias (2*D,)  c0, mask_h (B, D)  mask_pad (L, B)
    V (L, B, D*2): optional per-step offsets of weight_c, (forget, reset) per column
16-bit storage: float16, or bfloat16 (``ml_dtypes.bfloat16`` NumPy arrays; on CuPy, uint16 arrays
holding the bits with ``storage_dtype="bfloat16"``). Parameters (weight_c, bias, mask_h) are used in
the arithmetic type (float32, float64 for float64 data) and converted to it here.
"""

import functools

import numpy as np

from . import kernels, numpy_fallback
from .backends import backend_for

_DTYPE_NAMES = {}


def _dtype_name(dtype):
    """np.dtype(dtype).name, memoised: NumPy builds the name anew on every access (about 1.5 us,
    several times per launch)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = np.dtype(dtype).name
    return name


def _storage_name(array, storage_dtype, argname):
    name = _dtype_name(array.dtype)
    if storage_dtype is not None:
        if storage_dtype not in kernels.STORAGE_TYPES:
            raise TypeError(f"storage_dtype: expected one of {tuple(kernels.STORAGE_TYPES)}, "
                            f"got {storage_dtype!r}")
        if storage_dtype == "bfloat16" and name in ("uint16", "int16", "bfloat16"):
            return storage_dtype
        if name != storage_dtype:
            raise TypeError(f"{argname}: dtype {name} does not hold storage_dtype {storage_dtype!r}")
        return storage_dtype
    if name not in kernels.STORAGE_TYPES:
        raise TypeError(f"{argname}: expected dtype float16, float32, float64 or bfloat16, got {name}")
    return name


def _launch_shape(backend, columns_total):
    """(columns per thread, grid, block) of a launch over ``columns_total`` = B * D columns."""
    columns = backend.columns_per_thread()
    threads = (columns_total + columns - 1) // columns
    block = backend.block_size(threads)
    return columns, ((threads + block - 1) // block, 1, 1), (block, 1, 1)


class _Problem:
    """Checked sizes and options of one call."""

    def __init__(self, U, hidden_size, bidirectional, has_skip_term, use_tanh, scale_x, storage_dtype):
        if not hasattr(U, "shape") or not hasattr(U, "dtype"):
            raise TypeError(f"U: expected a numpy.ndarray or cupy.ndarray, got {type(U).__name__}")
        if U.ndim != 3:
            raise ValueError(f"U: expected rank 3 (L, B, D*k), got shape {tuple(U.shape)}")
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, (int, np.integer)) \
                or hidden_size < 1:
            raise ValueError(f"hidden_size: expected a positive int, got {hidden_size!r}")
        self.backend = backend_for(U)
        self.array_type = type(U)
        self.reference = U
        self.dtype = _storage_name(U, storage_dtype, "U")
        # Outputs and state arrays share U's dtype, in native byte order (the kernels read native).
        self.storage = np.dtype(U.dtype).newbyteorder("=")
        self.arith = kernels.ARITHMETIC_DTYPES[self.dtype]
        self.L, self.B = int(U.shape[0]), int(U.shape[1])
        self.d = int(hidden_size)
        self.dirs = 2 if bidirectional else 1
        self.D = self.dirs * self.d
        width = int(U.shape[2])
        if width not in (self.D * 3, self.D * 4):
            raise ValueError(f"U: expected last axis D*3 = {self.D * 3} or D*4 = {self.D * 4} "
                             f"(D = dirs * hidden_size = {self.dirs} * {self.d}), got {width}")
        self.k = width // self.D
        if self.k == 4 and not has_skip_term:
            raise ValueError("U: k = 4 (a learned skip slot) needs has_skip_term=True, "
                             "got has_skip_term=False")
        self.skip = bool(has_skip_term)
        self.use_tanh = bool(use_tanh)
        self.reads_x = self.skip and self.k == 3
        self.scale_x = np.dtype(self.arith).type(scale_x)
        self.flags = np.int32((kernels.FLAG_SKIP if self.skip else 0)
                              | (kernels.FLAG_TANH if self.use_tanh else 0))
        self.xp = self.backend.array_module(U)

    # -- argument preparation -------------------------------------------------------------------
    def _same_kind(self, array, argname):
        try:
            same = backend_for(array) is self.backend
        except TypeError:
            same = False
        if not same:
            raise TypeError(f"{argname}: expected {self.array_type.__module__}."
                            f"{self.array_type.__name__} like U, got {type(array).__module__}."
                            f"{type(array).__name__} (do not mix NumPy and CuPy arrays)")
        self.backend.check_same_device(array, self.reference, argname)

    def data(self, array, shape, argname, required=True):
        """A contiguous array of the storage dtype with the given shape (or None)."""
        if array is None:
            if required:
                raise ValueError(f"{argname}: required for these options, got None")
            return None
        self._same_kind(array, argname)
        if tuple(array.shape) != shape:
            raise ValueError(f"{argname}: expected shape {shape}, got {tuple(array.shape)}")
        if np.dtype(array.dtype).newbyteorder("=") != self.storage:
            raise TypeError(f"{argname}: expected dtype {self.storage.name} like U, "
                            f"got {np.dtype(array.dtype).name}")
        # Byte-swapped input is converted to native order (a copy, like a non-contiguous one).
        return self.xp.ascontiguousarray(array.astype(self.storage, copy=False))

    def param(self, array, argname, shape, required=True):
        """A contiguous array in the arithmetic dtype (weight_c, bias, mask_h)."""
        if array is None:
            if required:
                raise ValueError(f"{argname}: required, got None")
            return None
        self._same_kind(array, argname)
        if tuple(array.shape) != shape and tuple(array.shape) not in self._param_shapes(shape):
            raise ValueError(f"{argname}: expected shape {shape}, got {tuple(array.shape)}")
        name = _dtype_name(array.dtype)
        if name not in kernels.STORAGE_TYPES:  # the floating dtypes the package knows
            raise TypeError(f"{argname}: expected a floating dtype, got {name}")
        return self.xp.ascontiguousarray(array.reshape(-1).astype(self.arith, copy=False))

    def _param_shapes(self, shape):
        if shape == (2 * self.D,):  # weight_c and bias may come as (2, D) or (2, dirs, d)
            return {(2, self.D), (2, self.dirs, self.d)}
        return set()

    def pad_mask(self, mask_pad):
        if mask_pad is None:
            return None
        self._same_kind(mask_pad, "mask_pad")
        if tuple(mask_pad.shape) != (self.L, self.B):
            raise ValueError(f"mask_pad: expected shape (L, B) = {(self.L, self.B)}, "
                             f"got {tuple(mask_pad.shape)}")
        if np.dtype(mask_pad.dtype) in (np.dtype(np.bool_), np.dtype(np.uint8)):
            # Already one byte per step, zero meaning a real step: no temporary needed.
            return self.xp.ascontiguousarray(mask_pad).view(self.xp.uint8)
        return self.xp.ascontiguousarray(mask_pad != 0).view(self.xp.uint8)

    def empty(self, shape, arith=False):
        return self.backend.empty(shape, np.dtype(self.arith) if arith else self.storage)

    def check_out_keys(self, out, allowed):
        if out is None:
            return
        unknown = sorted(set(out) - set(allowed))
        if unknown:
            raise ValueError(f"out: expected keys among {sorted(allowed)}, got unknown {unknown}")
        given = [a for a in out.values() if a is not None]
        if len({id(a) for a in given}) != len(given):
            raise ValueError("out: the same array is given for two outputs")

    def output(self, out, key, shape, arith=False):
        if out is None or out.get(key) is None:
            return self.empty(shape, arith)
        array = out[key]
        self._same_kind(array, f"out[{key!r}]")
        if not getattr(array.flags, "writeable", True):
            raise ValueError(f"out[{key!r}]: expected a writeable array, got a read-only one")
        dtype = np.dtype(self.arith) if arith else self.storage
        if tuple(array.shape) != shape or np.dtype(array.dtype) != dtype:
            raise ValueError(f"out[{key!r}]: expected shape {shape} and dtype {dtype.name}, got "
                             f"{tuple(array.shape)} {np.dtype(array.dtype).name}")
        if not array.flags.c_contiguous:
            raise ValueError(f"out[{key!r}]: expected a C-contiguous array")
        return array

    def kernel(self, kernel, with_v):
        """(name, grid, block) of a kernel for this problem on this backend; ``with_v``: V is
        given (the kernel instantiation that reads it)."""
        columns, grid, block = _launch_shape(self.backend, self.B * self.D)
        return kernels.kernel_name(kernel, self.dtype, self.k, columns, with_v), grid, block

    def uses_numpy_fallback(self):
        """True for NumPy arrays where no C++ compiler can build the host kernels."""
        return self.backend.name == "host" and not self.backend.available()

    def sizes(self):
        return (self.scale_x, np.int64(self.L), np.int64(self.B), np.int32(self.d),
                np.int32(self.dirs), self.flags)


def recurrence_forward(U, x, weight_c, bias, c0=None, *, hidden_size, bidirectional=False,
                       has_skip_term=True, use_tanh=False, scale_x=1.0, mask_h=None, mask_pad=None,
                       store_c=True, storage_dtype=None, out=None, V=None):
    """Runs the SRU recurrence forward (with V, the gates use weight_c + V_t at step t).

    Returns ``(h, c, c_last)``: h (L, B, D), c (L, B, D) the state after every step (None when
    ``store_c`` is False, the inference variant), c_last (B, D) the final state of each direction.
    ``out`` may hold preallocated contiguous outputs under the keys "h", "c", "c_last".
    """
    p = _Problem(U, hidden_size, bidirectional, has_skip_term, use_tanh, scale_x, storage_dtype)
    with p.backend.device_guard(U):  # outputs and launch on U's device
        L, B, D = p.L, p.B, p.D
        U = p.data(U, (L, B, D * p.k), "U")
        x = p.data(x, (L, B, D), "x") if p.reads_x else None
        if p.reads_x and x is None:
            raise ValueError("x: required when the skip term reads it (k = 3 with has_skip_term)")
        weight_c = p.param(weight_c, "weight_c", (2 * D,), required=False)
        bias = p.param(bias, "bias", (2 * D,))
        c0 = p.data(c0, (B, D), "c0", required=False)
        mask_h = p.param(mask_h, "mask_h", (B, D), required=False)
        mask_pad = p.pad_mask(mask_pad)
        V = p.data(V, (L, B, D * 2), "V", required=False)

        p.check_out_keys(out, ("h", "c", "c_last"))
        h = p.output(out, "h", (L, B, D))
        c = p.output(out, "c", (L, B, D)) if store_c else None
        c_last = p.output(out, "c_last", (B, D))
        if B == 0:
            return h, c, c_last
        if L == 0:  # no step: the final state is the initial one
            if c0 is None:
                c_last[...] = 0
            else:
                c_last[...] = c0
            return h, c, c_last
        if p.uses_numpy_fallback():
            numpy_fallback.recurrence_forward(p, h, c, c_last, U, x, weight_c, bias, c0, mask_h,
                                              mask_pad, V)
            return h, c, c_last
        name, grid, block = p.kernel("sru_recurrence_forward", V is not None)
        p.backend.launch(name, grid, block,
                         [h, c, c_last, U, x, weight_c, V, bias, c0, mask_h, mask_pad, *p.sizes()],
                         work=L * B * D)
        return h, c, c_last


def recurrence_backward(grad_h, grad_c_last, U, x, weight_c, bias, c0, c, *, hidden_size,
                        bidirectional=False, has_skip_term=True, use_tanh=False, scale_x=1.0,
                        mask_h=None, mask_pad=None, storage_dtype=None, out=None,
                        reduce_params=True, V=None):
    """Gradients of the SRU recurrence, given dL/dh (L, B, D) and dL/dc_last (B, D, or None).

    ``c`` is the forward's state after every step. Returns a dict: "U" (L, B, D*k), "x" (L, B, D) or
    None when the recurrence does not read x, "c0" (B, D), "weight_c" and "bias" (2*D,) in the
    arithmetic dtype, and their per-column partials "weight_c_partial", "bias_partial" (2, B, D)
    before the sum over the batch, and "V" (L, B, D*2) when V is given (None otherwise). ``out``
    may hold preallocated outputs under "U", "x", "c0", "weight_c_partial", "bias_partial", "V". With ``reduce_params=False`` the sums over the batch are
    left to the caller ("weight_c" and "bias" are then absent).
    """
    p = _Problem(U, hidden_size, bidirectional, has_skip_term, use_tanh, scale_x, storage_dtype)
    with p.backend.device_guard(U):  # outputs and launch on U's device
        L, B, D = p.L, p.B, p.D
        U = p.data(U, (L, B, D * p.k), "U")
        x = p.data(x, (L, B, D), "x") if p.reads_x else None
        weight_c = p.param(weight_c, "weight_c", (2 * D,), required=False)
        bias = p.param(bias, "bias", (2 * D,))
        c0 = p.data(c0, (B, D), "c0", required=False)
        mask_h = p.param(mask_h, "mask_h", (B, D), required=False)
        mask_pad = p.pad_mask(mask_pad)
        c = p.data(c, (L, B, D), "c")
        grad_h = p.data(grad_h, (L, B, D), "grad_h")
        grad_c_last = p.data(grad_c_last, (B, D), "grad_c_last", required=False)
        V = p.data(V, (L, B, D * 2), "V", required=False)

        p.check_out_keys(out, ("U", "x", "c0", "weight_c_partial", "bias_partial", "V"))
        grads = {
            "U": p.output(out, "U", (L, B, D * p.k)),
            "x": p.output(out, "x", (L, B, D)) if p.reads_x else None,
            "c0": p.output(out, "c0", (B, D)),
            "weight_c_partial": p.output(out, "weight_c_partial", (2, B, D), arith=True),
            "bias_partial": p.output(out, "bias_partial", (2, B, D), arith=True),
            "V": p.output(out, "V", (L, B, D * 2)) if V is not None else None,
        }
        if B > 0 and L == 0:  # nothing ran: dL/dc0 is dL/dc_last
            grads["weight_c_partial"][...] = 0
            grads["bias_partial"][...] = 0
            if grads["V"] is not None:
                grads["V"][...] = 0
            if grad_c_last is None:
                grads["c0"][...] = 0
            else:
                grads["c0"][...] = grad_c_last
        elif B > 0 and p.uses_numpy_fallback():
            numpy_fallback.recurrence_backward(p, grads, U, x, weight_c, bias, c0, mask_h, mask_pad,
                                               c, grad_h, grad_c_last, V)
        elif B > 0:
            name, grid, block = p.kernel("sru_recurrence_backward", V is not None)
            p.backend.launch(name, grid, block,
                             [grads["U"], grads["x"], grads["weight_c_partial"], grads["bias_partial"],
                              grads["c0"], grads["V"], U, x, weight_c, V, bias, c0, mask_h,
                              mask_pad, c, grad_h,
                              grad_c_last, *p.sizes()], work=L * B * D)
        if reduce_params:
            grads["weight_c"] = grads["weight_c_partial"].sum(axis=1).reshape(2 * D)
            grads["bias"] = grads["bias_partial"].sum(axis=1).reshape(2 * D)
        return grads


# -- host kernels over memory the caller has checked ----------------------------------------------


@functools.lru_cache(maxsize=1024)
def _host_arguments(kernel, dtype, k, columns, L, B, hidden_size, dirs, flags, scale_x, with_v):
    """(kernel name, the size arguments as ctypes values) of a host launch, made once per
    problem."""
    from .backends import host
    if dtype not in kernels.STORAGE_TYPES:
        raise TypeError(f"dtype: expected one of {tuple(kernels.STORAGE_TYPES)}, got {dtype!r}")
    arith = np.dtype(kernels.ARITHMETIC_DTYPES[dtype]).type
    sizes = tuple(host.as_ctypes_scalar(v) for v in (
        arith(scale_x), np.int64(L), np.int64(B), np.int32(hidden_size), np.int32(dirs),
        np.int32(flags)))
    return kernels.kernel_name(kernel, dtype, k, columns, with_v), sizes


#: Where V's address is in ``host_recurrence``'s ``addresses``, per kernel.
_V_ADDRESS_INDEX = {"sru_recurrence_forward": 6, "sru_recurrence_backward": 9}


def host_recurrence(kernel, addresses, *, dtype, k, L, B, hidden_size, bidirectional,
                    has_skip_term, use_tanh, scale_x, with_v=None):
    """Runs ``kernel`` ("sru_recurrence_forward" or "sru_recurrence_backward") with the host
    backend over arrays given by address, which the caller has checked, allocated and made
    contiguous: the PyTorch op's CPU path, for which the checks and conversions of
    ``recurrence_forward`` / ``recurrence_backward`` would repeat its own (on small problems
    they cost as much as the kernel).

    ``addresses``: ``ctypes.c_void_p`` values (None for an absent array), in the kernel's order:
    forward (h, c, c_last, U, x, weight_c, V, bias, c0, mask_h, mask_pad); backward (grad U,
    grad x, weight_c partials, bias partials, grad c0, grad V, U, x, weight_c, V, bias, c0,
    mask_h, mask_pad, c, grad_h, grad_c_last). Storage arrays hold ``dtype``, weight_c, bias,
    mask_h and the partials its arithmetic dtype, mask_pad one byte per step, with the shapes of
    ``recurrence_forward``; x is None unless the skip term reads it, c None for inference. Needs
    L >= 1, B >= 1 and the host library (a C++ compiler). ``with_v`` picks the kernel
    instantiation that reads V; by default, whether V's address is given (an instantiation
    without it would ignore V)."""
    from .backends import host
    if kernel not in _V_ADDRESS_INDEX:
        raise ValueError(f"kernel: expected one of {tuple(_V_ADDRESS_INDEX)}, got {kernel!r}")
    v_given = addresses[_V_ADDRESS_INDEX[kernel]] is not None
    if with_v is None:
        with_v = v_given
    elif v_given and not with_v:
        raise ValueError("with_v: expected True (or None) when V's address is given, got False")
    dirs = 2 if bidirectional else 1
    columns, grid, block = _launch_shape(host, B * dirs * hidden_size)
    flags = (kernels.FLAG_SKIP if has_skip_term else 0) | (kernels.FLAG_TANH if use_tanh else 0)
    name, sizes = _host_arguments(kernel, dtype, k, columns, L, B, hidden_size, dirs, flags,
                                  float(scale_x), bool(with_v))
    host.launch(name, grid, block, [*addresses, *sizes], work=L * B * dirs * hidden_size)
