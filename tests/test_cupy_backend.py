"""The CuPy backend (sru_cupy.backends.cupy_backend).

On the CPU, against a stand-in for CuPy that records what the backend asks of it: the NVRTC options
(float32 subnormals kept, as in the host and PTX builds), the compile cache on disk, one function
object per (device, kernel), a lock per device, the prebuilt-PTX driver check with its fallback
and single warning, a missing NVRTC or header as a KernelCompileError naming what to install, and
the first call inside CUDA graph capture. The options are also compiled for real with pynvrtc.

Tests marked ``gpu`` run the real backend (tests/conftest.py skips them, with the reason, where CuPy
or a GPU is missing)."""

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import types
import warnings

import numpy as np
import pytest

from sru_cupy import cache, errors, kernels, ptx
from sru_cupy.backends import cupy_backend
from sru_cupy.errors import CaptureNotReadyError, KernelCompileError, PTXDriverWarning

from child_env import child_env

NAMES = kernels.all_kernel_names()


# -- a stand-in for CuPy ----------------------------------------------------------------------------


class FakeCompileException(Exception):
    def get_message(self):
        return str(self)


class FakeFunction:
    def __init__(self, module, lowered):
        self.module, self.lowered, self.calls = module, lowered, []

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        self.calls.append((grid, block, args, stream))


class FakeCuda:
    """The parts of ``cupy.cuda`` the backend uses, with counters."""

    def __init__(self, archs=("90",), driver=13000, nvrtc=(13, 0)):
        self.archs = list(archs)  # compute capability per device id
        self.current = 0
        self.driver = driver
        self.nvrtc_version = nvrtc
        self.capturing = False
        self.compiles, self.loads, self.get_function_calls = [], [], []
        self.compile_hook = None
        self.ptx_load_error = None  # raised when PTX (not a cubin) is loaded
        self.before_load = None  # called with nothing as a load starts: the moment of a swap
        self.stream = types.SimpleNamespace(ptr=0x5000)
        fake = self

        class Device:
            def __init__(self, device_id=None):
                self.id = fake.current if device_id is None else device_id
                self.compute_capability = fake.archs[self.id]

            def __enter__(self):
                self._previous, fake.current = fake.current, self.id
                return self

            def __exit__(self, *exc):
                fake.current = self._previous

        class Module:
            def load(self, binary):
                assert isinstance(binary, bytes)
                if fake.before_load is not None:
                    fake.before_load()
                if fake.ptx_load_error is not None and not binary.startswith(b"CUBIN"):
                    raise fake.ptx_load_error
                fake.loads.append(("binary", fake.current, binary))

            def load_file(self, path):  # as the driver does: reads the file when asked to load
                if fake.before_load is not None:
                    fake.before_load()
                with open(path, "rb") as f:
                    data = f.read()
                if fake.ptx_load_error is not None and not data.startswith(b"CUBIN"):
                    raise fake.ptx_load_error
                fake.loads.append(("file", fake.current, data))

            def get_function(self, lowered):
                fake.get_function_calls.append((fake.current, lowered))
                return FakeFunction(self, lowered)

        def compile_using_nvrtc(source, options=(), arch=None, filename="kern.cu",
                                name_expressions=None, log_stream=None, cache_in_memory=False):
            # CuPy 13 and 14 both take these arguments (14 adds jitify=None, method=None).
            fake.compiles.append(dict(options=tuple(options), arch=arch, names=list(name_expressions),
                                      filename=filename,
                                      device=fake.current, source_hash=hashlib.sha256(
                                          source.encode()).hexdigest()))
            if fake.compile_hook is not None:
                fake.compile_hook(arch)
            return (f"CUBIN sm_{arch}".encode(),
                    {n: f"_lowered_{i}" for i, n in enumerate(name_expressions)})

        def get_version():
            if isinstance(fake.nvrtc_version, Exception):
                raise fake.nvrtc_version
            return fake.nvrtc_version

        self.Device = Device
        self.function = types.SimpleNamespace(Module=Module)
        self.compiler = types.SimpleNamespace(compile_using_nvrtc=compile_using_nvrtc,
                                              CompileException=FakeCompileException)
        self.nvrtc = types.SimpleNamespace(getVersion=get_version)
        self.runtime = types.SimpleNamespace(
            getDevice=lambda: fake.current, driverGetVersion=lambda: fake.driver,
            runtimeGetVersion=lambda: 13000,
            streamIsCapturing=lambda ptr: fake.capturing)
        self.get_current_stream = lambda: fake.stream


