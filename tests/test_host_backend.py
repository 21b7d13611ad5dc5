"""The host backend (sru_cupy.backends.host): finding a compiler (the system's, else the ziglang
wheel's), building, caching and loading the C++ build of the CUDA sources, its failure modes, its
kernel table, the 16-bit conversions of sru_numeric.cuh as the kernels use them, the parallel grid
walk (OpenMP, or std::thread workers), the kernels built by ziglang with no system compiler, and a
fresh virtual environment where ``pip install sru_cupy[cpu]`` brings that compiler.

Tests that need fresh module state (an empty cache, another compiler) run in a subprocess.
"""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import sru_cupy
from sru_cupy import cpu, kernels
from sru_cupy.backends import KernelCompileError, host
from sru_cupy.launch import recurrence_backward, recurrence_forward
from sru_cupy.reference import recurrence_forward_reference

from child_env import child_env
from test_packaging import wheel  # noqa: F401  (the fixture: a wheel built from the checkout)

REPO = Path(sru_cupy.__file__).resolve().parent.parent
COMPILER = host.find_compiler()
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="host backend: no C++ compiler found")
BF16 = np.dtype(ml_dtypes.bfloat16)
LIBRARY_NAME = re.compile(r"^sru_host_[0-9a-f]{24}\.so$")


def _env(cache, **changes):
    """The environment of a subprocess: the given cache, and `changes` (None removes a variable)."""
    return child_env(cache, **changes)


