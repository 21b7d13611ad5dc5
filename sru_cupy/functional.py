"""Array-in, array-out SRU recurrence: NumPy on the CPU, CuPy on the GPU, any DLPack producer.

    from sru_cupy import functional as F
    h, c, c_last = F.recurrence_forward(U, x, weight_c, bias, c0, hidden_size=d)
    h, c_last = F.recurrence_inference(U, x, weight_c, bias, c0, hidden_size=d)
    grads = F.recurrence_backward(grad_h, grad_c_last, U, x, weight_c, bias, c0, c, hidden_size=d)

Shapes, with L steps, B batch, d = hidden_size, dirs = 2 if bidirectional else 1, D = dirs * d and
k = 3 (u0, u1, u2) or 4 (plus the learned skip input u3, only with has_skip_term):

    U (L, B, D*k)   x (L, B, D) the skip input (read only when k == 3 and has_skip_term)
    weight_c, bias (2*D,) (forget gate's D values, then the reset gate's; weight_c None = v1)
    c0, mask_h (B, D)   mask_pad (L, B), nonzero = padding   h, c (L, B, D)   c_last (B, D)
    V (L, B, D*2) optional per-step offsets of weight_c: (forget, reset) per column; the gates of
    step t then use weight_c + V_t (the second output of an `sru` custom_m / transform_module)

Inputs. Each array argument may be
  * a ``numpy.ndarray``: runs on the CPU with the host backend (the C++ build of the CUDA kernels);
  * a ``cupy.ndarray``: runs on the GPU holding it, on CuPy's *current stream* of that device (a
    ``with cupy.cuda.Stream():`` block, CUDA graph capture, or ``cupy.cuda.ExternalStream`` around
    another framework's stream), whatever device is current;
  * any other DLPack producer (``torch.Tensor``, ``jax.Array``, ...): read through
    ``__dlpack_device__()`` / ``__dlpack__()`` without a copy, CPU memory as a NumPy view
    (``numpy.from_dlpack``) and CUDA memory as a CuPy view (``cupy.from_dlpack``). bfloat16
    producers are accepted too: their DLPack descriptor is relabelled as 16-bit integers (same bits,
    zero copy), viewed as ``ml_dtypes.bfloat16`` on the CPU and passed to the kernels as uint16 bits
    with ``storage_dtype="bfloat16"`` on the GPU. A torch tensor that requires grad must be
    ``.detach()``-ed first (PyTorch refuses to export it).
All arrays of one call must be on the same side: mixing CPU (NumPy) and GPU (CuPy) arrays is a
TypeError, and GPU arrays must be on one device.

Data arrays (U, x, c0, V, c, grad_h, grad_c_last) share U's dtype: float16, float32, float64 or
bfloat16 (``ml_dtypes.bfloat16`` NumPy arrays; on CuPy, uint16/int16 arrays of bfloat16 bits with
``storage_dtype="bfloat16"``). weight_c, bias and mask_h may be any floating dtype and are used in
the arithmetic dtype (float32; float64 for float64 data).

Outputs are always ``numpy.ndarray`` (CPU) or ``cupy.ndarray`` (GPU), never the producer's type;
wrap them back with e.g. ``torch.from_dlpack(h)`` / ``torch.from_numpy(h)``, or pass the producer's
own preallocated tensors in ``out=`` (also converted without a copy, then written in place), which
is also the way to get bfloat16 results into torch tensors. 16-bit outputs on the GPU are uint16
bit patterns when the inputs came as bits (bfloat16).

Importing this module imports neither torch nor cupy (CuPy is imported when a CUDA array is seen).
"""

import ctypes

import numpy as np

from . import launch

__all__ = ["recurrence_forward", "recurrence_inference", "recurrence_backward", "as_array"]

# DLPack constants (dlpack.h).
_KDL_CPU, _KDL_CUDA, _KDL_CUDA_HOST, _KDL_CUDA_MANAGED = 1, 2, 3, 13
_KDL_UINT, _KDL_BFLOAT = 1, 4
_CPU_DEVICES = (_KDL_CPU, _KDL_CUDA_HOST)
_CUDA_DEVICES = (_KDL_CUDA, _KDL_CUDA_MANAGED)

# Arguments read in the arithmetic dtype (launch converts them; bfloat16 bits are decoded here).
_PARAM_ARGS = ("weight_c", "bias", "mask_h")


# -- DLPack ---------------------------------------------------------------------------------------


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


# DLManagedTensorVersioned: {uint32 major, minor; void* manager_ctx; void (*deleter)(...);
# uint64 flags; DLTensor dl_tensor}; the legacy DLManagedTensor starts with its DLTensor.
_VERSIONED_TENSOR_OFFSET = 8 + 8 + 8 + 8

