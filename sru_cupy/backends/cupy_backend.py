"""CuPy backend: the CUDA sources compiled by NVRTC through ``cupy.RawModule`` and launched on CuPy
arrays.

Compiled at first use, once per device (RawModule with the kernel name expressions; CuPy keeps its
own on-disk cache keyed by the source text, which has every header expanded into it). Every launch
looks up the arrays' device and that device's *current* stream at call time, so side streams, CUDA
graph capture and multi-GPU work; nothing is cached at import.

With ``$SRU_CUPY_PTX_DIR`` set to a folder written by ``python -m sru_cupy compile``, the PTX for the
device's architecture is loaded from there instead of compiling.
"""

import os
import threading

import numpy as np

from .. import kernels
from . import KernelCompileError

name = "cupy"

_lock = threading.Lock()
_modules = {}  # device id -> (RawModule, {name expression: name to look up})


def _cupy():
    import cupy
    return cupy


def _compile_options():
    return ("-std=c++17",)


def _load_module(device_id):
    cupy = _cupy()
    ptx_dir = os.environ.get("SRU_CUPY_PTX_DIR")
    with cupy.cuda.Device(device_id) as device:
        if ptx_dir:  # PTX built offline by `python -m sru_cupy compile`
            from .. import ptx
            _, path, lowered = ptx.load_ptx_for_device(ptx_dir, int(device.compute_capability))
            return cupy.RawModule(path=path), dict(lowered)
        names = kernels.all_kernel_names()
        try:
            module = cupy.RawModule(code=kernels.assembled_source(), options=_compile_options(),
                                    name_expressions=names)
            module.compile()
        except cupy.cuda.compiler.CompileException as error:
            raise KernelCompileError("NVRTC compilation of the SRU kernels (CuPy)",
                                     error.get_message() if hasattr(error, "get_message")
                                     else str(error), _compile_options()) from error
        return module, {n: n for n in names}


def module_for(device_id):
    """The (RawModule, name map) of a device, compiled or loaded once per device and process."""
    entry = _modules.get(device_id)
    if entry is None:
        with _lock:
            entry = _modules.get(device_id)
            if entry is None:
                entry = _modules[device_id] = _load_module(device_id)
    return entry


def _argument(value):
    # A null pointer parameter: an 8-byte zero.
    return np.uint64(0) if value is None else value


def device_guard(array):
    """Context manager making the array's device current."""
    return _cupy().cuda.Device(array.device.id)


def launch(kernel_name, grid, block, args, work=None):
    """Launches on the current device's current stream (the caller holds the device guard)."""
    cupy = _cupy()
    device_id = cupy.cuda.runtime.getDevice()
    module, names = module_for(device_id)
    kernel = module.get_function(names[kernel_name])
    kernel(grid, block, tuple(_argument(a) for a in args),
           stream=cupy.cuda.get_current_stream())


def empty(shape, dtype):
    return _cupy().empty(shape, dtype=dtype)


def array_module(array=None):
    return _cupy()


def columns_per_thread():
    return kernels.GPU_COLUMNS_PER_THREAD


def block_size(threads):
    # One thread per column (N = 1) and often few columns (B * D): small blocks spread them over
    # more SMs.
    # At most 128 keeps every instantiation launchable (the float64 backward uses up to ~134 registers).
    return 128 if threads >= 128 * 1024 else 64


def check_same_device(array, reference, argname):
    if array.device.id != reference.device.id:
        raise ValueError(f"{argname}: expected an array on device {reference.device.id} like U, "
                         f"got one on device {array.device.id}")
