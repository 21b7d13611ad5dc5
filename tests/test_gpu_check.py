"""The one-command GPU check (benchmarks/gpu_check.py, ``make gpu-check``) and its smoke script
(benchmarks/gpu_smoke.py) on this machine: the stage runner (logs written as they come, the time
limit, SIGINT so that pytest still writes its junit file and summary), the order and split of the
GPU tests, the budgets, the archive that --out receives (rewritten after every stage), the smoke
script's runner and its checks' own code with CuPy replaced by NumPy, and a dry run without a GPU,
which must say there is no GPU and what it would run, run the report, the smoke script (every GPU
check skipped) and the test stages, leave the benchmark out, leave at most 8 files in --out, and
never import torch or CuPy in the orchestrating process (a CUDA context there would lock the
stages out in exclusive-process mode)."""

import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from child_env import child_env

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _load("gpu_check")


@pytest.fixture(scope="module")
def gpu_smoke():
    return _load("gpu_smoke")


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
    assert output.startswith("start\n") and "[gpu-check] sleeper stopped after 1 s (SIGINT" in output
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


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_a_pytest_stage_past_its_limit_keeps_its_junit_file_and_summary_line(tmp_path, sigint):
    """Stopped with SIGINT, pytest raises KeyboardInterrupt, writes its junit file and summary
    line and exits 2 (SIGTERM would end it with neither). Also when the runner was started with
    SIGINT ignored, as a shell starts a background job: the stage must not inherit that."""
    tests = tmp_path / "test_sleepy.py"
    tests.write_text("import time\n\ndef test_fast():\n    pass\n\n"
                     "def test_slow():\n    time.sleep(120)\n")
    junit = tmp_path / "junit.xml"
    script = textwrap.dedent(f"""
        import importlib.util, json, signal, sys
        if {sigint == "ignored"!r}:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        spec = importlib.util.spec_from_file_location("gpu_check", {str(ROOT / "benchmarks" / "gpu_check.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                   "--junitxml", {str(junit)!r}, {str(tests)!r}]
        code, output = module._run("sleepy", command, {str(tmp_path)!r}, "sleepy.log", 15, None)
        print("RESULT " + json.dumps([code, module._pytest_counts(output)]))
    """)
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=child_env())
    assert time.time() - started < 60
    assert proc.returncode == 0, proc.stderr[-2000:]
    code, counts = json.loads(proc.stdout.rsplit("RESULT ", 1)[1])
    assert code == 2, proc.stdout[-2000:]  # pytest's exit status for an interrupted run
    assert counts.startswith("1 passed"), counts
    log = (tmp_path / "sleepy.log").read_text()
    assert "KeyboardInterrupt" in log and re.search(r"^=+ 1 passed in ", log, re.MULTILINE), log
    assert "[gpu-check] sleepy stopped after 15 s (SIGINT" in log
    cases = [case.get("name") for case in ElementTree.parse(junit).iter("testcase")]
    assert "test_fast" in cases, cases


def test_gpu_test_files_are_those_with_gpu_marks(gpu_check):
    files = gpu_check.gpu_test_files()
    for name in ("tests/test_launch_gpu.py", "tests/test_cupy_backend.py", "tests/test_ops.py",
                 "tests/test_modules_gpu.py"):
        assert name in files
    assert "tests/test_reference.py" not in files


def test_gpu_test_stages_run_the_launch_layer_first_and_the_sweeps_last(gpu_check):
    split = gpu_check.gpu_test_stages()
    assert list(split) == ["gpu-launch", "gpu-modules", "gpu-streams", "gpu-sweeps"]
    assert split["gpu-launch"] == (["tests/test_cupy_backend.py", "tests/test_launch_gpu.py"],
                                   None)
    files = gpu_check.gpu_test_files()
    others = [f for f in files if f not in split["gpu-launch"][0]]
    for name in ("gpu-modules", "gpu-streams", "gpu-sweeps"):
        assert sorted(split[name][0]) == sorted(others)
    assert split["gpu-modules"][0][0] == "tests/test_modules_gpu.py"
    assert [stage.name for stage in gpu_check.stages("full", "/r")] == list(
        gpu_check.STAGE_LIMITS["full"])


