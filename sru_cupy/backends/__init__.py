"""Backends run a kernel instantiation over arrays: ``host`` (the C++ build of the CUDA sources, on
NumPy arrays) and ``cupy`` (NVRTC through CuPy, on CuPy arrays). Both are loaded lazily."""

from ..errors import KernelCompileError  # noqa: F401  (its old home; import from here still works)


_backends = {}  # array type -> its backend module (several lookups per launch)


def backend_for(array):
    """The backend module that runs kernels over ``array``'s kind of array."""
    backend = _backends.get(type(array))
    if backend is not None:
        return backend
    module = type(array).__module__.split(".")[0]
    if module == "numpy":
        from . import host as backend
    elif module == "cupy":
        from . import cupy_backend as backend
    else:
        raise TypeError(f"expected numpy.ndarray (CPU) or cupy.ndarray (GPU), got "
                        f"{type(array).__name__}")
    _backends[type(array)] = backend
    return backend