_capsule_api = None


def _capsule_functions():
    global _capsule_api
    if _capsule_api is None:
        api = ctypes.pythonapi
        is_valid = api.PyCapsule_IsValid
        is_valid.restype = ctypes.c_int
        is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]
        get_pointer = api.PyCapsule_GetPointer
        get_pointer.restype = ctypes.c_void_p
        get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        _capsule_api = (is_valid, get_pointer)
    return _capsule_api


def _dl_tensor(capsule):
    """The DLTensor inside an unconsumed DLPack capsule (legacy or versioned), or None."""
    is_valid, get_pointer = _capsule_functions()
    if is_valid(capsule, b"dltensor"):
        return _DLTensor.from_address(get_pointer(capsule, b"dltensor"))
    if is_valid(capsule, b"dltensor_versioned"):
        address = get_pointer(capsule, b"dltensor_versioned") + _VERSIONED_TENSOR_OFFSET
        return _DLTensor.from_address(address)
    return None


class _DLPackView:
    """A DLPack producer that forwards to ``source`` and reports what dtype it exported.

    A bfloat16 export (DLPack code kDLBfloat, 16 bits) is relabelled kDLUInt 16 in the capsule
    before the consumer reads it: the same memory and bits, which NumPy and every CuPy version
    accept (some CuPy versions crash on bfloat16 capsules). The consumer then owns the capsule.
    """

    def __init__(self, source):
        self.source = source
        self.bfloat16 = False

    def __dlpack_device__(self):
        return self.source.__dlpack_device__()

    def __dlpack__(self, stream=None, **kwargs):
        # The consumer's request as it is (max_version, dl_device, copy: a versioned capsule keeps
        # the read-only flag and NumPy makes legacy ones read-only); older producers take less.
        attempts = [dict(kwargs, stream=stream), {"stream": stream}, {}]
        if stream is None:
            attempts = [dict(kwargs), {}]
        for i, attempt in enumerate(attempts):
            try:
                capsule = self.source.__dlpack__(**attempt)
                break
            except TypeError:
                if i + 1 == len(attempts):
                    raise
        tensor = _dl_tensor(capsule)
        if tensor is not None and tensor.dtype.code == _KDL_BFLOAT and tensor.dtype.bits == 16 \
                and tensor.dtype.lanes == 1:
            tensor.dtype.code = _KDL_UINT
            self.bfloat16 = True
        return capsule


def _is_numpy(value):
    return isinstance(value, np.ndarray)


def _is_cupy(value):
    return type(value).__module__.split(".")[0] == "cupy" and hasattr(value, "device") \
        and hasattr(value, "data") and hasattr(value, "shape")


def _type_name(value):
    t = type(value)
    return f"{t.__module__.split('.')[0]}.{t.__name__}"


def _convert(value, argname):
    """-> (numpy or cupy array, True if it holds bfloat16 bits as uint16 on CuPy)."""
    if _is_numpy(value) or _is_cupy(value):
        return value, False
    if not (hasattr(value, "__dlpack__") and hasattr(value, "__dlpack_device__")):
        raise TypeError(f"{argname}: expected a numpy.ndarray, a cupy.ndarray or a DLPack producer "
                        f"(an object with __dlpack__ and __dlpack_device__, e.g. torch.Tensor or "
                        f"jax.Array), got {_type_name(value)}")
    try:
        device_type, device_id = value.__dlpack_device__()
        device_type = int(device_type)
    except Exception as error:
        raise TypeError(f"{argname}: __dlpack_device__() of {_type_name(value)} failed: "
                        f"{error}") from error
    view = _DLPackView(value)
    if device_type in _CPU_DEVICES:
        try:
            array = np.from_dlpack(view)
        except Exception as error:
            raise TypeError(f"{argname}: could not read {_type_name(value)} (CPU) through DLPack: "
                            f"{type(error).__name__}: {error}") from error
        if view.bfloat16:
            import ml_dtypes
            array = array.view(ml_dtypes.bfloat16)
        return array, False
    if device_type in _CUDA_DEVICES:
        try:
            import cupy
        except ImportError as error:
            raise TypeError(f"{argname}: {_type_name(value)} lives on CUDA device {device_id}; "
                            "reading it needs CuPy (pip install cupy-cuda13x or cupy-cuda12x)") \
                from error
        try:
            array = cupy.from_dlpack(view)
        except Exception as error:
            raise TypeError(f"{argname}: could not read {_type_name(value)} (CUDA device "
                            f"{device_id}) through DLPack: {type(error).__name__}: {error}") \
                from error
        return array, view.bfloat16
    raise TypeError(f"{argname}: {_type_name(value)} is on DLPack device type {device_type}; "
                    "expected CPU (1) or CUDA (2) memory")