def _python(code, env, timeout=240, with_stderr=False, python=sys.executable, cwd=REPO):
    """Runs `code` in a fresh interpreter; returns the JSON object it prints last (and its stderr
    when with_stderr)."""
    proc = subprocess.run([str(python), "-c", textwrap.dedent(code)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return (result, proc.stderr) if with_stderr else result


#: Makes the ziglang wheel unimportable in a child process (put first in its code).
_HIDE_ZIGLANG = "import sys; sys.modules['ziglang'] = None\n"
#: The shape of the ziglang wheel's command (host._ziglang_command), in some virtual environment.
FAKE_ZIG = ["/some/venv/lib/python3.11/site-packages/ziglang/zig", "c++"]
BUILD_NOTICE = "compiling the CPU kernels (once per machine)"


def _script(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


_LOAD_AND_RUN = """
    import json, os
    import numpy as np
    from sru_cupy.backends import host
    from sru_cupy.launch import recurrence_forward
    lib = host.library()
    U = np.full((2, 1, 3), 0.5, np.float32)
    h, c, c_last = recurrence_forward(U, np.ones((2, 1, 1), np.float32), None,
                                      np.zeros(2, np.float32), hidden_size=1)
    st = os.stat(lib.path)
    print(json.dumps({"path": lib.path, "ino": st.st_ino, "mtime": st.st_mtime_ns,
                      "h": h.ravel().tolist(), "count": lib.sru_host_kernel_count()}))
"""


def _libraries(cache):
    """The host libraries in the cache (other files, such as build records and locks, may exist)."""
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*.so") if p.is_file())


def _temporary_files(cache):
    """Half-written files (write_atomic's temporaries) left in the cache."""
    return sorted(str(p) for p in cache.rglob(".tmp-*"))


# -- build, cache, reuse -----------------------------------------------------------------------


@needs_compiler
def test_library_is_built_once_into_the_cache_and_reused(tmp_path):
    """The first use compiles the library into <cache>/host; a fresh process loads that file and
    runs no compile of the kernels (a compiler wrapper logs every invocation)."""
    cache = tmp_path / "cache"
    log = tmp_path / "cxx.log"
    wrapper = _script(tmp_path / "cxx-wrapper", f'echo "$@" >> "{log}"\nexec "{COMPILER}" "$@"\n')
    env = _env(cache, CXX=wrapper)

    first, stderr = _python(_LOAD_AND_RUN, env, with_stderr=True)
    assert stderr.count(BUILD_NOTICE) == 1, stderr  # one line while the build runs
    path = Path(first["path"])
    assert path.parent == cache / "host", path
    assert LIBRARY_NAME.match(path.name), path.name
    assert _libraries(cache) == [f"host/{path.name}"] and _temporary_files(cache) == []
    assert stat.S_IMODE((cache / "host").stat().st_mode) & 0o077 == 0, "cache folder not private"
    assert first["count"] == len(kernels.all_kernel_names((host.COLUMNS_PER_THREAD,)))
    ref_h, _, _ = recurrence_forward_reference(np.full((2, 1, 3), 0.5), np.ones((2, 1, 1)), None,
                                               np.zeros(2), hidden_size=1)
    np.testing.assert_allclose(first["h"], ref_h.ravel(), rtol=1e-6)  # the loaded library works
    builds = [line for line in log.read_text().splitlines() if "sru_host.cpp" in line]
    assert len(builds) == 1, f"expected one compile of the kernels, got {builds}"
    assert "-O3" in builds[0] and "-shared" in builds[0]

    second, stderr = _python(_LOAD_AND_RUN, env, with_stderr=True)
    assert BUILD_NOTICE not in stderr, stderr
    assert second["path"] == first["path"]
    assert (second["ino"], second["mtime"]) == (first["ino"], first["mtime"]), "library rewritten"
    assert second["h"] == first["h"]
    builds = [line for line in log.read_text().splitlines() if "sru_host.cpp" in line]
    assert len(builds) == 1, f"the second process compiled the kernels again: {builds}"
    assert _libraries(cache) == [f"host/{path.name}"] and _temporary_files(cache) == []


@needs_compiler
def test_concurrent_first_builds_leave_one_complete_library(tmp_path):
    """Two processes building into the same empty cache at once both load a working library, and
    the cache ends with one library and no temporary files."""
    cache = tmp_path / "cache"
    env = _env(cache)
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(_LOAD_AND_RUN)], env=env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["path"] == results[1]["path"]
    assert results[0]["h"] == results[1]["h"]
    libraries = _libraries(cache)
    assert len(libraries) == 1 and LIBRARY_NAME.match(Path(libraries[0]).name), libraries
    assert _temporary_files(cache) == []


_EXPECT_FAILURE = """
    import json
    from sru_cupy.backends import KernelCompileError, host
    from sru_cupy.launch import recurrence_forward
    import numpy as np
    result = {"available": host.available()}
    for attempt in ("library", "launch"):
        try:
            if attempt == "library":
                host.library()
            else:
                recurrence_forward(np.zeros((1, 1, 3), np.float32), np.zeros((1, 1, 1), np.float32),
                                   None, np.zeros(2, np.float32), hidden_size=1)
        except Exception as exc:
            result[attempt] = {"type": type(exc).__name__,
                               "compile_error": isinstance(exc, KernelCompileError),
                               "runtime_error": isinstance(exc, RuntimeError),
                               "message": str(exc),
                               "log": getattr(exc, "log", None),
                               "options": getattr(exc, "options", None)}
        else:
            result[attempt] = None
    print(json.dumps(result))
"""


def test_failing_compiler_raises_kernel_compile_error_with_log_and_options(tmp_path):
    cache = tmp_path / "cache"
    broken = _script(tmp_path / "broken-cxx",
                     'echo "broken-cxx: error: deliberate failure for $*" >&2\nexit 1\n')
    got = _python(_EXPECT_FAILURE, _env(cache, CXX=broken))
    for attempt in ("library", "launch"):
        error = got[attempt]
        assert error is not None, f"{attempt}: no error raised by a compiler that always fails"
        assert error["compile_error"] and error["runtime_error"], error["type"]
        assert error["type"] == KernelCompileError.__name__
        message = error["message"]
        assert "deliberate failure" in message, message  # the compiler's log
        assert "deliberate failure" in error["log"]
        options = error["options"]
        assert options[0] == str(broken), options  # the command: compiler, flags, files
        for flag in ("-O3", "-std=c++17", "-shared", "-fPIC"):
            assert flag in options, options
            assert flag in message, message
        assert any(option.endswith("sru_host.cpp") for option in options), options
    # Nothing half-built is left behind.
    if cache.exists():
        assert _libraries(cache) == [] and _temporary_files(cache) == []


_NO_COMPILER = """
    import json, warnings
    import numpy as np
    from sru_cupy.backends import host
    from sru_cupy.launch import recurrence_forward
    result = {"available": host.available(), "command": host.compiler_command()}
    try:
        host.library()
    except Exception as exc:
        result["library"] = {"type": type(exc).__name__, "message": str(exc)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h, c, c_last = recurrence_forward(np.full((2, 1, 3), 0.5, np.float32),
                                          np.ones((2, 1, 1), np.float32), None,
                                          np.zeros(2, np.float32), hidden_size=1)
    result["h"] = h.ravel().tolist()
    result["warnings"] = [str(w.message) for w in caught]
    print(json.dumps(result))
"""


@pytest.mark.parametrize("how", ["CXX-missing", "PATH-empty"])
def test_no_compiler_library_raises_and_numpy_arrays_fall_back(tmp_path, how):
    """No compiler at all (a $CXX that does not exist, or nothing on PATH and no ziglang): the
    library cannot be built (a RuntimeError that says how to get a compiler), and NumPy arrays run
    on the NumPy implementation, with its notice, building nothing."""
    cache = tmp_path / "cache"
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    if how == "CXX-missing":
        env = _env(cache, CXX=tmp_path / "no-such-compiler", PATH=empty)
    else:
        env = _env(cache, CXX=None, PATH=empty)
    got = _python(_HIDE_ZIGLANG + textwrap.dedent(_NO_COMPILER), env)
    assert got["available"] is False and got["command"] is None
    error = got.get("library")
    assert error is not None, "host.library(): no error without a compiler"
    assert error["type"] == "RuntimeError", error
    for words in ("no C++ compiler", "CXX", "pip install sru_cupy[cpu]"):
        assert words in error["message"], error["message"]
    ref_h, _, _ = recurrence_forward_reference(np.full((2, 1, 3), 0.5), np.ones((2, 1, 1)), None,
                                               np.zeros(2), hidden_size=1)
    np.testing.assert_allclose(got["h"], ref_h.ravel(), rtol=1e-6)
    assert [w for w in got["warnings"] if "vectorized NumPy implementation" in w], got["warnings"]
    assert not cache.exists(), "the cache folder was created although nothing could be built"


def test_find_compiler_prefers_cxx(tmp_path, monkeypatch):
    fake = _script(tmp_path / "my-cxx", "exit 0\n")
    monkeypatch.setattr(host, "_ziglang_command", lambda: FAKE_ZIG)
    monkeypatch.setenv("CXX", str(fake))
    assert host.find_compiler() == str(fake)
    assert host.compiler_command() == [str(fake)]
    monkeypatch.setenv("CXX", str(tmp_path / "absent"))
    assert host.find_compiler() is None
    assert host.compiler_command() is None  # an explicit $CXX is not silently replaced, not even
    assert host.available() is False        # by ziglang


def test_found_compiler_is_kept_while_it_exists(tmp_path, monkeypatch):
    """Every CPU call asks for the compiler: the PATH is searched once per $CXX and $PATH, again
    when the compiler found has gone, and a missing compiler is looked for again each time."""
    monkeypatch.delenv("CXX", raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    searches = []
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: searches.append(name) or real_which(name))
    assert host.find_compiler() is None
    assert host.find_compiler() is None
    assert searches.count("c++") == 2  # not finding one is not kept
    gxx = _script(bin_dir / "g++", "exit 0\n")
    searches.clear()
    assert [host.find_compiler() for _ in range(3)] == [str(gxx)] * 3
    assert searches == ["c++", "g++"]  # one search, then the kept path
    assert host.available()
    gxx.unlink()
    monkeypatch.setattr(host, "_ziglang_command", lambda: None)
    assert not host.available()  # the kept one has gone, and there is no other
    clang = _script(bin_dir / "clang++", "exit 0\n")
    assert host.find_compiler() == str(clang)  # searched again
    assert host.available()


@pytest.mark.parametrize("ziglang", [True, False], ids=["ziglang", "no-ziglang"])
def test_ziglang_is_the_last_resort(tmp_path, monkeypatch, ziglang):
    """With no $CXX: a compiler on PATH first, else ziglang (when importable), else none."""
    monkeypatch.setattr(host, "_ziglang_command", lambda: FAKE_ZIG if ziglang else None)
    monkeypatch.delenv("CXX", raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    assert host.compiler_command() == (FAKE_ZIG if ziglang else None)
    assert host.available() is ziglang
    gxx = _script(bin_dir / "g++", "exit 0\n")
    assert host.compiler_command() == [str(gxx)]


def test_ziglang_builds_for_the_chosen_isa_with_threads_and_a_venv_independent_key(monkeypatch):
    """ziglang has no OpenMP (not probed: std::thread workers, -pthread), is told the instruction
    set (zig would target the build machine's CPU, past what the cache key names): the CPU's, or
    the baseline one when $SRU_CUPY_HOST_ISA says so; and is named in the cache key by its
    version, not by the virtual environment that holds it."""
    zig = FAKE_ZIG
    flags = host.compiler_flags(zig)
    assert "-fopenmp" not in flags and "-pthread" in flags, flags
    mcpu = [flag for flag in flags if flag.startswith("-mcpu=")]
    assert mcpu == [host._ISA_ZIGLANG_FLAGS[cpu.isa()][0]], flags
    monkeypatch.setenv(host.ISA_ENV_VAR, "baseline")
    flags = host.compiler_flags(zig)
    assert [flag for flag in flags if flag.startswith("-m")] == ["-mcpu=baseline"], flags
    for flag in ("-O3", "-std=c++17", "-shared", "-fPIC"):
        assert flag in flags, flags
    assert host._compiler_identity(zig) == host._compiler_identity(
        ["/other/venv/lib/python3.12/site-packages/ziglang/zig", "c++"])
    assert host._compiler_identity(zig) == host.ZIGLANG
    assert host._compiler_identity(["/usr/bin/g++"]) == "/usr/bin/g++"
    assert host._compiler_identity(["/usr/bin/ccache", "g++"]) == "/usr/bin/ccache g++"
    installed = host._ziglang_command()
    if installed is not None:
        import importlib.metadata
        assert host._is_ziglang(installed)
        assert host._compiler_version(installed) == "zig " + importlib.metadata.version("ziglang")
        assert host.compiler_description(installed) == (f"the ziglang wheel's clang "
                                                        f"({host._compiler_version(installed)})")


# -- the kernel table --------------------------------------------------------------------------


@needs_compiler
@pytest.mark.parametrize("columns", [host.COLUMNS_PER_THREAD, 1], ids=["host", "gpu"])
def test_library_exports_every_kernel_name(columns):
    lib = host.library(columns)
    names = [lib.sru_host_kernel_name(i).decode() for i in range(lib.sru_host_kernel_count())]
    expected = kernels.all_kernel_names((columns,))
    assert len(expected) == 32  # 2 kernels x 4 storage types x K = 3, 4 x without and with V
    assert all(name.endswith(f", {columns}>") for name in expected)
    assert sorted(names) == sorted(expected)
    assert len(set(names)) == len(names)
    # Every instantiation without V has its WITH_V twin, and the other way round.
    without_v = {n.replace(", false, ", ", WITH_V, ") for n in names if ", false, " in n}
    with_v = {n.replace(", true, ", ", WITH_V, ") for n in names if ", true, " in n}
    assert len(without_v) == len(with_v) == 16 and without_v == with_v


def test_kernel_name_places_with_v_before_the_columns():
    assert kernels.kernel_name("sru_recurrence_forward", "float32", 3) == \
        "sru_recurrence_forward<float, 3, false, 1>"
    assert kernels.kernel_name("sru_recurrence_backward", "bfloat16", 4, 8, with_v=True) == \
        "sru_recurrence_backward<sru_bfloat16, 4, true, 8>"
    for value in (1, None, np.bool_(True), "true"):
        with pytest.raises(TypeError, match="with_v: expected a bool"):
            kernels.kernel_name("sru_recurrence_forward", "float32", 3, with_v=value)


def _recorded_launches(monkeypatch):
    """The kernel names host.launch is asked for, from here on (the launches still run)."""
    names = []
    launch = host.launch

    def recording(name, *args, **kwargs):
        names.append(name)
        return launch(name, *args, **kwargs)

    monkeypatch.setattr(host, "launch", recording)
    return names


def _v_problem(rng, dtype=np.float32, L=5, B=3, d=4):
    D = 2 * d
    data = lambda *shape: rng.uniform(-1, 1, shape).astype(dtype)  # noqa: E731
    return dict(U=data(L, B, 3 * D), x=data(L, B, D), weight_c=data(2 * D), bias=data(2 * D),
                c0=data(B, D), V=data(L, B, 2 * D), grad_h=data(L, B, D), grad_c_last=data(B, D),
                hidden_size=d)


@needs_compiler
def test_a_launch_with_v_runs_a_with_v_instantiation(monkeypatch):
    """The launch layer picks the WITH_V instantiation exactly when V is given, forward and
    backward, through the checked launches and over addresses (the PyTorch op's CPU path)."""
    import ctypes
    from sru_cupy.call import RecurrenceCall
    from sru_cupy.launch import run_checked
    names = _recorded_launches(monkeypatch)
    p = _v_problem(np.random.default_rng(3))
    options = dict(hidden_size=p["hidden_size"], bidirectional=True)
    args = (p["U"], p["x"], p["weight_c"], p["bias"], p["c0"])
    columns = host.COLUMNS_PER_THREAD
    for V in (None, p["V"]):
        names.clear()
        _, c, _ = recurrence_forward(*args, V=V, **options)
        recurrence_backward(p["grad_h"], p["grad_c_last"], *args, c, V=V, **options)
        assert names == [kernels.kernel_name(kernel, "float32", 3, columns, with_v=V is not None)
                         for kernel in kernels.KERNELS]

    L, B, D = p["U"].shape[0], p["U"].shape[1], 2 * p["hidden_size"]
    address = lambda a: None if a is None else ctypes.c_void_p(a.ctypes.data)  # noqa: E731
    for V in (None, p["V"]):
        names.clear()
        call = RecurrenceCall.describe((L, B, 3 * D), "float32", p["hidden_size"], True,
                                       with_v=V is not None)
        h, c, c_last = (np.empty((L, B, D), np.float32) for _ in range(3))
        arrays = dict(h=h, c=c, c_last=c_last[0], U=p["U"], x=p["x"], weight_c=p["weight_c"],
                      V=V, bias=p["bias"], c0=p["c0"])
        run_checked("sru_recurrence_forward", call, {n: address(a) for n, a in arrays.items()},
                    host, None)
        assert names == [kernels.kernel_name("sru_recurrence_forward", "float32", 3, columns,
                                             with_v=V is not None)]


@needs_compiler
@pytest.mark.parametrize("columns", [host.COLUMNS_PER_THREAD, 1], ids=["host", "gpu"])
def test_a_variant_given_the_other_variants_arguments_is_defined(columns):
    """WITH_V with a null V runs with zero offsets and writes no grad_V; an instantiation without
    WITH_V ignores a V (and grad_V) it is given: both give what the matching variant gives."""
    rng = np.random.default_rng(4)
    p = _v_problem(rng)
    L, B, d = p["U"].shape[0], p["U"].shape[1], p["hidden_size"]
    D = 2 * d
    grid, block = (B * D + 1, 1, 1), (1, 1, 1)  # one thread per block: enough for any columns
    sizes = [np.float32(1.0), np.int64(L), np.int64(B), np.int32(d), np.int32(2),
             np.int32(kernels.FLAG_SKIP)]

    def forward(with_v, V):
        h, c, c_last = np.empty((L, B, D), np.float32), np.empty((L, B, D), np.float32), \
            np.empty((B, D), np.float32)
        host.launch(kernels.kernel_name("sru_recurrence_forward", "float32", 3, columns, with_v),
                    grid, block, [h, c, c_last, p["U"], p["x"], p["weight_c"], V, p["bias"],
                                  p["c0"], None, None, *sizes])
        return h, c, c_last

    def backward(with_v, V, c, grad_V):
        grads = [np.empty((L, B, 3 * D), np.float32), np.empty((L, B, D), np.float32),
                 np.empty((2, B, D), np.float32), np.empty((2, B, D), np.float32),
                 np.empty((B, D), np.float32)]
        host.launch(kernels.kernel_name("sru_recurrence_backward", "float32", 3, columns, with_v),
                    grid, block, [*grads, grad_V, p["U"], p["x"], p["weight_c"], V, p["bias"],
                                  p["c0"], None, None, c, p["grad_h"], p["grad_c_last"], *sizes])
        return grads

    plain = forward(False, None)
    with_v = forward(True, p["V"])
    assert not np.array_equal(plain[0], with_v[0])  # V matters in this problem
    for got, want in zip(forward(True, None), plain):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(forward(False, p["V"]), plain):
        np.testing.assert_array_equal(got, want)

    c = plain[1]
    want = backward(False, None, c, None)
    untouched = np.full((L, B, 2 * D), 7.0, np.float32)
    for got in (backward(True, None, c, untouched), backward(False, p["V"], c, untouched)):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        assert np.all(untouched == 7.0)  # no grad_V written


@needs_compiler
@pytest.mark.parametrize("name", ["sru_recurrence_forward<int, 3, false, 1>",
                                  "sru_recurrence_forward<float, 5, false, 1>",
                                  "sru_recurrence_forward<float, 3, 1>",  # no WITH_V argument
                                  "sru_recurrence_forward<float, 3, 1, 1>",
                                  "sru_recurrence_forward<float, 3, false, 0>",
                                  "sru_recurrence_forward<float, 3, false, 65>",
                                  "sru_recurrence_forward<float, 3>", "sru_recurrence_forward", ""])
def test_launching_an_unknown_kernel_raises(name):
    with pytest.raises(RuntimeError, match="not in the library|not a kernel instantiation"):
        host.launch(name, (1, 1, 1), (1, 1, 1), [])


@needs_compiler
@pytest.mark.parametrize("value", [1.5, 3, True, np.float16(1)], ids=["float", "int", "bool", "f16"])
def test_launch_rejects_scalars_without_an_exact_c_type(value):
    """A Python float would be passed as a double where the kernel may expect a float."""
    with pytest.raises(TypeError, match="kernel argument"):
        host.launch(kernels.kernel_name("sru_recurrence_forward", "float32", 3), (1, 1, 1),
                    (1, 1, 1), [value])


# -- 16-bit conversions ------------------------------------------------------------------------


def _finite_patterns(dtype):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    values = bits.view(dtype)
    return values[np.isfinite(values.astype(np.float32))]


def _half_path_forward(u0, u3, c0, mask_h, *, forget_bias):
    """Forward with k = 4, v1 (weight_c None), u1 = u2 = 0 and b_r = 0 (so r = 1/2 exactly),
    b_f = forget_bias (0: f = 1/2 exactly; -1e30: f = 0 exactly). u0, u3: (L, N); c0: (N,)."""
    L, N = u0.shape
    U = np.zeros((L, 1, N, 4), dtype=u0.dtype)
    U[..., 0] = u0[:, None, :]
    U[..., 3] = u3[:, None, :]
    bias = np.zeros(2 * N, np.float32)
    bias[:N] = forget_bias
    return recurrence_forward(U.reshape(L, 1, 4 * N), None, None, bias, c0.reshape(1, N),
                              hidden_size=N, mask_h=mask_h.reshape(1, N).astype(np.float32))


@needs_compiler
@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16], ids=["f16", "bf16"])
def test_every_finite_16bit_value_round_trips(dtype):
    """Load and store are exact for every finite value: with f = 0, c = u0; with m = 0, h = u3."""
    values = _finite_patterns(dtype)
    assert values.size > 63000
    u = values[None, :]
    h, c, c_last = _half_path_forward(u, u, np.zeros(values.size, dtype), np.zeros(values.size),
                                      forget_bias=-1e30)
    for name, out in (("c", c[0, 0]), ("h", h[0, 0]), ("c_last", c_last[0])):
        assert out.dtype == dtype
        same = out.view(np.uint16) == values.view(np.uint16)
        zero = (out.astype(np.float32) == 0) & (values.astype(np.float32) == 0)  # -0 may become +0
        bad = ~(same | zero)
        assert not bad.any(), (f"{name}: {bad.sum()} values changed, e.g. "
                               f"{values[bad][:5].astype(np.float32)} -> {out[bad][:5].astype(np.float32)}")


def _rounding_inputs(dtype, rng, N):
    """Columns of (c0 (N,), u0 (L, N), u3 (L, N), m (N,)) in classes that stress the rounding:
    random finite values, values at the range limit (m up to 3, so h overflows), h straddling the
    overflow threshold, subnormals, values around the smallest normal, and two exact ties at the
    overflow threshold. c0 and u0 keep the state finite (the kernel's f would be nan otherwise)."""
    info = ml_dtypes.finfo(dtype) if dtype == BF16 else np.finfo(dtype)
    big, tiny = float(info.max), float(info.smallest_subnormal)
    normal, nmant = float(info.smallest_normal), int(info.nmant)
    L = 4
    finite = _finite_patterns(dtype).astype(np.float64)
    moderate = finite[np.abs(finite) < big / 4]
    c0, u0, u3, m = np.zeros(N), np.zeros((L, N)), np.zeros((L, N)), np.ones(N)
    for j in range(N):
        kind = j % 5
        if kind == 0:  # random values of every magnitude
            state = rng.choice(moderate, 1 + L)
            c0[j], u0[:, j], u3[:, j] = state[0], state[1:], rng.choice(finite, L)
            m[j] = rng.choice([0.0, 1.0, 0.75, 1.5, 1 / 0.7])
        elif kind == 1:  # large values, one sign for the state; m up to 3: h overflows
            sign = rng.choice([-1.0, 1.0])
            state = sign * big * (1 - rng.integers(0, 64, 1 + L) * 2.0 ** -nmant)
            c0[j], u0[:, j] = state[0], state[1:]
            u3[:, j] = big * (1 - rng.integers(0, 64, L) * 2.0 ** -nmant) * rng.choice([-1.0, 1.0], L)
            m[j] = rng.uniform(0.5, 3.0)
        elif kind == 2:  # h = (c - max/2) m / 2 + max/2 with c ~ max, m ~ 2: around max and beyond
            state = big * (1 - rng.integers(0, 64, 1 + L) * 2.0 ** -nmant)
            c0[j], u0[:, j], u3[:, j] = state[0], state[1:], big / 2
            m[j] = 2.0 * (1 + rng.uniform(0, 4) * 2.0 ** -nmant)
        elif kind == 3:  # subnormals: every stored c is a subnormal, many of them ties
            k = rng.integers(-(2 ** nmant) + 1, 2 ** nmant, 1 + 2 * L)
            c0[j], u0[:, j], u3[:, j] = k[0] * tiny, k[1:L + 1] * tiny, k[L + 1:] * tiny
            m[j] = rng.choice([1.0, 0.75, 1.25, 1.5, 3.0])
        else:  # around the smallest normal: results on both sides of the subnormal boundary
            state = normal * rng.uniform(0.5, 2.0, 1 + L)
            c0[j], u0[:, j], u3[:, j] = state[0], state[1:], normal * rng.uniform(-0.1, 0.1, L)
            m[j] = rng.choice([1.0, 0.9, 1.1])
    # Exact ties at the overflow threshold: c = max, u3 = the next value down, m = 3:
    # h = (max - below) * 3 / 2 + below = max + ulp / 2, the midpoint between max and infinity.
    below = float(np.nextafter(np.array(big, dtype=dtype), np.array(0, dtype=dtype)))
    for j, sign in ((N - 2, 1.0), (N - 1, -1.0)):
        c0[j], u0[:, j], u3[:, j], m[j] = sign * big, sign * big, sign * below, 3.0
    return c0.astype(dtype), u0.astype(dtype), u3.astype(dtype), m.astype(np.float32)


def _emulate_forward(c0, u0, u3, m, dtype):
    """The kernel's float32 arithmetic for this configuration, step by step, rounded to `dtype` at
    every store (numpy / ml_dtypes round float32 to nearest even)."""
    f = np.float32(0.5)
    state = c0.astype(np.float32)
    hs, cs = [], []
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(u0.shape[0]):
            x0, s = u0[t].astype(np.float32), u3[t].astype(np.float32)
            state = (state - x0) * f + x0
            h = ((state - s) * m) * f + s  # r = 1/2 like f
            hs.append(h.astype(dtype))
            cs.append(state.astype(dtype))
        return np.stack(hs), np.stack(cs), state.astype(dtype)


@needs_compiler
@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16], ids=["f16", "bf16"])
def test_16bit_rounding_matches_float32_rounded_to_nearest_even(dtype):
    """With f = r = 1/2 exactly the kernel's float32 arithmetic can be replayed in NumPy; every
    stored h and c must be that float32 value rounded to nearest even: ties, subnormals, the
    smallest normal, and overflow to infinity at and past the threshold."""
    rng = np.random.default_rng(16)
    N = 1000
    c0, u0, u3, m = _rounding_inputs(dtype, rng, N)
    h, c, c_last = _half_path_forward(u0, u3, c0, m, forget_bias=0.0)
    ref_h, ref_c, ref_c_last = _emulate_forward(c0, u0, u3, m, dtype)
    # The cases exercise what they claim to.
    assert np.isinf(ref_h.astype(np.float32)).sum() > 20
    assert np.isinf(ref_h[-1, -2:].astype(np.float32)).all()  # the exact ties round to inf
    info = ml_dtypes.finfo(dtype) if dtype == BF16 else np.finfo(dtype)
    sub = np.abs(ref_c.astype(np.float32))
    assert ((sub > 0) & (sub < float(info.smallest_normal))).sum() > 100
    for name, out, ref in (("h", h[:, 0], ref_h), ("c", c[:, 0], ref_c), ("c_last", c_last[0], ref_c_last)):
        assert out.dtype == dtype
        nan = np.isnan(out.astype(np.float32))
        assert np.array_equal(nan, np.isnan(ref.astype(np.float32))), f"{name}: nan where not expected"
        bad = (out.view(np.uint16) != ref.view(np.uint16)) & ~nan
        assert not bad.any(), (f"{name}: {bad.sum()} stores differ from round-to-nearest-even, e.g. "
                               f"got {out[bad][:4].astype(np.float32)}, "
                               f"expected {ref[bad][:4].astype(np.float32)}")


