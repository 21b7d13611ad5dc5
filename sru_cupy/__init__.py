"""sru_cupy: the Simple Recurrent Unit (SRU) as raw CUDA kernels compiled at first use.

    from sru_cupy import SRU, SRUCell          # PyTorch layers (need torch)
    from sru_cupy import SRUpp, SRUppCell      # SRU++: attention makes U (need torch)
    from sru_cupy import launch, reference     # array-level kernels and the NumPy reference

Importing the package initialises no CUDA context, compiles nothing and imports neither torch nor
cupy: the names below are loaded on first access.
"""

__version__ = "0.1.0"

_LAZY = {
    "SRU": ("modules", "SRU"),
    "SRUCell": ("modules", "SRUCell"),
    "recurrence": ("ops", "recurrence"),
    "SRUpp": ("srupp", "SRUpp"),
    "SRUppCell": ("srupp", "SRUppCell"),
    "SRUppAttention": ("srupp", "SRUppAttention"),
    "SRUppProjectedLinear": ("srupp", "SRUppProjectedLinear"),
    "export_onnx": ("export", "export_onnx"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["SRU", "SRUCell", "SRUpp", "SRUppCell", "SRUppAttention", "SRUppProjectedLinear",
           "recurrence", "export_onnx", "__version__"]
