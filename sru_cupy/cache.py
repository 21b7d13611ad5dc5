"""The on-disk cache of compiled kernels (host shared libraries, CuPy binaries, PTX written by the
package).

Location: ``$SRU_CUPY_CACHE_DIR``, else ``$XDG_CACHE_HOME/sru_cupy`` (an absolute
``$XDG_CACHE_HOME`` only: the XDG spec says a relative one is ignored), else ``~/.cache/sru_cupy``.

A shared library loaded from the cache runs with the rights of the user who loads it (often root),
so whatever can change the cache can run code as that user. The rules:

- Trusted owners are this user and root. The configured path is resolved once
  (``os.path.realpath``) and the resolved path is used from then on; a symbolic link on the way must
  be owned by a trusted owner (a link someone else owns could be re-pointed after the check).
- Every component of the resolved path, from ``/`` down, is checked with ``lstat``: a folder, owned
  by a trusted owner. The cache folder and its sub-folders must not be writable by group or others.
  An ancestor writable by others is accepted only with the sticky bit (``/tmp``): there only an
  entry's owner can rename or remove it, and the next component must itself be owned by a trusted
  owner, so nobody else can swap it. Anything else is refused, with a warning, for a private
  temporary folder (mode 0700, removed at exit); so is a folder that cannot be created.
- Folders are created one level at a time with mode 0700 (``chmod`` too), files with mode 0600
  (``mkstemp``; ``fchmod`` for the public files of a PTX folder), whatever the umask.
- A cached file is opened once (``O_RDONLY | O_NOFOLLOW``) and its descriptor checked with
  ``fstat`` (a regular file, a trusted owner, not writable by group or others,
  :func:`open_trusted`); the hash is computed from that descriptor and the loader is given that
  descriptor (``/proc/self/fd/N``), so the file cannot be swapped between the check and the load.
- Files are written atomically (a temporary ``.tmp-*`` file in the same folder, then
  ``os.replace``): a reader never sees a half-written file.
- Builders take an exclusive lock per artifact (``fcntl.flock`` on ``<file>.lock``, holding the
  builder's pid), so threads and processes that build the same kernels at once build them once.
  Waiting for it is bounded: ``$SRU_CUPY_LOCK_TIMEOUT`` seconds (default
  :data:`DEFAULT_LOCK_TIMEOUT`), then :class:`LockTimeoutError` names the lock and its holder.
  A build removes stale temporaries (older than :data:`STALE_SECONDS`) and lock files nobody holds.
- A read-only cache folder (a shared pre-built cache) is read from: a verified entry loads with no
  compile and no write; a missing one is built into the private temporary folder, with a warning.
  A write that fails (a full disk) keeps the built code for this process only, with a warning.
"""

import contextlib
import hashlib
import os
import stat
import tempfile
import threading
import time

from .errors import CacheWarning, warn_once  # noqa: F401  (CacheWarning: its old home)

ENV_VAR = "SRU_CUPY_CACHE_DIR"
#: Environment variable: seconds a build waits for another build's lock before giving up.
LOCK_TIMEOUT_ENV_VAR = "SRU_CUPY_LOCK_TIMEOUT"
#: Default of $SRU_CUPY_LOCK_TIMEOUT: longer than a whole build may take (the compile limit of the
#: host backend is 600 s by default), so a waiter only gives up on a holder that is stuck.
DEFAULT_LOCK_TIMEOUT = 900.0
#: A ``.tmp-*`` file older than this (seconds) is left over from a killed writer: a build removes it.
STALE_SECONDS = 600

_fallback_root = None
_fallback_lock = threading.Lock()
_resolved = {}  # configured cache folder -> its real path, resolved once

_POSIX = hasattr(os, "geteuid")
#: Flags of every open of a cached file: no symbolic link as the last component, no blocking on a
#: FIFO put in its place, not inherited by compilers and other children.
_READ_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0))


class LockTimeoutError(TimeoutError):
    """Another build held the lock of an artifact for longer than $SRU_CUPY_LOCK_TIMEOUT."""


class UntrustedFileError(PermissionError):
    """A cached file that must not be used: a link, not a regular file, owned by another user, or
    writable by group or others."""


