"""Hardening of the kernel cache (sru_cupy.cache) and of the host library it holds
(sru_cupy.backends.host): private folders, refusal of unsafe or unusable folders with a
CacheWarning and a private temporary fallback, atomic writes, corrupt or substituted libraries
detected before they are loaded, ``clear()`` and the ``clear-cache`` / ``info`` commands, and
concurrent first builds from threads and processes; the trust rules (links and path components
others own or can write, files checked and loaded by descriptor, even when swapped between the
check and the load), the lock time limit, full and read-only caches (a real tmpfs and a read-only
bind mount where the tests run as root), records missing a field, unloadable libraries and stale
files.

Every test that needs fresh module state (an empty cache, no library loaded yet, warnings not yet
shown) runs a fresh interpreter with ``SRU_CUPY_CACHE_DIR`` set. To keep the suite fast, the
builds go through a compiler wrapper (``fast_cxx``) that logs every invocation and compiles with
-O0 instead of -O3 (the same source and code paths; about 7x faster to build). Compiles of the
kernels are counted as the logged invocations that name ``sru_host.cpp``.
"""

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sru_cupy
from sru_cupy import cache
from sru_cupy.backends import host

from child_env import child_env

REPO = Path(sru_cupy.__file__).resolve().parent.parent
COMPILER = host.find_compiler()
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="host backend: no C++ compiler found")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
FALLBACK_PREFIX = "sru_cupy-cache-"


# -- helpers -------------------------------------------------------------------------------------


def _env(cache_dir, **changes):
    """The environment of a child: the given cache folder (None unsets it), OpenMP at 2 threads
    unless set here, and `changes` (None removes a variable)."""
    changes.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    return child_env(cache_dir, **changes)


def _run(code, env, timeout=300, expect_rc=0):
    """Runs `code` in a fresh interpreter; returns (JSON object printed last, completed process)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect_rc, (f"child exited with {proc.returncode}:\n"
                                          f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    if expect_rc != 0:
        return None, proc
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def _cli(args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "sru_cupy", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _files(folder):
    folder = Path(folder)
    if not folder.exists():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _is_compiler_record(name):
    return Path(name).name.startswith("compiler_") and name.endswith(".json")


def _artifacts(folder):
    """Cache files other than the (empty) lock files that build_lock leaves beside a library and
    the records of compiler facts (host/compiler_*.json, one per compiler)."""
    return [f for f in _files(folder) if not f.endswith(".lock") and not _is_compiler_record(f)]


def _compiles(log):
    log = Path(log)
    if not log.exists():
        return 0
    return sum("sru_host.cpp" in line for line in log.read_text().splitlines())


@pytest.fixture(scope="module")
def fast_cxx(tmp_path_factory):
    """A compiler wrapper: appends its arguments to $SRU_TEST_CXX_LOG (when set), then runs the real
    compiler with -O0 in place of -O3."""
    if COMPILER is None:
        pytest.skip("host backend: no C++ compiler found")
    folder = tmp_path_factory.mktemp("cxx")
    wrapper = folder / "fast-cxx"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ -n "$SRU_TEST_CXX_LOG" ]; then echo "$@" >> "$SRU_TEST_CXX_LOG"; fi
        for a in "$@"; do
          shift
          if [ "$a" = "-O3" ]; then set -- "$@" -O0; else set -- "$@" "$a"; fi
        done
        exec "{COMPILER}" "$@"
        """))
    wrapper.chmod(0o755)
    return wrapper


# The child that loads the library, runs one small forward, and reports what happened. Warnings of
# every category are recorded; CacheWarnings are reported by message.
_LOAD_AND_RUN = """
    import json, os, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import numpy as np
        from sru_cupy import cache
        from sru_cupy.backends import host
        from sru_cupy.launch import recurrence_forward
        from sru_cupy.reference import recurrence_forward_reference
        lib = host.library()
        rng = np.random.default_rng(3)
        L, B, d = 7, 3, 2
        U = rng.standard_normal((L, B, 3 * d)).astype(np.float32)
        x = rng.standard_normal((L, B, d)).astype(np.float32)
        wc = rng.standard_normal(2 * d).astype(np.float32)
        bias = rng.standard_normal(2 * d).astype(np.float32)
        h, c, c_last = recurrence_forward(U, x, wc, bias, hidden_size=d)
        rh, rc, rcl = recurrence_forward_reference(U, x, wc, bias, hidden_size=d)
        error = max(float(np.abs(h - rh).max()), float(np.abs(c - rc).max()),
                    float(np.abs(c_last - rcl).max()))
        again = host.library()
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else -1
    print(json.dumps({
        "path": lib.path, "same_object": again is lib, "error": error,
        "cache_warnings": [str(w.message) for w in caught if issubclass(w.category, cache.CacheWarning)],
        "other_warnings": [f"{w.category.__name__}: {w.message}" for w in caught
                           if not issubclass(w.category, cache.CacheWarning)],
        "fallback_root": cache._fallback_root, "fds": fds}))
"""


def _load_and_run(cache_dir, fast_cxx, log, **env_changes):
    env = _env(cache_dir, CXX=fast_cxx, SRU_TEST_CXX_LOG=log, **env_changes)
    result, _ = _run(_LOAD_AND_RUN, env)
    assert result["error"] < 1e-5, f"the loaded library computes wrong results: {result}"
    assert result["same_object"]
    assert result["other_warnings"] == [], result["other_warnings"]
    return result


def _check_private_fallback(result, refused):
    """The library came from a private temporary folder, not from `refused`, and that folder was
    removed when the child exited."""
    path = Path(result["path"])
    root = Path(result["fallback_root"])
    assert root.name.startswith(FALLBACK_PREFIX), root
    assert path.is_relative_to(root), (path, root)
    assert not path.is_relative_to(Path(refused)), f"loaded from the refused folder: {path}"
    assert not root.exists(), f"the temporary fallback folder {root} outlived the process"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, fast_cxx):
    """A cache holding a complete library + record built by fast_cxx, to copy from."""
    folder = tmp_path_factory.mktemp("pristine") / "cache"
    log = folder.parent / "cxx.log"
    result = _load_and_run(folder, fast_cxx, log)
    assert result["cache_warnings"] == []
    assert _compiles(log) == 1
    library = Path(result["path"])
    record = library.with_suffix(".json")
    assert record.is_file()
    return {"folder": folder, "library": library.relative_to(folder),
            "record": record.relative_to(folder), "key": json.loads(record.read_text())["key"]}


def _copy_pristine(pristine, destination):
    shutil.copytree(pristine["folder"], destination)
    for path in [destination, *destination.rglob("*")]:  # copytree keeps modes; make sure
        if path.is_dir():
            path.chmod(0o700)
    return destination / pristine["library"], destination / pristine["record"]


# -- private folders -----------------------------------------------------------------------------