@needs_compiler
@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16], ids=["f16", "bf16"])
def test_16bit_nan_stays_nan(dtype):
    """A nan stays nan through load and store, whatever its payload: including float32 nans whose
    rounding would carry out of the nan range (0x7fffffff, the GPU's canonical nan, would become
    -0 in bfloat16 under plain round-to-nearest-even)."""
    values = np.array([[1.0, np.nan, -np.nan, 2.0]]).astype(dtype)
    h, c, _ = _half_path_forward(np.zeros_like(values), values, np.zeros(4, dtype),
                                 np.zeros(4), forget_bias=0.0)
    assert np.isnan(h[0, 0].astype(np.float32)).tolist() == [False, True, True, False]
    h, c, c_last = _half_path_forward(values, np.zeros_like(values), np.zeros(4, dtype), np.ones(4),
                                      forget_bias=-1e30)
    assert np.isnan(c[0, 0].astype(np.float32)).tolist() == [False, True, True, False]
    # nan payloads from a float32 parameter: h = ((c - u3) m) r + u3 with m = nan.
    payloads = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FBFFFFF, 0x7FC00000, 0x3F800000],
                        dtype=np.uint32)
    m = payloads.view(np.float32)
    ones = np.ones((1, m.size), dtype)
    h, _, _ = _half_path_forward(ones, ones * 0.5, np.ones(m.size, dtype), m, forget_bias=0.0)
    assert np.isnan(h[0, 0].astype(np.float32)).tolist() == [True] * 5 + [False], \
        h[0, 0].view(np.uint16)


