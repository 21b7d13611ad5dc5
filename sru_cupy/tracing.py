"""Whether PyTorch is tracing or exporting the code that runs, asked in one place: the layers take
other routes then (ONNX export: the recurrence as a scan over time in standard operations; the
compilers and tracers: the plain GEMM), and nothing here imports more of torch than it has."""

import sys

import torch

__all__ = ["onnx_exporting", "compiling_or_tracing", "fx_tracing"]


def onnx_exporting() -> bool:
    """True inside ``torch.onnx.export`` (torch.onnx is not imported for the check); False under
    TorchScript, which cannot compile the check, so scripted code may call it too."""
    if torch.jit.is_scripting():
        return False
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def compiling_or_tracing() -> bool:
    """True under torch.compile / torch.export (dynamo), torch.jit.trace or ONNX export."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or onnx_exporting()


def fx_tracing() -> bool:
    """Whether torch.fx.symbolic_trace is tracing (its own check where this PyTorch has it; the
    older is_fx_tracing logs a warning on every call)."""
    trace = torch.fx._symbolic_trace
    check = getattr(trace, "is_fx_symbolic_tracing", None)
    return bool(check()) if check is not None else bool(getattr(trace, "_is_fx_tracing_flag",
                                                                 False))