def test_stage_limits_fit_the_budgets(gpu_check):
    for mode, budget in gpu_check.BUDGET.items():
        assert sum(gpu_check.STAGE_LIMITS[mode].values()) <= budget
        # the quick stages are the full run's, in the same order
        assert [n for n in gpu_check.STAGE_LIMITS["full"] if n in gpu_check.STAGE_LIMITS[mode]] \
            == list(gpu_check.STAGE_LIMITS[mode])
    # a loan of 15 minutes, machine start included; a command may run 10 minutes
    assert gpu_check.BUDGET["full"] + gpu_check.STOP_GRACE <= 540
    assert gpu_check.BUDGET["quick"] + gpu_check.STOP_GRACE <= 270
    assert gpu_check.STAGE_LIMITS["full"]["smoke"] <= 90


@pytest.mark.parametrize("available", [True, False])
def test_the_test_stages_get_a_per_test_limit_where_pytest_timeout_is_importable(gpu_check,
                                                                                available):
    timeout = 60 if available else None
    plan = {stage.name: stage for stage in gpu_check.stages("full", "/r", per_test_timeout=timeout)}
    for name in ("gpu-launch", "gpu-modules", "gpu-streams", "gpu-sweeps"):
        command = plan[name].command(100)
        has_limit = "-p timeout --timeout 60" in " ".join(command)
        assert has_limit == available, command
        assert ("pytest-timeout is not importable" in plan[name].header) == (not available)
        assert command[command.index("--junitxml") + 1] == f"/r/{name}-junit.xml"
    smoke = plan["smoke"].command(90)
    assert smoke[-2:] == ["--budget", "85"] and smoke[1].endswith("benchmarks/gpu_smoke.py")
    assert plan["benchmark"].needs_gpu and not plan["gpu-launch"].needs_gpu


def test_plan_lists_every_stage_and_runs_nothing(tmp_path):
    for args, absent in (([], []), (["--quick"], ["gpu-sweeps", "cpu-smoke"])):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--plan",
                               *args], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                              env=child_env())
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].startswith(f"plan ({'quick' if args else 'full'}, budget ")
        for name in ("environment", "smoke", "gpu-launch", "gpu-modules", "gpu-streams",
                     "benchmark", "gpu-sweeps", "cpu-smoke"):
            line = next(line for line in lines if line.split()[0] == name)
            assert ("not run with --quick" in line) == (name in absent), line
        assert "-m sru_cupy bench --device cuda" in proc.stdout
        assert not list(tmp_path.iterdir())