# -- the emulated grid ---------------------------------------------------------------------------


def _problem(rng, L=13, B=5, d=100, dtype=np.float32):
    D = 2 * d
    data = lambda *shape: (rng.standard_normal(shape) * 0.5).astype(dtype)  # noqa: E731
    mask_pad = np.zeros((L, B), bool)
    mask_pad[L - 3:, 1] = True
    mask_pad[:2, 2] = True
    return dict(U=data(L, B, 3 * D), x=data(L, B, D), weight_c=data(2 * D), bias=data(2 * D),
                c0=data(B, D), mask_h=(rng.random((B, D)) > 0.2).astype(np.float32) * 1.25,
                mask_pad=mask_pad, grad_h=data(L, B, D), grad_c_last=data(B, D), d=d)


def _run(p):
    opts = dict(hidden_size=p["d"], bidirectional=True, use_tanh=True, scale_x=1.5,
                mask_h=p["mask_h"], mask_pad=p["mask_pad"])
    args = [p[k] for k in ("U", "x", "weight_c", "bias", "c0")]
    h, c, c_last = recurrence_forward(*args, **opts)
    g = recurrence_backward(p["grad_h"], p["grad_c_last"], *args, c, **opts)
    return {"h": h, "c": c, "c_last": c_last, "gU": g["U"], "gx": g["x"], "gc0": g["c0"],
            "gwc": g["weight_c_partial"], "gb": g["bias_partial"]}