@needs_compiler
def test_cache_folders_are_private_and_hold_only_the_library_and_its_record(tmp_path, fast_cxx):
    """A fresh cache (nested, not existing yet) is created mode 0700 at every level sru_cupy owns;
    no file in it is writable by group or others; it holds the library and its record, whose key and
    sha256 describe the library."""
    root = tmp_path / "a" / "b" / "cache"
    log = tmp_path / "cxx.log"
    result = _load_and_run(root, fast_cxx, log)
    assert result["cache_warnings"] == [], result["cache_warnings"]
    assert result["fallback_root"] is None
    library = Path(result["path"])
    assert library.parent == root / "host", library
    for folder in (root, root / "host"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, (folder, oct(folder.stat().st_mode))
    for path in root.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o022 == 0, f"{path} is writable by others"
    assert _artifacts(root) == sorted([f"host/{library.name}", f"host/{library.stem}.json"])
    assert len([f for f in _files(root) if _is_compiler_record(f)]) == 1, _files(root)
    record = json.loads(library.with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(library.read_bytes()).hexdigest()
    assert len(record["key"]) == 64 and library.stem.endswith(record["key"][:24])
    assert not [f for f in _files(root) if ".tmp-" in f], "temporary files left in the cache"
    assert _compiles(log) == 1


@needs_compiler
def test_cache_folders_are_private_even_with_a_permissive_umask(tmp_path, fast_cxx):
    """With umask 000 the cache folders are still 0700 and the library and record not writable by
    others (mkstemp files are 0600)."""
    root = tmp_path / "cache"
    log = tmp_path / "cxx.log"
    code = "import os; os.umask(0)\n" + textwrap.dedent(_LOAD_AND_RUN)
    result, _ = _run(code, _env(root, CXX=fast_cxx, SRU_TEST_CXX_LOG=log))
    assert result["error"] < 1e-5 and result["cache_warnings"] == []
    for folder in (root, root / "host"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, (folder, oct(folder.stat().st_mode))
    for name in _artifacts(root):
        mode = stat.S_IMODE((root / name).stat().st_mode)
        assert mode & 0o077 == 0, f"{name} has mode {mode:o}"


# -- atomic writes -------------------------------------------------------------------------------


class _Boom(Exception):
    pass


def _fail_fsync(monkeypatch):
    def fsync(fd):
        raise OSError(28, "No space left on device (simulated)")
    monkeypatch.setattr(os, "fsync", fsync)


def _fail_half_way(monkeypatch):
    """The first write writes half of the data to the temporary file, then fails."""
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise _Boom("disk failure half way (simulated)")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: HalfWriter(real_fdopen(fd, *a, **k)))


def _fail_replace(monkeypatch):
    def replace(src, dst, *a, **k):
        raise OSError(18, "Invalid cross-device link (simulated)")
    monkeypatch.setattr(os, "replace", replace)


def _interrupt_write(monkeypatch):
    real_fdopen = os.fdopen

    class Interrupting:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:3])
            raise KeyboardInterrupt

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Interrupting(real_fdopen(fd, *a, **k)))


@pytest.mark.parametrize("failure", [_fail_fsync, _fail_half_way, _fail_replace, _interrupt_write],
                         ids=["fsync", "half-written", "replace", "KeyboardInterrupt"])
@pytest.mark.parametrize("existing", [True, False], ids=["over-old", "new-file"])
def test_write_atomic_failure_keeps_old_content_and_no_temporary_file(tmp_path, monkeypatch,
                                                                       failure, existing):
    target = tmp_path / "sru_host_x.so"
    old = b"old content " * 1000
    if existing:
        target.write_bytes(old)
    new = os.urandom(1 << 16)
    failure(monkeypatch)
    with pytest.raises((OSError, _Boom, KeyboardInterrupt)):
        cache.write_atomic(str(target), new)
    monkeypatch.undo()
    if existing:
        assert target.read_bytes() == old, "the old content was damaged by a failed write"
    else:
        assert not target.exists(), "a failed write left a (partial) file under the final name"
    assert _files(tmp_path) == (["sru_host_x.so"] if existing else []), _files(tmp_path)
    # and a write that succeeds replaces the whole content
    cache.write_atomic(str(target), new)
    assert target.read_bytes() == new
    assert _files(tmp_path) == ["sru_host_x.so"]


@needs_compiler
@pytest.mark.parametrize("which", ["library", "record"])
def test_build_failing_mid_write_keeps_the_kernels_for_the_process_and_recovers(tmp_path, fast_cxx,
                                                                                 which):
    """A build whose write of the library (or of its record) fails half way (a full disk) still
    gives this process working kernels, with one warning naming the error; it leaves no file under
    the final names and no temporary file; the next process builds a working library."""
    root = tmp_path / "cache"
    log = tmp_path / "cxx.log"
    code = f"""
        import json, os, warnings
        from sru_cupy import cache
        from sru_cupy.backends import host
        real_fdopen = os.fdopen
        class Half:
            def __init__(self, f): self.f = f
            def write(self, data):
                self.f.write(data[:len(data) // 2]); self.f.flush()
                raise OSError(28, "No space left on device (simulated)")
            def __enter__(self): return self
            def __exit__(self, *exc): self.f.close()
            def __getattr__(self, name): return getattr(self.f, name)
        real_write_atomic = cache.write_atomic
        def write_atomic(path, data):
            if path.endswith({'.so' if which == 'library' else '.json'!r}):
                os.fdopen = lambda fd, *a, **k: Half(real_fdopen(fd, *a, **k))
            try:
                return real_write_atomic(path, data)
            finally:
                os.fdopen = real_fdopen
        host.write_atomic = write_atomic
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lib = host.library()
        print(json.dumps({{"count": lib.sru_host_kernel_count(),
                          "warnings": [str(w.message) for w in caught]}}))
    """
    got, _ = _run(code, _env(root, CXX=fast_cxx, SRU_TEST_CXX_LOG=log))
    assert got["count"] > 0
    assert len(got["warnings"]) == 1 and "simulated" in got["warnings"][0], got["warnings"]
    assert "kept for this process only" in got["warnings"][0]
    files = _artifacts(root)
    assert not [f for f in files if ".tmp-" in f], f"temporary files left behind: {files}"
    assert not [f for f in files if f.startswith("host/sru_host_")], f"files were left: {files}"
    result = _load_and_run(root, fast_cxx, log)
    assert result["cache_warnings"] == [], result["cache_warnings"]
    assert _compiles(log) == 2


