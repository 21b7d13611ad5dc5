"""The one-command GPU check (benchmarks/gpu_check.py, ``make gpu-check``) run on this machine: its
stages, logs, summary and exit status, and the stage time limit. On a machine without a GPU the
benchmark stage must fail with the reason, and the check with it."""

import importlib.util
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_output_is_logged_and_returned(gpu_check, tmp_path):
    code, output = gpu_check._run("echo", [sys.executable, "-c", "print('one'); print('two')"],
                                  str(tmp_path), "echo.log", 60, None)
    assert code == 0 and output == "one\ntwo\n"
    assert (tmp_path / "echo.log").read_text() == "one\ntwo\n"


def test_a_silent_stage_is_stopped_at_its_time_limit(gpu_check, tmp_path):
    started = time.time()
    code, output = gpu_check._run("sleeper", [sys.executable, "-c",
                                              "import time; print('start', flush=True); "
                                              "time.sleep(60)"],
                                  str(tmp_path), "sleep.log", 1, None)
    assert time.time() - started < 30
    assert code != 0
    assert output.startswith("start\n") and "[gpu-check] sleeper stopped after 1 s" in output
    assert "stopped after 1 s" in (tmp_path / "sleep.log").read_text()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="the check's benchmark stage needs torch")
def test_check_writes_logs_and_summary(gpu_check, tmp_path, capsys):
    import torch
    out = tmp_path / "results"
    code = gpu_check.main(["--out", str(out),
                           "--pytest-args", "tests/test_info.py -k device_name -p no:cacheprovider"])
    for name in ("info.txt", "pytest.log", "junit.xml", "bench.log", "summary.txt"):
        assert (out / name).is_file(), name
    assert (out / "info.txt").read_text().startswith("sru_cupy ")
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0] == f"device: {gpu_check._device_slug()}"
    assert "tests: exit 0: 1 passed" in summary[2], summary
    assert "environment report: exit 0" in summary
    if torch.cuda.is_available():
        assert "benchmark: exit 0" in summary and code == 0
        assert (out / "bench.json").is_file()
    else:  # no GPU: the benchmark stage says why, and the check fails
        assert "benchmark: exit 1" in summary and code == 1
        assert "PyTorch sees no CUDA device" in (out / "bench.log").read_text()