def as_array(value, argname="array"):
    """A NumPy (CPU) or CuPy (GPU) array viewing ``value`` without a copy.

    NumPy and CuPy arrays come back as they are; other DLPack producers are read through DLPack
    (bfloat16: an ``ml_dtypes.bfloat16`` NumPy view on the CPU, a uint16 CuPy view of the bits on
    the GPU). ``None`` stays ``None``. Raises TypeError naming ``argname`` for anything else.
    """
    if value is None:
        return None
    return _convert(value, argname)[0]


def _bf16_bits_to_float32(bits):
    """float32 values of bfloat16 bit patterns (a uint16/int16 NumPy or CuPy array)."""
    if _is_numpy(bits):
        xp = np
    else:
        import cupy as xp
    return (bits.view(xp.uint16).astype(xp.uint32) << 16).view(xp.float32)


class _Converted:
    """The arguments of one call as NumPy or CuPy arrays, checked to be all one kind."""

    def __init__(self, arrays, storage_dtype, out=None):
        self.arrays = {}
        self.origin = {}
        bits = {}
        for name, value in arrays.items():
            if value is None:
                self.arrays[name] = None
                continue
            self.arrays[name], bits[name] = _convert(value, name)
            self.origin[name] = value
        self.out = None
        if out is not None:
            if not isinstance(out, dict):
                raise TypeError(f"out: expected a dict of preallocated outputs, got "
                                f"{_type_name(out)}")
            self.out = {}
            for key, value in out.items():
                if value is None:
                    self.out[key] = None
                    continue
                name = f"out[{key!r}]"
                self.out[key], bits[name] = _convert(value, name)
                self.origin[name] = value
                if _is_numpy(self.out[key]) and not self.out[key].flags.writeable:
                    raise ValueError(f"{name}: the array is read-only")
        self._check_one_kind({**{k: v for k, v in self.arrays.items() if v is not None},
                              **{f"out[{k!r}]": v for k, v in (self.out or {}).items()
                                 if v is not None}})
        self.storage_dtype = storage_dtype
        if bits.get("U") and storage_dtype is None:
            self.storage_dtype = "bfloat16"  # bfloat16 producer on CUDA: U holds the bits
        for name in _PARAM_ARGS:  # parameters are read as values: decode bfloat16 bits
            if bits.get(name):
                self.arrays[name] = _bf16_bits_to_float32(self.arrays[name])

    def _check_one_kind(self, named):
        cpu = [n for n, a in named.items() if _is_numpy(a)]
        gpu = [n for n, a in named.items() if not _is_numpy(a)]
        if cpu and gpu:
            def describe(names, kind):
                parts = []
                for n in names[:4]:
                    source = self.origin.get(n)
                    via = "" if source is None or _is_numpy(source) or _is_cupy(source) \
                        else f" (from {_type_name(source)})"
                    parts.append(f"{n}{via}")
                return f"{', '.join(parts)} {'is' if len(names) == 1 else 'are'} {kind}"
            raise TypeError(
                "mixed NumPy (CPU) and CuPy (GPU) arrays in one call: "
                f"{describe(cpu, 'numpy.ndarray (CPU)')}, {describe(gpu, 'cupy.ndarray (GPU)')}; "
                "pass every array on the same device (cupy.asarray / cupy.asnumpy, or .cpu() / "
                ".cuda() for torch tensors)")

    def __getitem__(self, name):
        return self.arrays[name]


# -- the recurrence -------------------------------------------------------------------------------