@needs_compiler
def test_process_killed_while_writing_never_leaves_a_partial_library(tmp_path, fast_cxx):
    """A process killed (os._exit) after writing the library's bytes to its temporary file but before
    the rename: the final name never holds a partial library, and the next process builds and
    loads a working one (a stray temporary file cannot be cleaned by the killed process; the next
    build does not trip over it)."""
    root = tmp_path / "cache"
    log = tmp_path / "cxx.log"
    code = """
        import os
        def fsync(fd):
            os._exit(9)  # killed between the write and the rename
        os.fsync = fsync
        from sru_cupy.backends import host
        host.library()
    """
    _run(code, _env(root, CXX=fast_cxx, SRU_TEST_CXX_LOG=log), expect_rc=9)
    final = [f for f in _artifacts(root) if not Path(f).name.startswith(".tmp-")]
    assert final == [], f"files under their final names after the kill: {final}"
    assert [f for f in _files(root) if ".tmp-" in f], "the kill did not happen mid-write"
    result = _load_and_run(root, fast_cxx, log)
    assert result["cache_warnings"] == [], result["cache_warnings"]
    assert Path(result["path"]).is_relative_to(root)


# -- clear() and the command line ----------------------------------------------------------------


@needs_compiler
def test_clear_cache_command_and_clear_empty_the_cache(tmp_path, fast_cxx, pristine, monkeypatch):
    root = tmp_path / "cache"
    _copy_pristine(pristine, root)
    (root / "ptx").mkdir(mode=0o700)
    (root / "ptx" / "manifest.json").write_text("{}")
    count = len(_files(root))
    assert count >= 3
    proc = _cli(["clear-cache"], _env(root))
    assert proc.returncode == 0, proc.stderr
    assert f"removed {count} files from {root}" in proc.stdout, proc.stdout
    assert _files(root) == [] and list(root.iterdir()) == [], list(root.iterdir())

    # the function, in this process
    _copy_pristine(pristine, tmp_path / "cache2")
    monkeypatch.setenv("SRU_CUPY_CACHE_DIR", str(tmp_path / "cache2"))
    n = len(_files(tmp_path / "cache2"))
    assert cache.clear() == n
    assert list((tmp_path / "cache2").iterdir()) == []
    assert cache.clear() == 0
    monkeypatch.setenv("SRU_CUPY_CACHE_DIR", str(tmp_path / "absent"))
    assert cache.clear() == 0
    assert not (tmp_path / "absent").exists()

    # a cleared cache is rebuilt on next use
    log = tmp_path / "cxx.log"
    result = _load_and_run(root, fast_cxx, log)
    assert result["cache_warnings"] == [] and _compiles(log) == 1


def test_clear_cache_does_not_empty_a_folder_it_refuses_to_use(tmp_path):
    """A cache folder that sru_cupy refuses (other users can write it, e.g. SRU_CUPY_CACHE_DIR=/tmp
    by mistake) holds nothing sru_cupy wrote; `clear-cache` must not delete other people's files
    there (run as root, it would delete every file in /tmp)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "someone-elses-file.txt").write_text("keep me")
    (shared / "their-folder").mkdir()
    (shared / "their-folder" / "data").write_text("keep me too")
    proc = _cli(["clear-cache"], _env(shared))
    # Refused, with the reason, and nothing deleted.
    assert proc.returncode == 1, proc.stderr
    assert "not clearing" in proc.stderr and "other users can write" in proc.stderr, proc.stderr
    assert _files(shared) == ["someone-elses-file.txt", "their-folder/data"], (
        f"clear-cache deleted files from a folder that sru_cupy refuses as unsafe: "
        f"left {_files(shared)}; stdout: {proc.stdout.strip()}")


def test_info_prints_the_cache_folder_and_honours_the_variable(tmp_path, pristine, monkeypatch):
    root = tmp_path / "my cache"
    _copy_pristine(pristine, root)
    proc = _cli(["info"], _env(root))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("Kernel cache:")]
    assert len(lines) == 1, proc.stdout
    assert f"Kernel cache: {root} ($SRU_CUPY_CACHE_DIR moves it)" in lines[0], lines[0]
    assert f"{len(_files(root))} files" in lines[0], lines[0]
    assert "host/:" in proc.stdout

    # the same report in this process (the command prints info.report()), for other settings
    from sru_cupy import info
    other = tmp_path / "elsewhere"
    monkeypatch.setenv("SRU_CUPY_CACHE_DIR", str(other))
    report = "\n".join(info.report())
    assert f"Kernel cache: {other} ($SRU_CUPY_CACHE_DIR moves it): absent" in report, report
    assert not other.exists(), "info created the cache folder"
    monkeypatch.delenv("SRU_CUPY_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert f"Kernel cache: {tmp_path / 'xdg' / 'sru_cupy'} (" in "\n".join(info.report())
    monkeypatch.setenv("SRU_CUPY_CACHE_DIR", "/proc/sru_cupy_test_cache")  # unusable: no crash
    assert "Kernel cache: /proc/sru_cupy_test_cache (" in "\n".join(info.report())


# -- unsafe and unusable folders -----------------------------------------------------------------


_CACHE_DIR_ONLY = """
    import json, os, warnings
    from sru_cupy import cache
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = cache.cache_dir("host")
        second = cache.cache_dir("host")
    print(json.dumps({
        "first": first, "second": second, "root": cache._fallback_root,
        "root_mode": oct(os.stat(cache._fallback_root).st_mode & 0o777) if cache._fallback_root else None,
        "host_mode": oct(os.stat(first).st_mode & 0o777),
        "cache_warnings": [str(w.message) for w in caught
                           if issubclass(w.category, cache.CacheWarning)],
        "other": [str(w.message) for w in caught if not issubclass(w.category, cache.CacheWarning)]}))