@pytest.fixture
def fake_cupy(monkeypatch, tmp_path):
    """A fresh backend state and a stand-in CuPy; the kernel cache in a temporary folder."""
    cuda = FakeCuda(archs=("90", "80"))
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setenv("SRU_CUPY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SRU_CUPY_PTX_DIR", raising=False)
    monkeypatch.setattr(cupy_backend, "_modules", {})
    monkeypatch.setattr(cupy_backend, "_functions", {})
    monkeypatch.setattr(cupy_backend, "_device_locks", {})
    monkeypatch.setattr(cupy_backend, "loaded_from", {})
    monkeypatch.setattr(errors, "_warned", set())
    return cuda


def _launch(cuda, device, name=NAMES[0], times=1):
    with cuda.Device(device):
        for _ in range(times):
            cupy_backend.launch(name, [3, 1, 1], (64, 1, 1), [None, np.int32(2)])


# -- options: the three builds agree on subnormals --------------------------------------------------


def test_compile_options_keep_float32_subnormals(fake_cupy):
    _launch(fake_cupy, 0)
    (call,) = fake_cupy.compiles
    assert call["options"] == ptx.BASE_OPTIONS == cupy_backend.compile_options()
    assert "-ftz=false" in call["options"] and "-ftz=true" not in call["options"]
    assert "--fmad=true" in call["options"]  # contraction into FMAs, chosen on purpose
    assert call["arch"] == "90" and call["names"] == NAMES and call["filename"] == kernels.SOURCE_FILE
    assert call["source_hash"] == hashlib.sha256(kernels.assembled_source().encode()).hexdigest()


def _nvrtc13():
    pytest.importorskip("pynvrtc.interface", reason="pynvrtc is not installed; pip install -e '.[test]'")
    found = [n for n in ptx.available_nvrtcs() if n.supports(80)]
    if not found:
        pytest.skip("no libnvrtc supporting sm_80; pip install -e '.[test]'")
    return found[0]


def test_cupy_options_compile_to_the_ptx_build_without_flush_to_zero():
    """NVRTC with the CuPy build's options (plus what compile_using_nvrtc adds) writes exactly the
    PTX of the device-free build, with no .ftz instruction; the option cupy.RawModule appends last
    would turn flushing on (NVRTC takes the last -ftz), which is why the backend avoids it."""
    nvrtc = _nvrtc13()
    source, names = kernels.assembled_source(), NAMES
    build = ptx.compile_source(source, names, 80, nvrtc)
    cupy_like = ptx.compile_source(source, names, 80, nvrtc, extra_options=(
        *[o for o in cupy_backend.compile_options() if o not in ptx.BASE_OPTIONS],
        "--device-as-default-execution-space"))
    # IEEE-rounded arithmetic that -ftz=true turns into flushing. (CUDA's expf and tanhf use
    # ex2.approx.ftz and rcp.approx.ftz inside either way, on arguments that are never subnormal.)
    flushing = re.compile(r"\b(?:add|sub|mul|fma|div|sqrt|max|min|setp\.\w+)(?:\.rn)?\.ftz\.f32")
    assert not flushing.search(build.ptx), flushing.search(build.ptx).group(0)
    assert cupy_like.ptx == build.ptx
    raw_module_like = ptx.compile_source(source, names[:1], 80, nvrtc, extra_options=("-ftz=true",))
    assert flushing.search(raw_module_like.ptx)


