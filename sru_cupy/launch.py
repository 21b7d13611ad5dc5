"""Launch layer: checks arguments, allocates outputs, sizes the grid and runs the SRU kernels.

Arrays are NumPy arrays (run by the host backend, the C++ build of the kernels; where no C++
compiler exists, by ``numpy_fallback``) or CuPy arrays (run by the CuPy backend on the current
stream of the arrays' device). The same code serves both; the kernels themselves are in
``cuda/sru_recurrence.cu`` and their math is documented there. What each call takes, the shapes
and the kernels' argument order are described once, in :mod:`sru_cupy.call`.

Shapes, with D = dirs * hidden_size and k = 3 or 4:
    U (L, B, D*k)  x (L, B, D)  weight_c, bias (2*D,)  c0, mask_h (B, D)  mask_pad (L, B)
    V (L, B, D*2): optional per-step offsets of weight_c, (forget, reset) per column
16-bit storage: float16, or bfloat16 (``ml_dtypes.bfloat16`` NumPy arrays; on CuPy, uint16 arrays
holding the bits with ``storage_dtype="bfloat16"``). Parameters (weight_c, bias, mask_h) are used in
the arithmetic type (float32, float64 for float64 data) and converted to it here.

Keyword arguments of both functions: ``hidden_size`` (required), ``bidirectional`` (False),
``has_skip_term`` (True), ``use_tanh`` (False), ``scale_x`` (1.0), ``mask_h``, ``mask_pad``, ``V``
(None), ``storage_dtype`` (None: U's dtype), ``out`` (None); the forward also ``store_c`` (True), the
backward ``reduce_params`` (True).
"""

import numpy as np

from . import implementation, kernels, numpy_fallback
from .backends import backend_for
from .call import ARRAYS, BACKWARD, DATA, FORWARD, KERNEL_OUTPUTS, PARAM, RecurrenceCall, keywords

_DTYPE_NAMES = {}

#: Keyword arguments of recurrence_forward / recurrence_backward beyond the options, by function,
#: with their defaults.
_COMMON_KEYWORDS = {"bidirectional": False, "has_skip_term": True, "use_tanh": False,
                    "scale_x": 1.0, "mask_h": None, "mask_pad": None, "V": None,
                    "storage_dtype": None, "out": None}
FORWARD_KEYWORDS = dict(_COMMON_KEYWORDS, store_c=True)
BACKWARD_KEYWORDS = dict(_COMMON_KEYWORDS, reduce_params=True)

#: The ``out`` keys of recurrence_backward and the result keys: the kernel's output names without
#: their "grad_" prefix ("U", "x", "c0", "weight_c_partial", "bias_partial", "V").
_BACKWARD_RESULT_NAMES = {name: name[len("grad_"):] for name in
                          ("grad_U", "grad_x", "grad_c0", "grad_weight_c_partial",
                           "grad_bias_partial", "grad_V")}


