"""Backends run a kernel instantiation over arrays: ``host`` (the C++ build of the CUDA sources, on
NumPy arrays) and ``cupy`` (NVRTC through CuPy, on CuPy arrays). Both are loaded lazily."""


class KernelCompileError(RuntimeError):
    """A kernel source failed to compile. Carries the compiler's log and the options it was given."""

    def __init__(self, what, log, options):
        self.log = log
        self.options = list(options)
        super().__init__(f"{what} failed\noptions: {' '.join(map(str, self.options))}\n"
                         f"compiler log:\n{log}")


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
