"""Which implementation runs where (sru_cupy/implementation.py): the compiled kernels where a C++
compiler exists, else NumPy's or PyTorch's, announced once per process with a line that points at
the caller; and `python -m sru_cupy info` reports that same decision."""

import warnings

import pytest

from sru_cupy import implementation, info
from sru_cupy.backends import host


@pytest.mark.parametrize("available", [True, False], ids=["compiler", "no-compiler"])
def test_the_decision_follows_the_compiler(monkeypatch, available):
    monkeypatch.setattr(host, "available", lambda: available)
    assert implementation.for_numpy() == ("host" if available else "numpy")
    assert implementation.for_torch_cpu() == ("host" if available else "torch")
    line = info.cpu_path()
    assert line.startswith("host kernels") == available, line
    if not available:
        assert "vectorized NumPy path" in line and "vectorized PyTorch path" in line


def test_a_fallback_is_announced_once_pointing_at_the_caller(monkeypatch):
    monkeypatch.setattr(implementation, "_announced", set())
    with pytest.warns(UserWarning, match="CPU tensors use the vectorized PyTorch implementation") \
            as record:
        implementation.announce(implementation.TORCH)
    assert len(record) == 1 and record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        implementation.announce(implementation.TORCH)  # once per process
        implementation.announce(implementation.HOST)  # the compiled kernels need no notice
    with pytest.warns(UserWarning, match="NumPy arrays use the vectorized NumPy implementation"):
        implementation.announce(implementation.NUMPY)
