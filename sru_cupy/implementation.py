"""Which implementation runs a recurrence, decided in one place (``python -m sru_cupy info``
reports these decisions):

- CUDA tensors and CuPy arrays: the CUDA kernels (the CuPy backend);
- CPU tensors and NumPy arrays: the same kernels compiled by a C++ compiler (the host backend),
  or, where no compiler exists, a vectorized PyTorch (CPU tensors) or NumPy (NumPy arrays)
  implementation of the same math, each announced once per process.
"""

import warnings

from .backends import host
from .errors import user_stacklevel

HOST, NUMPY, TORCH = "host", "numpy", "torch"

_NO_COMPILER = ("sru_cupy: no C++ compiler found, {what} use the vectorized {impl} implementation "
                "(pip install sru_cupy[cpu], or set $CXX, for the compiled kernels)")
_announced = set()
_asked = set()  # the deciding functions announce_once has asked


def compiled_cpu_kernels():
    """True when the host kernels can be built (a C++ compiler is present)."""
    return host.available()


def for_numpy():
    """``"host"`` (compiled kernels) or ``"numpy"`` for NumPy arrays."""
    return HOST if compiled_cpu_kernels() else NUMPY


def for_torch_cpu():
    """``"host"`` (compiled kernels) or ``"torch"`` for CPU tensors."""
    return HOST if compiled_cpu_kernels() else TORCH


def announce(chosen):
    """Says once per process that a fallback implementation runs and why (nothing for "host")."""
    if chosen == HOST or chosen in _announced:
        return
    _announced.add(chosen)
    what = "NumPy arrays" if chosen == NUMPY else "CPU tensors"
    warnings.warn(_NO_COMPILER.format(what=what, impl="NumPy" if chosen == NUMPY else "PyTorch"),
                  stacklevel=user_stacklevel())


def announce_once(decide):
    """``announce(decide())`` the first time in the process that ``decide`` (for_numpy or
    for_torch_cpu) is passed: a per-call hook that costs nothing after its first call, as the
    announcement is once per process anyway."""
    if decide not in _asked:
        _asked.add(decide)
        announce(decide())
