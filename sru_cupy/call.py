"""The recurrence call, described once: its options, the sizes they derive, which arrays exist for
which options with their shapes and kinds, and each kernel's parameters in order, by name.

Every layer builds one :class:`RecurrenceCall` per call and reads everything from it: the checks of
the array API (``launch``), of the PyTorch op (``ops``), the host and GPU launches (the kernel's
argument list: :meth:`RecurrenceCall.arguments`), the NumPy and PyTorch implementations used where
no compiler exists, the float64 reference, the op's fake (meta) implementations and the ONNX scan.
Arrays travel in mappings keyed by the names below; nothing slices an argument list by position.

Shapes, with L steps, B batch, d = hidden_size, dirs = 2 if bidirectional else 1, D = dirs * d and
k = 3 (u0, u1, u2) or 4 (plus the learned skip input u3, only with has_skip_term)::

    U (L, B, D*k)     x (L, B, D), the skip input, read when k == 3 and has_skip_term
    weight_c, bias (2*D,) (the forget gate's D values, then the reset gate's; weight_c None = v1)
    c0, mask_h (B, D)     mask_pad (L, B), nonzero = padding     V (L, B, D*2), optional
    h, c (L, B, D)     c_last (B, D)     grad_h like h     grad_c_last like c_last
    grad_U like U     grad_x like x     grad_c0 like c0     grad_V like V
    grad_weight_c_partial, grad_bias_partial (2, B, D): per-column sums, the caller sums over B

Kinds: ``data`` arrays hold the storage dtype (float16, bfloat16, float32, float64), ``param`` and
``partial`` arrays the arithmetic dtype (float32; float64 for float64 data), ``mask`` one byte per
step. The kernels take the arrays, then the scalars :data:`SCALARS`, in the order of
:data:`KERNEL_PARAMETERS` (that of ``cuda/sru_recurrence.cu``).

Imports neither torch nor cupy.
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import numpy as np

from . import kernels

FORWARD = "sru_recurrence_forward"
BACKWARD = "sru_recurrence_backward"

DATA, PARAM, PARTIAL, MASK = "data", "param", "partial", "mask"

#: When an array takes part in a call: always, never required (may be None), or only under an
#: option (then it must be given for that option, and is not read otherwise).
ALWAYS, OPTIONAL, READS_X, STORE_C, WITH_V = "always", "optional", "reads_x", "store_c", "with_v"


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One array of the call: its shape in the symbols of the module docstring, its kind, and when
    it takes part (ALWAYS, OPTIONAL, READS_X, STORE_C or WITH_V)."""
    shape: Tuple[str, ...]
    kind: str
    when: str


#: Every array of either kernel, by name.
ARRAYS: Dict[str, ArraySpec] = {
    # inputs
    "U": ArraySpec(("L", "B", "Dk"), DATA, ALWAYS),
    "x": ArraySpec(("L", "B", "D"), DATA, READS_X),
    "weight_c": ArraySpec(("2D",), PARAM, OPTIONAL),
    "V": ArraySpec(("L", "B", "2D"), DATA, WITH_V),
    "bias": ArraySpec(("2D",), PARAM, ALWAYS),
    "c0": ArraySpec(("B", "D"), DATA, OPTIONAL),
    "mask_h": ArraySpec(("B", "D"), PARAM, OPTIONAL),
    "mask_pad": ArraySpec(("L", "B"), MASK, OPTIONAL),
    "grad_h": ArraySpec(("L", "B", "D"), DATA, ALWAYS),
    "grad_c_last": ArraySpec(("B", "D"), DATA, OPTIONAL),
    # forward outputs (c is also the backward's input)
    "h": ArraySpec(("L", "B", "D"), DATA, ALWAYS),
    "c": ArraySpec(("L", "B", "D"), DATA, STORE_C),
    "c_last": ArraySpec(("B", "D"), DATA, ALWAYS),
    # backward outputs
    "grad_U": ArraySpec(("L", "B", "Dk"), DATA, ALWAYS),
    "grad_x": ArraySpec(("L", "B", "D"), DATA, READS_X),
    "grad_weight_c_partial": ArraySpec(("2", "B", "D"), PARTIAL, ALWAYS),
    "grad_bias_partial": ArraySpec(("2", "B", "D"), PARTIAL, ALWAYS),
    "grad_c0": ArraySpec(("B", "D"), DATA, ALWAYS),
    "grad_V": ArraySpec(("L", "B", "2D"), DATA, WITH_V),
}

