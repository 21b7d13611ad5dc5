"""CuPy backend: the CUDA sources compiled by NVRTC through CuPy and launched on CuPy arrays.

Compiled at first use, once per device architecture, with the same NVRTC options as the device-free
PTX build (:data:`sru_cupy.ptx.BASE_OPTIONS`: float32 subnormals kept, as on the host), through
``cupy.cuda.compiler.compile_using_nvrtc``. Not ``cupy.RawModule``: it appends ``-ftz=true`` to
every compile, and NVRTC takes the last ``-ftz``, so its build would flush subnormals where the host
and PTX builds do not. The binary (cubin, or PTX for an architecture newer than the NVRTC) and its
lowered names are cached on disk in the sru_cupy cache folder (``cupy/``), keyed by the source, the
options, the NVRTC release and the architecture, and written atomically. Cached binaries and prebuilt
PTX are read from descriptors checked as :mod:`sru_cupy.cache` says (owner, mode, no link), hashed
as read, and loaded from those bytes (``Module.load``), never by path; a read-only cache is read,
and a binary that cannot be written (a full disk) is kept for the process, with a warning.

Per device, the module is loaded once and a function object is kept for every kernel, so a launch
is a dictionary look-up and the launch itself. Compiles and loads of different devices do not wait
on each other (a lock per device). Every launch looks up the current device and that device's
*current* stream at call time, so side streams, CUDA graph capture and multi-GPU work; nothing is
cached at import.

CUDA graph capture: loading a module is not allowed while a stream is being captured, so the first
call on a device must come before capturing (every kernel is loaded then, so any later call,
whichever variant, can be captured). A first call inside capture raises
:class:`~sru_cupy.errors.CaptureNotReadyError` saying so.

With ``$SRU_CUPY_PTX_DIR`` set to a folder written by ``python -m sru_cupy compile``, the PTX for the
device's architecture is loaded from there instead of compiling, when the driver is new enough for
it (the manifest's ``min_driver``); otherwise, or when the driver refuses the PTX, the kernels are
compiled as above, with one :class:`~sru_cupy.errors.PTXDriverWarning` per folder and architecture.
"""

import hashlib
import json
import os
import threading

import numpy as np

from .. import cache, kernels
from ..errors import CaptureNotReadyError, KernelCompileError, PTXDriverWarning, warn_once

name = "cupy"

#: Cache sub-folder of the compiled binaries.
CACHE_SUBFOLDER = "cupy"

_locks_guard = threading.Lock()
_device_locks = {}  # device id -> lock of that device's compile and load
_modules = {}  # device id -> cupy.cuda.function.Module (holds the code of the functions below)
_functions = {}  # (device id, name expression) -> cupy.cuda.function.Function
#: device id -> where its kernels came from: ("ptx", PTX file) or ("nvrtc", cached binary)
loaded_from = {}


def _cupy():
    import cupy
    return cupy


def _ptx():
    from .. import ptx
    return ptx


def compile_options():
    """The NVRTC options of the CuPy build (the architecture is added by CuPy)."""
    return tuple(_ptx().BASE_OPTIONS)


def _warn_once(key, message):
    warn_once(key, message, PTXDriverWarning, stacklevel=5)


def _device_lock(device_id):
    with _locks_guard:
        return _device_locks.setdefault(device_id, threading.Lock())


def _cuda_major(cupy):
    try:
        return int(cupy.cuda.runtime.runtimeGetVersion()) // 1000
    except Exception:  # no runtime library either: say both extras
        return None


def _install_hint(cupy):
    major = _cuda_major(cupy)
    extras = f"cuda{major}" if major in (12, 13) else "cuda12] or [cuda13"
    return (f"install CuPy's CUDA components: pip install 'sru_cupy[{extras}]' "
            f"(cupy-cuda{major or 'XX'}x[ctk]: NVRTC and the CUDA runtime headers), or a CUDA "
            "toolkit with CUDA_PATH pointing at it")


# -- compiling ---------------------------------------------------------------------------------


