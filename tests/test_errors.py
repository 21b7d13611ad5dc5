"""The shared errors (sru_cupy.errors): one module below every builder, importable first or last in
any order, with the old import path (sru_cupy.backends.KernelCompileError) still working."""

import json
import subprocess
import sys
import textwrap

import pytest

from sru_cupy import errors

from child_env import child_env

ORDERS = [("sru_cupy.ptx", "sru_cupy.backends.cupy_backend"),
          ("sru_cupy.backends.cupy_backend", "sru_cupy.ptx"),
          ("sru_cupy.backends.host", "sru_cupy.ptx"),
          ("sru_cupy.backends", "sru_cupy.errors")]


@pytest.mark.parametrize("order", ORDERS, ids=["-then-".join(o) for o in ORDERS])
def test_import_in_any_order_gives_one_class(order, tmp_path):
    code = textwrap.dedent(f"""
        import importlib, json, sys
        for name in {list(order)!r}:
            importlib.import_module(name)
        import sru_cupy.backends, sru_cupy.backends.cupy_backend, sru_cupy.backends.host
        import sru_cupy.errors, sru_cupy.ptx
        classes = {{sru_cupy.errors.KernelCompileError, sru_cupy.backends.KernelCompileError,
                    sru_cupy.ptx.KernelCompileError, sru_cupy.backends.host.KernelCompileError,
                    sru_cupy.backends.cupy_backend.KernelCompileError}}
        print(json.dumps(len(classes)))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=child_env(tmp_path / "cache"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == 1


def test_errors_module_imports_nothing_of_the_package(tmp_path):
    code = ("import json, sys; import sru_cupy.errors; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('sru_cupy'))))")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(tmp_path / "cache"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["sru_cupy", "sru_cupy.errors"]


def test_kernel_compile_error_carries_log_and_options():
    error = errors.KernelCompileError("NVRTC compile of x", "line 3: error", ("-std=c++17", "-G"))
    assert isinstance(error, RuntimeError)
    assert error.log == "line 3: error" and error.options == ["-std=c++17", "-G"]
    assert str(error) == "NVRTC compile of x failed\noptions: -std=c++17 -G\ncompiler log:\nline 3: error"


def test_capture_error_and_driver_warning_kinds():
    assert issubclass(errors.CaptureNotReadyError, RuntimeError)
    assert issubclass(errors.PTXDriverWarning, UserWarning)
