"""The environment report (sru_cupy.info, ``python -m sru_cupy info``): versions, GPUs, which backend
each path uses and why, and the kernel caches; it must work without a GPU, CuPy, torch or a C++
compiler, saying what is missing instead of raising."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sru_cupy import cpu, info
from sru_cupy.backends import host

from child_env import child_env


def _report_in_subprocess(tmp_path, block=(), **env):
    """info.report() in a fresh process where the modules in ``block`` cannot be imported."""
    code = textwrap.dedent(f"""
        import json, sys
        for name in {list(block)!r}:
            sys.modules[name] = None  # import raises ImportError
        from sru_cupy import info
        print(json.dumps(info.report()))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=child_env(tmp_path / "cache", **env),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _line(lines, start):
    found = [line for line in lines if line.strip().startswith(start)]
    assert found, f"no line starting with {start!r} in:\n" + "\n".join(lines)
    return found[0]


def test_report_names_versions_backends_and_caches():
    lines = info.report()
    assert lines[0].startswith("sru_cupy ")
    assert _line(lines, "Python ").startswith(f"Python {sys.version.split()[0]}")
    assert _line(lines, "NumPy ") == f"NumPy {np.__version__}"
    for name in ("CuPy", "PyTorch", "pynvrtc", "NVRTC"):
        _line(lines, name + " ")
    assert _line(lines, "GPUs:")
    assert "$SRU_CUPY_CACHE_DIR moves it" in _line(lines, "Kernel cache: ")
    _line(lines, "CuPy kernel cache: ")


@pytest.mark.skipif(not host.available(), reason="needs a C++ compiler")
def test_report_says_the_host_kernels_run_numpy_and_cpu_tensors():
    line = _line(info.report(), "NumPy arrays and CPU tensors:")
    isa = cpu.isa()
    assert f"host kernels ({host.COLUMNS_PER_THREAD} columns per thread, instruction set {isa})" \
        in line
    assert host.find_compiler() in line


def test_report_says_which_gemm_the_layers_use_on_the_cpu(monkeypatch):
    from sru_cupy import cpu_gemm
    monkeypatch.setenv(cpu_gemm.ROUTE_ENV_VAR, "matmul")
    assert _line(info.report(), "GEMM of the layers on the CPU:").endswith(
        "torch.matmul ($SRU_CUPY_CPU_GEMM=matmul)")
    monkeypatch.setenv(cpu_gemm.ROUTE_ENV_VAR, "onednn")
    assert "oneDNN 1x1 convolutions for float32" in _line(info.report(),
                                                          "GEMM of the layers on the CPU:")


def test_report_works_without_cupy_and_torch(tmp_path):
    lines = _report_in_subprocess(tmp_path, block=("cupy", "torch"))
    assert _line(lines, "CuPy ").startswith("CuPy not available (ModuleNotFoundError")
    assert _line(lines, "PyTorch ").startswith("PyTorch not available (ModuleNotFoundError")
    assert "GPUs: none" in lines
    assert "CuPy is not installed" in _line(lines, "CuPy arrays and CUDA tensors:")


@pytest.mark.parametrize("how", ["CXX-missing", "nothing-found"])
def test_report_without_a_compiler_says_which_cpu_path_runs(tmp_path, how):
    if how == "CXX-missing":
        lines = _report_in_subprocess(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    else:
        (tmp_path / "empty-bin").mkdir()
        lines = _report_in_subprocess(tmp_path, block=("ziglang",), CXX=None,
                                      PATH=str(tmp_path / "empty-bin"))
    line = _line(lines, "NumPy arrays and CPU tensors:")
    assert "no C++ compiler" in line
    assert "vectorized NumPy path" in line and "vectorized PyTorch path" in line
    assert "pip install sru_cupy[cpu]" in line
    assert ("no-such-compiler not found" in line) == (how == "CXX-missing"), line


def test_report_names_ziglang_when_it_is_the_compiler(tmp_path):
    """With no system compiler but the ziglang wheel importable, the host kernels are compiled by
    it (only named here: nothing is built)."""
    pytest.importorskip("ziglang", reason="the ziglang wheel is not installed (the test extra has it)")
    (tmp_path / "empty-bin").mkdir()
    lines = _report_in_subprocess(tmp_path, CXX=None, PATH=str(tmp_path / "empty-bin"))
    line = _line(lines, "NumPy arrays and CPU tensors:")
    assert "host kernels" in line and "the ziglang wheel's clang (zig " in line, line


@pytest.mark.skipif(not host.available(), reason="needs a C++ compiler")
def test_report_lists_what_the_cache_holds(tmp_path, monkeypatch):
    monkeypatch.setenv("SRU_CUPY_CACHE_DIR", str(tmp_path / "cache"))
    before = info.report()
    assert _line(before, "Kernel cache: ").endswith("absent")
    (tmp_path / "cache" / "host").mkdir(parents=True)
    (tmp_path / "cache" / "host" / "a.so").write_bytes(b"x" * 2_000_000)
    after = info.report()
    assert _line(after, "Kernel cache: ").endswith("1 files, 2.0 MB")
    assert _line(after, "host/: ").strip() == "host/: 1 files, 2.0 MB"


def test_device_name_of_the_cpu():
    torch = pytest.importorskip("torch")
    name = info.device_name(torch.device("cpu"))
    assert name.startswith("CPU (") and f"{os.cpu_count()} cores" in name


class _FakeLibcuda:
    def __init__(self, version, status=0):
        self.version, self.status = version, status

    def cuDriverGetVersion(self, pointer):
        pointer._obj.value = self.version
        return self.status


@pytest.mark.parametrize("lib, expected", [
    (_FakeLibcuda(13000), (13, 0)), (_FakeLibcuda(12090), (12, 9)),
    (_FakeLibcuda(0, status=100), None), (None, None)], ids=["13.0", "12.9", "error", "no-driver"])
def test_driver_version_from_libcuda(monkeypatch, lib, expected):
    monkeypatch.setattr(info, "_libcuda", lambda: lib)
    assert info.driver_version() == expected
    line = _line(info.report(), "CUDA driver:")
    if expected is None:
        assert line == "CUDA driver: none found (libcuda)"
    else:
        assert line.startswith(f"CUDA driver: for CUDA {expected[0]}.{expected[1]}")
        assert "loads on drivers for CUDA X.Y and newer" in line


def test_report_says_what_driver_prebuilt_ptx_needs(tmp_path, monkeypatch):
    folder = tmp_path / "ptx"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": 1, "archs": {
        "sm_70": {"arch": 70, "min_driver": "12.0"}, "sm_90": {"arch": 90, "nvrtc_version": "13.5"}}}))
    assert info._ptx_drivers(str(folder)) == ("sm_70 needs a driver for CUDA 12.0, sm_90 needs a "
                                              "driver for CUDA 13.5")
    assert info._ptx_drivers(str(tmp_path / "none")).startswith("unusable: ")


def test_report_names_a_cxx_command_line_with_its_launcher(tmp_path, monkeypatch):
    """CXX="launcher g++" (as with ccache): the report says which compiler runs, through what,
    instead of "no C++ compiler"."""
    launcher = tmp_path / "launcher"
    launcher.write_text('#!/bin/sh\nexec "$@"\n')
    launcher.chmod(0o755)
    monkeypatch.setenv("CXX", f"{launcher} g++ -pipe")
    line = info.cpu_path()
    assert f"compiled with {launcher} g++ -pipe (from $CXX)" in line, line
    assert "no C++ compiler" not in line
