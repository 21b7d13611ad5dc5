"""Environment report for ``python -m sru_cupy info``: versions, GPUs, which backend each path
uses and why, and the kernel cache folders. Works without a GPU, without CuPy and without torch
(each missing piece is reported, not raised)."""

import importlib
import os
import platform
import sys

from . import cache


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


def _folder_summary(path):
    if not os.path.isdir(path):
        return "absent"
    files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names]
    size = sum(os.path.getsize(f) for f in files if os.path.exists(f))
    return f"{len(files)} files, {size / 1e6:.1f} MB"


def _cpu_path():
    """Which implementation runs NumPy arrays and CPU tensors, and how to get the compiled one."""
    from .backends import host
    compiler = host.compiler_description()
    if compiler:
        return f"host kernels ({host.COLUMNS_PER_THREAD} columns per thread), compiled with {compiler}"
    cxx = os.environ.get("CXX")
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
              f"pynvrtc {pynvrtc_version}", f"NVRTC {_nvrtc_versions()}"]

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
    lines.append("  NumPy arrays and CPU tensors: " + _cpu_path())
    if cupy is None:
        lines.append("  CuPy arrays and CUDA tensors: unavailable (CuPy is not installed: "
                     "pip install sru_cupy[cuda12] or [cuda13])")
    else:
        ptx_dir = os.environ.get("SRU_CUPY_PTX_DIR")
        lines.append("  CuPy arrays and CUDA tensors: CuPy backend, "
                     + (f"PTX loaded from $SRU_CUPY_PTX_DIR={ptx_dir}" if ptx_dir
                        else "compiled by NVRTC at first use per device"))
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