@needs_compiler
@pytest.mark.parametrize("block", [1, 7, 64, 1000, 1024])
def test_block_size_does_not_change_results(monkeypatch, block):
    """The grid walk covers every column exactly once whatever the block size (partial blocks,
    one thread per block, one block for all)."""
    p = _problem(np.random.default_rng(3))
    expected = _run(p)
    monkeypatch.setattr(host, "block_size", lambda threads: block)
    got = _run(p)
    for key in expected:
        assert np.array_equal(got[key], expected[key]), key


#: Shapes whose threads' columns (N = 3, 8, 16) straddle the direction and batch boundaries, leave
#: the last thread partly filled, or (L6B3d32) all lie in one direction of one batch element (lanes
#: only); L13B5d100 has both kinds of thread.
_LANE_SHAPES = [(13, 5, 100), (9, 3, 7), (1, 3, 1), (17, 4, 3), (6, 3, 32)]
_LANE_IDS = ["L13B5d100", "L9B3d7", "L1B3d1", "L17B4d3", "L6B3d32"]


@needs_compiler
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("L,B,d", _LANE_SHAPES, ids=_LANE_IDS)
def test_lanes_give_what_one_column_per_thread_gives(monkeypatch, L, B, d, dtype):
    """A thread's N columns are the lanes of SIMD vectors where they lie in one direction of one
    batch element; a thread straddling a direction or batch boundary, the last (partly filled) one
    and N = 3 run scalar columns. With the scalar exp and tanh (VECTOR_MATH False) every column
    gives exactly what one thread per column (the GPU's N = 1) gives, bit for bit, either way: each
    lane does the same IEEE operations in the same order (no FMA contraction)."""
    p = _problem(np.random.default_rng(L * 1000 + B * 10 + d), L=L, B=B, d=d, dtype=dtype)
    monkeypatch.setattr(host, "VECTOR_MATH", False)
    monkeypatch.setattr(host, "COLUMNS_PER_THREAD", 1)
    expected = _run(p)
    for columns in (3, 8, 16):
        monkeypatch.setattr(host, "COLUMNS_PER_THREAD", columns)
        got = _run(p)
        for key in expected:
            assert np.array_equal(got[key], expected[key]), f"N = {columns}: {key}"


@needs_compiler
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("L,B,d", _LANE_SHAPES, ids=_LANE_IDS)
def test_vector_exp_lanes_agree_with_one_column_per_thread(monkeypatch, L, B, d, dtype):
    """The default build, whose lanes take exp and tanh from the C library's vector variants
    (libmvec with g++: within 4 ulp), agrees with one column per thread (scalar expf) within the
    float32 tolerance of the suite (1e-5 of each output's scale; float64 1e-12), and keeps padding
    exact: h and the input gradients are 0 at padded steps."""
    p = _problem(np.random.default_rng(L * 1000 + B * 10 + d + 1), L=L, B=B, d=d, dtype=dtype)
    monkeypatch.setattr(host, "COLUMNS_PER_THREAD", 1)
    expected = _run(p)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    pad = p["mask_pad"]
    for columns in (8, 16):
        monkeypatch.setattr(host, "COLUMNS_PER_THREAD", columns)
        got = _run(p)
        for key in expected:
            scale = max(1.0, float(np.abs(expected[key]).max()))
            np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=tol * scale,
                                       err_msg=f"N = {columns}: {key}")
        assert not got["h"][pad].any() and not got["gU"][pad].any(), f"N = {columns}"
        assert pad.any() and got["h"][~pad].all()


# -- instruction set, compiler facts, start-up ----------------------------------------------------


def test_each_instruction_set_has_its_columns_per_thread():
    assert host._ISA_COLUMNS == {"avx512": 16, "avx2": 8, "baseline": 8}
    assert set(host._ISA_FLAGS) == set(host._ISA_ZIGLANG_FLAGS) == set(host.ISAS)


@needs_compiler
def test_instruction_set_is_in_the_flags_and_the_cache_key(monkeypatch):
    """Libraries built for different instruction sets have different cache keys (a cache folder
    shared between CPUs never loads one built for another), and the flags name the set."""
    monkeypatch.delenv(host.ISA_ENV_VAR, raising=False)
    keys = {}
    for isa in cpu.isas():
        monkeypatch.setenv(host.ISA_ENV_VAR, isa)
        key, _, flags = host.library_key([COMPILER], 8)
        assert host.build_isa([COMPILER]) == isa  # g++ and clang++ take every set's flags
        assert all(flag in flags for flag in host._ISA_FLAGS[isa]), (isa, flags)
        keys[isa] = key
    assert len(set(keys.values())) == len(keys), keys
    monkeypatch.setattr(host, "VECTOR_MATH", False)
    assert host.library_key([COMPILER], 8)[0] not in keys.values()


def _gnu_x86_64_glibc():
    return (COMPILER is not None and "g++" in os.path.basename(os.path.realpath(COMPILER))
            and os.uname().machine == "x86_64" and os.confstr("CS_GNU_LIBC_VERSION") >= "glibc 2.35")


@needs_compiler
def test_lanes_call_the_vector_exp_of_the_instruction_set():
    """With g++ on x86-64 glibc the library calls libmvec's exp (and tanh) variants of the
    instruction set it was built for (AVX-512: _ZGVeN16v_expf, AVX2: _ZGVdN8v_expf, baseline:
    _ZGVbN4v_expf), not the scalar expf alone."""
    if not _gnu_x86_64_glibc():
        pytest.skip("libmvec's variants are reached with g++ on x86-64 glibc >= 2.35 only")
    lib = host.library(host.COLUMNS_PER_THREAD)
    symbols = subprocess.run(["nm", "-D", "--undefined-only", lib.path], capture_output=True,
                             text=True, check=True).stdout
    isa = host.build_isa([COMPILER])
    wanted = {"avx512": ("_ZGVeN16v_expf", "_ZGVeN8v_exp", "_ZGVeN16v_tanhf"),
              "avx2": ("_ZGVdN8v_expf", "_ZGVdN4v_exp", "_ZGVdN8v_tanhf"),
              "baseline": ("_ZGVbN4v_expf", "_ZGVbN2v_exp", "_ZGVbN4v_tanhf")}[isa]
    for name in wanted:
        assert re.search(rf"\b{name}\b", symbols), (isa, name, symbols)