def test_real_cupy_compiles_every_kernel_to_a_cubin(monkeypatch, tmp_path):
    """The installed CuPy (13 or 14) itself, where there is one: compile_using_nvrtc takes the
    backend's arguments and returns a cubin and every lowered name; no GPU is needed for that
    (without one, CuPy's per-device choice of the -arch option is given its answer)."""
    try:
        import cupy
        from cupy.cuda import compiler
    except Exception as exc:
        pytest.skip(f"CuPy is not importable ({type(exc).__name__}: {exc})")
    try:
        has_device = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        has_device = False
    if not has_device:
        monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc",
                            lambda arch=None: (f"-arch=sm_{arch}", "cubin"))
    monkeypatch.setenv("SRU_CUPY_CACHE_DIR", str(tmp_path / "cache"))
    try:
        binary, lowered, path = cupy_backend.compile_for_arch(80)
    except KernelCompileError as error:
        if "NVRTC could not be loaded" in error.log:
            pytest.skip(f"CuPy finds no NVRTC here: {error.log.splitlines()[0]}")
        raise
    assert binary.startswith(b"\x7fELF")
    assert set(lowered) == set(NAMES) and len(set(lowered.values())) == len(NAMES)
    assert cupy_backend.compile_for_arch(80) == (binary, lowered, path)  # from the cache


# -- caching: compile once, function objects per (device, kernel) ---------------------------------


def test_function_objects_are_kept_per_device_and_kernel(fake_cupy):
    fake_cupy.archs = ["90", "90"]
    _launch(fake_cupy, 0, times=5)
    _launch(fake_cupy, 0, NAMES[1], times=3)
    _launch(fake_cupy, 1, times=2)
    assert len(fake_cupy.compiles) == 1, "the second device of the same architecture reads the cache"
    per_device = {d: sorted(l for dd, l in fake_cupy.get_function_calls if dd == d) for d in (0, 1)}
    assert len(per_device[0]) == len(per_device[1]) == len(NAMES)  # once each, at load
    assert len(set(per_device[0])) == len(NAMES)
    function = cupy_backend._functions[(0, NAMES[0])]
    assert len(function.calls) == 5
    grid, block, args, stream = function.calls[0]
    assert grid == (3, 1, 1) and block == (64, 1, 1) and stream is fake_cupy.stream
    assert args[0] == np.uint64(0) and args[0].dtype == np.uint64  # None: a null pointer
    assert cupy_backend._functions[(1, NAMES[0])] is not function
    assert cupy_backend.loaded_from[0][0] == "nvrtc"


def test_launch_on_a_raw_stream_handle_loads_once_and_passes_the_arguments_as_given(fake_cupy):
    """The PyTorch op's path: a launch on (device, raw stream handle) with device addresses as
    8-byte integers, no CuPy stream object made; the first one loads the device's kernels."""
    assert not cupy_backend.is_loaded(0)
    args = [np.uint64(0x7F0000001000), None, np.float32(1.5), np.int64(3)]
    cupy_backend.launch_on(NAMES[0], (2, 1, 1), (64, 1, 1), args, (0, 0x5A5A))
    assert cupy_backend.is_loaded(0) and not cupy_backend.is_loaded(1)
    loads = len(fake_cupy.loads)
    cupy_backend.launch_on(NAMES[1], (1, 1, 1), (64, 1, 1), args, (0, 0x5A5A))
    assert len(fake_cupy.loads) == loads
    (grid, block, given, stream), = cupy_backend._functions[(0, NAMES[0])].calls
    assert grid == (2, 1, 1) and block == (64, 1, 1) and given is args
    assert stream.ptr == 0x5A5A  # what CuPy's launch reads of a stream
    assert cupy_backend.scalar_argument(np.float32(2)) == np.float32(2)


def test_an_unknown_kernel_name_is_a_clear_error(fake_cupy):
    _launch(fake_cupy, 0)
    with pytest.raises(RuntimeError, match=r"kernel 'no_such_kernel<float, 3, 1>' is not among"):
        cupy_backend.function(0, "no_such_kernel<float, 3, 1>")


