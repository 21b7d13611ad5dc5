"""Shared pytest configuration: the `slow` and `gpu` markers and the --run-slow option.

- ``@pytest.mark.slow``: skipped with reason "slow; run with --run-slow" unless
  pytest is given ``--run-slow``.
- ``@pytest.mark.gpu``: needs CuPy and a CUDA device; skipped (with the reason)
  where either is missing. The check runs only when a gpu test is collected,
  so CPU-only runs never import CuPy.
"""

import functools
import os

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run tests marked slow",
    )


@pytest.fixture(scope="session", autouse=True)
def _private_kernel_cache(tmp_path_factory):
    """Kernels built by the tests go into a per-session temporary cache folder (inherited by the
    subprocesses tests start), unless the caller chose one with SRU_CUPY_CACHE_DIR."""
    if os.environ.get("SRU_CUPY_CACHE_DIR"):
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SRU_CUPY_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "sru_cupy_cache"))
        yield


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def torch_threads(request):
    """PyTorch's thread count for the test (sru_cupy.cpu_gemm's oneDNN route depends on it)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def pytest_configure(config):
    # Also declared in setup.cfg [tool:pytest]; repeated here so the markers are
    # known when pytest runs with another config file (or -c /dev/null).
    declared = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    if "slow" not in declared:
        config.addinivalue_line("markers", "slow: long-running test; skipped unless pytest is given --run-slow")
    if "gpu" not in declared:
        config.addinivalue_line("markers", "gpu: needs a CUDA GPU (and CuPy); skipped where none is present")


@functools.lru_cache(maxsize=None)
def _gpu_unavailable_reason():
    """None when CuPy can see a CUDA device, else why not."""
    try:
        import cupy  # noqa: F401  (imported only when a gpu test was collected)
    except Exception as exc:  # ImportError, or a CuPy build that fails to load
        return f"gpu: CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        return f"gpu: no CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return "gpu: no CUDA device"
    return None


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow")
    skip_slow = pytest.mark.skip(reason="slow; run with --run-slow")
    for item in items:
        if not run_slow and item.get_closest_marker("slow") is not None:
            item.add_marker(skip_slow)
        if item.get_closest_marker("gpu") is not None:
            reason = _gpu_unavailable_reason()
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