@needs_compiler
@pytest.mark.slow
def test_baseline_build_works_on_any_cpu_of_the_architecture(tmp_path):
    """$SRU_CUPY_HOST_ISA=baseline builds code without AVX (as on a CPU without AVX2), in a
    library of its own, that computes the same results within the float32 tolerance."""
    code = """
        import json, numpy as np
        from sru_cupy.backends import host
        from sru_cupy.launch import recurrence_forward
        from sru_cupy.reference import recurrence_forward_reference
        rng = np.random.default_rng(0)
        L, B, d = 7, 3, 40
        U = rng.standard_normal((L, B, 3 * d)).astype(np.float32)
        x = rng.standard_normal((L, B, d)).astype(np.float32)
        w, b = rng.standard_normal(2 * d).astype(np.float32), rng.standard_normal(2 * d).astype(np.float32)
        h, _, _ = recurrence_forward(U, x, w, b, hidden_size=d)
        ref = recurrence_forward_reference(U.astype(np.float64), x.astype(np.float64), w, b, hidden_size=d)[0]
        flags = json.load(open(host.library().path[:-3] + ".json"))["flags"]
        print(json.dumps({"error": float(np.abs(h - ref).max()), "flags": flags,
                          "columns": host.COLUMNS_PER_THREAD}))
    """
    got = _python(code, _env(str(tmp_path), **{host.ISA_ENV_VAR: "baseline"}))
    assert got["error"] < 1e-5 and got["columns"] == 8, got
    assert not any(flag.startswith(("-mavx", "-mfma", "-march", "-mcpu=baseline+")) for flag in got["flags"])


def _wrapper_compiler(path):
    """A compiler that is the system one under another path (its own facts in the cache)."""
    return _script(path, f'exec {COMPILER} "$@"\n')


@needs_compiler
def test_compiler_facts_are_probed_once_and_kept_in_the_cache(tmp_path, monkeypatch):
    """The version, OpenMP support and instruction-set flags of a compiler are probed once and kept
    in the cache keyed by the compiler's path, size and modification time: a process with the same
    cache starts no compiler to learn them; a changed compiler is probed again."""
    monkeypatch.setenv("SRU_CUPY_CACHE_DIR", str(tmp_path / "cache"))
    compiler = _wrapper_compiler(tmp_path / "cxx")
    compiler.chmod(0o755)
    monkeypatch.setattr(host, "_compiler_info", {})
    facts = host._compiler_facts([str(compiler)])
    assert facts["openmp"] == (host._openmp_flags([COMPILER]) == ["-fopenmp"])
    assert facts["version"] == host._compiler_version([COMPILER]) and facts["isa"]["baseline"]
    records = {json.loads(path.read_text())["identity"]["command"][0]: json.loads(path.read_text())
               for path in (tmp_path / "cache" / "host").glob("compiler_*.json")}
    assert records[str(compiler)]["facts"] == facts
    assert records[str(compiler)]["identity"]["file"][0] == str(compiler.resolve())

    def no_process(*args, **kwargs):
        raise AssertionError(f"a compiler was started: {args}")

    monkeypatch.setattr(host, "_compiler_info", {})  # a new process: facts from the cache
    monkeypatch.setattr(host.subprocess, "run", no_process)
    monkeypatch.setattr(host.subprocess, "Popen", no_process)
    assert host._compiler_facts([str(compiler)]) == facts
    monkeypatch.undo()
    monkeypatch.setenv("SRU_CUPY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(host, "_compiler_info", {})
    info = compiler.stat()
    os.utime(compiler, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))  # a changed compiler
    probes = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(host.subprocess, "Popen",
                        lambda *a, **k: probes.append(a) or real_popen(*a, **k))
    assert host._compiler_facts([str(compiler)]) == facts and probes


@needs_compiler
def test_a_warm_process_starts_no_compiler(tmp_path):
    """With the kernel cache warm, a new process reaches its first launch without starting any
    process (no compiler version query, no OpenMP or instruction-set probe, no build)."""
    code = """
        import json, subprocess
        import numpy as np
        from sru_cupy.launch import recurrence_forward
        rng = np.random.default_rng(0)
        U = rng.standard_normal((3, 2, 12)).astype(np.float32)
        x = rng.standard_normal((3, 2, 4)).astype(np.float32)
        w = np.zeros(8, np.float32)
        if {forbid}:
            def no_process(*args, **kwargs):
                raise AssertionError(f"process started: {{args}}")
            subprocess.run = subprocess.Popen = no_process
        h, _, _ = recurrence_forward(U, x, w, w, hidden_size=4)
        print(json.dumps({{"h": h.ravel().tolist()}}))
    """
    env = _env(str(tmp_path))
    cold = _python(code.format(forbid=False), env)
    warm = _python(code.format(forbid=True), env)
    assert warm == cold