def recurrence_forward(U, x, weight_c, bias, c0=None, *, hidden_size, bidirectional=False,
                       has_skip_term=True, use_tanh=False, scale_x=1.0, mask_h=None, mask_pad=None,
                       store_c=True, storage_dtype=None, out=None, V=None):
    """SRU recurrence forward (training variant: keeps the state of every step for backward).

    Args:
        U: (L, B, D*k) the GEMM output x W, k = 3 or 4.
        x: (L, B, D) the skip input, read when k == 3 and has_skip_term (else may be None).
        weight_c: (2*D,) (or (2, D)) peephole weights v_f, v_r; None for v1 (zero).
        bias: (2*D,) (or (2, D)) gate biases b_f, b_r.
        c0: (B, D) initial state, None for zeros.
        hidden_size: d; D = d * (2 if bidirectional else 1).
        scale_x: the skip scale (used when k == 3 and has_skip_term).
        mask_h: (B, D) variational dropout mask on h, None for none.
        mask_pad: (L, B) nonzero at padded steps, None for none.
        store_c: False runs the inference kernel and returns c as None.
        storage_dtype: "bfloat16" for CuPy uint16/int16 arrays holding bfloat16 bits.
        out: dict with preallocated C-contiguous outputs "h", "c", "c_last" (optional, any of them;
            NumPy/CuPy arrays or DLPack producers, written in place).
        V: (L, B, D*2) per-step offsets of weight_c ((forget, reset) per column), None for none.

    Returns:
        (h (L, B, D), c (L, B, D) or None, c_last (B, D)) as NumPy or CuPy arrays in U's dtype.
    """
    a = _Converted(dict(U=U, x=x, weight_c=weight_c, bias=bias, c0=c0, mask_h=mask_h,
                        mask_pad=mask_pad, V=V), storage_dtype, out)
    return launch.recurrence_forward(
        a["U"], a["x"], a["weight_c"], a["bias"], a["c0"], hidden_size=hidden_size,
        bidirectional=bidirectional, has_skip_term=has_skip_term, use_tanh=use_tanh,
        scale_x=scale_x, mask_h=a["mask_h"], mask_pad=a["mask_pad"], store_c=store_c,
        storage_dtype=a.storage_dtype, out=a.out, V=a["V"])


def recurrence_inference(U, x, weight_c, bias, c0=None, *, hidden_size, bidirectional=False,
                         has_skip_term=True, use_tanh=False, scale_x=1.0, mask_h=None,
                         mask_pad=None, storage_dtype=None, out=None, V=None):
    """SRU recurrence forward without the per-step state (nothing kept for backward).

    Same arguments as :func:`recurrence_forward` (``out`` may hold "h" and "c_last").
    Returns (h (L, B, D), c_last (B, D)).
    """
    h, _, c_last = recurrence_forward(
        U, x, weight_c, bias, c0, hidden_size=hidden_size, bidirectional=bidirectional,
        has_skip_term=has_skip_term, use_tanh=use_tanh, scale_x=scale_x, mask_h=mask_h,
        mask_pad=mask_pad, store_c=False, storage_dtype=storage_dtype, out=out, V=V)
    return h, c_last


def recurrence_backward(grad_h, grad_c_last, U, x, weight_c, bias, c0, c, *, hidden_size,
                        bidirectional=False, has_skip_term=True, use_tanh=False, scale_x=1.0,
                        mask_h=None, mask_pad=None, storage_dtype=None, out=None,
                        reduce_params=True, V=None):
    """Gradients of the SRU recurrence.

    Args:
        grad_h: (L, B, D) dL/dh.
        grad_c_last: (B, D) dL/dc_last, or None (zero).
        U, x, weight_c, bias, c0: the forward's inputs (as for :func:`recurrence_forward`).
        c: (L, B, D) the forward's per-step state (``recurrence_forward(...)[1]``).
        mask_h, mask_pad, hidden_size, bidirectional, has_skip_term, use_tanh, scale_x: as forward.
        V: the forward's per-step offsets of weight_c, or None.
        out: dict with preallocated outputs "U", "x", "c0", "weight_c_partial", "bias_partial",
            "V".
        reduce_params: False leaves the sums over the batch of the parameter gradients to the
            caller ("weight_c" and "bias" are then absent).

    Returns:
        dict of NumPy or CuPy arrays: "U" (L, B, D*k), "x" (L, B, D) or None when the recurrence
        does not read x, "c0" (B, D) (in U's dtype); "weight_c", "bias" (2*D,) and their per-column
        partials "weight_c_partial", "bias_partial" (2, B, D) in the arithmetic dtype ("weight_c" is
        the gradient w.r.t. v even when weight_c is None); "V" (L, B, D*2) in U's dtype, or None
        without V.
    """
    a = _Converted(dict(grad_h=grad_h, grad_c_last=grad_c_last, U=U, x=x, weight_c=weight_c,
                        bias=bias, c0=c0, c=c, mask_h=mask_h, mask_pad=mask_pad, V=V),
                   storage_dtype, out)
    return launch.recurrence_backward(
        a["grad_h"], a["grad_c_last"], a["U"], a["x"], a["weight_c"], a["bias"], a["c0"], a["c"],
        hidden_size=hidden_size, bidirectional=bidirectional, has_skip_term=has_skip_term,
        use_tanh=use_tanh, scale_x=scale_x, mask_h=a["mask_h"], mask_pad=a["mask_pad"],
        storage_dtype=a.storage_dtype, out=a.out, reduce_params=reduce_params, V=a["V"])
