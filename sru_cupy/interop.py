"""The bridge between array libraries: DLPack views of other frameworks' arrays and PyTorch's
streams as CuPy sees them.

- :func:`as_array` / :func:`convert`: a NumPy (CPU) or CuPy (GPU) array viewing any DLPack producer
  (``torch.Tensor``, ``jax.Array``, ...) without a copy; bfloat16 travels as its bits (DLPack's
  bfloat16 code relabelled as 16-bit unsigned, which every NumPy and CuPy version reads).
- :func:`cupy_stream`: CuPy's view of a PyTorch stream, for running the array API on PyTorch's
  current stream.

Importing this module imports neither torch nor cupy.
"""

import ctypes

import numpy as np

__all__ = ["as_array", "convert", "DLPackView", "is_numpy", "is_cupy", "type_name",
           "bf16_bits_to_float32", "cupy_stream", "CUDA_STREAM_LEGACY"]

# DLPack constants (dlpack.h).
_KDL_CPU, _KDL_CUDA, _KDL_CUDA_HOST, _KDL_CUDA_MANAGED = 1, 2, 3, 13
_KDL_UINT, _KDL_BFLOAT = 1, 4
_CPU_DEVICES = (_KDL_CPU, _KDL_CUDA_HOST)
_CUDA_DEVICES = (_KDL_CUDA, _KDL_CUDA_MANAGED)


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


class DLPackView:
    """A DLPack producer that forwards to ``source`` and reports what dtype it exported.

    A bfloat16 export (DLPack code kDLBfloat, 16 bits) is relabelled kDLUInt 16 in the capsule
    before the consumer reads it: the same memory and bits, which NumPy and every CuPy version
    accept (some CuPy versions crash on bfloat16 capsules). The consumer then owns the capsule.
    ``export_stream`` (e.g. -1: no synchronisation) replaces the stream the consumer asks for.
    """

    def __init__(self, source, export_stream=None):
        self.source = source
        self.export_stream = export_stream
        self.bfloat16 = False

    def __dlpack_device__(self):
        return self.source.__dlpack_device__()

    def __dlpack__(self, stream=None, **kwargs):
        if self.export_stream is not None:
            stream = self.export_stream
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


def is_numpy(value):
    return isinstance(value, np.ndarray)


def is_cupy(value):
    return type(value).__module__.split(".")[0] == "cupy" and hasattr(value, "device") \
        and hasattr(value, "data") and hasattr(value, "shape")


def type_name(value):
    t = type(value)
    return f"{t.__module__.split('.')[0]}.{t.__name__}"


def convert(value, argname):
    """-> (numpy or cupy array, True if it holds bfloat16 bits as uint16 on CuPy)."""
    if is_numpy(value) or is_cupy(value):
        return value, False
    if not (hasattr(value, "__dlpack__") and hasattr(value, "__dlpack_device__")):
        raise TypeError(f"{argname}: expected a numpy.ndarray, a cupy.ndarray or a DLPack producer "
                        f"(an object with __dlpack__ and __dlpack_device__, e.g. torch.Tensor or "
                        f"jax.Array), got {type_name(value)}")
    try:
        device_type, device_id = value.__dlpack_device__()
        device_type = int(device_type)
    except Exception as error:
        raise TypeError(f"{argname}: __dlpack_device__() of {type_name(value)} failed: "
                        f"{error}") from error
    view = DLPackView(value)
    if device_type in _CPU_DEVICES:
        try:
            array = np.from_dlpack(view)
        except Exception as error:
            raise TypeError(f"{argname}: could not read {type_name(value)} (CPU) through DLPack: "
                            f"{type(error).__name__}: {error}") from error
        if view.bfloat16:
            import ml_dtypes
            array = array.view(ml_dtypes.bfloat16)
        return array, False
    if device_type in _CUDA_DEVICES:
        try:
            import cupy
        except ImportError as error:
            raise TypeError(f"{argname}: {type_name(value)} lives on CUDA device {device_id}; "
                            "reading it needs CuPy (pip install cupy-cuda13x or cupy-cuda12x)") \
                from error
        try:
            # On the producer's device, whichever is current: PyTorch refuses to export a tensor
            # of another device than the current one.
            with cupy.cuda.Device(int(device_id)):
                array = cupy.from_dlpack(view)
        except Exception as error:
            raise TypeError(f"{argname}: could not read {type_name(value)} (CUDA device "
                            f"{device_id}) through DLPack: {type(error).__name__}: {error}") \
                from error
        return array, view.bfloat16
    raise TypeError(f"{argname}: {type_name(value)} is on DLPack device type {device_type}; "
                    "expected CPU (1) or CUDA (2) memory")


def as_array(value, argname="array"):
    """A NumPy (CPU) or CuPy (GPU) array viewing ``value`` without a copy.

    NumPy and CuPy arrays come back as they are; other DLPack producers are read through DLPack
    (bfloat16: an ``ml_dtypes.bfloat16`` NumPy view on the CPU, a uint16 CuPy view of the bits on
    the GPU). ``None`` stays ``None``. Raises TypeError naming ``argname`` for anything else.
    """
    if value is None:
        return None
    return convert(value, argname)[0]


def bf16_bits_to_float32(bits):
    """float32 values of bfloat16 bit patterns (a uint16/int16 NumPy or CuPy array), allocated on
    the array's own device whatever device is current."""
    if is_numpy(bits):
        return (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    import cupy
    with cupy.cuda.Device(bits.device.id):
        return (bits.view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32)




#: cudaStreamLegacy: the legacy default stream named explicitly, which is what PyTorch's default
#: stream (handle 0) is. Handle 0 would mean CuPy's default stream, the per-thread one under
#: $CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1.
CUDA_STREAM_LEGACY = 1


class _StreamHandle:
    """A raw stream handle through the CUDA stream protocol (``__cuda_stream__``), which
    ``cupy.cuda.Stream.from_external`` reads (not every supported PyTorch gives its streams one)."""

    def __init__(self, handle):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


def cupy_stream(cupy, torch_stream, device_index):
    """CuPy's view of a PyTorch stream of device ``device_index`` (the current device): through
    ``Stream.from_external`` (CuPy 14, where ``ExternalStream`` is deprecated and warns on every
    construction), else ``ExternalStream`` (CuPy 13)."""
    handle = torch_stream.cuda_stream or CUDA_STREAM_LEGACY
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(_StreamHandle(handle))
    return cupy.cuda.ExternalStream(handle, device_index)
