"""Backends run a kernel instantiation over arrays: ``host`` (the C++ build of the CUDA sources, on
NumPy arrays) and ``cupy`` (NVRTC through CuPy, on CuPy arrays). Both are loaded lazily."""

from ..errors import KernelCompileError  # noqa: F401  (its old home; import from here still works)


def backend_for(array):
    """The backend module that runs kernels over ``array``'s kind of array."""
    module = type(array).__module__.split(".")[0]
    if module == "numpy":
        from . import host
        return host
    if module == "cupy":
        from . import cupy_backend
        return cupy_backend
    raise TypeError(f"expected numpy.ndarray (CPU) or cupy.ndarray (GPU), got {type(array).__name__}")
