"""The on-disk cache of compiled kernels (host shared libraries, PTX written by the package).

Location: ``$SRU_CUPY_CACHE_DIR``, else ``$XDG_CACHE_HOME/sru_cupy``, else ``~/.cache/sru_cupy``.

Safety rules, because a shared library loaded from the cache runs as the user who loads it:
- folders are created private (mode 0700); an existing folder that another user owns or that group
  or others can write is refused (a warning says so) and a private temporary folder is used;
- a folder that cannot be created or written also falls back to a private temporary folder, with a
  warning, instead of failing;
- files are written atomically (a temporary file in the same folder, then ``os.replace``), so a
  reader never sees a half-written file;
- builders take an exclusive lock per artifact (``fcntl.flock``), so threads and processes that
  build the same kernels at once build them once and all load the same file.
"""

import contextlib
import hashlib
import os
import stat
import tempfile
import threading
import warnings

ENV_VAR = "SRU_CUPY_CACHE_DIR"

_fallback_root = None
_fallback_lock = threading.Lock()
_warned = set()


class CacheWarning(UserWarning):
    """The cache folder was refused or unusable, or a cached file was corrupt and rebuilt."""


def warn_once(key, message, category=CacheWarning, stacklevel=3):
    """Warns once per process for each ``key`` (the stack level is counted from the caller)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, category, stacklevel=stacklevel)


def cache_root():
    """The configured cache folder's path (not created, not checked)."""
    if os.environ.get(ENV_VAR):
        return os.path.abspath(os.path.expanduser(os.environ[ENV_VAR]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sru_cupy")


def unsafe_reason(path):
    """Why an existing folder must not hold code we load (None when it is safe)."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a folder"
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"it is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"other users can write to it (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _make_private(path):
    os.makedirs(path, mode=0o700, exist_ok=True)
    reason = unsafe_reason(path)
    if reason:
        raise PermissionError(f"refusing cache folder {path}: {reason}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"cache folder {path} is not writable")
    return path


def _fallback(reason):
    global _fallback_root
    with _fallback_lock:
        if _fallback_root is None:
            _fallback_root = tempfile.mkdtemp(prefix="sru_cupy-cache-")  # mode 0700
            import atexit
            import shutil
            atexit.register(shutil.rmtree, _fallback_root, True)
        warn_once(("fallback", reason),
                  f"sru_cupy: {reason}; using the private temporary folder {_fallback_root} "
                  f"instead (set ${ENV_VAR} to a private folder)")
        return _fallback_root


def cache_dir(*parts):
    """A private sub-folder of the cache, created (mode 0700) if needed; falls back to a private
    temporary folder, with a warning, when the configured one is unsafe or unusable."""
    root = cache_root()
    try:
        _make_private(root)
        path = root
        for part in parts:
            path = _make_private(os.path.join(path, part))
        return path
    except OSError as error:
        path = _fallback(str(error))
        for part in parts:
            path = os.path.join(path, part)
            os.makedirs(path, mode=0o700, exist_ok=True)
        return path


def write_atomic(path, data):
    """Writes bytes to ``path`` so that it either keeps its old content or has all of ``data``."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_thread_locks = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def build_lock(path):
    """Exclusive lock for building ``path``: across threads, and across processes via
    ``fcntl.flock`` on ``path + '.lock'`` where fcntl exists."""
    with _thread_locks_guard:
        lock = _thread_locks.setdefault(path, threading.Lock())
    with lock:
        try:
            import fcntl
        except ImportError:  # no advisory locks: atomic writes still keep every file whole
            yield
            return
        with open(path + ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: What the package writes in the cache folder; clear() removes these and nothing else.
OWN_SUBFOLDERS = ("host", "ptx", "cupy")


def clear():
    """Empties the cache: removes sru_cupy's own sub-folders (``OWN_SUBFOLDERS``) and returns how
    many files they held. Other files are left alone, and a folder that cache_dir() would refuse
    is not touched at all (PermissionError), as it may be someone else's."""
    import shutil
    root = cache_root()
    if not os.path.isdir(root):
        return 0
    reason = unsafe_reason(root)
    if reason:
        raise PermissionError(f"not clearing {root}: {reason}")
    removed = 0
    for entry in OWN_SUBFOLDERS:
        path = os.path.join(root, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            removed += sum(len(files) for _, _, files in os.walk(path))
            shutil.rmtree(path)
    return removed