"""


def _nobody_uid():
    import pwd
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


def _unsafe_folder(tmp_path, kind):
    """-> (SRU_CUPY_CACHE_DIR, text the warning must contain, the folder that must stay untouched)."""
    folder = tmp_path / "cache"
    if kind == "world-writable":
        folder.mkdir()
        folder.chmod(0o777)
        return folder, ["other users can write to it", "777"], folder
    if kind == "group-writable":
        folder.mkdir()
        folder.chmod(0o770)
        return folder, ["other users can write to it", "770"], folder
    if kind == "sticky-tmp-like":
        folder.mkdir()
        folder.chmod(0o1777)
        return folder, ["other users can write to it"], folder
    if kind == "other-owner":
        if not IS_ROOT:
            pytest.skip("needs root to give a folder to another user")
        folder.mkdir(mode=0o700)
        os.chown(folder, _nobody_uid(), -1)
        return folder, [f"owned by uid {_nobody_uid()}"], folder
    if kind == "host-subfolder-world-writable":
        (folder / "host").mkdir(parents=True)
        folder.chmod(0o700)
        (folder / "host").chmod(0o777)
        return folder, ["other users can write to it", "host"], folder / "host"
    if kind == "symlink-to-world-writable":
        target = tmp_path / "shared"
        target.mkdir()
        target.chmod(0o777)
        folder.symlink_to(target)
        return folder, ["other users can write to it"], target
    raise AssertionError(kind)


UNSAFE_KINDS = ["world-writable", "group-writable", "sticky-tmp-like", "other-owner",
                "host-subfolder-world-writable", "symlink-to-world-writable"]


@pytest.mark.parametrize("kind", UNSAFE_KINDS)
def test_unsafe_cache_folder_is_refused_with_a_warning(tmp_path, kind):
    configured, reasons, untouched = _unsafe_folder(tmp_path, kind)
    before = _files(untouched)
    got, _ = _run(_CACHE_DIR_ONLY, _env(configured))
    assert len(got["cache_warnings"]) == 1, got["cache_warnings"]  # once, for two calls
    message = got["cache_warnings"][0]
    for reason in reasons:
        assert reason in message, f"{reason!r} not in the warning: {message}"
    assert "refusing" in message and "temporary" in message, message
    root = got["root"]
    assert root and Path(root).name.startswith(FALLBACK_PREFIX), got
    assert got["first"] == got["second"] == os.path.join(root, "host")
    assert got["root_mode"] == "0o700" and got["host_mode"] == "0o700", got
    assert not Path(root).exists(), "the fallback folder outlived the process"
    assert _files(untouched) == before, "files were written into the refused folder"


@needs_compiler
@pytest.mark.parametrize("kind", ["world-writable", "other-owner"])
def test_refused_cache_folder_still_gives_working_kernels(tmp_path, fast_cxx, pristine, kind):
    """Even a refused folder that holds a (valid) library is not loaded from; the kernels are built
    in the private fallback and work, with exactly one CacheWarning."""
    configured, reasons, untouched = _unsafe_folder(tmp_path, kind)
    # put a complete, valid library + record there: it must still not be used
    host_dir = untouched / "host"
    shutil.copytree(pristine["folder"] / "host", host_dir)
    if kind == "other-owner":
        for path in [host_dir, *host_dir.iterdir()]:
            os.chown(path, _nobody_uid(), -1)
    log = tmp_path / "cxx.log"
    before = {f: (untouched / f).stat().st_mtime_ns for f in _files(untouched)}
    result = _load_and_run(configured, fast_cxx, log)
    assert len(result["cache_warnings"]) == 1, result["cache_warnings"]
    assert all(reason in result["cache_warnings"][0] for reason in reasons), result["cache_warnings"]
    _check_private_fallback(result, untouched)
    assert _compiles(log) == 1
    assert {f: (untouched / f).stat().st_mtime_ns for f in _files(untouched)} == before


def _unusable(tmp_path, kind):
    if kind == "parent-is-a-file":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file" / "cache", [f"{tmp_path / 'file'} is not a folder"]
    if kind == "is-a-file":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file", ["it is not a folder"]
    if kind == "under-proc":
        if not os.path.isdir("/proc/self"):
            pytest.skip("no /proc")
        return Path("/proc/sru_cupy_test_cache"), ["/proc/sru_cupy_test_cache"]
    if kind == "host-is-a-file":
        (tmp_path / "cache").mkdir(mode=0o700)
        (tmp_path / "cache" / "host").write_text("x")
        return tmp_path / "cache", ["host"]
    if kind == "read-only-parent":
        if IS_ROOT:
            pytest.skip("running as root: a read-only folder does not stop root from writing")
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
        return parent / "cache", ["Permission denied"]
    if kind == "read-only-cache":
        if IS_ROOT:
            pytest.skip("running as root: a read-only folder does not stop root from writing")
        folder = tmp_path / "cache"
        folder.mkdir()
        folder.chmod(0o500)
        return folder, ["not writable"]
    raise AssertionError(kind)


UNUSABLE_KINDS = ["parent-is-a-file", "is-a-file", "under-proc", "host-is-a-file",
                  "read-only-parent", "read-only-cache"]


@pytest.mark.parametrize("kind", UNUSABLE_KINDS)
def test_unusable_cache_folder_falls_back_with_a_warning(tmp_path, kind):
    configured, reasons = _unusable(tmp_path, kind)
    try:
        got, _ = _run(_CACHE_DIR_ONLY, _env(configured))
    finally:
        if kind.startswith("read-only"):
            for p in tmp_path.rglob("*"):
                if p.is_dir():
                    p.chmod(0o700)
    assert len(got["cache_warnings"]) == 1, got["cache_warnings"]
    message = got["cache_warnings"][0]
    for reason in reasons:
        assert reason in message, f"{reason!r} not in the warning: {message}"
    assert got["root"] and Path(got["root"]).name.startswith(FALLBACK_PREFIX)
    assert got["root_mode"] == "0o700" and got["host_mode"] == "0o700", got


@needs_compiler
def test_unusable_cache_folder_never_crashes_kernels_info_or_clear(tmp_path, fast_cxx):
    (tmp_path / "file").write_text("x")
    configured = tmp_path / "file" / "cache"
    log = tmp_path / "cxx.log"
    result = _load_and_run(configured, fast_cxx, log)
    assert len(result["cache_warnings"]) == 1, result["cache_warnings"]
    _check_private_fallback(result, tmp_path / "file")
    proc = _cli(["clear-cache"], _env(configured))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "removed 0 files" in proc.stdout, proc.stdout
    assert (tmp_path / "file").read_text() == "x"


# -- corrupt or substituted libraries ------------------------------------------------------------


def _flip_bytes(path):
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 3, len(data) // 3 + 64, 8):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _corrupt(kind, library, record, key):
    if kind == "truncated-library":
        library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])
    elif kind == "empty-library":
        library.write_bytes(b"")
    elif kind == "flipped-bytes":
        _flip_bytes(library)
    elif kind == "appended-bytes":
        with open(library, "ab") as f:
            f.write(b"\0" * 16)
    elif kind == "record-garbage":
        record.write_text('{"key": "' + key[:10])  # truncated JSON
    elif kind == "record-not-an-object":
        record.write_text("[1, 2, 3]")
    elif kind == "record-wrong-key":
        data = json.loads(record.read_text())
        data["key"] = "0" * 64
        record.write_text(json.dumps(data))
    elif kind == "record-wrong-digest":
        data = json.loads(record.read_text())
        data["sha256"] = hashlib.sha256(b"something else").hexdigest()
        record.write_text(json.dumps(data))
    elif kind == "record-missing":
        record.unlink()
    elif kind == "library-missing":
        library.unlink()
    else:
        raise AssertionError(kind)


CORRUPTIONS = ["truncated-library", "empty-library", "flipped-bytes", "appended-bytes",
               "record-garbage", "record-not-an-object", "record-wrong-key", "record-wrong-digest",
               "record-missing", "library-missing"]


@needs_compiler
@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_cached_library_is_detected_rebuilt_and_reported_once(tmp_path, fast_cxx, pristine,
                                                                       kind):
    root = tmp_path / "cache"
    library, record = _copy_pristine(pristine, root)
    _corrupt(kind, library, record, pristine["key"])
    log = tmp_path / "cxx.log"
    result = _load_and_run(root, fast_cxx, log)
    assert Path(result["path"]) == library, "rebuilt somewhere else"
    assert len(result["cache_warnings"]) == 1, result["cache_warnings"]
    message = result["cache_warnings"][0]
    assert str(library) in message and "rebuild" in message, message
    assert _compiles(log) == 1
    # the cache is whole again: one library, one record that matches it
    assert _artifacts(root) == sorted([str(pristine["library"]), str(pristine["record"])])
    data = json.loads(record.read_text())
    assert data["key"] == pristine["key"]
    assert data["sha256"] == hashlib.sha256(library.read_bytes()).hexdigest()
    # and the check that every later process makes accepts it
    assert host._record_matches(str(library), str(record), pristine["key"])


_EVIL_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void sru_test_marker(void) {
    const char* path = getenv("SRU_TEST_MARKER");
    if (path) { FILE* f = fopen(path, "w"); if (f) { fputs("loaded\n", f); fclose(f); } }
}
int sru_host_launch(void) { return 0; }
int sru_host_kernel_count(void) { return 999; }
"""


