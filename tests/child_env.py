"""The environment of a child Python process started by a test, with the checkout importable."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_KEEP = object()


def child_env(cache=_KEEP, **changes):
    """This process's environment with the checkout first on PYTHONPATH; ``cache`` the kernel cache
    folder (None unsets SRU_CUPY_CACHE_DIR; not given: as it is here), then ``changes`` (a value of
    None removes the variable)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    if cache is not _KEEP:
        env.pop("SRU_CUPY_CACHE_DIR", None)
        if cache is not None:
            env["SRU_CUPY_CACHE_DIR"] = str(cache)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env