def test_compiled_kernels_are_cached_on_disk_and_a_corrupt_file_is_rebuilt(fake_cupy, monkeypatch):
    _launch(fake_cupy, 0)
    path = cupy_backend.loaded_from[0][1]
    assert os.path.isfile(path) and path.startswith(os.environ["SRU_CUPY_CACHE_DIR"])
    monkeypatch.setattr(cupy_backend, "_modules", {})  # a new process: nothing in memory
    monkeypatch.setattr(cupy_backend, "_functions", {})
    _launch(fake_cupy, 0)
    assert len(fake_cupy.compiles) == 1
    assert fake_cupy.loads[-1] == ("binary", 0, b"CUBIN sm_90")
    with open(path, "r+b") as f:  # one byte of the binary changes
        f.seek(-1, os.SEEK_END)
        f.write(b"!")
    monkeypatch.setattr(cupy_backend, "_modules", {})
    monkeypatch.setattr(cupy_backend, "_functions", {})
    with pytest.warns(UserWarning, match="are unusable .*compiling them again"):
        _launch(fake_cupy, 0)
    assert len(fake_cupy.compiles) == 2
    header = json.loads(open(path, "rb").read().partition(b"\n")[0])
    assert set(header["lowered_names"]) == set(NAMES)


def test_cache_key_changes_with_nvrtc_release_and_arch():
    key = cupy_backend._cache_key
    options = cupy_backend.compile_options()
    assert key(80, (13, 0), options, NAMES) != key(80, (13, 1), options, NAMES)
    assert key(80, (13, 0), options, NAMES) != key(90, (13, 0), options, NAMES)
    assert key(80, (13, 0), options, NAMES) != key(80, (13, 0), options + ("-G",), NAMES)


def test_devices_compile_without_waiting_on_each_other(fake_cupy):
    """Device 0's compile (sm_90) is held up; device 1 (sm_80) compiles and launches meanwhile."""
    release, started = threading.Event(), threading.Event()

    def hold_sm90(arch):
        if arch == "90":
            started.set()
            assert release.wait(30)
    fake_cupy.compile_hook = hold_sm90
    errors = []

    def first_device():
        try:
            cupy_backend.ensure_loaded(0)
        except Exception as exc:  # reported below
            errors.append(exc)
    worker = threading.Thread(target=first_device)
    worker.start()
    try:
        assert started.wait(30)
        done = threading.Event()
        other = threading.Thread(target=lambda: (cupy_backend.ensure_loaded(1), done.set()))
        other.start()
        assert done.wait(10), "device 1 waited for device 0's compile"
        other.join()
        assert 0 not in cupy_backend._modules
    finally:
        release.set()
        worker.join()
    assert not errors and 0 in cupy_backend._modules
    assert sorted(c["arch"] for c in fake_cupy.compiles) == ["80", "90"]