@pytest.fixture(scope="module")
def evil_library(tmp_path_factory):
    if shutil.which("cc") is None and COMPILER is None:
        pytest.skip("no C compiler")
    folder = tmp_path_factory.mktemp("evil")
    source = folder / "evil.c"
    source.write_text(_EVIL_C)
    out = folder / "evil.so"
    compiler = shutil.which("cc") or COMPILER
    subprocess.run([compiler, "-x", "c", "-shared", "-fPIC", str(source), "-o", str(out)],
                   check=True, capture_output=True)
    return out


def test_marker_library_writes_its_marker_when_loaded(tmp_path, evil_library):
    """Positive control for the test below: loading the substitute library does write the marker."""
    marker = tmp_path / "marker"
    code = f"import ctypes; ctypes.CDLL({str(evil_library)!r}); print('{{}}')"
    _run(code, _env(tmp_path / "cache", SRU_TEST_MARKER=marker))
    assert marker.read_text() == "loaded\n"


@needs_compiler
@pytest.mark.parametrize("record", ["kept", "digest-of-substitute-wrong-key"])
def test_substituted_library_is_never_loaded(tmp_path, fast_cxx, pristine, evil_library, record):
    """A different, valid shared library put in place of the cached one (whose record no longer
    matches) is never dlopen'ed: its constructor would write a marker file. It is replaced by a
    rebuilt library that works."""
    root = tmp_path / "cache"
    library, record_path = _copy_pristine(pristine, root)
    shutil.copyfile(evil_library, library)
    if record == "digest-of-substitute-wrong-key":  # record describes the substitute, other key
        data = json.loads(record_path.read_text())
        data["sha256"] = hashlib.sha256(library.read_bytes()).hexdigest()
        data["key"] = hashlib.sha256(b"another source").hexdigest()
        record_path.write_text(json.dumps(data))
    marker = tmp_path / "marker"
    log = tmp_path / "cxx.log"
    result = _load_and_run(root, fast_cxx, log, SRU_TEST_MARKER=marker)
    assert not marker.exists(), "the substituted library was loaded (its constructor ran)"
    assert len(result["cache_warnings"]) == 1, result["cache_warnings"]
    assert Path(result["path"]) == library and _compiles(log) == 1
    assert library.read_bytes() != evil_library.read_bytes()
    assert json.loads(record_path.read_text())["sha256"] == hashlib.sha256(
        library.read_bytes()).hexdigest()


# -- concurrency ---------------------------------------------------------------------------------


_THREADS = """
    import json, threading, warnings
    import numpy as np
    from sru_cupy.backends import host
    from sru_cupy.launch import recurrence_forward, recurrence_backward
    from sru_cupy.reference import recurrence_forward_reference, recurrence_backward_reference
    N = 8
    barrier = threading.Barrier(N)
    results = [None] * N
    def work(i):
        try:
            barrier.wait()
            lib = host.library()
            rng = np.random.default_rng(i)
            L, B, d = 9 + i, 1 + i % 3, 2 + i % 2
            U = rng.standard_normal((L, B, 6 * d))
            x = rng.standard_normal((L, B, 2 * d))
            wc, bias = rng.standard_normal(4 * d), rng.standard_normal(4 * d)
            gh = rng.standard_normal((L, B, 2 * d))
            worst = 0.0
            for _ in range(20):  # concurrent launches from all threads
                h, c, cl = recurrence_forward(U, x, wc, bias, hidden_size=d, bidirectional=True)
                g = recurrence_backward(gh, cl, U, x, wc, bias, None, c, hidden_size=d,
                                        bidirectional=True)
                rh, rc, rcl = recurrence_forward_reference(U, x, wc, bias, hidden_size=d,
                                                           bidirectional=True)
                rg = recurrence_backward_reference(gh, cl, U, x, wc, bias, None, rc,
                                                   hidden_size=d, bidirectional=True)
                worst = max(worst, float(np.abs(h - rh).max()), float(np.abs(g["U"] - rg["U"]).max()),
                            float(np.abs(g["bias"] - rg["bias"]).max()))
            results[i] = {"id": id(lib), "path": lib.path, "error": worst}
        except BaseException as error:
            results[i] = {"exception": repr(error)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=work, args=(i,)) for i in range(N)]
        for t in threads: t.start()
        for t in threads: t.join()
    print(json.dumps({"results": results, "warnings": [str(w.message) for w in caught]}))
"""


@needs_compiler
def test_eight_threads_on_a_fresh_cache_build_once_and_share_one_library(tmp_path, fast_cxx):
    root = tmp_path / "cache"
    log = tmp_path / "cxx.log"
    got, _ = _run(_THREADS, _env(root, CXX=fast_cxx, SRU_TEST_CXX_LOG=log))
    results = got["results"]
    assert all("exception" not in r for r in results), results
    assert len({r["id"] for r in results}) == 1, "threads got different library objects"
    assert len({r["path"] for r in results}) == 1
    assert max(r["error"] for r in results) < 1e-10, results
    assert got["warnings"] == []
    assert _compiles(log) == 1, f"{_compiles(log)} compiles of the kernels for 8 threads"
    assert len(_artifacts(root)) == 2, _files(root)


_PROCESSES = """
import json, multiprocessing, os, sys

def work(barrier, seed):
    import warnings
    import numpy as np
    warnings.simplefilter("error")  # a CacheWarning (e.g. "corrupt") would be a failure here
    barrier.wait()
    from sru_cupy.backends import host
    from sru_cupy.launch import recurrence_forward, recurrence_backward
    from sru_cupy.reference import recurrence_forward_reference, recurrence_backward_reference
    lib = host.library()
    rng = np.random.default_rng(seed)
    L, B, d = 11, 3, 3
    U = rng.standard_normal((L, B, 4 * d)).astype(np.float32)
    wc, bias = rng.standard_normal(2 * d), rng.standard_normal(2 * d)
    gh = rng.standard_normal((L, B, d)).astype(np.float32)
    h, c, cl = recurrence_forward(U, None, wc, bias, hidden_size=d)
    g = recurrence_backward(gh, None, U, None, wc, bias, None, c, hidden_size=d)
    rh, rc, rcl = recurrence_forward_reference(U, None, wc, bias, hidden_size=d)
    rg = recurrence_backward_reference(gh, None, U, None, wc, bias, None, rc, hidden_size=d)
    return {"path": lib.path, "pid": os.getpid(),
            "error": max(float(np.abs(h - rh).max()), float(np.abs(g["U"] - rg["U"]).max()))}

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    n = int(sys.argv[1])
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n)
        with ctx.Pool(n) as pool:
            results = pool.starmap(work, [(barrier, i) for i in range(n)])
    print(json.dumps(results))
"""