def dtype_name(dtype):
    """np.dtype(dtype).name, memoised: NumPy builds the name anew on every access (about 1.5 us,
    several times per launch)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = np.dtype(dtype).name
    return name


def _storage_name(array, storage_dtype):
    name = dtype_name(array.dtype)
    if storage_dtype is not None:
        if storage_dtype not in kernels.STORAGE_TYPES:
            raise TypeError(f"storage_dtype: expected one of {tuple(kernels.STORAGE_TYPES)}, "
                            f"got {storage_dtype!r}")
        if storage_dtype == "bfloat16" and name in ("uint16", "int16", "bfloat16"):
            return storage_dtype
        if name != storage_dtype:
            raise TypeError(f"U: dtype {name} does not hold storage_dtype {storage_dtype!r}")
        return storage_dtype
    if name not in kernels.STORAGE_TYPES:
        raise TypeError(f"U: expected dtype float16, float32, float64 or bfloat16, got {name}")
    return name


def launch_shape(backend, columns_total):
    """(columns per thread, grid, block) of a launch over ``columns_total`` = B * D columns."""
    columns = backend.columns_per_thread()
    threads = (columns_total + columns - 1) // columns
    block = backend.block_size(threads)
    return columns, ((threads + block - 1) // block, 1, 1), (block, 1, 1)


class _Arrays:
    """The arrays of one call on one backend: checked against the call's description and made
    what the kernels read (contiguous, native byte order, parameters in the arithmetic dtype,
    mask_pad as bytes), outputs allocated or taken from ``out``."""

    def __init__(self, kernel, arrays, hidden_size, options):
        U = arrays["U"]
        if not hasattr(U, "shape") or not hasattr(U, "dtype"):
            raise TypeError(f"U: expected a numpy.ndarray or cupy.ndarray, got {type(U).__name__}")
        self.backend = backend_for(U)
        self.reference = U
        self.call = RecurrenceCall.describe(
            U.shape, _storage_name(U, options["storage_dtype"]), hidden_size,
            options["bidirectional"], options["has_skip_term"], options["use_tanh"],
            options["scale_x"], with_v=arrays.get("V") is not None,
            store_c=options.get("store_c", True))
        # Outputs and state arrays share U's dtype, in native byte order (the kernels read native).
        self.storage = np.dtype(U.dtype).newbyteorder("=")
        self.xp = self.backend.array_module(U)
        for name, array in arrays.items():
            if array is not None and self.call.takes_part(name):
                self._same_kind(array, name)
        call = self.call
        for name in ("weight_c", "bias"):  # (2, D) and (2, dirs, d) views of the same values
            array = arrays.get(name)
            if array is not None and tuple(array.shape) in ((2, call.D),
                                                            (2, call.dirs, call.hidden_size)):
                arrays = dict(arrays, **{name: array.reshape(-1)})
        call.check(kernel, arrays, self._check_array)
        self.inputs = {name: self._prepared(name, arrays.get(name))
                       for name in self.call.inputs(kernel)}

    def _same_kind(self, array, argname):
        try:
            same = backend_for(array) is self.backend
        except TypeError:
            same = False
        if not same:
            kind = type(self.reference)
            raise TypeError(f"{argname}: expected {kind.__module__}.{kind.__name__} like U, got "
                            f"{type(array).__module__}.{type(array).__name__} (do not mix NumPy "
                            "and CuPy arrays)")
        self.backend.check_same_device(array, self.reference, argname)

    def _check_array(self, name, array, kind):
        """The dtype each kind of array must hold: data arrays U's, parameters a floating dtype,
        mask_pad bool, integer or floating (nonzero = padding)."""
        dtype = np.dtype(array.dtype)
        if kind == DATA:
            if dtype.newbyteorder("=") != self.storage:
                raise TypeError(f"{name}: expected dtype {self.storage.name} like U, got "
                                f"{dtype.name}")
        elif kind == PARAM:
            if dtype_name(array.dtype) not in kernels.STORAGE_TYPES:
                raise TypeError(f"{name}: expected a floating dtype, got {dtype.name}")
        elif dtype.kind not in "biuf":
            raise TypeError(f"{name}: expected a bool, integer or floating dtype, got "
                            f"{dtype.name}")

    def _prepared(self, name, array):
        if array is None:
            return None
        kind = ARRAYS[name].kind
        xp = self.xp
        if kind == DATA:
            # Byte-swapped input is converted to native order (a copy, like a non-contiguous one).
            return xp.ascontiguousarray(array.astype(self.storage, copy=False))
        if kind == PARAM:
            return xp.ascontiguousarray(array.reshape(-1).astype(self.call.arith, copy=False))
        if np.dtype(array.dtype) in (np.dtype(np.bool_), np.dtype(np.uint8)):
            # Already one byte per step, zero meaning a real step: no temporary needed.
            return xp.ascontiguousarray(array).view(xp.uint8)
        return xp.ascontiguousarray(array != 0).view(xp.uint8)

    def outputs(self, kernel, out, out_names):
        """The kernel's outputs: from ``out`` (keys: ``out_names[name]``) where given, checked,
        else allocated."""
        call = self.call
        if out is not None:
            allowed = {out_names[name] for name in KERNEL_OUTPUTS[kernel]}
            unknown = sorted(set(out) - allowed)
            if unknown:
                raise ValueError(f"out: expected keys among {sorted(allowed)}, got unknown "
                                 f"{unknown}")
        arrays = {}
        for name in call.outputs(kernel):
            key = out_names[name]
            given = None if out is None else out.get(key)
            arrays[name] = (self.backend.empty(call.shape(name), self._dtype(name)) if given is None
                            else self._checked_output(given, name, key))
        self._check_no_overlap(arrays, out_names)
        return arrays

    def _dtype(self, name):
        return self.storage if ARRAYS[name].kind == DATA else np.dtype(self.call.arith)

    def _checked_output(self, array, name, key):
        label = f"out[{key!r}]"
        self._same_kind(array, label)
        if not getattr(array.flags, "writeable", True):
            raise ValueError(f"{label}: expected a writeable array, got a read-only one")
        shape, dtype = self.call.shape(name), self._dtype(name)
        if tuple(array.shape) != shape or np.dtype(array.dtype) != dtype:
            raise ValueError(f"{label}: expected shape {shape} and dtype {dtype.name}, got "
                             f"{tuple(array.shape)} {np.dtype(array.dtype).name}")
        if not array.flags.c_contiguous:
            raise ValueError(f"{label}: expected a C-contiguous array")
        return array

    def _check_no_overlap(self, outputs, out_names):
        """An output that shares memory with an input or another output would be read after it is
        written: refused, naming both."""
        named = [(f"out[{out_names[n]!r}]", a) for n, a in outputs.items()]
        others = [(n, a) for n, a in self.inputs.items() if a is not None]
        may_share = getattr(self.xp, "may_share_memory", None) or np.may_share_memory
        for i, (label, array) in enumerate(named):
            for other, value in named[:i] + others:
                if may_share(array, value):
                    raise ValueError(f"{label}: shares memory with {other}; outputs must not "
                                     "overlap the inputs or each other")

    def run(self, kernel, arrays):
        """Runs ``kernel`` over ``arrays`` (inputs and outputs by name) on this backend: the
        compiled kernels, or NumPy's implementation where no C++ compiler exists."""
        call = self.call
        if self.backend.name == "host" and implementation.for_numpy() == "numpy":
            numpy_fallback.run(kernel, call, arrays)
            return
        columns, grid, block = launch_shape(self.backend, call.columns)
        self.backend.launch(call.kernel_name(kernel, columns), grid, block,
                            call.arguments(kernel, arrays), work=call.work)