def test_threads_loading_one_device_load_it_once(fake_cupy):
    threads = [threading.Thread(target=cupy_backend.ensure_loaded, args=(0,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_cupy.compiles) == 1 and len(fake_cupy.loads) == 1


# -- a missing NVRTC or header -------------------------------------------------------------------


def test_missing_nvrtc_is_a_compile_error_naming_the_extra(fake_cupy):
    fake_cupy.nvrtc_version = RuntimeError("CuPy failed to load libnvrtc.so.13")
    with pytest.raises(KernelCompileError, match=r"NVRTC could not be loaded.*libnvrtc\.so\.13.*"
                                                 r"pip install 'sru_cupy\[cuda13\]'"):
        _launch(fake_cupy, 0)
    assert not cupy_backend._modules


def test_missing_header_is_a_compile_error_naming_the_extra(fake_cupy):
    def fail(arch):
        raise FakeCompileException('kern.cu(1): catastrophic error: cannot open source file '
                                   '"cuda_fp16.h"')
    fake_cupy.compile_hook = fail
    with pytest.raises(KernelCompileError) as info:
        _launch(fake_cupy, 0)
    assert "cuda_fp16.h" in info.value.log
    assert "pip install 'sru_cupy[cuda13]'" in str(info.value)
    assert info.value.options == list(cupy_backend.compile_options())


def test_nvrtc_that_fails_to_run_is_a_compile_error(fake_cupy):
    def fail(arch):
        raise OSError("libnvrtc-builtins.so.13.0: cannot open shared object file")
    fake_cupy.compile_hook = fail
    with pytest.raises(KernelCompileError, match="libnvrtc-builtins.*sru_cupy\\[cuda13\\]"):
        _launch(fake_cupy, 0)


# -- CUDA graph capture ---------------------------------------------------------------------------


def test_first_call_inside_capture_says_to_run_one_call_before(fake_cupy):
    fake_cupy.capturing = True
    with pytest.raises(CaptureNotReadyError, match=r"first call on cuda:0 is inside CUDA graph "
                                                   r"capture.*run one call on this device"):
        _launch(fake_cupy, 0)
    assert fake_cupy.compiles == [] and fake_cupy.loads == []


def test_after_one_call_every_kernel_launches_inside_capture(fake_cupy):
    _launch(fake_cupy, 0, NAMES[0])
    loads = len(fake_cupy.loads)
    fake_cupy.capturing = True
    for name in NAMES:  # variants never called before included
        _launch(fake_cupy, 0, name)
    assert len(fake_cupy.loads) == loads
    assert all(len(cupy_backend._functions[(0, n)].calls) >= 1 for n in NAMES)


def test_the_legacy_default_stream_is_not_asked_about_capture(fake_cupy):
    fake_cupy.capturing = True
    fake_cupy.stream = types.SimpleNamespace(ptr=0)
    _launch(fake_cupy, 0)
    assert len(fake_cupy.loads) == 1


# -- prebuilt PTX: driver check, fallback, one warning ----------------------------------------------


def _ptx_folder(tmp_path, min_driver="13.0", arch=90):
    folder = tmp_path / "ptx"
    folder.mkdir()
    data = b"// fake PTX\n"
    (folder / ptx.ptx_file_name(arch)).write_bytes(data)
    manifest = {"format": ptx.MANIFEST_FORMAT, "source_hash": kernels.source_hash(), "archs": {
        ptx.arch_key(arch): {"arch": arch, "file": ptx.ptx_file_name(arch), "size": len(data),
                             "sha256": hashlib.sha256(data).hexdigest(), "nvrtc_version": min_driver,
                             "min_driver": min_driver,
                             "lowered_names": {n: f"_ptx_{i}" for i, n in enumerate(NAMES)}}}}
    (folder / ptx.MANIFEST_FILE).write_text(json.dumps(manifest))
    return str(folder)


def test_prebuilt_ptx_is_loaded_when_the_driver_is_new_enough(fake_cupy, tmp_path, monkeypatch):
    folder = _ptx_folder(tmp_path, "13.0")
    monkeypatch.setenv("SRU_CUPY_PTX_DIR", folder)
    fake_cupy.driver = 13000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _launch(fake_cupy, 0)
    assert fake_cupy.compiles == []
    assert fake_cupy.loads == [("binary", 0, b"// fake PTX\n")]
    assert cupy_backend.loaded_from[0] == ("ptx", os.path.join(folder, ptx.ptx_file_name(90)))
    assert cupy_backend._functions[(0, NAMES[0])].lowered == "_ptx_0"
    assert cupy_backend.loaded_from[0][0] == "ptx"


def test_too_old_a_driver_compiles_instead_and_warns_once(fake_cupy, tmp_path, monkeypatch):
    fake_cupy.archs = ["90", "90"]
    monkeypatch.setenv("SRU_CUPY_PTX_DIR", _ptx_folder(tmp_path, "13.5"))
    fake_cupy.driver = 13000
    with pytest.warns(PTXDriverWarning, match=r"needs a driver for CUDA 13\.5 or newer, this "
                                              r"driver is for CUDA 13\.0.*--cuda 13\.0") as record:
        _launch(fake_cupy, 0)
        _launch(fake_cupy, 0)
        _launch(fake_cupy, 1)
    assert len([w for w in record if issubclass(w.category, PTXDriverWarning)]) == 1
    assert [kind for kind, _, _ in fake_cupy.loads] == ["binary", "binary"]
    assert len(fake_cupy.compiles) == 1
    assert cupy_backend._functions[(0, NAMES[0])].lowered == "_lowered_0"


def test_ptx_the_driver_refuses_compiles_instead(fake_cupy, tmp_path, monkeypatch):
    monkeypatch.setenv("SRU_CUPY_PTX_DIR", _ptx_folder(tmp_path, "12.0"))
    fake_cupy.ptx_load_error = RuntimeError("CUDA_ERROR_UNSUPPORTED_PTX_VERSION")
    with pytest.warns(PTXDriverWarning, match="refused the PTX.*UNSUPPORTED_PTX_VERSION"):
        _launch(fake_cupy, 0)
    assert len(fake_cupy.compiles) == 1 and cupy_backend.loaded_from[0][0] == "nvrtc"


def test_driver_version_reads_cudaDriverGetVersion(fake_cupy):
    fake_cupy.driver = 12040
    assert cupy_backend.driver_version() == (12, 4)


# -- trust: what is loaded is what was checked -----------------------------------------------------

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def test_ptx_swapped_after_its_check_is_not_loaded(fake_cupy, tmp_path, monkeypatch):
    """The PTX file is replaced after its SHA-256 was checked, just as the driver is asked to load
    it: the bytes that were checked are loaded, not the replacement."""
    folder = _ptx_folder(tmp_path, "13.0")
    monkeypatch.setenv("SRU_CUPY_PTX_DIR", folder)
    path = os.path.join(folder, ptx.ptx_file_name(90))

    def swap():
        with open(path + ".new", "wb") as f:
            f.write(b"// substituted PTX\n")
        os.replace(path + ".new", path)

    fake_cupy.before_load = swap
    _launch(fake_cupy, 0)
    assert [data for _, _, data in fake_cupy.loads] == [b"// fake PTX\n"], fake_cupy.loads
    assert cupy_backend.loaded_from[0][0] == "ptx"


def _untrusted(path, how):
    """Makes the file at ``path`` one that must not be loaded."""
    if how == "group-writable":
        os.chmod(path, 0o664)
    elif how == "other-owner":
        if not IS_ROOT:
            pytest.skip("needs root to give a file to another user")
        os.chown(path, 65534, -1)
    elif how == "symlink":
        target = path + ".elsewhere"
        os.replace(path, target)
        os.symlink(target, path)
    else:
        raise AssertionError(how)


UNTRUSTED = ["group-writable", "other-owner", "symlink"]


@pytest.mark.parametrize("how", UNTRUSTED)
def test_prebuilt_ptx_that_others_could_have_written_is_refused(fake_cupy, tmp_path, monkeypatch,
                                                                 how):
    """A PTX file (matching its manifest) that group or others can write, another user owns, or
    that is a symbolic link is not loaded: the folder is refused, saying why."""
    folder = _ptx_folder(tmp_path, "13.0")
    monkeypatch.setenv("SRU_CUPY_PTX_DIR", folder)
    _untrusted(os.path.join(folder, ptx.ptx_file_name(90)), how)
    with pytest.raises(ptx.PTXManifestError, match="cannot read the PTX") as error:
        _launch(fake_cupy, 0)
    reason = {"group-writable": "other users can write", "other-owner": "owned by uid 65534",
              "symlink": "symbolic link"}[how]
    assert reason in str(error.value)
    assert fake_cupy.loads == []


def _cache_file(arch="90"):
    names = kernels.all_kernel_names()
    key = cupy_backend._cache_key(arch, (13, 0), cupy_backend.compile_options(), names)
    return os.path.join(cache.cache_dir(cupy_backend.CACHE_SUBFOLDER),
                        f"sru_recurrence.sm_{arch}.{key}.bin")


@pytest.mark.parametrize("how", UNTRUSTED)
def test_cached_binary_that_others_could_have_written_is_compiled_again(fake_cupy, how):
    """A cache file with a consistent header but a binary nobody here compiled, which group or
    others can write, another user owns, or that is a symbolic link, is never loaded: the kernels
    are compiled again (with a warning that says why) and replace it."""
    path = _cache_file()
    binary = b"SUBSTITUTED CUBIN"
    header = {"sha256": hashlib.sha256(binary).hexdigest(),
              "lowered_names": {n: f"_lowered_{i}" for i, n in enumerate(NAMES)}}
    with open(path, "wb") as f:
        f.write(json.dumps(header).encode() + b"\n" + binary)
    os.chmod(path, 0o600)
    _untrusted(path, how)
    with pytest.warns(cache.CacheWarning, match="unusable") as record:
        _launch(fake_cupy, 0)
    reason = {"group-writable": "other users can write", "other-owner": "owned by uid 65534",
              "symlink": "symbolic link"}[how]
    assert any(reason in str(w.message) for w in record), [str(w.message) for w in record]
    assert [data for _, _, data in fake_cupy.loads] == [b"CUBIN sm_90"], fake_cupy.loads
    assert len(fake_cupy.compiles) == 1
    assert not os.path.islink(path) and os.stat(path).st_mode & 0o077 == 0


def test_full_disk_keeps_the_compiled_kernels_for_the_process(fake_cupy, monkeypatch):
    """Writing the compiled binary fails (no space left): the launch still works with the binary
    compiled, one warning says the kernels are kept for this process, and nothing half-written
    is left in the cache."""
    def no_space(path, data, mode=0o600):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache, "write_atomic", no_space)
    with pytest.warns(cache.CacheWarning, match="No space left.*kept for this process only"):
        _launch(fake_cupy, 0)
        monkeypatch.setattr(cupy_backend, "_modules", {})
        monkeypatch.setattr(cupy_backend, "_functions", {})
        _launch(fake_cupy, 1)
    assert [data for _, _, data in fake_cupy.loads] == [b"CUBIN sm_90", b"CUBIN sm_80"]
    folder = cache.cache_dir(cupy_backend.CACHE_SUBFOLDER)
    assert [f for f in os.listdir(folder) if not f.endswith(".lock")] == []


# -- on a GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_kernels_load_once_and_keep_subnormals():
    """The real backend: one load per device, the same function objects on every launch, and a
    float32 subnormal result (u0 = 1e-39 through a closed forget gate) identical to the host
    build's, which does not flush."""
    import cupy
    from sru_cupy import launch
    from sru_cupy.backends import host
    L, B, d = 4, 2, 3
    U = np.zeros((L, B, 3 * d), np.float32)
    U[..., 0::3] = 1e-39  # u0: subnormal candidate state
    U[..., 1::3] = -30.0  # forget gate closed: c = u0
    U[..., 2::3] = 30.0  # reset gate open: h = c
    args = dict(hidden_size=d, has_skip_term=False)
    bias = np.zeros(2 * d, np.float32)
    h_gpu, _, c_gpu = launch.recurrence_forward(cupy.asarray(U), None, None, cupy.asarray(bias),
                                                **args)
    before = dict(cupy_backend._functions)
    launch.recurrence_forward(cupy.asarray(U), None, None, cupy.asarray(bias), **args)
    assert cupy_backend._functions == before
    assert all(cupy_backend._functions[k] is v for k, v in before.items())
    c_host = cupy.asnumpy(c_gpu)
    assert np.all(c_host != 0), "the GPU build flushed a float32 subnormal to zero"
    if host.available():
        _, _, c_ref = launch.recurrence_forward(U, None, None, bias, **args)
        assert np.array_equal(c_host.view(np.uint32), c_ref.view(np.uint32))


@pytest.mark.gpu
def test_gpu_prebuilt_ptx_matches_the_nvrtc_path(tmp_path):
    """`python -m sru_cupy compile` for this GPU, loaded through $SRU_CUPY_PTX_DIR in a fresh
    process, gives the results of the NVRTC-through-CuPy build; a manifest asking for a newer
    driver than this one falls back to NVRTC with one warning and the same results."""
    pytest.importorskip("pynvrtc.interface", reason="the PTX build needs pynvrtc (test extras)")
    import cupy
    arch = "sm_" + cupy.cuda.Device(0).compute_capability
    folder = tmp_path / "ptx"
    env = child_env()  # the session's kernel cache: the NVRTC build is compiled once
    driver = cupy_backend.driver_version()
    build = subprocess.run([sys.executable, "-m", "sru_cupy", "compile", "--arch", arch, "--cuda",
                            "%d.%d" % driver, "--out", str(folder)], env=env, capture_output=True,
                           text=True, timeout=300)
    if build.returncode != 0 and "no NVRTC found supports" in build.stderr:
        pytest.skip(f"no installed NVRTC builds {arch} for this driver: {build.stderr.strip()}")
    assert build.returncode == 0, build.stderr
    script = textwrap.dedent("""
        import json, sys, warnings
        import numpy as np, cupy
        from sru_cupy import launch
        from sru_cupy.backends import cupy_backend
        rng = np.random.default_rng(0)
        L, B, d = 7, 3, 5
        U = cupy.asarray(rng.standard_normal((L, B, 6 * d)).astype(np.float32))
        x = cupy.asarray(rng.standard_normal((L, B, 2 * d)).astype(np.float32))
        wc = cupy.asarray(rng.standard_normal(4 * d).astype(np.float32))
        bias = cupy.asarray(rng.standard_normal(4 * d).astype(np.float32))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            h, c, c_last = launch.recurrence_forward(U, x, wc, bias, hidden_size=d,
                                                     bidirectional=True)
        print(json.dumps({"h": cupy.asnumpy(h).tolist(), "c_last": cupy.asnumpy(c_last).tolist(),
                          "source": cupy_backend.loaded_from[0][0],
                          "warnings": [str(w.message) for w in caught]}))
    """)

    def run(**changes):
        out = subprocess.run([sys.executable, "-c", script], env=dict(env, **changes),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])
    nvrtc = run()
    prebuilt = run(SRU_CUPY_PTX_DIR=str(folder))
    assert (nvrtc["source"], prebuilt["source"]) == ("nvrtc", "ptx")
    for key in ("h", "c_last"):
        np.testing.assert_allclose(prebuilt[key], nvrtc[key], rtol=1e-6, atol=1e-6)
    manifest = json.loads((folder / ptx.MANIFEST_FILE).read_text())
    for entry in manifest["archs"].values():
        entry["min_driver"] = "99.0"
    (folder / ptx.MANIFEST_FILE).write_text(json.dumps(manifest))
    fallback = run(SRU_CUPY_PTX_DIR=str(folder))
    assert fallback["source"] == "nvrtc"
    assert sum("needs a driver for CUDA 99.0" in w for w in fallback["warnings"]) == 1
    assert fallback["h"] == nvrtc["h"]