@pytest.mark.parametrize("threads", [1, 7, 64, 100, 1000, 10**6])
def test_block_size_gives_every_core_several_blocks(threads):
    block = host.block_size(threads)
    assert 1 <= block <= host.BLOCK_SIZE
    blocks = -(-threads // block)
    wanted = host.BLOCKS_PER_CORE * host._cores()
    # as many blocks as wanted, unless the threads run out (blocks of one) or the cap is reached
    assert blocks >= wanted or block == 1 or block == host.BLOCK_SIZE, (block, blocks)


_WALK_RUN = """
    import json, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from sru_cupy.backends import host
    from test_host_backend import _problem, _run
    if {no_openmp}:
        host._openmp_flags = lambda compiler: []  # build for the std::thread workers
    host.PARALLEL_WORK = {parallel_work}
    host.BLOCK_SIZE = {block}
    p = _problem(np.random.default_rng(3))
    np.savez({out!r}, **_run(p))
    print(json.dumps({{"flags": host.compiler_flags(host.compiler_command())}}))
"""


@needs_compiler
@pytest.mark.parametrize("walk", ["openmp", "threads"])
def test_parallel_grid_walk_does_not_change_results(tmp_path, monkeypatch, walk):
    """The parallel grid walk (forced with PARALLEL_WORK = 0), with OpenMP or, in a build without it
    (as ziglang's), on std::thread workers, gives bit-identical results to one thread
    (OMP_NUM_THREADS=1, and the small-work single-thread path); each column is one thread's."""
    if walk == "openmp" and host._openmp_flags(COMPILER) != ["-fopenmp"]:
        pytest.skip("the compiler has no OpenMP: the std::thread walk is the one tested")
    block = 8  # small blocks: enough of them for several threads
    monkeypatch.setattr(host, "BLOCK_SIZE", block)
    p = _problem(np.random.default_rng(3))
    threads = -(-p["U"].shape[1] * 2 * p["d"] // host.COLUMNS_PER_THREAD)
    assert -(-threads // block) >= 8
    assert p["U"].shape[0] * p["U"].shape[1] * 2 * p["d"] < host.PARALLEL_WORK  # default: 1 thread
    expected = _run(p)
    runs = {}
    if walk == "openmp":
        monkeypatch.setattr(host, "PARALLEL_WORK", 0)
        runs["in-process, parallel"] = _run(p)
    for threads, parallel_work in ((1, 0), (3, 0), (4, host.PARALLEL_WORK)):
        out = tmp_path / f"{walk}{threads}.npz"
        code = _WALK_RUN.format(tests=str(Path(__file__).resolve().parent), out=str(out),
                                parallel_work=parallel_work, block=block,
                                no_openmp=walk == "threads")
        got = _python(code, _env(os.environ["SRU_CUPY_CACHE_DIR"], OMP_NUM_THREADS=threads))
        assert ("-fopenmp" in got["flags"]) == (walk == "openmp"), got["flags"]
        runs[f"OMP_NUM_THREADS={threads}, PARALLEL_WORK={parallel_work}"] = dict(np.load(out))
    for run, got in runs.items():
        for key in expected:
            assert np.array_equal(got[key], expected[key]), f"{run}: {key}"


# -- the ziglang compiler (pip install sru_cupy[cpu]) with no system compiler visible ----------------


def _require_ziglang():
    """The ziglang tests install nothing: the test extra brings the wheel."""
    if not host._ziglang_importable():
        pytest.fail("the ziglang wheel is not importable here: install the test extra "
                    "(pip install -e .[test]), which has it")


@pytest.fixture(scope="module")
def ziglang_cache(tmp_path_factory):
    """The kernel cache of the ziglang tests. Shared: a library built by ziglang is keyed by the
    ziglang version (not the interpreter), so the fresh virtual environment with the same version
    loads the one the kernel test built instead of spending another build."""
    return tmp_path_factory.mktemp("ziglang-cache")


#: A representative part of tests/test_launch.py, forward and backward against the float64
#: reference: every direction x k-variant x dtype (the one-step size cases), the option
#: combinations of the covering design, and the parallel grid walk; all with the host's columns per
#: thread, so one library is built.
_ZIGLANG_SUBSET = ("not cols1 and (test_options_against_reference or "
                   "test_parallel_host_launches_against_reference or "
                   "(test_sizes_against_reference and L1B3d4))")


@pytest.mark.slow
def test_kernels_built_by_ziglang_match_the_reference(tmp_path, ziglang_cache):
    """With $CXX unset and no compiler on PATH, the host backend builds the kernels with ziglang
    (no OpenMP: std::thread workers), and the launch tests pass on that library."""
    _require_ziglang()
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = _env(ziglang_cache, CXX=None, PATH=empty)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "tests/test_launch.py", "-k", _ZIGLANG_SUBSET]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 50, summary
    assert "skipped" not in summary and "failed" not in summary, summary
    records = [json.loads(p.read_text()) for p in sorted((ziglang_cache / "host").glob("*.json"))]
    assert len(records) == 1, records  # one library: the host's columns per thread
    assert host._is_ziglang(records[0]["compiler"]), records[0]
    assert "-fopenmp" not in records[0]["flags"] and "-pthread" in records[0]["flags"]


_VENV_RUN = """
    import json, warnings
    import numpy as np
    import sru_cupy
    from sru_cupy import functional
    from sru_cupy.arrays import SRU
    from sru_cupy.backends import host
    from sru_cupy.reference import recurrence_backward_reference, recurrence_forward_reference

    rng = np.random.default_rng(0)
    L, B, d = 9, 3, 5
    data = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    U, x, wc, bias, grad_h = data(L, B, 6 * d), data(L, B, 2 * d), data(4 * d), data(4 * d), \\
        data(L, B, 2 * d)
    options = dict(hidden_size=d, bidirectional=True, use_tanh=True, scale_x=1.3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h, c, _ = functional.recurrence_forward(U, x, wc, bias, **options)
        g = functional.recurrence_backward(grad_h, None, U, x, wc, bias, None, c, **options)
        model = SRU(4, 6, num_layers=2, device="cpu", seed=0)
        hs, cs, cache = model.forward(data(L, B, 4), training=True)
        grad_x, _, grads = model.backward(cache, np.ones_like(hs))
    f64 = lambda a: a.astype(np.float64)
    ref_h, _, _ = recurrence_forward_reference(f64(U), f64(x), f64(wc), f64(bias), **options)
    ref = recurrence_backward_reference(f64(grad_h), None, f64(U), f64(x), f64(wc), f64(bias),
                                        None, f64(c), **options)
    print(json.dumps({
        "package": sru_cupy.__file__,
        "compiler": host.compiler_command(),
        "libraries": [lib.path for lib in host._libraries.values()],
        "error": max(float(np.abs(h - ref_h).max()), float(np.abs(g["U"] - ref["U"]).max()),
                     float(np.abs(g["x"] - ref["x"]).max())),
        "finite": bool(np.isfinite(hs).all() and np.isfinite(grad_x).all()
                       and all(np.isfinite(v).all() for v in grads.values())),
        "warnings": [str(w.message) for w in caught]}))
"""


@pytest.mark.slow
def test_fresh_venv_plain_install_falls_back_and_cpu_extra_compiles(wheel, tmp_path, ziglang_cache):
    """In a fresh virtual environment with no C++ compiler visible, ``pip install sru_cupy`` runs
    NumPy arrays (functional and arrays.SRU, forward and backward) on the NumPy implementation, and
    ``pip install sru_cupy[cpu]`` then runs them on host kernels compiled by ziglang."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    clean = {k: v for k, v in os.environ.items()
             if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CXX")}
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    run_env = dict(clean, PATH=str(empty), SRU_CUPY_CACHE_DIR=str(ziglang_cache))

    def pip_install(requirement):
        proc = subprocess.run([str(python), "-m", "pip", "install", "-q", requirement], env=clean,
                              cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"pip install {requirement} failed:\n{proc.stdout}\n{proc.stderr}"

    def run():
        return _python(_VENV_RUN, run_env, timeout=900, with_stderr=True, python=python,
                       cwd=tmp_path)

    pip_install(str(wheel))
    plain, stderr = run()
    assert Path(plain["package"]).resolve().is_relative_to(venv.resolve()), plain["package"]
    assert plain["compiler"] is None and plain["libraries"] == [], plain
    assert [w for w in plain["warnings"] if "vectorized NumPy implementation" in w], plain["warnings"]
    assert plain["error"] < 1e-5 and plain["finite"], plain
    assert BUILD_NOTICE not in stderr

    pip_install(f"{wheel}[cpu]")
    compiled, stderr = run()
    assert host._is_ziglang(compiled["compiler"]), compiled["compiler"]
    assert Path(compiled["compiler"][0]).resolve().is_relative_to(venv.resolve()), \
        compiled["compiler"]
    assert len(compiled["libraries"]) == 1, compiled
    assert Path(compiled["libraries"][0]).parent == ziglang_cache / "host"
    assert not [w for w in compiled["warnings"] if "NumPy implementation" in w], compiled["warnings"]
    assert compiled["error"] < 1e-5 and compiled["finite"], compiled


_THREAD_COUNT_RUN = """
    import json, os, threading, time
    import numpy as np
    from sru_cupy.backends import host
    from sru_cupy.launch import recurrence_forward
    host._openmp_flags = lambda compiler: []  # the std::thread walk
    host.PARALLEL_WORK = 0
    L, B, d = 200, 16, 256
    rng = np.random.default_rng(0)
    U = rng.standard_normal((L, B, 3 * d)).astype(np.float32)
    x = rng.standard_normal((L, B, d)).astype(np.float32)
    bias = np.zeros(2 * d, np.float32)
    recurrence_forward(U[:1], x[:1], None, bias, hidden_size=d)  # builds and loads the library
    counts, done = [], threading.Event()

    def watch():  # ctypes releases the GIL during a launch, so this samples while it runs
        while not done.is_set():
            counts.append(len(os.listdir("/proc/self/task")))
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.05)
    baseline = max(counts)
    for _ in range(10):
        recurrence_forward(U, x, None, bias, hidden_size=d)
    done.set()
    watcher.join()
    print(json.dumps({"extra": max(counts) - baseline}))
"""


@needs_compiler
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc/self/task")
@pytest.mark.parametrize("threads", [1, 3])
def test_thread_workers_follow_omp_num_threads(threads):
    """Without OpenMP the grid walk starts OMP_NUM_THREADS - 1 helper threads (the caller is a
    worker too), as OpenMP would run OMP_NUM_THREADS threads, and none for OMP_NUM_THREADS=1."""
    got = _python(_THREAD_COUNT_RUN, _env(os.environ["SRU_CUPY_CACHE_DIR"], OMP_NUM_THREADS=threads))
    if threads == 1:
        assert got["extra"] == 0, got
    else:
        assert 1 <= got["extra"] <= threads - 1, got


# -- the compiler command: no cwd imports, $CXX as a command line, time limits -----------------------


def _fast_script(path, compiler, log, drop=()):
    """A compiler script: logs its arguments, drops its first argument when ``drop`` says so (the
    ``c++`` of ``zig c++``) and any ``-mcpu=`` flag (zig's, unknown to g++), builds with -O0 (with
    this PATH, for the assembler and linker, whatever the caller's)."""
    return _script(path, textwrap.dedent(f"""\
        export PATH="{os.environ['PATH']}"
        echo "$@" >> "{log}"
        {'shift' if 'first' in drop else ''}
        for a in "$@"; do
          shift
          case "$a" in
            -O3) set -- "$@" -O0 ;;
            -mcpu=*) ;;
            *) set -- "$@" "$a" ;;
          esac
        done
        exec "{compiler}" "$@"
        """))


@needs_compiler
def test_a_ziglang_folder_in_the_working_folder_is_never_run(tmp_path):
    """With no system compiler, the ziglang wheel compiles; a ``ziglang/`` folder in the current
    working folder (a cloned repository, a download folder) must be neither imported nor run in
    its place: the wheel's own executable is run by its absolute path."""
    marker = tmp_path / "marker"
    attack = tmp_path / "downloads"
    (attack / "ziglang").mkdir(parents=True)
    (attack / "ziglang" / "__init__.py").write_text("")
    (attack / "ziglang" / "__main__.py").write_text(
        f"open({str(marker)!r}, 'w').write('run')\nimport sys\nsys.exit(1)\n")
    site = tmp_path / "site"  # stands for the installed wheel: a zig that is g++ at -O0
    (site / "ziglang").mkdir(parents=True)
    (site / "ziglang" / "__init__.py").write_text("")
    log = tmp_path / "zig.log"
    _fast_script(site / "ziglang" / "zig", COMPILER, log, drop=("first",))
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = _env(tmp_path / "cache", CXX=None, PATH=empty)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(site)])
    code = """
        import json
        from sru_cupy.backends import host
        command = host.compiler_command()
        lib = host.library()
        print(json.dumps({"command": command, "count": lib.sru_host_kernel_count()}))
    """
    got = _python(code, env, cwd=attack)  # `python -c`: the working folder is first on sys.path
    assert not marker.exists(), "the ziglang folder of the working folder was run"
    assert got["command"] == [str(site / "ziglang" / "zig"), "c++"], got["command"]
    assert got["count"] == len(kernels.all_kernel_names((host.COLUMNS_PER_THREAD,)))
    assert "sru_host.cpp" in log.read_text()


