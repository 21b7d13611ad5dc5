"""Whether PyTorch is tracing or exporting (sru_cupy/tracing.py): each check is true exactly under
its tracer, so the layers take their other routes there and only there."""

import torch

from sru_cupy import tracing


def test_nothing_is_tracing_in_eager_mode():
    assert not tracing.onnx_exporting()
    assert not tracing.compiling_or_tracing()
    assert not tracing.fx_tracing()


def test_jit_trace_is_seen():
    seen = []

    def f(x):
        seen.append(tracing.compiling_or_tracing())
        return x * 2

    torch.jit.trace(f, torch.ones(2), check_trace=False)
    assert seen == [True]


def test_torch_compile_is_seen():
    seen = []

    @torch.compiler.disable
    def record(flag):
        seen.append(flag)

    def f(x):
        record(tracing.compiling_or_tracing())
        return x + 1

    torch.compile(f, backend="eager")(torch.ones(2))
    assert seen == [True]


def test_fx_symbolic_trace_is_seen():
    seen = []

    class Module(torch.nn.Module):
        def forward(self, x):
            seen.append(tracing.fx_tracing())
            return x + 1

    torch.fx.symbolic_trace(Module())
    assert seen == [True]


def test_onnx_export_is_read_from_torch_onnx(monkeypatch):
    import sys
    import types
    fake = types.SimpleNamespace(is_in_onnx_export=lambda: True)
    monkeypatch.setitem(sys.modules, "torch.onnx", fake)
    assert tracing.onnx_exporting() and tracing.compiling_or_tracing()