def _cache_key(arch, nvrtc_version, options, names):
    text = json.dumps([kernels.source_hash(), list(options), list(nvrtc_version), int(arch),
                       sorted(names)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read_cached(path, names):
    """(binary, lowered names) from a cache file, or None when absent or unusable (read from a
    descriptor checked as :func:`sru_cupy.cache.open_trusted` says, and hashed as read)."""
    try:
        header, _, binary = cache.read_trusted(path).partition(b"\n")
        meta = json.loads(header)
        lowered = meta["lowered_names"]
        if hashlib.sha256(binary).hexdigest() != meta["sha256"] or set(lowered) != set(names):
            raise ValueError("content does not match its header")
        return binary, lowered
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        warn_once(("cupy-cache", path), f"sru_cupy: cached kernels {path} are unusable "
                                              f"({error}); compiling them again")
        return None


def _write_cached(path, binary, lowered):
    """Writes the cache file; False (with a warning, once per folder) when it cannot be written
    (a full disk): the caller keeps the binary for this process."""
    header = json.dumps({"sha256": hashlib.sha256(binary).hexdigest(), "lowered_names": lowered,
                         "source_hash": kernels.source_hash()}, sort_keys=True).encode()
    try:
        cache.write_atomic(path, header + b"\n" + binary)
        return True
    except OSError as error:
        folder = os.path.dirname(path)
        warn_once(("cupy-unwritten", folder),
                        f"sru_cupy: could not write the compiled kernels to {folder} ({error}); "
                        "they are kept for this process only")
        return False


def _compile(cupy, arch, options, names, what):
    """(binary, lowered names) compiled by CuPy's NVRTC."""
    compiler = cupy.cuda.compiler
    try:
        with _ptx().keeping_thread_locale():  # NVRTC 12.0 leaves the thread on "C"
            binary, lowered = compiler.compile_using_nvrtc(
                kernels.assembled_source(), options=options, arch=str(arch),
                filename=kernels.SOURCE_FILE, name_expressions=names)
    except compiler.CompileException as error:
        log = error.get_message() if hasattr(error, "get_message") else str(error)
        if "cannot open source file" in log:  # a header NVRTC does not have
            log += f"\n{_install_hint(cupy)}"
        raise KernelCompileError(what, log, options) from error
    except (RuntimeError, OSError, ImportError) as error:  # NVRTC failed to load or run
        raise KernelCompileError(what, f"{type(error).__name__}: {error}; "
                                       f"{_install_hint(cupy)}", options) from error
    return bytes(binary), {n: str(lowered[n]) for n in names}


def compile_for_arch(arch):
    """(binary, {name expression: lowered name}, cache file) of every kernel for one architecture,
    compiled by CuPy's NVRTC with :func:`compile_options`, or read from the cache folder. A
    read-only cache folder is read; what it lacks is compiled into the private temporary folder
    (with a warning)."""
    cupy = _cupy()
    options = compile_options()
    names = kernels.all_kernel_names()
    what = f"NVRTC compilation of the SRU kernels for sm_{arch} (CuPy)"
    try:
        nvrtc_version = tuple(cupy.cuda.nvrtc.getVersion())
    except Exception as error:  # libnvrtc missing or unloadable
        raise KernelCompileError(what, f"NVRTC could not be loaded ({type(error).__name__}: "
                                       f"{error}); {_install_hint(cupy)}", options) from error
    name = f"sru_recurrence.sm_{arch}.{_cache_key(arch, nvrtc_version, options, names)}.bin"
    folder = cache.cache_dir(CACHE_SUBFOLDER)
    path = os.path.join(folder, name)
    cached = _read_cached(path, names)
    if cached is not None:
        return (*cached, path)
    if not cache.writable(folder):
        folder = cache.private_dir(CACHE_SUBFOLDER, reason=f"the kernel cache {folder} is "
                                   "read-only and lacks these GPU kernels")
        path = os.path.join(folder, name)
    with cache.build_lock(path):
        cache.clean_stale(folder)
        cached = _read_cached(path, names)
        if cached is not None:
            return (*cached, path)
        binary, lowered = _compile(cupy, arch, options, names, what)
        _write_cached(path, binary, lowered)
    return binary, lowered, path


# -- loading -----------------------------------------------------------------------------------


def driver_version():
    """The CUDA driver's release as (major, minor), e.g. (13, 0)."""
    return _ptx().parse_cuda_version(int(_cupy().cuda.runtime.driverGetVersion()))


def _prebuilt_ptx(folder, device_arch):
    """(path, PTX bytes, lowered names) of the PTX in ``folder`` for the device (the bytes checked
    against the manifest's SHA-256 as they were read), or None (with a warning, once) when this
    driver is too old for it."""
    ptx = _ptx()
    arch, path, data, lowered = ptx.read_ptx_for_device(folder, device_arch)
    needed, driver = ptx.required_driver(folder, arch), driver_version()
    if driver < needed:
        _warn_once(("driver", folder, arch),
                   f"sru_cupy: the PTX for sm_{arch} in {folder} needs a driver for CUDA "
                   f"{needed[0]}.{needed[1]} or newer, this driver is for CUDA "
                   f"{driver[0]}.{driver[1]}; compiling the kernels with CuPy's NVRTC instead "
                   f"(for this driver: python -m sru_cupy compile --cuda {driver[0]}.{driver[1]})")
        return None
    return path, data, lowered


def _load(device_id):
    """Loads the module of a device and keeps a function object for every kernel (caller holds the
    device's lock)."""
    cupy = _cupy()
    names = kernels.all_kernel_names()
    with cupy.cuda.Device(device_id) as device:
        arch = int(device.compute_capability)
        module = source = None
        folder = _ptx().ptx_dir_from_env()
        prebuilt = _prebuilt_ptx(folder, arch) if folder else None
        if prebuilt is not None:
            path, data, lowered = prebuilt
            module = cupy.cuda.function.Module()
            try:
                module.load(data)  # the bytes that were checked: the file may change after it
                source = ("ptx", path)
            except Exception as error:  # e.g. CUDA_ERROR_UNSUPPORTED_PTX_VERSION
                _warn_once(("load", folder, arch),
                           f"sru_cupy: the driver refused the PTX {path} ({type(error).__name__}: "
                           f"{error}); compiling the kernels with CuPy's NVRTC instead")
                module = None
        if module is None:
            binary, lowered, path = compile_for_arch(arch)
            module = cupy.cuda.function.Module()
            module.load(binary)
            source = ("nvrtc", path)
        # Every function now: under lazy loading this loads its code, so that no later call,
        # whichever variant, has to load anything (which CUDA graph capture would refuse).
        functions = {n: module.get_function(lowered[n]) for n in names}
    for n, function in functions.items():
        _functions[(device_id, n)] = function
    loaded_from[device_id] = source
    _modules[device_id] = module  # last: a device listed here has all its functions


def _capturing(cupy, stream):
    """True while ``stream`` is being captured into a CUDA graph."""
    is_capturing = getattr(cupy.cuda.runtime, "streamIsCapturing", None)
    if is_capturing is None or stream.ptr in (0, 1):  # the legacy default stream is never captured
        return False
    try:
        return bool(is_capturing(stream.ptr))
    except Exception:
        return False


def check_capture(device_id, capturing):
    """Raises :class:`CaptureNotReadyError` when ``capturing`` (the current stream is being
    captured into a CUDA graph) and the kernels of ``device_id`` are not loaded yet."""
    if capturing and device_id not in _modules:
        raise CaptureNotReadyError(
            f"sru_cupy: the first call on cuda:{device_id} is inside CUDA graph capture, where the "
            "kernels cannot be loaded; run one call on this device before capturing (it loads "
            "every kernel variant, so anything can be captured afterwards)")


def ensure_loaded(device_id, stream=None):
    """Compiles (or reads from the cache) and loads the kernels of a device, once per process."""
    if device_id in _modules:
        return
    cupy = _cupy()
    stream = cupy.cuda.get_current_stream() if stream is None else stream
    check_capture(device_id, _capturing(cupy, stream))
    with _device_lock(device_id):
        if device_id not in _modules:
            _load(device_id)


def function(device_id, kernel_name, stream=None):
    """The function object of a kernel on a device (loading the device's kernels at first use)."""
    found = _functions.get((device_id, kernel_name))
    if found is None:
        ensure_loaded(device_id, stream)
        found = _functions.get((device_id, kernel_name))
        if found is None:
            raise RuntimeError(f"sru_cupy CuPy backend: kernel {kernel_name!r} is not among the "
                               f"kernels built for device {device_id}")
    return found


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
    stream = cupy.cuda.get_current_stream()
    kernel = function(device_id, kernel_name, stream)
    kernel(tuple(grid), tuple(block), tuple(_argument(a) for a in args), stream=stream)


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


def is_loaded(device_id):
    """Whether the kernels of ``device_id`` are loaded in this process (a launch then loads
    nothing, which CUDA graph capture requires)."""
    return device_id in _modules


def scalar_argument(value):
    """A scalar kernel argument as CuPy passes it: a NumPy scalar goes by value with its size."""
    return value


class _RawStream:
    """A raw stream handle where CuPy's launch reads it (``ptr``)."""
    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr


def launch_on(kernel_name, grid, block, args, stream):
    """Launches on ``stream`` = (device id, raw stream handle), that device being current: the
    PyTorch op's path, whose arguments are device addresses (8-byte NumPy integers, None for
    null) and NumPy scalars, checked by the op, with no CuPy array or stream object made."""
    device_id, handle = stream
    kernel = _functions.get((device_id, kernel_name))
    if kernel is None:
        kernel = function(device_id, kernel_name)
    kernel(grid, block, args, stream=_RawStream(handle))