def seconds_from_env(name, default):
    """A time limit in seconds from the environment variable ``name`` (a number > 0), else
    ``default``."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"${name}: expected a number of seconds > 0, got {value!r}")
    return seconds


def lock_timeout():
    """Seconds a build waits for another build's lock: $SRU_CUPY_LOCK_TIMEOUT, else
    DEFAULT_LOCK_TIMEOUT."""
    return seconds_from_env(LOCK_TIMEOUT_ENV_VAR, DEFAULT_LOCK_TIMEOUT)


def cache_root():
    """The configured cache folder's path (not created, not checked, not resolved)."""
    if os.environ.get(ENV_VAR):
        return os.path.abspath(os.path.expanduser(os.environ[ENV_VAR]))
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = xdg if xdg and os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sru_cupy")


# -- who may own what ----------------------------------------------------------------------------


def _trusted(uid):
    return not _POSIX or uid in (os.geteuid(), 0)


def _owner_reason(info, what):
    if _trusted(info.st_uid):
        return None
    return (f"{what} owned by uid {info.st_uid}, not by this user (uid {os.geteuid()}) "
            "or root")


def _links_reason(path):
    """Why a symbolic link on the way to ``path`` (absolute, not resolved) is not to be followed:
    one owned by someone else could be re-pointed once checked."""
    prefix = os.sep
    for part in path.split(os.sep):
        if not part:
            continue
        prefix = os.path.join(prefix, part)
        try:
            info = os.lstat(prefix)
        except OSError:
            return None  # the rest does not exist yet: created below, checked once resolved
        if stat.S_ISLNK(info.st_mode):
            reason = _owner_reason(info, f"the symbolic link {prefix} is")
            if reason:
                return reason
    return None


def _components(real):
    """``/``, ``/a``, ``/a/b``, ... ``real``."""
    chain = [real]
    while os.path.dirname(chain[-1]) != chain[-1]:
        chain.append(os.path.dirname(chain[-1]))
    return chain[::-1]


def _chain_reason(real, leaf=True):
    """Why the resolved folder ``real`` must not hold code we load (None when it is safe): every
    component a folder owned by this user or root; the folder itself (when ``leaf``) not writable
    by group or others; an ancestor writable by others only with the sticky bit."""
    chain = _components(real)
    for i, component in enumerate(chain):
        info = os.lstat(component)
        is_leaf = leaf and i == len(chain) - 1
        name = "it" if is_leaf else component
        if stat.S_ISLNK(info.st_mode):
            return f"{component} became a symbolic link while it was checked"
        if not stat.S_ISDIR(info.st_mode):
            return f"{name} is not a folder" if not is_leaf else "it is not a folder"
        if not _POSIX:
            continue
        reason = _owner_reason(info, "it is" if is_leaf else f"{component}, which holds it, is")
        if reason:
            return reason
        mode = stat.S_IMODE(info.st_mode)
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            if is_leaf:
                return f"other users can write to it (mode {mode:o})"
            if not mode & stat.S_ISVTX:
                return (f"other users can write to {component} (mode {mode:o}), which holds it, "
                        "and could replace it")
    return None


def unsafe_reason(path):
    """Why an existing folder must not hold code we load (None when it is safe): a link on the way
    that someone else owns, or a component of its resolved path that someone else owns or can
    write (see the module's rules)."""
    path = os.path.abspath(path)
    return _links_reason(path) or _chain_reason(os.path.realpath(path))


def _make_folder(path):
    """Creates one folder level with mode 0700, whatever the umask."""
    os.mkdir(path, 0o700)
    os.chmod(path, 0o700)  # mkdir's mode is narrowed by the umask, never widened: say it exactly


def _resolved_root():
    """The cache folder, created if needed, resolved once, and checked (PermissionError or another
    OSError when it is refused or unusable)."""
    configured = cache_root()
    real = _resolved.get(configured)
    if real is not None and not os.path.lexists(real):  # removed since: resolved and made anew
        real = None
    if real is None:
        reason = _links_reason(configured)
        if reason:
            raise PermissionError(f"refusing cache folder {configured}: {reason}")
        existing, missing = configured, []
        while not os.path.lexists(existing):
            existing, name = os.path.split(existing)
            missing.insert(0, name)
        real = os.path.realpath(existing)
        if missing:  # nothing is created in a folder others could tamper with
            reason = _chain_reason(real, leaf=False)
            if reason:
                raise PermissionError(f"refusing cache folder {configured}: {reason}")
            for name in missing:
                real = os.path.join(real, name)
                with contextlib.suppress(FileExistsError):  # another process made it meanwhile
                    _make_folder(real)
            # What another process made meanwhile is checked like the rest: no link it does not
            # own on the way, and from here on the resolved path.
            reason = _links_reason(real)
            if reason:
                raise PermissionError(f"refusing cache folder {configured}: {reason}")
            real = os.path.realpath(real)
    reason = _chain_reason(real)
    if reason:
        raise PermissionError(f"refusing cache folder {real}: {reason}")
    _resolved[configured] = real
    return real


