"""Environment report for ``python -m sru_cupy info``: versions, GPUs, which backend each path
uses and why, and the kernel cache folders. Works without a GPU, without CuPy and without torch
(each missing piece is reported, not raised)."""

import importlib
import os
import platform
import re
import sys

from . import cache, cpu


def _version(module_name):
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # not installed, or fails to load (e.g. no driver)
        return None, f"not available ({type(error).__name__}: {str(error).splitlines()[0][:100]})" \
            if str(error) else f"not available ({type(error).__name__})"
    return module, getattr(module, "__version__", "installed")


def device_name(device):
    """A readable name of a torch device: the GPU model, or the CPU."""
    if device.type == "cuda":
        import torch
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _nvrtc_versions():
    found = []
    try:
        import cupy
        major, minor = cupy.cuda.nvrtc.getVersion()
        found.append(f"{major}.{minor} (CuPy)")
    except Exception:
        pass
    try:
        from . import ptx
        for nvrtc in ptx.available_nvrtcs():
            found.append(f"{nvrtc.version_string} ({nvrtc.path})")
    except Exception:
        pass
    return ", ".join(found) if found else "not found"


def _libcuda():
    """The CUDA driver library (ctypes), or None where there is none."""
    import ctypes
    import ctypes.util
    for name in ("libcuda.so.1", "nvcuda.dll", ctypes.util.find_library("cuda")):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    return None


def driver_version():
    """The CUDA release the installed driver supports, as (major, minor), or None without a
    driver. ``cuDriverGetVersion`` needs no initialisation and creates no CUDA context."""
    import ctypes
    lib = _libcuda()
    if lib is None:
        return None
    version = ctypes.c_int()
    try:
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
            return None
    except AttributeError:
        return None
    from .ptx import parse_cuda_version
    return parse_cuda_version(version.value)


def _driver_line():
    version = driver_version()
    if version is None:
        return "CUDA driver: none found (libcuda)"
    line = f"CUDA driver: for CUDA {version[0]}.{version[1]}"
    try:  # the kernel module's release, e.g. 580.65.06 (Linux)
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", f.read())
        if match:
            line += f" (NVIDIA driver {match.group(1)})"
    except OSError:
        pass
    return line + "; PTX from NVRTC X.Y loads on drivers for CUDA X.Y and newer"


def _ptx_drivers(folder):
    """What each architecture of a PTX folder needs: "sm_80 needs a driver for CUDA 13.0, ..."."""
    from . import ptx
    try:
        archs = ptx.built_archs(folder)
        needs = [f"sm_{a} needs a driver for CUDA %d.%d" % ptx.required_driver(folder, a)
                 for a in archs]
    except ptx.PTXError as error:
        return f"unusable: {str(error).splitlines()[0]}"
    return ", ".join(needs) or "no architectures"


def _folder_summary(path):
    if not os.path.isdir(path):
        return "absent"
    files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names]
    size = sum(os.path.getsize(f) for f in files if os.path.exists(f))
    return f"{len(files)} files, {size / 1e6:.1f} MB"


def cpu_path():
    """Which implementation runs NumPy arrays and CPU tensors (``implementation``'s decision), and
    how to get the compiled one."""
    from . import implementation
    from .backends import host
    cxx = os.environ.get("CXX")
    if implementation.for_numpy() == implementation.HOST:
        compiler = host.compiler_description()
        # The whole command: with CXX="ccache g++" the compiler that runs is g++, through ccache.
        compiler += " (from $CXX)" if cxx else ""
        # The CPU's instruction set, as COLUMNS_PER_THREAD is: build_isa would probe the compiler
        # and write its facts into the cache, and the report creates nothing.
        try:
            isa = cpu.isa()
        except ValueError as exc:  # a $SRU_CUPY_HOST_ISA this CPU lacks
            isa = f"unknown: {exc}"
        return (f"host kernels ({host.COLUMNS_PER_THREAD} columns per thread, instruction set "
                f"{isa}), compiled with {compiler}")
    why = f"$CXX={cxx} not found" if cxx else "none on PATH, ziglang not installed"
    return (f"no C++ compiler ({why}): NumPy arrays use the vectorized NumPy path, CPU tensors the "
            "vectorized PyTorch path; pip install sru_cupy[cpu] for the compiled kernels")


def report():
    """The report as a list of lines."""
    lines = [f"sru_cupy {importlib.import_module('sru_cupy').__version__}",
             f"Python {sys.version.split()[0]} ({platform.platform()})"]
    numpy, numpy_version = _version("numpy")
    cupy, cupy_version = _version("cupy")
    torch, torch_version = _version("torch")
    _, pynvrtc_version = _version("pynvrtc")
    lines += [f"NumPy {numpy_version}", f"CuPy {cupy_version}", f"PyTorch {torch_version}",
              f"pynvrtc {pynvrtc_version}", f"NVRTC {_nvrtc_versions()}", _driver_line()]

    gpus = []
    if cupy is not None:
        try:
            for i in range(cupy.cuda.runtime.getDeviceCount()):
                props = cupy.cuda.runtime.getDeviceProperties(i)
                gpus.append(f"  {i}: {props['name'].decode()} (sm_{props['major']}{props['minor']}, "
                            f"{props['totalGlobalMem'] / 2**30:.0f} GiB)")
        except Exception as error:
            gpus.append(f"  none visible to CuPy ({type(error).__name__})")
    elif torch is not None and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append(f"  {i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    lines.append("GPUs:" if gpus else "GPUs: none")
    lines += gpus

    lines.append("Backends:")
    lines.append("  NumPy arrays and CPU tensors: " + cpu_path())
    if torch is not None:
        from . import cpu_gemm
        lines.append("  GEMM of the layers on the CPU: " + cpu_gemm.describe())
    if cupy is None:
        lines.append("  CuPy arrays and CUDA tensors: unavailable (CuPy is not installed: "
                     "pip install sru_cupy[cuda12] or [cuda13])")
    else:
        from .ptx import ptx_dir_from_env
        ptx_dir = ptx_dir_from_env()
        lines.append("  CuPy arrays and CUDA tensors: CuPy backend, "
                     + (f"PTX loaded from $SRU_CUPY_PTX_DIR={ptx_dir} ({_ptx_drivers(ptx_dir)}; "
                        "compiled by NVRTC on an older driver)" if ptx_dir
                        else "compiled by NVRTC at first use per architecture (cached)"))
    root = cache.cache_root()
    lines.append(f"Kernel cache: {root} (${cache.ENV_VAR} moves it): {_folder_summary(root)}")
    refused = cache.unsafe_reason(root) if os.path.isdir(root) else None
    if refused:
        lines.append(f"  refused ({refused}): kernels are cached in a private temporary folder")
    for sub in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        lines.append(f"  {sub}/: {_folder_summary(os.path.join(root, sub))}")
    cupy_cache = os.environ.get("CUPY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cupy",
                                                                 "kernel_cache")
    lines.append(f"CuPy kernel cache: {cupy_cache}: {_folder_summary(cupy_cache)}")
    return lines