@needs_compiler
def test_four_spawned_processes_on_a_fresh_shared_cache_build_once(tmp_path, fast_cxx):
    """4 processes (spawn) start together on one empty cache: all compute correct results with the
    same library file, the cache ends with one library and one record, and the flock makes the
    kernels compile exactly once."""
    root = tmp_path / "cache"
    log = tmp_path / "cxx.log"
    script = tmp_path / "processes.py"
    script.write_text(_PROCESSES)
    env = _env(root, CXX=fast_cxx, SRU_TEST_CXX_LOG=log, OMP_NUM_THREADS=1)
    proc = subprocess.run([sys.executable, str(script), "4"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len({r["pid"] for r in results}) == 4
    assert len({r["path"] for r in results}) == 1, results
    assert max(r["error"] for r in results) < 1e-5, results
    assert Path(results[0]["path"]).is_relative_to(root)
    assert len(_artifacts(root)) == 2, _files(root)
    assert not [f for f in _files(root) if ".tmp-" in f]
    assert _compiles(log) == 1, f"{_compiles(log)} compiles of the kernels for 4 processes"


# -- trust: links, path components, what is loaded -------------------------------------------------


_CACHE_DIR_TWICE = """
    import json, os, warnings
    from sru_cupy import cache
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = cache.cache_dir("host")
        repoint = os.environ.get("SRU_TEST_REPOINT")
        if repoint:  # the link is re-pointed once the folder was checked
            link = os.environ["SRU_CUPY_CACHE_DIR"]
            os.unlink(link)
            os.symlink(repoint, link)
        second = cache.cache_dir("host")
    print(json.dumps({"first": first, "second": second, "root": cache._fallback_root,
                      "cache_warnings": [str(w.message) for w in caught
                                         if issubclass(w.category, cache.CacheWarning)]}))
"""


@pytest.mark.skipif(not IS_ROOT, reason="needs root to give a symbolic link to another user")
def test_symbolic_link_owned_by_another_user_is_refused(tmp_path):
    """SRU_CUPY_CACHE_DIR names a link that another user owns (under a shared /tmp), pointing at a
    private folder of ours: the link could be re-pointed after any check, so it is refused."""
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(ours)
    os.lchown(link, _nobody_uid(), -1)
    got, _ = _run(_CACHE_DIR_TWICE, _env(link))
    assert len(got["cache_warnings"]) == 1, got["cache_warnings"]
    message = got["cache_warnings"][0]
    assert f"the symbolic link {link} is owned by uid {_nobody_uid()}" in message, message
    assert got["first"] == got["second"] == os.path.join(got["root"], "host")
    assert list(ours.iterdir()) == [], "the folder behind the refused link was written to"


def test_cache_folder_is_resolved_once_and_used_as_resolved(tmp_path):
    """A link of ours to a private folder is followed once: the real folder is what cache_dir
    gives, and re-pointing the link afterwards (to a folder someone else prepared) changes
    nothing in this process."""
    ours, other = tmp_path / "ours", tmp_path / "other"
    ours.mkdir(mode=0o700)
    other.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(ours)
    got, _ = _run(_CACHE_DIR_TWICE, _env(link, SRU_TEST_REPOINT=other))
    assert got["cache_warnings"] == [], got["cache_warnings"]
    assert got["first"] == got["second"] == str(ours / "host"), got
    assert not (other / "host").exists()


def _component_case(tmp_path, kind):
    """-> (SRU_CUPY_CACHE_DIR, the reason expected in the warning, or None when it is accepted)."""
    if kind == "parent-writable-by-others":
        parent = tmp_path / "shared"
        parent.mkdir()
        parent.chmod(0o777)
        (parent / "cache").mkdir(mode=0o700)  # ours, but anyone can rename it and put another
        return parent / "cache", f"other users can write to {parent} (mode 777), which holds it"
    if kind == "grandparent-group-writable":
        top = tmp_path / "group"
        (top / "mine" / "cache").mkdir(parents=True)
        top.chmod(0o770)
        return top / "mine" / "cache", f"other users can write to {top} (mode 770)"
    if kind == "sticky-parent":  # as /tmp: only an entry's owner may rename it
        parent = tmp_path / "sticky"
        parent.mkdir()
        parent.chmod(0o1777)
        return parent / "cache", None
    if kind == "sticky-parent-other-owner":
        if not IS_ROOT:
            pytest.skip("needs root to give a folder to another user")
        parent = tmp_path / "sticky"
        parent.mkdir()
        parent.chmod(0o1777)
        (parent / "theirs").mkdir(mode=0o755)
        os.chown(parent / "theirs", _nobody_uid(), -1)
        return parent / "theirs" / "cache", f"{parent / 'theirs'}, which holds it, is owned by uid"
    if kind == "ancestor-other-owner":
        if not IS_ROOT:
            pytest.skip("needs root to give a folder to another user")
        top = tmp_path / "theirs"
        (top / "cache").mkdir(parents=True, mode=0o700)
        top.chmod(0o755)
        os.chown(top, _nobody_uid(), -1)
        return top / "cache", f"{top}, which holds it, is owned by uid {_nobody_uid()}"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["parent-writable-by-others", "grandparent-group-writable",
                                  "sticky-parent", "sticky-parent-other-owner",
                                  "ancestor-other-owner"])
def test_every_component_of_the_cache_path_is_checked(tmp_path, kind):
    """A private cache folder inside a folder others can write (without the sticky bit) or own
    can be swapped for another by them: refused. Inside a sticky folder such as /tmp it is
    accepted when the next component is ours."""
    configured, reason = _component_case(tmp_path, kind)
    got, _ = _run(_CACHE_DIR_TWICE, _env(configured))
    if reason is None:
        assert got["cache_warnings"] == [], got["cache_warnings"]
        assert got["first"] == str(configured / "host") and got["root"] is None, got
        assert stat.S_IMODE(configured.stat().st_mode) == 0o700
        return
    assert len(got["cache_warnings"]) == 1, got["cache_warnings"]
    assert reason in got["cache_warnings"][0], got["cache_warnings"][0]
    assert got["first"] == os.path.join(got["root"], "host"), got


@pytest.mark.parametrize("how", ["group-writable", "other-owner", "symlink"])
@needs_compiler
def test_cached_library_others_could_have_written_is_rebuilt_not_loaded(tmp_path, fast_cxx,
                                                                         pristine, how):
    """A cached library whose content still matches its record, but which group or others can
    write, another user owns, or which is a symbolic link (to a file others could change), is not
    loaded: it is rebuilt, with a warning that says why."""
    root = tmp_path / "cache"
    library, record = _copy_pristine(pristine, root)
    if how == "group-writable":
        library.chmod(0o660)
        reason = "other users can write to it"
    elif how == "other-owner":
        if not IS_ROOT:
            pytest.skip("needs root to give a file to another user")
        os.chown(library, _nobody_uid(), -1)
        reason = f"owned by uid {_nobody_uid()}"
    else:
        elsewhere = tmp_path / "elsewhere.so"
        shutil.move(library, elsewhere)
        library.symlink_to(elsewhere)
        reason = "symbolic link"
    log = tmp_path / "cxx.log"
    result = _load_and_run(root, fast_cxx, log)
    assert len(result["cache_warnings"]) == 1, result["cache_warnings"]
    assert reason in result["cache_warnings"][0] and "rebuild" in result["cache_warnings"][0]
    assert _compiles(log) == 1
    assert library.is_file() and not library.is_symlink()
    assert stat.S_IMODE(library.stat().st_mode) == 0o600 and library.stat().st_uid == os.geteuid()


@needs_compiler
def test_library_swapped_between_its_check_and_its_load_is_not_loaded(tmp_path, fast_cxx, pristine,
                                                                      evil_library):
    """The attacker's best moment: the library is replaced after its hash was checked, right
    before the loader opens it. The loader gets the checked file (its descriptor), so the
    substitute's constructor never runs."""
    root = tmp_path / "cache"
    library, _ = _copy_pristine(pristine, root)
    marker = tmp_path / "marker"
    code = f"""
        import ctypes, json, os, shutil
        real_cdll = ctypes.CDLL
        def swapping_cdll(name, *args, **kwargs):
            if os.path.exists({str(library)!r}):
                shutil.copyfile({str(evil_library)!r}, {str(library)!r} + ".new")
                os.replace({str(library)!r} + ".new", {str(library)!r})
            return real_cdll(name, *args, **kwargs)
        ctypes.CDLL = swapping_cdll
        from sru_cupy.backends import host
        lib = host.library()
        print(json.dumps({{"count": lib.sru_host_kernel_count()}}))
    """
    log = tmp_path / "cxx.log"
    got, _ = _run(code, _env(root, CXX=fast_cxx, SRU_TEST_CXX_LOG=log, SRU_TEST_MARKER=marker))
    assert not marker.exists(), "the library swapped in after the check was loaded"
    from sru_cupy import kernels  # the real library's table (the substitute says 999)
    assert got["count"] == len(kernels.all_kernel_names((host.COLUMNS_PER_THREAD,))), got
    assert _compiles(log) == 0


# -- time limits -----------------------------------------------------------------------------------

_HOLD_LOCK = """
    import fcntl, os, sys, time
    from sru_cupy import cache
    from sru_cupy.backends import host
    key, _, _ = host.library_key(host.compiler_command())
    lock = os.path.join(cache.cache_dir("host"), f"sru_host_{key[:24]}.so.lock")
    handle = open(lock, "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    handle.write(f"{os.getpid()}\\n"); handle.flush()
    print(lock, flush=True)
    time.sleep(600)
"""


@needs_compiler
@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_lock_held_too_long_is_a_clear_error_after_the_lock_timeout(tmp_path, fast_cxx):
    """Another process holds the build lock and never lets go (a build stuck on a hung file system,
    a stopped process): a waiting process gives up after $SRU_CUPY_LOCK_TIMEOUT seconds with an
    error naming the lock file, its holder and the variable, instead of waiting forever."""
    root = tmp_path / "cache"
    env = _env(root, CXX=fast_cxx)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_HOLD_LOCK)], env=env,
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        lock = holder.stdout.readline().strip()
        assert lock.endswith(".lock"), lock
        code = """
            import json, time
            from sru_cupy import cache
            from sru_cupy.backends import host
            start = time.monotonic()
            try:
                host.library()
                error = None
            except cache.LockTimeoutError as exc:
                error = str(exc)
            print(json.dumps({"error": error, "waited": time.monotonic() - start}))
        """
        got, _ = _run(code, dict(env, SRU_CUPY_LOCK_TIMEOUT="2"), timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert got["error"] is not None, "the build did not give up"
    for part in (lock, f"held by process {holder.pid}", "SRU_CUPY_LOCK_TIMEOUT", "2 s"):
        assert part in got["error"], got["error"]
    assert 1.5 < got["waited"] < 60, got


# -- full disk and read-only caches ----------------------------------------------------------------


def _mount(*args):
    if not IS_ROOT or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) for a real full or read-only file system")
    proc = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"mount is not allowed here: {proc.stderr.strip()}")