_FORWARD_OUT_NAMES = {"h": "h", "c": "c", "c_last": "c_last"}


def recurrence_forward(U, x, weight_c, bias, c0=None, *, hidden_size, **options):
    """Runs the SRU recurrence forward (with V, the gates use weight_c + V_t at step t).

    Returns ``(h, c, c_last)``: h (L, B, D), c (L, B, D) the state after every step (None when
    ``store_c`` is False, the inference variant), c_last (B, D) the final state of each direction.
    ``out`` may hold preallocated contiguous outputs under the keys "h", "c", "c_last". Keyword
    arguments: see the module docstring.
    """
    options = keywords("recurrence_forward", options, FORWARD_KEYWORDS)
    given = dict(U=U, x=x, weight_c=weight_c, bias=bias, c0=c0, mask_h=options["mask_h"],
                 mask_pad=options["mask_pad"], V=options["V"])
    p = _Arrays(FORWARD, given, hidden_size, options)
    call = p.call
    with p.backend.device_guard(U):  # outputs and launch on U's device
        out = p.outputs(FORWARD, options["out"], _FORWARD_OUT_NAMES)
        h, c, c_last = out["h"], out.get("c"), out["c_last"]
        if call.B == 0:
            return h, c, c_last
        if call.L == 0:  # no step: the final state is the initial one
            c0 = p.inputs["c0"]
            if c0 is None:
                c_last[...] = 0
            else:
                c_last[...] = c0
            return h, c, c_last
        p.run(FORWARD, {**p.inputs, **out})
        return h, c, c_last