def _sub_folder(parent, part):
    path = os.path.join(parent, part)
    if not os.path.lexists(path):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            _make_folder(path)
    reason = _chain_reason(path)
    if reason:
        raise PermissionError(f"refusing cache folder {path}: {reason}")
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
                  f"instead (set ${ENV_VAR} to a private folder)", stacklevel=4)
        return _fallback_root


def private_dir(*parts, reason):
    """A sub-folder of the private temporary folder of this process (created mode 0700), with a
    warning (once per ``reason``) that says why it is used."""
    path = _fallback(reason)
    for part in parts:
        path = os.path.join(path, part)
        if not os.path.isdir(path):
            _make_folder(path)
    return path


def cache_dir(*parts):
    """A checked sub-folder of the cache (its resolved path), created (mode 0700) if needed; falls
    back to a private temporary folder, with a warning, when the configured one is unsafe or cannot
    be created. An existing folder that is read-only is returned as it is: entries are read from
    it, and a build that must write uses :func:`writable` and :func:`private_dir`."""
    try:
        path = _resolved_root()
        for part in parts:
            path = _sub_folder(path, part)
        return path
    except OSError as error:
        return private_dir(*parts, reason=str(error))


def writable(folder):
    """True when this process can create files in ``folder``."""
    return os.access(folder, os.W_OK | os.X_OK)


# -- reading ---------------------------------------------------------------------------------------