@pytest.mark.gpu
def test_gpu_first_call_inside_capture_cold_and_warm():
    """Cold (a fresh process whose first call is inside torch.cuda.graph capture): a
    CaptureNotReadyError saying what to do. Warm (one call before): the capture records the op,
    and replay gives the eager result."""
    pytest.importorskip("torch")
    script = textwrap.dedent("""
        import sys, torch
        from sru_cupy import recurrence
        from sru_cupy.errors import CaptureNotReadyError
        d = 4
        U = torch.randn(5, 2, 3 * d, device="cuda")
        x = torch.randn(5, 2, d, device="cuda")
        bias = torch.zeros(2 * d, device="cuda")
        warm = sys.argv[1] == "warm"
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        if warm:
            with torch.cuda.stream(side):
                eager, _ = recurrence(U, x, None, bias, hidden_size=d)
            torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                h, _ = recurrence(U, x, None, bias, hidden_size=d)
        except CaptureNotReadyError as error:
            print("CAPTURE-ERROR", error)
            sys.exit(0)
        graph.replay()
        torch.cuda.synchronize()
        print("REPLAY-EQUAL", torch.equal(h, eager))
    """)
    for mode, expected in (("cold", "CAPTURE-ERROR"), ("warm", "REPLAY-EQUAL True")):
        # The session's kernel cache: "cold" is about the first load in a process, not compiling.
        out = subprocess.run([sys.executable, "-c", script, mode], env=child_env(),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert expected in out.stdout, f"{mode}: {out.stdout}\n{out.stderr}"
        if mode == "cold":
            assert "run one call on this device before capturing" in out.stdout


@pytest.mark.gpu
def test_gpu_missing_nvrtc_is_a_compile_error(monkeypatch, tmp_path):
    """The real CuPy with its NVRTC made unloadable (and nothing loaded or cached yet): a
    KernelCompileError naming the extra to install, not CuPy's raw error."""
    import cupy
    monkeypatch.setenv("SRU_CUPY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cupy_backend, "_modules", {})
    monkeypatch.setattr(cupy_backend, "_functions", {})

    def unloadable():
        raise RuntimeError("CuPy failed to load libnvrtc.so: cannot open shared object file")
    monkeypatch.setattr(cupy.cuda.nvrtc, "getVersion", unloadable)
    with pytest.raises(KernelCompileError, match=r"NVRTC could not be loaded.*pip install "
                                                 r"'sru_cupy\[cuda1[23]\]'"):
        cupy_backend.ensure_loaded(0)