#: The scalar parameters that follow the arrays in both kernels.
SCALARS = ("scale_x", "length", "batch", "d", "dirs", "flags")

#: Each kernel's outputs and inputs, in the order of its parameters (then SCALARS).
KERNEL_OUTPUTS = {
    FORWARD: ("h", "c", "c_last"),
    BACKWARD: ("grad_U", "grad_x", "grad_weight_c_partial", "grad_bias_partial", "grad_c0",
               "grad_V"),
}
KERNEL_INPUTS = {
    FORWARD: ("U", "x", "weight_c", "V", "bias", "c0", "mask_h", "mask_pad"),
    BACKWARD: ("U", "x", "weight_c", "V", "bias", "c0", "mask_h", "mask_pad", "c", "grad_h",
               "grad_c_last"),
}
KERNEL_PARAMETERS = {kernel: KERNEL_OUTPUTS[kernel] + KERNEL_INPUTS[kernel] + SCALARS
                     for kernel in kernels.KERNELS}

#: The options of the recurrence and their defaults (hidden_size has none).
OPTIONS = ("hidden_size", "bidirectional", "has_skip_term", "use_tanh", "scale_x")
OPTION_DEFAULTS = {"bidirectional": False, "has_skip_term": True, "use_tanh": False,
                   "scale_x": 1.0}

#: The PyTorch operators' schemas (``sru_cupy::recurrence_forward`` / ``_backward``): argument
#: names with their schema types, in order. Saved TorchScript modules and exported programs name
#: these operators, so the schemas never change.
OP_ARGUMENTS = {
    FORWARD: (("U", "Tensor"), ("x", "Tensor?"), ("weight_c", "Tensor?"), ("bias", "Tensor"),
              ("c0", "Tensor?"), ("mask_h", "Tensor?"), ("mask_pad", "Tensor?"),
              ("hidden_size", "SymInt"), ("bidirectional", "bool"), ("has_skip_term", "bool"),
              ("use_tanh", "bool"), ("scale_x", "float"), ("store_c", "bool"),
              ("V", "Tensor?=None")),
    BACKWARD: (("grad_h", "Tensor"), ("grad_c_last", "Tensor?"), ("U", "Tensor"),
               ("x", "Tensor?"), ("weight_c", "Tensor?"), ("bias", "Tensor"), ("c0", "Tensor?"),
               ("c", "Tensor"), ("mask_h", "Tensor?"), ("mask_pad", "Tensor?"),
               ("hidden_size", "SymInt"), ("bidirectional", "bool"), ("has_skip_term", "bool"),
               ("use_tanh", "bool"), ("scale_x", "float"), ("V", "Tensor?=None")),
}
_OP_ARGUMENT_NAMES = {kernel: tuple(name for name, _ in arguments)
                      for kernel, arguments in OP_ARGUMENTS.items()}
#: What each operator returns, by name: an absent array comes back as an empty (0,) tensor; the
#: backward's parameter gradients are summed over the batch.
OP_RESULTS = {
    FORWARD: ("h", "c", "c_last"),
    BACKWARD: ("grad_U", "grad_x", "grad_weight_c", "grad_bias", "grad_c0", "grad_V"),
}


def op_schema(kernel):
    """The schema string of the operator that runs ``kernel``."""
    arguments = ", ".join(f"{kind.split('=')[0]} {name}" + (f"={kind.split('=')[1]}"
                                                            if "=" in kind else "")
                          for name, kind in OP_ARGUMENTS[kernel])
    return f"({arguments}) -> ({', '.join(['Tensor'] * len(OP_RESULTS[kernel]))})"