def _file_reason(info):
    if not stat.S_ISREG(info.st_mode):
        return "it is not a regular file"
    if not _POSIX:
        return None
    reason = _owner_reason(info, "it is")
    if reason:
        return reason
    mode = stat.S_IMODE(info.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"other users can write to it (mode {mode:o})"
    return None


def open_trusted(path):
    """A read-only descriptor of ``path``, checked on the descriptor itself (``fstat``): a regular
    file, not a symbolic link, owned by this user or root, not writable by group or others.
    FileNotFoundError when it is absent; UntrustedFileError (a PermissionError) when it must not be
    used. The caller closes it."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as error:
        if os.path.islink(path):  # ELOOP from O_NOFOLLOW
            raise UntrustedFileError(f"{path}: it is a symbolic link") from None
        raise error from None
    try:
        reason = _file_reason(os.fstat(fd))
        if reason:
            raise UntrustedFileError(f"{path}: {reason}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _blocks(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    return iter(lambda: os.read(fd, 1 << 20), b"")


def read_descriptor(fd):
    """Every byte of an open file, from its start."""
    return b"".join(_blocks(fd))


def read_trusted(path):
    """The bytes of ``path``, read from a descriptor that :func:`open_trusted` checked."""
    fd = open_trusted(path)
    try:
        return read_descriptor(fd)
    finally:
        os.close(fd)


def descriptor_digest(fd):
    """SHA-256 (hex) of an open file's content, from its start."""
    digest = hashlib.sha256()
    for block in _blocks(fd):
        digest.update(block)
    return digest.hexdigest()


def loadable_path(fd, path):
    """The path a loader opens to get the very file of ``fd``: ``/proc/self/fd/N`` where it exists
    (Linux), else ``path`` (checked, but open to a swap before the loader opens it)."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else path


# -- writing ---------------------------------------------------------------------------------------


def write_atomic(path, data, mode=0o600):
    """Writes bytes to ``path`` so that it either keeps its old content or has all of ``data``; the
    file gets ``mode`` (0600: private) whatever the umask."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != 0o600:  # mkstemp's mode; the umask cannot have widened it
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def keep_in_memory(data, name):
    """(descriptor, path) of a private copy of ``data`` for a build that could not be written to
    the cache (a full disk): an anonymous memory file (Linux; its path ``/proc/self/fd/N``), else a
    file in the private temporary folder. The caller keeps the descriptor open while it is used."""
    if hasattr(os, "memfd_create"):
        with contextlib.suppress(OSError):
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                return fd, f"/proc/self/fd/{fd}"
            except BaseException:
                os.close(fd)
                raise
    path = os.path.join(private_dir(reason="the kernel cache could not be written"), name)
    write_atomic(path, data)
    return os.open(path, _READ_FLAGS), path


# -- locks -----------------------------------------------------------------------------------------

_thread_locks = {}
_thread_locks_guard = threading.Lock()


def _holder(fd):
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
        return f" (held by process {pid})"
    return ""


def _same_file(fd, path):
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except OSError:
        return False


def _timeout_error(lock_path, timeout, holder=""):
    return LockTimeoutError(
        f"sru_cupy: waited {timeout:g} s for the build lock {lock_path}{holder}, which another "
        f"build holds; set ${LOCK_TIMEOUT_ENV_VAR} (seconds) to wait longer")


def _lock_file(fcntl, lock_path, deadline, timeout):
    """An open descriptor of ``lock_path`` holding its flock. A lock file removed as stale between
    the open and the lock (see clean_stale) is no lock: then the new file is locked instead."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            delay = 0.01
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise _timeout_error(lock_path, timeout, _holder(fd)) from None
                    time.sleep(min(delay, remaining))
                    delay = min(2 * delay, 0.25)
            if _same_file(fd, lock_path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextlib.contextmanager
def build_lock(path, timeout=None):
    """Exclusive lock for building ``path``: across threads, and across processes via
    ``fcntl.flock`` on ``path + '.lock'`` where fcntl exists. Waits at most ``timeout`` seconds
    (default :func:`lock_timeout`), then raises :class:`LockTimeoutError`."""
    timeout = lock_timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    with _thread_locks_guard:
        lock = _thread_locks.setdefault(path, threading.Lock())
    if not lock.acquire(timeout=max(timeout, 0)):
        raise _timeout_error(path + ".lock", timeout, " (held by a thread of this process)")
    try:
        try:
            import fcntl
        except ImportError:  # no advisory locks: atomic writes still keep every file whole
            yield
            return
        fd = _lock_file(fcntl, path + ".lock", deadline, timeout)
        try:
            yield
        finally:
            os.close(fd)  # releases the flock
    finally:
        lock.release()


def _reset_after_fork():
    # A lock held by another thread at the fork stays held in the child forever: start afresh.
    global _thread_locks_guard, _fallback_lock
    _thread_locks.clear()
    _thread_locks_guard = threading.Lock()
    _fallback_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def clean_stale(folder, now=None):
    """Removes what killed builds leave in ``folder``: ``.tmp-*`` files older than STALE_SECONDS
    and lock files nobody holds (each removed while holding its lock, so no builder is between
    opening it and locking it). Returns the paths removed."""
    try:
        import fcntl
    except ImportError:
        return []
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        with contextlib.suppress(OSError):
            if not entry.is_file(follow_symlinks=False):
                continue
            if entry.name.startswith(".tmp-"):
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_SECONDS:
                    os.unlink(entry.path)
                    removed.append(entry.path)
            elif entry.name.endswith(".lock"):
                fd = os.open(entry.path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0)
                             | getattr(os, "O_CLOEXEC", 0))
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if _same_file(fd, entry.path):
                        os.unlink(entry.path)
                        removed.append(entry.path)
                except BlockingIOError:
                    pass  # held: a build is running
                finally:
                    os.close(fd)
    return removed


# -- what the cache holds --------------------------------------------------------------------------

#: What the package writes in the cache folder; clear() removes these and nothing else.
OWN_SUBFOLDERS = ("host", "ptx", "cupy")


def _checked_root(action):
    """The resolved cache folder for ``action`` ("clearing", ...), or None when there is none;
    PermissionError for a folder cache_dir() would refuse (it may be someone else's)."""
    root = cache_root()
    if not os.path.isdir(root):
        return None
    reason = unsafe_reason(root)
    if reason:
        raise PermissionError(f"not {action} {root}: {reason}")
    return os.path.realpath(root)


def clear():
    """Empties the cache: removes sru_cupy's own sub-folders (``OWN_SUBFOLDERS``) and returns how
    many files they held. Other files are left alone, and a folder that cache_dir() would refuse
    is not touched at all (PermissionError), as it may be someone else's."""
    import shutil
    root = _checked_root("clearing")
    if root is None:
        return 0
    removed = 0
    for entry in OWN_SUBFOLDERS:
        path = os.path.join(root, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            removed += sum(len(files) for _, _, files in os.walk(path))
            shutil.rmtree(path)
    return removed


def _current_source_hash():
    from . import kernels
    return kernels.source_hash()


def _json_prefix(path, header_only=False):
    """The JSON object at the start of a cached file (its first line when ``header_only``), or
    None when it cannot be read."""
    import json
    with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
        data = read_trusted(path)
        if header_only:
            data = data.partition(b"\n")[0]
        value = json.loads(data)
        return value if isinstance(value, dict) else None
    return None


def entries():
    """What the cache holds, as a list of dicts: ``name`` (the entry, relative to the cache
    folder), ``files`` (paths), ``size`` (bytes), ``age`` (seconds since the newest file changed),
    ``kind``, and ``current``: True for kernels of the installed sources, False for other source
    versions (or unreadable entries), None for what belongs to no source version (compiler facts,
    lock and temporary files). Empty when there is no cache folder."""
    root = _checked_root("listing")
    if root is None:
        return []
    current_hash = _current_source_hash()
    groups = {}  # name -> [kind, files, source hash or True/None]

    def add(name, kind, path, source=None):
        group = groups.setdefault(name, [kind, [], source])
        group[1].append(path)
        if source is not None:
            group[0], group[2] = kind, source

    for sub in OWN_SUBFOLDERS:
        folder = os.path.join(root, sub)
        if not os.path.isdir(folder) or os.path.islink(folder):
            continue
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if not entry.is_file(follow_symlinks=False):
                continue
            name, path = entry.name, entry.path
            stem, ext = os.path.splitext(name)
            if name.startswith(".tmp-"):
                add(f"{sub}/{name}", "temporary file", path)
            elif sub == "host" and name.startswith("compiler_"):
                add(f"{sub}/{name}", "compiler facts", path)
            elif sub == "host" and ext in (".so", ".json", ".lock") and name.startswith("sru_host_"):
                stem = stem if ext != ".lock" else os.path.splitext(stem)[0]
                record = _json_prefix(os.path.join(folder, stem + ".json")) or {}
                add(f"{sub}/{stem}", "host library", path, record.get("source_hash", False))
            elif sub == "cupy" and (name.endswith(".bin") or name.endswith(".bin.lock")):
                binary = name[:-len(".lock")] if name.endswith(".lock") else name
                header = _json_prefix(os.path.join(folder, binary), header_only=True) or {}
                add(f"{sub}/{binary}", "CuPy binary", path, header.get("source_hash", False))
            elif sub == "ptx":
                manifest = _json_prefix(os.path.join(folder, "manifest.json")) or {}
                add(f"{sub}/", "PTX folder", path, manifest.get("source_hash", False))
            elif ext == ".lock":
                add(f"{sub}/{name}", "lock file", path)
            else:
                add(f"{sub}/{name}", "other file", path)
    now = time.time()
    listed = []
    for name, (kind, files, source) in sorted(groups.items()):
        content = [f for f in files if not f.endswith(".lock")]
        if not content:  # a lock left without what it locked: clean_stale's (when nobody holds it)
            kind, source = "lock file", None
        infos = [os.lstat(f) for f in content or files if os.path.lexists(f)]
        listed.append({
            "name": name, "kind": kind, "files": files,
            "size": sum(i.st_size for i in infos),
            "age": now - max((i.st_mtime for i in infos), default=now),
            "current": None if source is None else source == current_hash})
    return listed


def prune():
    """Removes the entries of other source versions (``current`` False in :func:`entries`), stale
    temporaries and lock files nobody holds. Returns the entries removed (as entries() lists
    them)."""
    removed = []
    for entry in entries():
        if entry["current"] is False:
            for path in entry["files"]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            removed.append(entry)
    root = _checked_root("pruning")
    stale = []
    for sub in OWN_SUBFOLDERS if root else ():
        folder = os.path.join(root, sub)
        if os.path.isdir(folder) and not os.path.islink(folder):
            stale += clean_stale(folder)
    for path in stale:
        removed.append({"name": os.path.relpath(path, root), "kind": "stale file", "files": [path],
                        "size": 0, "age": 0.0, "current": None})
    return removed