def test_pack_writes_the_folder_under_one_name_and_shortens_large_files(gpu_check, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "small.log").write_text("small\n")
    big = b"".join(b"%09d\n" % i for i in range(gpu_check.MEMBER_LIMIT // 5))  # 2x the limit
    (work / "big.log").write_bytes(big)
    (work / "half-written.json.tmp").write_text("{")
    archive = tmp_path / "out.tar.gz"
    gpu_check.pack(str(work), str(archive), "H200-2026-01-01")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        shortened = tar.extractfile("H200-2026-01-01/big.log").read()
        assert tar.extractfile("H200-2026-01-01/small.log").read() == b"small\n"
    assert sorted(names) == ["H200-2026-01-01/big.log", "H200-2026-01-01/small.log"]
    assert len(shortened) < gpu_check.MEMBER_LIMIT + 200
    assert shortened.startswith(big[:gpu_check.MEMBER_LIMIT // 4])
    assert shortened.endswith(big[-(gpu_check.MEMBER_LIMIT * 3 // 4):])
    assert b"bytes of this %d-byte file left out" % len(big) in shortened
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_the_archive_and_summary_are_rewritten_after_every_stage(gpu_check, tmp_path,
                                                                 monkeypatch):
    """A run stopped in its fourth stage (the loan ends, say) still leaves in --out the archive of
    everything before it, the summary saying so, and nothing else."""
    out = tmp_path / "out"
    seen = {}

    def stage(label, command, work_dir, log_name, timeout, env, header=""):
        archive = out / gpu_check.ARCHIVE
        with tarfile.open(archive) as tar:
            seen[label] = sorted(Path(name).name for name in tar.getnames())
        Path(work_dir, log_name).write_text(f"{label} ran\n")
        if label == "gpu-streams":
            raise KeyboardInterrupt
        return 0, "1 passed in 0.1s\n"

    monkeypatch.setattr(gpu_check, "_run", stage)
    monkeypatch.setattr(gpu_check, "_stop_on_sigterm", lambda: None)  # not in pytest's process
    monkeypatch.setattr(gpu_check, "find_gpus", lambda: (["NVIDIA H200"], None))
    monkeypatch.setattr(gpu_check, "_environment_files",
                        lambda work_dir, env: Path(work_dir, "nvidia-smi.txt").write_text("smi\n"))
    assert gpu_check.main(["--out", str(out)]) == 1
    assert seen["environment"] == ["gpu-check.log", "nvidia-smi.txt", "summary.json",
                                   "summary.txt"]
    assert seen["gpu-launch"] == ["gpu-check.log", "info.txt", "nvidia-smi.txt", "smoke.log",
                                  "summary.json", "summary.txt"]
    assert "gpu-launch.log" in seen["gpu-modules"] and "gpu-modules.log" in seen["gpu-streams"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.tar.gz", "summary.json",
                                                     "summary.txt"]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["environment", "smoke", "gpu-launch", "gpu-modules",
                                       "gpu-streams"]
    assert summary["stages"]["gpu-streams"]["status"] == "interrupted: the run was stopped"
    assert summary["device"] == "NVIDIA-H200" and "total_seconds" in summary
    top = f"NVIDIA-H200-{datetime.date.today().isoformat()}"
    with tarfile.open(out / gpu_check.ARCHIVE) as tar:
        assert f"{top}/gpu-streams.log" in tar.getnames()  # what the stopped stage printed
        assert json.loads(tar.extractfile(f"{top}/summary.json").read()) == summary
        runner_log = tar.extractfile(f"{top}/gpu-check.log").read().decode()
    assert "plan (full, budget 520 s" in runner_log and "gpu-modules: passed" in runner_log


def test_a_terminated_run_stops_its_stage_and_writes_its_summary_and_archive(tmp_path):
    """SIGTERM to the check (a runner's time limit, say) during a stage: the stage is stopped
    with SIGINT, and the summary and archive are written once more, with that stage's log."""
    proc = _start_without_gpu(tmp_path)
    out = tmp_path / "results"
    deadline = time.time() + 200
    try:
        while time.time() < deadline:  # wait until the gpu-launch stage has started
            summary = out / "summary.json"
            if summary.is_file() and "smoke" in json.loads(summary.read_text())["stages"]:
                break
            time.sleep(0.2)
        time.sleep(2)
        proc.terminate()
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, stdout[-3000:]
    assert "== gpu-launch: interrupted (signal 15); the run ends here" in stdout
    data = json.loads((out / "summary.json").read_text())
    assert "total_seconds" in data
    assert list(data["stages"]) == ["environment", "smoke", "gpu-launch"]
    assert data["stages"]["gpu-launch"]["status"] == "interrupted: the run was stopped"
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        names = [Path(name).name for name in tar.getnames()]
        top = Path(tar.getnames()[0]).parts[0]
        log = tar.extractfile(f"{top}/gpu-launch.log").read().decode()
    assert "smoke.log" in names and "gpu-launch.log" in names
    assert "[gpu-check] gpu-launch stopped" not in log  # stopped by the run's end, not its limit
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.tar.gz", "summary.json",
                                                     "summary.txt"]


def _start_without_gpu(tmp_path, *args):
    """gpu_check.main started in a fresh process that cannot import torch or cupy, with an
    nvidia-smi that finds no GPU first on PATH (as on a machine with the tools but no device)
    and no CUDA device visible to the stages; stdout and stderr together."""
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
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=child_env(tmp_path / "cache", PATH=f"{fake_bin}:/usr/bin:/bin",
                                          CUDA_VISIBLE_DEVICES=""))


def _check_without_gpu(tmp_path, *args):
    """Runs the check as _start_without_gpu starts it: (the finished process, its output as
    stdout; the --out folder; seconds)."""
    started = time.time()
    proc = _start_without_gpu(tmp_path, *args)
    try:
        output, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    return (subprocess.CompletedProcess(proc.args, proc.returncode, output),
            tmp_path / "results", time.time() - started)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run without a GPU, its archive unpacked into ``unpacked``."""
    tmp_path = tmp_path_factory.mktemp("dry-run")
    proc, out, seconds = _check_without_gpu(tmp_path)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    if (out / "gpu-check.tar.gz").is_file():
        with tarfile.open(out / "gpu-check.tar.gz") as tar:
            tar.extractall(unpacked, filter="data")
    return proc, out, seconds, unpacked


def test_dry_run_without_a_gpu(dry_run, gpu_check):
    proc, out, seconds, unpacked = dry_run
    # 4 GPU test stages, each collecting the test modules (about 10 s apiece on 2 shared cores)
    assert seconds < 150, f"the dry run took {seconds:.0f} s"
    assert proc.returncode == 2, proc.stdout[-6000:]
    # --out gets three files, far within what a loan returns (8 files, 2 folders down)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["gpu-check.tar.gz", "summary.json", "summary.txt"]
    assert len(files) <= 8 and all(p.stat().st_size < 16 << 20 for p in files)
    top = f"no-gpu-{datetime.date.today().isoformat()}"
    assert [p.name for p in unpacked.iterdir()] == [top]
    run = unpacked / top

    summary = (out / "summary.txt").read_text().splitlines()
    assert (run / "summary.txt").read_text().splitlines() == summary
    assert summary[0] == "device: no-gpu" and "mode: full (budget 520 s)" in summary
    assert any(line.startswith("GPU: none (nvidia-smi lists no GPU (exit 6: NVIDIA-SMI has failed")
               for line in summary), summary
    assert "environment: passed" in "\n".join(summary)
    assert any(line.startswith("smoke: passed") and "1 passed, 0 failed, 11 skipped" in line
               for line in summary), summary
    for name in ("gpu-launch", "gpu-modules", "gpu-streams", "gpu-sweeps"):
        assert any(line.startswith(f"{name}: passed") and "skipped" in line
                   for line in summary), (name, summary)
    assert any(line.startswith("cpu-smoke: passed") and " passed" in line for line in summary)
    assert "benchmark: not run (no GPU)" in summary

    assert (run / "info.txt").read_text().startswith("sru_cupy ")
    for name in ("gpu-launch", "gpu-modules", "gpu-streams", "gpu-sweeps"):
        assert (run / f"{name}-junit.xml").is_file(), name
        log = (run / f"{name}.log").read_text()
        timeout_note = "pytest-timeout is not importable" in log.splitlines()[0]
        assert timeout_note != gpu_check.pytest_timeout_available(), log[:300]
    for name in ("cpu-smoke.log", "cpu-junit.xml", "nvidia-smi.txt", "packages.txt",
                 "gpu-check.log", "summary.json"):
        assert (run / name).is_file(), name
    assert not (run / "bench.json").exists()
    data = json.loads((out / "summary.json").read_text())
    assert data["gpus"] == [] and data["stages"]["gpu-launch"]["exit"] == 0
    assert "NVIDIA-SMI has failed" in (run / "nvidia-smi.txt").read_text()
    assert "pytest" in (run / "packages.txt").read_text()

    # it says what it would run
    assert "no GPU: nvidia-smi lists no GPU" in proc.stdout
    assert "plan (full, budget 520 s" in proc.stdout
    assert re.search(r"benchmark: not run \(no GPU\); with one it would run: \S+ -m sru_cupy "
                     r"bench --device cuda", proc.stdout)
    runner_log = (run / "gpu-check.log").read_text()
    assert "plan (full, budget 520 s" in runner_log and "with one it would run" in runner_log

    # the smoke script ran and skipped every GPU check, saying why
    smoke = (run / "smoke.log").read_text()
    assert "PASS versions: " in smoke and "torch.export.Dim.AUTO: " in smoke
    for name in ("kernels", "dtype-float32", "dtype-float64", "dtype-float16", "dtype-bfloat16",
                 "capture-cold", "capture-unlaunched", "thread-capture", "memcheck",
                 "compile-default", "compile-reduce-overhead"):
        assert re.search(rf"^SKIP {name}: no GPU: ", smoke, re.MULTILINE), name
    assert smoke.rstrip().endswith("smoke: 1 passed, 0 failed, 11 skipped")


def test_every_gpu_test_runs_in_exactly_one_stage(dry_run, gpu_check):
    """The dry run's junit files (every GPU test is collected, and skipped, there) against one
    collection of all the GPU tests: none lost, none run twice."""
    _, _, _, unpacked = dry_run
    run = next(unpacked.iterdir())
    by_stage = {}
    for name in ("gpu-launch", "gpu-modules", "gpu-streams", "gpu-sweeps"):
        cases = [(case.get("classname"), case.get("name"))
                 for case in ElementTree.parse(run / f"{name}-junit.xml").iter("testcase")]
        assert cases, name
        by_stage[name] = cases
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p",
         "no:cacheprovider", *gpu_check.gpu_test_files()],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=child_env())
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    expected = sorted((path[:-3].replace("/", "."), name)
                      for path, name in (node.split("::", 1) for node in ids))
    found = sorted(case for cases in by_stage.values() for case in cases)
    assert len(expected) > 500 and found == expected
    assert {c for c, _ in by_stage["gpu-launch"]} == {"tests.test_cupy_backend",
                                                       "tests.test_launch_gpu"}
    assert all(name.startswith(("test_against_reference", "test_gpu_gradcheck"))
               for _, name in by_stage["gpu-sweeps"])
    assert any("graph" in name for _, name in by_stage["gpu-streams"])


def test_a_spent_budget_stops_the_run_and_keeps_the_summary(tmp_path):
    proc, out, _ = _check_without_gpu(tmp_path, "--quick", "--budget", "20")
    assert proc.returncode == 1
    data = json.loads((out / "summary.json").read_text())
    statuses = {name: stage["status"] for name, stage in data["stages"].items()}
    assert data["mode"] == "quick"
    assert "not run (time budget spent)" in statuses.values() or \
        "stopped at its time limit" in statuses.values(), statuses
    assert statuses["gpu-sweeps"] == statuses["cpu-smoke"] == "not run (--quick)"
    assert data["total_seconds"] < 60
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        assert any(name.endswith("/summary.json") for name in tar.getnames())


# -- the smoke script ----------------------------------------------------------------------------


def test_smoke_runner_reports_crashes_and_stops_and_carries_on(gpu_smoke, capsys):
    runner = gpu_smoke.Runner(budget=60)
    py = sys.executable
    runner.run([py, "-c", "print('PASS a: fine')"], ["a"], 10)
    runner.run([py, "-c", "print('PASS b1: fine', flush=True); raise SystemExit(3)"],
               ["b1", "b2"], 10)
    started = time.time()
    runner.run([py, "-c", "import time; print('working', flush=True); time.sleep(60)"], ["c"], 2)
    assert time.time() - started < 20
    runner.run([py, "-c", "print('SKIP d: no GPU')"], ["d"], 10)
    runner.run([py, "-c", "import time; print('PASS e: fine', flush=True); time.sleep(60)"],
               ["e"], 2)
    printed = capsys.readouterr().out
    assert "PASS a: fine" in printed and "PASS b1: fine" in printed
    # each check's time, and whether it was stopped (after all its results, or before)
    assert re.search(r"^-- a: [\d.]+ s$", printed, re.MULTILINE), printed
    assert re.search(r"^-- b1, b2: [\d.]+ s$", printed, re.MULTILINE), printed
    assert re.search(r"^-- c: [\d.]+ s \(stopped\)$", printed, re.MULTILINE), printed
    assert re.search(r"^-- e: [\d.]+ s \(stopped at its limit after reporting every result\)$",
                     printed, re.MULTILINE), printed
    assert re.search(r"^FAIL b2: exit 3 without a result after [\d.]+ s; last line: PASS b1: fine$",
                     printed, re.MULTILINE), printed
    # the check's own lines, then (after its traceback from SIGINT) the stop
    assert printed.index("working\n") < printed.index("FAIL c: stopped after 2 s (limit")
    assert runner.counts == {"PASS": 3, "FAIL": 2, "SKIP": 1}

    spent = gpu_smoke.Runner(budget=0)
    spent.check("kernels", ["kernels"], 60)
    assert "SKIP kernels: not run: the smoke budget of 0 s is spent" in capsys.readouterr().out
    assert spent.counts["SKIP"] == 1


_FAKE_CUPY = """
import os
import numpy as np

_PERTURB = os.environ.get("FAKE_CUPY_PERTURB") == "1"


def asarray(array):
    array = np.array(array, copy=True)
    if _PERTURB and array.dtype.kind == "f":
        array = (array * 1.05).astype(array.dtype)
    return array


def asnumpy(array):
    return np.asarray(array)


class _Waitable:
    def __init__(self, *args):
        pass

    def synchronize(self):
        pass


class cuda:
    Device = _Waitable

    class runtime:
        @staticmethod
        def getDeviceCount():
            return 1

    @staticmethod
    def get_current_stream():
        return _Waitable()

    @staticmethod
    def set_allocator(allocator):
        pass
"""


@pytest.fixture
def numpy_as_cupy(tmp_path):
    """An environment whose ``cupy`` is NumPy under CuPy's names: the launch layer then runs the
    host build on both sides, so the checks' own code runs here, on the CPU."""
    fake = tmp_path / "fake"
    (fake / "cupy").mkdir(parents=True)
    (fake / "cupy" / "__init__.py").write_text(_FAKE_CUPY)
    return child_env(PYTHONPATH=os.pathsep.join([str(fake), str(ROOT)]))


@pytest.mark.parametrize("perturbed", [False, True])
def test_smoke_dtype_check_compares_every_dtype_against_the_host_build(numpy_as_cupy, perturbed):
    env = dict(numpy_as_cupy, FAKE_CUPY_PERTURB="1" if perturbed else "0")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--child",
                           "dtypes"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for dtype in ("float32", "float64", "float16", "bfloat16"):
        line = next(line for line in proc.stdout.splitlines()
                    if line.startswith(("PASS", "FAIL")) and f" dtype-{dtype}: " in line)
        if perturbed:  # the "device" copies are 5 % off: every dtype must notice
            assert line.startswith(f"FAIL dtype-{dtype}: ") and "differ from the host" in line, line
        else:
            assert line.startswith(f"PASS dtype-{dtype}: forward and backward"), line
            assert "worst " in line


def test_memcheck_target_runs_every_dtype_and_variant(numpy_as_cupy):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_memcheck.py")],
                          capture_output=True, text=True, timeout=300, env=numpy_as_cupy)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "memcheck target: done, 48 launches"