@needs_compiler
def test_cxx_with_a_launcher_is_split_and_used(tmp_path):
    """CXX="launcher g++" (as with ccache) is a command line: the launcher runs the compiler (it is
    not taken for "no compiler", which would fall back to NumPy in silence)."""
    log = tmp_path / "launcher.log"
    launcher = _script(tmp_path / "my launcher", f'echo "$@" >> "{log}"\nexec "$@"\n')
    fast = _fast_script(tmp_path / "fast-g++", COMPILER, tmp_path / "fast.log")
    cxx = f"'{launcher}' {fast}"
    code = """
        import json
        from sru_cupy.backends import host
        lib = host.library()
        print(json.dumps({"available": host.available(), "command": host.compiler_command(),
                          "description": host.compiler_description(),
                          "count": lib.sru_host_kernel_count()}))
    """
    got = _python(code, _env(tmp_path / "cache", CXX=cxx))
    assert got["available"] and got["command"] == [str(launcher), str(fast)], got
    assert got["description"] == cxx, got
    assert got["count"] == len(kernels.all_kernel_names((host.COLUMNS_PER_THREAD,)))
    builds = [line for line in log.read_text().splitlines() if "sru_host.cpp" in line]
    assert len(builds) == 1 and builds[0].startswith(str(fast)), builds


@needs_compiler
@pytest.mark.parametrize("stage", ["probe", "build"])
def test_a_hanging_compiler_is_stopped_after_the_compile_timeout(tmp_path, stage):
    """A compiler that never finishes (at its --version probe, or at the build) is killed, with
    everything it started, after $SRU_CUPY_COMPILE_TIMEOUT seconds, and a KernelCompileError names
    the command and the limit; nothing is left half-built."""
    pids = tmp_path / "pids"
    hang = "*" if stage == "probe" else "*sru_host.cpp*"
    hanging = _script(tmp_path / "hanging-cxx", textwrap.dedent(f"""\
        case "$*" in
          {hang}) sleep 600 & echo $! >> "{pids}"; wait ;;
          *) exec "{COMPILER}" "$@" ;;
        esac
        """))
    code = """
        import json, time
        from sru_cupy.backends import KernelCompileError, host
        start = time.monotonic()
        try:
            host.library()
            error = None
        except KernelCompileError as exc:
            error = str(exc)
        print(json.dumps({"error": error, "seconds": time.monotonic() - start}))
    """
    got = _python(code, _env(tmp_path / "cache", CXX=hanging, SRU_CUPY_COMPILE_TIMEOUT="3"),
                  timeout=120)
    assert got["error"] is not None, "no error from a compiler that hangs"
    assert "stopped after 3 s" in got["error"] and "SRU_CUPY_COMPILE_TIMEOUT" in got["error"]
    assert str(hanging) in got["error"], got["error"]
    if stage == "build":
        assert "sru_host.cpp" in got["error"] and "-O3" in got["error"], got["error"]
    assert got["seconds"] < 60, got
    for pid in pids.read_text().split():  # the compiler's own children are gone too
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split()[2] == "Z", f"process {pid} still runs"
    assert _libraries(tmp_path / "cache") == [] and _temporary_files(tmp_path / "cache") == []


def test_compile_timeout_must_be_a_positive_number(monkeypatch):
    monkeypatch.setenv(host.COMPILE_TIMEOUT_ENV_VAR, "soon")
    with pytest.raises(ValueError, match=r"\$SRU_CUPY_COMPILE_TIMEOUT: expected a number of "
                                         r"seconds > 0, got 'soon'"):
        host.compile_timeout()
    monkeypatch.setenv(host.COMPILE_TIMEOUT_ENV_VAR, "2.5")
    assert host.compile_timeout() == 2.5
    monkeypatch.delenv(host.COMPILE_TIMEOUT_ENV_VAR)
    assert host.compile_timeout() == host.DEFAULT_COMPILE_TIMEOUT


# -- fork after a parallel launch ---------------------------------------------------------------------

_FORK_AFTER_PARALLEL = """
    import json, multiprocessing, sys
    import numpy as np
    from sru_cupy.backends import host
    from sru_cupy.launch import recurrence_forward
    L, B, d = 64, 16, 256
    assert L * B * d >= host.PARALLEL_WORK  # the parent's launch runs on the worker threads
    rng = np.random.default_rng(0)
    U = rng.standard_normal((L, B, 3 * d)).astype(np.float32)
    x = rng.standard_normal((L, B, d)).astype(np.float32)
    bias = np.zeros(2 * d, np.float32)
    h, _, _ = recurrence_forward(U, x, None, bias, hidden_size=d)

    def child(queue):
        h2, _, _ = recurrence_forward(U, x, None, bias, hidden_size=d)
        queue.put(float(np.abs(h2 - h).max()))

    if __name__ == "__main__":
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        process = ctx.Process(target=child, args=(queue,))
        process.start()
        process.join(60)
        hung = process.is_alive()
        if hung:
            process.kill()
        error = None if hung else queue.get(timeout=10)
        h3, _, _ = recurrence_forward(U, x, None, bias, hidden_size=d)  # the parent is unchanged
        print(json.dumps({"hung": hung, "error": error, "exitcode": process.exitcode,
                          "parent": float(np.abs(h3 - h).max())}))
"""


@needs_compiler
def test_a_process_forked_after_a_parallel_launch_runs_its_launches(tmp_path):
    """A child forked (a DataLoader worker, multiprocessing with fork) after the parent ran a
    parallel launch would wait forever on GNU OpenMP's thread pool; it runs its launches on one
    thread instead and gets the parent's results."""
    script = tmp_path / "fork_after_parallel.py"
    script.write_text(textwrap.dedent(_FORK_AFTER_PARALLEL))
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                          env=_env(os.environ["SRU_CUPY_CACHE_DIR"], OMP_NUM_THREADS=2),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["hung"], "the forked child hung on its first launch"
    assert got["exitcode"] == 0 and got["error"] == 0.0 and got["parent"] == 0.0, got