@contextlib.contextmanager
def _tiny_file_system(folder, size="64k"):
    """A tmpfs of ``size`` mounted at ``folder``: a disk too small for a library."""
    folder.mkdir(mode=0o700)
    _mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", folder)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], timeout=60, check=True)


@contextlib.contextmanager
def read_only(folder):
    """``folder`` read-only for this user: a read-only bind mount when running as root (modes do
    not stop root), else modes without write permission."""
    if IS_ROOT:
        _mount("--bind", folder, folder)
        try:
            _mount("-o", "remount,ro,bind", folder)
            yield folder
        finally:
            subprocess.run(["umount", str(folder)], timeout=60, check=True)
        return
    paths = [folder, *folder.rglob("*")]
    for path in paths:
        path.chmod(0o500 if path.is_dir() else 0o400)
    try:
        yield folder
    finally:
        for path in paths:
            path.chmod(0o700 if path.is_dir() else 0o600)


@needs_compiler
def test_full_disk_keeps_the_library_in_memory_and_warns_once(tmp_path, fast_cxx):
    """The cache's disk is full: the build cannot be written (ENOSPC), but this process gets working
    kernels (kept in memory), with one warning; nothing half-written is left."""
    log = tmp_path / "cxx.log"
    with _tiny_file_system(tmp_path / "disk") as disk:
        root = disk / "cache"
        result = _load_and_run(root, fast_cxx, log)
        assert len(result["cache_warnings"]) == 1, result["cache_warnings"]
        message = result["cache_warnings"][0]
        assert "No space left on device" in message and "kept for this process only" in message
        assert not Path(result["path"]).is_relative_to(root), result["path"]
        assert not [f for f in _files(root) if ".tmp-" in f or f.endswith(".so")], _files(root)
        assert _compiles(log) == 1


def _snapshot(folder):
    return {f: ((folder / f).stat().st_mtime_ns, (folder / f).stat().st_size) for f in _files(folder)}


