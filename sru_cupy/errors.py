"""The package's shared errors and warnings, and its warning helpers (once per process; pointing
at the user's line).

A module of its own, below everything that raises them, so that no builder imports another to
reach an error class. ``sru_cupy.backends`` re-exports :class:`KernelCompileError` and
``sru_cupy.cache`` :class:`CacheWarning` under their old names."""

import warnings

_warned = set()


class KernelCompileError(RuntimeError):
    """A kernel source failed to compile, or the compiler itself is missing. Carries the compiler's
    log and the options it was given."""

    def __init__(self, what, log, options):
        self.log = log
        self.options = list(options)
        super().__init__(f"{what} failed\noptions: {' '.join(map(str, self.options))}\n"
                         f"compiler log:\n{log}")


class CaptureNotReadyError(RuntimeError):
    """The first call on a device came inside CUDA graph capture, where loading the kernels' module
    is not allowed: one call on that device must come before capturing."""


class CacheWarning(UserWarning):
    """The cache folder was refused or unusable, or a cached file was corrupt and rebuilt."""


class PTXDriverWarning(UserWarning):
    """Prebuilt PTX ($SRU_CUPY_PTX_DIR) cannot be loaded by this driver; the kernels are compiled
    with CuPy's NVRTC instead."""


def warn_once(key, message, category=CacheWarning, stacklevel=3):
    """Warns once per process for each ``key`` (the stack level is counted from the caller)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, category, stacklevel=stacklevel)


def user_stacklevel():
    """The warnings stacklevel, seen from the caller of this function, of the first frame outside
    the sru_cupy package (so a warning points at the user's line)."""
    import os
    import sys
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