def bind_op_arguments(kernel, args, kwargs):
    """The operator's arguments as given to a kernel implementation (positional, trailing
    defaults left out, or by keyword) as a dict by name, defaults filled in."""
    names = _OP_ARGUMENT_NAMES[kernel]
    if not kwargs and len(args) == len(names):
        return dict(zip(names, args))
    if len(args) > len(names):
        raise TypeError(f"{kernel}: expected at most {len(names)} arguments, got {len(args)}")
    bound = dict(zip(names, args))
    for name, value in kwargs.items():
        if name not in names or name in bound:
            raise TypeError(f"{kernel}: unexpected or repeated argument {name!r}")
        bound[name] = value
    for name, kind in OP_ARGUMENTS[kernel]:
        if name not in bound:
            if "=" not in kind:
                raise TypeError(f"{kernel}: missing argument {name!r}")
            bound[name] = None
    return bound


def keywords(function, given, defaults):
    """``given`` keyword arguments of ``function`` with ``defaults`` filled in; an unknown name is
    the TypeError Python would raise for it (the array functions take their options as keywords,
    listed once per function)."""
    unknown = [name for name in given if name not in defaults]
    if unknown:
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")
    return {**defaults, **given}


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_hidden_size(hidden_size, non_int_error=ValueError):
    """hidden_size as an int; ``non_int_error`` for a non-int (bool included: the array functions
    raise ValueError, the PyTorch op TypeError, as they always have), a ValueError for an int below
    1 or one too large for the kernels' 32-bit size parameter."""
    if not _is_int(hidden_size):
        raise non_int_error(f"hidden_size: expected a positive int, got {hidden_size!r}")
    if not 1 <= hidden_size < 2 ** 31:
        raise ValueError(f"hidden_size: expected a positive int below 2**31, got {hidden_size!r}")
    return int(hidden_size)


class KernelArrays(NamedTuple):
    """The arrays of one kernel in one call: inputs and outputs that take part, each as (name,
    shape, kind, required), and the kernel's array parameters in order (a name, or None where the
    parameter does not take part: a null pointer)."""
    inputs: Tuple[Tuple[str, Tuple[int, ...], str, bool], ...]
    outputs: Tuple[Tuple[str, Tuple[int, ...], str, bool], ...]
    parameters: Tuple[Optional[str], ...]