def recurrence_backward(grad_h, grad_c_last, U, x, weight_c, bias, c0, c, *, hidden_size,
                        **options):
    """Gradients of the SRU recurrence, given dL/dh (L, B, D) and dL/dc_last (B, D, or None).

    ``c`` is the forward's state after every step. Returns a dict: "U" (L, B, D*k), "x" (L, B, D) or
    None when the recurrence does not read x, "c0" (B, D), "weight_c" and "bias" (2*D,) in the
    arithmetic dtype, and their per-column partials "weight_c_partial", "bias_partial" (2, B, D)
    before the sum over the batch, and "V" (L, B, D*2) when V is given (None otherwise). ``out``
    may hold preallocated outputs under "U", "x", "c0", "weight_c_partial", "bias_partial", "V".
    With ``reduce_params=False`` the sums over the batch are left to the caller ("weight_c" and
    "bias" are then absent). Keyword arguments: see the module docstring.
    """
    options = keywords("recurrence_backward", options, BACKWARD_KEYWORDS)
    given = dict(grad_h=grad_h, grad_c_last=grad_c_last, U=U, x=x, weight_c=weight_c, bias=bias,
                 c0=c0, c=c, mask_h=options["mask_h"], mask_pad=options["mask_pad"],
                 V=options["V"])
    p = _Arrays(BACKWARD, given, hidden_size, options)
    call = p.call
    with p.backend.device_guard(U):  # outputs and launch on U's device
        out = p.outputs(BACKWARD, options["out"], _BACKWARD_RESULT_NAMES)
        if call.B > 0 and call.L == 0:  # nothing ran: dL/dc0 is dL/dc_last
            out["grad_weight_c_partial"][...] = 0
            out["grad_bias_partial"][...] = 0
            if "grad_V" in out:
                out["grad_V"][...] = 0
            grad_c_last = p.inputs["grad_c_last"]
            if grad_c_last is None:
                out["grad_c0"][...] = 0
            else:
                out["grad_c0"][...] = grad_c_last
        elif call.B > 0:
            p.run(BACKWARD, {**p.inputs, **out})
        grads = {key: out.get(name) for name, key in _BACKWARD_RESULT_NAMES.items()}
        if options["reduce_params"]:
            grads["weight_c"] = grads["weight_c_partial"].sum(axis=1).reshape(2 * call.D)
            grads["bias"] = grads["bias_partial"].sum(axis=1).reshape(2 * call.D)
        return grads


# -- kernels over memory the caller has checked ---------------------------------------------------


def run_checked(kernel, call, addresses, backend, convert, stream=None):
    """Runs ``kernel`` for ``call`` (a :class:`~sru_cupy.call.RecurrenceCall`, whose sizes it
    checked) over arrays given by address in ``addresses`` (a mapping by the description's names)
    that the caller has checked against ``call``, allocated and made contiguous: the PyTorch op's
    path, whose own checks the launch layer's would repeat (on small problems they cost as much as
    the kernel). ``backend`` is the host or CuPy backend module, ``convert`` makes an address the
    backend's argument value (None for an absent array), ``stream`` the CuPy backend's stream handle.

    What it checks itself: the call is not empty, and every array the call requires has an
    address (a ValueError naming it otherwise); the memory behind an address is the caller's word.
    """
    if call.empty:
        raise ValueError(f"call: expected L >= 1 and B >= 1 for a launch, got L={call.L}, "
                         f"B={call.B}")
    arrays = call.arrays(kernel)
    for name, _, _, required in arrays.outputs + arrays.inputs:
        if required and addresses.get(name) is None:
            raise ValueError(f"{name}: required for these options, got no address")
    name, grid, block, scalars = _launch_plan(kernel, call, backend)
    arguments = call.arguments(kernel, addresses, convert, scalars)
    if stream is None:
        backend.launch(name, grid, block, arguments, work=call.work)
    else:
        backend.launch_on(name, grid, block, arguments, stream)


def _launch_plan(kernel, call, backend):
    """(kernel name, grid, block, scalar argument values) of a launch, made once per call and
    backend (the scalars as the backend takes them), kept with the call."""
    key = ("plan", kernel, backend.name, backend.columns_per_thread())
    plan = call.memo.get(key)
    if plan is None:
        columns, grid, block = launch_shape(backend, call.columns)
        scalars = {name: backend.scalar_argument(value) for name, value in call.scalars().items()}
        plan = call.memo[key] = (call.kernel_name(kernel, columns), grid, block, scalars)
    return plan
