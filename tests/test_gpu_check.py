"""The one-command GPU check (benchmarks/gpu_check.py, ``make gpu-check``) on this machine: its
stage runner (logs written as they come, the time limit), the whole-run budget, and a dry run
without a GPU, which must finish well within 2 minutes, say there is no GPU, run the report and
both test stages, leave the benchmark out, write its summary, and never import torch or CuPy in
the orchestrating process (a CUDA context there would lock the stages out in exclusive-process
mode)."""

import importlib.util
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from child_env import child_env

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


def test_a_silent_stage_is_stopped_at_its_time_limit_and_keeps_its_log(gpu_check, tmp_path):
    started = time.time()
    code, output = gpu_check._run("sleeper", [sys.executable, "-c",
                                              "import time; print('start', flush=True); "
                                              "time.sleep(60)"],
                                  str(tmp_path), "sleep.log", 1, None)
    assert time.time() - started < 30
    assert code != 0
    assert output.startswith("start\n") and "[gpu-check] sleeper stopped after 1 s" in output
    log = (tmp_path / "sleep.log").read_text()
    assert log.startswith("start\n") and "stopped after 1 s" in log


def test_a_stage_past_its_limit_is_stopped_with_the_processes_it_started(gpu_check, tmp_path):
    """A grandchild (a subprocess test, a start-up probe) must not outlive its stage: it would hold
    the GPU into the next stage, and its end of the output pipe would keep the stage reading."""
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open({str(pid_file)!r}, 'w').write(str(child.pid)); "
              "print('started', flush=True); time.sleep(120)")
    started = time.time()
    code, output = gpu_check._run("parent", [sys.executable, "-c", script], str(tmp_path),
                                  "parent.log", 2, None)
    assert time.time() - started < 30
    assert code != 0 and "stopped after 2 s" in output
    grandchild = int(pid_file.read_text())
    deadline = time.time() + 10
    while time.time() < deadline and _alive(grandchild):
        time.sleep(0.1)
    assert not _alive(grandchild), "the stage's grandchild outlived the stage"


def _alive(pid):
    """True while ``pid`` runs (a zombie, dead but not yet reaped by init, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_gpu_test_files_are_those_with_gpu_marks(gpu_check):
    files = gpu_check.gpu_test_files()
    for name in ("tests/test_launch_gpu.py", "tests/test_cupy_backend.py", "tests/test_ops.py",
                 "tests/test_modules_gpu.py"):
        assert name in files
    assert "tests/test_reference.py" not in files


def test_stage_limits_fit_the_budgets(gpu_check):
    for mode, budget in gpu_check.BUDGET.items():
        assert sum(gpu_check.STAGE_LIMITS[mode].values()) <= budget
    assert gpu_check.BUDGET["full"] < 360 and gpu_check.BUDGET["quick"] < 180


def _check_without_gpu(tmp_path, *args):
    """gpu_check.main in a fresh process that cannot import torch or cupy, with an nvidia-smi that
    finds no GPU first on PATH (as on a machine with the tools but no device) and no CUDA device
    visible to the stages."""
    out = tmp_path / "results"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    smi = fake_bin / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no devices were found' >&2\nexit 6\n")
    smi.chmod(0o755)
    code = textwrap.dedent(f"""
        import importlib.util, sys
        sys.modules["torch"] = None  # the orchestrator must not import them
        sys.modules["cupy"] = None
        spec = importlib.util.spec_from_file_location("gpu_check", {str(ROOT / "benchmarks" / "gpu_check.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.exit(module.main(["--out", {str(out)!r}, *{list(args)!r}]))
    """)
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=child_env(tmp_path / "cache", PATH=f"{fake_bin}:/usr/bin:/bin",
                                        CUDA_VISIBLE_DEVICES=""))
    return proc, out, time.time() - started


def test_dry_run_without_a_gpu(tmp_path):
    proc, out, seconds = _check_without_gpu(tmp_path)
    assert seconds < 120, f"the dry run took {seconds:.0f} s"
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0] == "device: no-gpu" and "mode: full" in summary
    assert any(line.startswith("GPU: none (nvidia-smi lists no GPU (exit 6: NVIDIA-SMI has failed")
               for line in summary), summary
    assert "environment: passed" in "\n".join(summary)
    assert any(line.startswith("gpu-tests: passed") and "skipped" in line for line in summary)
    assert any(line.startswith("cpu-smoke: passed") and " passed" in line for line in summary)
    assert "benchmark: not run (no GPU)" in summary
    assert (out / "info.txt").read_text().startswith("sru_cupy ")
    for name in ("gpu-tests.log", "gpu-junit.xml", "cpu-smoke.log", "cpu-junit.xml"):
        assert (out / name).is_file(), name
    assert not (out / "bench.json").exists()
    data = json.loads((out / "summary.json").read_text())
    assert data["gpus"] == [] and data["stages"]["gpu-tests"]["exit"] == 0
    assert "no GPU: nvidia-smi lists no GPU" in proc.stdout
    assert "NVIDIA-SMI has failed" in (out / "nvidia-smi.txt").read_text()


def test_a_spent_budget_stops_the_run_and_keeps_the_summary(tmp_path):
    proc, out, _ = _check_without_gpu(tmp_path, "--quick", "--budget", "8")
    assert proc.returncode == 1
    data = json.loads((out / "summary.json").read_text())
    statuses = {name: stage["status"] for name, stage in data["stages"].items()}
    assert data["mode"] == "quick"
    assert "not run (time budget spent)" in statuses.values() or \
        "stopped at its time limit" in statuses.values(), statuses
    assert data["total_seconds"] < 60
