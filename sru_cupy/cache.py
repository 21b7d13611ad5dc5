"""The on-disk cache of compiled kernels (host shared libraries, PTX written by the package).

Location: ``$SRU_CUPY_CACHE_DIR``, else ``$XDG_CACHE_HOME/sru_cupy``, else ``~/.cache/sru_cupy``.
Folders are created private (mode 0700) and files are written atomically (a temporary file in the
same folder, then ``os.replace``), so a reader never sees a half-written file and concurrent
writers of the same content all end with one complete file.
"""

import os
import tempfile

ENV_VAR = "SRU_CUPY_CACHE_DIR"


def cache_root():
    """The cache folder's path (not created)."""
    if os.environ.get(ENV_VAR):
        return os.path.abspath(os.path.expanduser(os.environ[ENV_VAR]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sru_cupy")


def cache_dir(*parts):
    """A sub-folder of the cache, created with mode 0700 if it does not exist."""
    path = os.path.join(cache_root(), *parts)
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
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def clear():
    """Removes every file and folder inside the cache folder; returns the number of files removed."""
    import shutil
    root = cache_root()
    if not os.path.isdir(root):
        return 0
    removed = 0
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            removed += sum(len(files) for _, _, files in os.walk(path))
            shutil.rmtree(path)
        else:
            os.unlink(path)
            removed += 1
    return removed