@dataclasses.dataclass(frozen=True)
class RecurrenceCall:
    """The sizes and options of one call. Build it with :meth:`describe`, which checks them (and
    returns the same object for the same arguments: what is derived from a call is worked out
    once)."""
    L: int
    B: int
    hidden_size: int
    bidirectional: bool
    k: int
    has_skip_term: bool
    use_tanh: bool
    scale_x: float
    dtype: str             #: storage dtype name, a key of kernels.STORAGE_TYPES
    with_v: bool = False   #: V (per-step offsets of weight_c) is given
    store_c: bool = True   #: the forward keeps c (training); False: the inference variant

    def __post_init__(self):
        # What is derived from the call, worked out once (not a field: no part of its identity).
        object.__setattr__(self, "memo", {})

    @classmethod
    def describe(cls, U_shape, dtype, hidden_size, bidirectional=False, has_skip_term=True,
                 use_tanh=False, scale_x=1.0, with_v=False, store_c=True):
        """The call for U of shape ``U_shape`` (L, B, D*k) holding ``dtype`` (a storage dtype
        name), checked: errors name the argument, what was expected and what was given."""
        try:
            return _described(cls, tuple(U_shape), dtype, hidden_size, bidirectional,
                              has_skip_term, use_tanh, scale_x, with_v, store_c)
        except TypeError as error:
            if "unhashable" not in str(error):
                raise
        return cls.checked(U_shape, dtype, hidden_size, bidirectional, has_skip_term,
                           use_tanh, scale_x, with_v, store_c)

    @classmethod
    def checked(cls, U_shape, dtype, hidden_size, bidirectional=False, has_skip_term=True,
                use_tanh=False, scale_x=1.0, with_v=False, store_c=True):
        """:meth:`describe` without its memo: for code that torch.compile traces, which would
        look through the memo (and warn that it does) rather than use it."""
        hidden_size = check_hidden_size(hidden_size)
        if dtype not in kernels.STORAGE_TYPES:
            raise TypeError(f"U: expected dtype float16, bfloat16, float32 or float64, got {dtype}")
        if len(U_shape) != 3:
            raise ValueError(f"U: expected rank 3 (L, B, D*k), got shape {tuple(U_shape)}")
        dirs = 2 if bidirectional else 1
        D = dirs * hidden_size
        width = int(U_shape[2])
        if width not in (3 * D, 4 * D):
            raise ValueError(f"U: expected last axis D*3 = {3 * D} or D*4 = {4 * D} (D = dirs * "
                             f"hidden_size = {dirs} * {hidden_size}), got {width}")
        if width == 4 * D and not has_skip_term:
            raise ValueError("U: k = 4 (a learned skip slot) needs has_skip_term=True, got "
                             "has_skip_term=False")
        return cls.traced(U_shape, dtype, hidden_size, bidirectional, has_skip_term, use_tanh,
                          scale_x, with_v, store_c)

    @classmethod
    def traced(cls, U_shape, dtype, hidden_size, bidirectional=False, has_skip_term=True,
               use_tanh=False, scale_x=1.0, with_v=False, store_c=True):
        """The call without checks, its step and batch counts kept as given: symbolic sizes
        under tracing (a fake implementation, an export) stay symbolic (an int() would fix
        them to the traced example's)."""
        D = (2 if bidirectional else 1) * hidden_size
        return cls(L=U_shape[0], B=U_shape[1], hidden_size=hidden_size,
                   bidirectional=bool(bidirectional), k=U_shape[2] // D,
                   has_skip_term=bool(has_skip_term), use_tanh=bool(use_tanh),
                   scale_x=float(scale_x), dtype=dtype, with_v=bool(with_v),
                   store_c=bool(store_c))

    # -- derived sizes and flags ----------------------------------------------------------------
    @property
    def dirs(self):
        return 2 if self.bidirectional else 1

    @property
    def D(self):
        return self.dirs * self.hidden_size

    @property
    def reads_x(self):
        """The skip term reads x (k == 3 with has_skip_term); with k == 4 it reads u3."""
        return self.has_skip_term and self.k == 3

    @property
    def flags(self):
        return ((kernels.FLAG_SKIP if self.has_skip_term else 0)
                | (kernels.FLAG_TANH if self.use_tanh else 0))

    @property
    def arith(self):
        """The arithmetic dtype name: float32, or float64 for float64 data."""
        return kernels.ARITHMETIC_DTYPES[self.dtype]

    @property
    def columns(self):
        """Columns (b, direction, unit) the kernels run through time: B * D."""
        return self.B * self.D

    @property
    def work(self):
        """Column-steps of the call: L * B * D."""
        return self.L * self.columns

    @property
    def empty(self):
        """True when no step of any column runs (L == 0 or B == 0)."""
        return self.L == 0 or self.B == 0

    # -- arrays -----------------------------------------------------------------------------------
    def _sizes(self):
        D = self.D
        return {"L": self.L, "B": self.B, "D": D, "Dk": D * self.k, "2D": 2 * D, "2": 2}

    def shape(self, name):
        """The shape of array ``name`` in this call."""
        sizes = self._sizes()
        return tuple(sizes[symbol] for symbol in ARRAYS[name].shape)

    def takes_part(self, name):
        """Whether array ``name`` is read or written in this call (for OPTIONAL ones: may be)."""
        when = ARRAYS[name].when
        return (when in (ALWAYS, OPTIONAL) or (when == READS_X and self.reads_x)
                or (when == STORE_C and self.store_c) or (when == WITH_V and self.with_v))

    def required(self, name):
        """Whether array ``name`` must be given (not None) in this call."""
        return ARRAYS[name].when != OPTIONAL and self.takes_part(name)

    def dtype_of(self, name):
        """The dtype name array ``name`` holds: the storage dtype, the arithmetic dtype, or uint8
        (mask_pad as the kernels read it)."""
        kind = ARRAYS[name].kind
        return {DATA: self.dtype, PARAM: self.arith, PARTIAL: self.arith, MASK: "uint8"}[kind]

    def arrays(self, kernel):
        """The :class:`KernelArrays` of ``kernel`` in this call (worked out once)."""
        found = self.memo.get(kernel)
        if found is None:
            def entries(names):
                return tuple((n, self.shape(n), ARRAYS[n].kind, self.required(n))
                             for n in names if self.takes_part(n))
            found = self.memo[kernel] = KernelArrays(
                entries(KERNEL_INPUTS[kernel]), entries(KERNEL_OUTPUTS[kernel]),
                tuple(n if self.takes_part(n) else None
                      for n in KERNEL_OUTPUTS[kernel] + KERNEL_INPUTS[kernel]))
        return found

    def outputs(self, kernel):
        """The names of the arrays ``kernel`` writes in this call."""
        return tuple(entry[0] for entry in self.arrays(kernel).outputs)

    def inputs(self, kernel):
        """The names of the arrays ``kernel`` may read in this call."""
        return tuple(entry[0] for entry in self.arrays(kernel).inputs)

    def check(self, kernel, arrays, check_array=None):
        """Checks the given inputs of ``kernel`` (a mapping name -> array or None): the required
        ones present and every given one of its shape, then ``check_array(name, array, kind)``
        (dtype, device: what the caller's kind of array needs) on each given one. Arrays that do
        not take part in this call are not looked at."""
        for name, expected, kind, required in self.arrays(kernel).inputs:
            array = arrays.get(name)
            if array is None:
                if required:
                    raise ValueError(_missing_message(name))
                continue
            if tuple(array.shape) != expected:
                # mask_pad's shape is named, as (L, B) in its B, L layout is an easy mistake
                named = "(L, B) = " if name == "mask_pad" else ""
                raise ValueError(f"{name}: expected shape {named}{expected}, got "
                                 f"{tuple(array.shape)}")
            if check_array is not None:
                check_array(name, array, kind)

    # -- the kernels --------------------------------------------------------------------------------
    def kernel_name(self, kernel, columns=kernels.GPU_COLUMNS_PER_THREAD):
        """The instantiation of ``kernel`` for this call with ``columns`` columns per thread (the
        one that reads V exactly when V is given)."""
        return kernels.kernel_name(kernel, self.dtype, self.k, columns, self.with_v)

    def scalars(self):
        """The scalar arguments by name, typed as the kernels declare them (scale_x in the
        arithmetic dtype, 64-bit step and batch counts, 32-bit sizes and flags)."""
        return {"scale_x": np.dtype(self.arith).type(self.scale_x),
                "length": np.int64(self.L), "batch": np.int64(self.B),
                "d": np.int32(self.hidden_size), "dirs": np.int32(self.dirs),
                "flags": np.int32(self.flags)}

    def arguments(self, kernel, arrays, convert: Optional[Callable[[Any], Any]] = None,
                  scalars: Optional[Mapping[str, Any]] = None):
        """The argument list of ``kernel``: each array parameter taken from ``arrays`` by name
        (None where it does not take part or is not given), each converted by ``convert`` when
        given (an address, a ctypes value), then the scalars (``scalars``, or :meth:`scalars`)."""
        values = [None if name is None else arrays.get(name)
                  for name in self.arrays(kernel).parameters]
        if convert is not None:
            values = [convert(value) for value in values]
        scalars = self.scalars() if scalars is None else scalars
        return values + [scalars[name] for name in SCALARS]


# typed: True and 1, or 3.0 and 3, are not the same hidden_size here
@functools.lru_cache(maxsize=256, typed=True)
def _described(cls, U_shape, dtype, hidden_size, bidirectional, has_skip_term, use_tanh, scale_x,
               with_v, store_c):
    return cls.checked(U_shape, dtype, hidden_size, bidirectional, has_skip_term, use_tanh,
                       scale_x, with_v, store_c)


def _missing_message(name):
    if name == "x":
        return "x: required when the skip term reads it (k = 3 with has_skip_term), got None"
    if name == "V":
        return "V: required for the per-step weight_c variant, got None"
    return f"{name}: required for these options, got None"