@needs_compiler
def test_read_only_cache_loads_a_verified_entry_without_compiling_or_writing(tmp_path, fast_cxx,
                                                                             pristine):
    """A pre-built cache made read-only (a shared cache on a cluster, a container layer): its
    verified library loads with no compile, no write and no warning."""
    root = tmp_path / "cache"
    library, _ = _copy_pristine(pristine, root)
    before = _snapshot(root)
    log = tmp_path / "cxx.log"
    with read_only(root):
        result = _load_and_run(root, fast_cxx, log)
    assert Path(result["path"]) == library
    assert result["cache_warnings"] == [], result["cache_warnings"]
    assert _compiles(log) == 0 and not log.exists(), "a compiler ran"
    assert _snapshot(root) == before


@needs_compiler
def test_read_only_cache_without_the_entry_builds_privately_with_a_warning(tmp_path, fast_cxx,
                                                                           pristine):
    root = tmp_path / "cache"
    library, record = _copy_pristine(pristine, root)
    library.unlink()
    record.unlink()
    before = _snapshot(root)
    log = tmp_path / "cxx.log"
    with read_only(root):
        result = _load_and_run(root, fast_cxx, log)
    assert len(result["cache_warnings"]) == 1, result["cache_warnings"]
    assert "read-only" in result["cache_warnings"][0], result["cache_warnings"][0]
    _check_private_fallback(result, root)
    assert _compiles(log) == 1
    assert _snapshot(root) == before


# -- unreadable or unloadable entries --------------------------------------------------------------


@needs_compiler
def test_compiler_record_missing_a_field_is_probed_again(tmp_path, fast_cxx, pristine):
    """A record of compiler facts that lacks a field (written by another version, or damaged) is
    treated as absent: the compiler is probed again, no KeyError."""
    root = tmp_path / "cache"
    _copy_pristine(pristine, root)
    [facts_path] = (root / "host").glob("compiler_*.json")
    record = json.loads(facts_path.read_text())
    del record["facts"]["isa"]
    facts_path.write_text(json.dumps(record))
    log = tmp_path / "cxx.log"
    result = _load_and_run(root, fast_cxx, log)
    assert result["cache_warnings"] == [], result["cache_warnings"]
    assert _compiles(log) == 0  # the library itself was fine
    assert log.exists(), "the compiler was not probed again"
    assert "isa" in json.loads(facts_path.read_text())["facts"]


@needs_compiler
def test_library_that_matches_its_record_but_does_not_load_is_rebuilt_once(tmp_path, fast_cxx,
                                                                            pristine):
    """A library whose record was written for it but which does not load (truncated, another
    architecture's) is rebuilt once, with a warning, and then loads."""
    root = tmp_path / "cache"
    library, record_path = _copy_pristine(pristine, root)
    library.write_bytes(library.read_bytes()[:4096])
    record = json.loads(record_path.read_text())
    record["sha256"] = hashlib.sha256(library.read_bytes()).hexdigest()
    record_path.write_text(json.dumps(record))
    log = tmp_path / "cxx.log"
    result = _load_and_run(root, fast_cxx, log)
    assert len(result["cache_warnings"]) == 1, result["cache_warnings"]
    assert "cannot be loaded" in result["cache_warnings"][0] and "rebuild" in \
        result["cache_warnings"][0]
    assert _compiles(log) == 1 and Path(result["path"]) == library
    assert library.stat().st_size > 4096


@needs_compiler
def test_library_that_never_loads_fails_with_a_clear_error_after_one_rebuild(tmp_path):
    """A compiler that reports success but writes something that is no library: one rebuild, then
    an error that names the library, the compiler and the loader's reason."""
    log = tmp_path / "cxx.log"
    liar = tmp_path / "liar-cxx"
    liar.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case "$*" in
          *sru_host.cpp*) echo "$@" >> "{log}";
                          while [ "$#" -gt 1 ]; do shift; done; echo "not a library" > "$1" ;;
          *) exec "{COMPILER}" "$@" ;;
        esac
        """))
    liar.chmod(0o755)
    code = """
        import json, warnings
        from sru_cupy.backends import host
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                host.library()
                error = None
            except RuntimeError as exc:
                error = str(exc)
        print(json.dumps({"error": error, "warnings": [str(w.message) for w in caught]}))
    """
    got, _ = _run(code, _env(tmp_path / "cache", CXX=liar))
    assert got["error"] is not None, "no error for a library that does not load"
    for part in ("cannot be loaded", str(liar), "sru_host_"):
        assert part in got["error"], got["error"]
    assert len(got["warnings"]) == 1 and "rebuilding" in got["warnings"][0], got["warnings"]
    assert _compiles(log) == 2


# -- stale files, the cache command, XDG -----------------------------------------------------------


@needs_compiler
def test_a_build_removes_stale_temporaries_and_lock_files_nobody_holds(tmp_path, fast_cxx):
    root = tmp_path / "cache"
    host_dir = root / "host"
    host_dir.mkdir(parents=True, mode=0o700)
    root.chmod(0o700)
    stale = host_dir / ".tmp-abc123sru_host_x.so"
    stale.write_bytes(b"half")
    old = stale.stat().st_mtime - cache.STALE_SECONDS - 60
    os.utime(stale, (old, old))
    fresh = host_dir / ".tmp-def456sru_host_y.so"  # may be another process's write in progress
    fresh.write_bytes(b"half")
    (host_dir / "sru_host_0123456789abcdef01234567.so.lock").write_text("")
    log = tmp_path / "cxx.log"
    _load_and_run(root, fast_cxx, log)
    left = _files(root)
    assert "host/.tmp-abc123sru_host_x.so" not in left, left
    assert "host/.tmp-def456sru_host_y.so" in left, left
    assert "host/sru_host_0123456789abcdef01234567.so.lock" not in left, left


def test_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    """The XDG base-directory spec: a relative $XDG_CACHE_HOME is invalid and must be ignored (it
    would put the cache wherever the process happens to run)."""
    monkeypatch.delenv("SRU_CUPY_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert cache.cache_root() == str(tmp_path / "home" / ".cache" / "sru_cupy")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == str(tmp_path / "xdg" / "sru_cupy")


@needs_compiler
def test_libraries_loaded_by_descriptor_one_after_another_are_each_their_own(tmp_path, fast_cxx):
    """Libraries are loaded by /proc/self/fd/N and the descriptor closed afterwards, so the next
    library's descriptor often has the same number; the loader would hand back the first library
    for a name it has seen. Each library loaded must be the one asked for."""
    code = """
        import json
        from sru_cupy.backends import host
        names = {}
        for columns in (1, 2, host.COLUMNS_PER_THREAD):
            lib = host.library(columns)
            names[columns] = [lib.sru_host_kernel_name(i).decode()
                              for i in range(lib.sru_host_kernel_count())]
        print(json.dumps({"names": names}))
    """
    got, _ = _run(code, _env(tmp_path / "cache", CXX=fast_cxx))
    for columns, names in got["names"].items():
        assert names and all(name.endswith(f", {columns}>") for name in names), (columns, names)
