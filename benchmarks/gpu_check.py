#!/usr/bin/env python3
"""One-command GPU check, sized for a short loan of a GPU machine: the environment report, every
GPU-marked test plus a small CPU smoke set, then the GPU benchmark, with logs and results written
to one folder as each stage goes.

    make gpu-check                                # results in benchmarks/results/<device>-<date>/
    make gpu-check GPU_CHECK_ARGS=--quick         # the short version (< 3 minutes)
    make gpu-check GPU_CHECK_OUT=/some/folder     # or SRU_CUPY_GPU_CHECK_OUT=/some/folder

Stages and what they write (each stage has a time limit, and all together a budget: 345 s, or
170 s with --quick, so the whole run stays under 6 minutes, or 3; a stage past its limit is
stopped and what it wrote stays):

  environment  info.txt (python -m sru_cupy info), nvidia-smi.txt
  gpu-tests    gpu-tests.log, gpu-junit.xml: every test marked gpu (--quick: without gradcheck
               and the launch layer's case sweep)
  cpu-smoke    cpu-smoke.log, cpu-junit.xml: the backend, errors, info and functional CPU tests
  benchmark    bench.log, bench.json, bench.md, bench.png (python -m sru_cupy bench)
  summary.txt and summary.json, rewritten after every stage.

This process never initialises CUDA (under exclusive-process compute mode it would lock the
stages out): the GPU is found with nvidia-smi, and everything that touches CUDA runs in a child.
Without a GPU the check still runs the report and the tests (the GPU ones skip), says there is no
GPU, leaves the benchmark out, and exits with 2. Meant for a GPU machine where torch, cupy and
pytest are installed and nothing can be downloaded: it runs from the source tree (the repository
root on PYTHONPATH) and installs nothing. Exit status: 0 when every stage passed on a GPU, 1 when a
stage failed or was stopped, 2 when there is no GPU.
"""

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Whole-run budgets in seconds (the loan of a GPU machine is minutes).
BUDGET = {"full": 345, "quick": 170}
#: Per-stage limits in seconds, within the budget.
STAGE_LIMITS = {
    "full": {"environment": 30, "gpu-tests": 160, "cpu-smoke": 35, "benchmark": 120},
    "quick": {"environment": 20, "gpu-tests": 70, "cpu-smoke": 20, "benchmark": 60},
}
#: The CPU smoke set: fast tests of the code the GPU path goes through.
CPU_SMOKE = ["tests/test_errors.py", "tests/test_cupy_backend.py", "tests/test_info.py",
             "tests/test_functional.py"]
#: Benchmark arguments (python -m sru_cupy bench ...).
BENCH_ARGS = {
    "full": ["--repeats", "20", "--warmup", "5"],
    "quick": ["--config", "L128-B32-d512", "--config", "L256-B64-d1024", "--dtype", "float32",
              "--dtype", "bfloat16", "--repeats", "10", "--warmup", "3"],
}
_GPU_MARK = re.compile(r"pytest\.mark\.gpu|pytest\.param\([^)]*marks=pytest\.mark\.gpu")


def _stop_group(process, grace=5.0):
    """SIGTERM to the process group of ``process`` (pytest then still writes its junit file), and
    SIGKILL to what is left after ``grace`` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _run(label, command, out_dir, log_name, timeout, env):
    """Runs a command, teeing its output line by line to out_dir/log_name; returns (returncode,
    output). A command still running after ``timeout`` seconds is killed (whether or not it is
    printing)."""
    print(f"== {label}: {' '.join(command)}", flush=True)
    started = time.time()
    log_path = os.path.join(out_dir, log_name)
    with open(log_path, "w") as log:
        # A session of its own, so that a stage past its limit is stopped with everything it
        # started (subprocess tests, the benchmark's start-up probes), which would otherwise hold
        # the GPU into the next stage.
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1,
                                   start_new_session=True)
        timed_out = threading.Event()

        def stop():
            timed_out.set()
            _stop_group(process)

        timer = threading.Timer(timeout, stop)
        timer.start()
        output = []
        try:
            for line in process.stdout:
                sys.stdout.write(line)
                log.write(line)
                log.flush()  # a stage stopped later still leaves what it printed
                output.append(line)
        finally:
            returncode = process.wait()
            timer.cancel()
        if timed_out.is_set():
            note = f"[gpu-check] {label} stopped after {timeout} s\n"
            log.write("\n" + note)
            output.append(note)
    print(f"== {label}: exit {returncode} in {time.time() - started:.0f} s", flush=True)
    return returncode, "".join(output)


def find_gpus():
    """Names of the GPUs nvidia-smi lists (no CUDA context is made), or [] and why not."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], "nvidia-smi not found"
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return [], f"nvidia-smi failed: {error}"
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not names:
        return [], f"nvidia-smi lists no GPU (exit {out.returncode}: {out.stderr.strip()[:200]})"
    return names, None


def _device_slug(gpus):
    return re.sub(r"[^A-Za-z0-9]+", "-", gpus[0]).strip("-") if gpus else "no-gpu"


def gpu_test_files():
    """The test modules that hold GPU-marked tests (collecting only these is quicker)."""
    files = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        with open(path, encoding="utf-8") as f:
            if _GPU_MARK.search(f.read()):
                files.append(os.path.relpath(path, ROOT))
    return files


def _pytest_counts(output):
    counts = re.findall(r"^=*\s*(.*(?:passed|failed|error|skipped|deselected|no tests ran).*?)\s*=*$",
                        output, re.MULTILINE)
    return counts[-1] if counts else "no summary line"


class Summary:
    """summary.txt / summary.json, rewritten after every stage."""

    def __init__(self, out_dir, mode, gpus, why_none):
        self.out_dir = out_dir
        self.data = {"mode": mode, "device": _device_slug(gpus), "gpus": gpus,
                     "date": datetime.datetime.now().isoformat(timespec="seconds"), "stages": {}}
        if not gpus:
            self.data["no_gpu"] = why_none
        self.write()

    def stage(self, name, **fields):
        self.data["stages"][name] = fields
        self.write()

    def lines(self):
        d = self.data
        out = [f"device: {d['device']}", f"date: {d['date']}", f"mode: {d['mode']}"]
        out.append(f"GPU: {', '.join(d['gpus'])}" if d["gpus"]
                   else f"GPU: none ({d['no_gpu']}): the GPU tests skip and the benchmark is left out")
        for name, s in d["stages"].items():
            text = f"{name}: {s['status']}"
            if "seconds" in s:
                text += f" in {s['seconds']:.0f} s"
            if s.get("detail"):
                text += f": {s['detail']}"
            out.append(text)
        if "total_seconds" in d:
            out.append(f"total: {d['total_seconds']:.0f} s")
        return out

    def write(self):
        from_here = os.path.join(self.out_dir, "summary")
        with open(from_here + ".txt.tmp", "w") as f:
            f.write("\n".join(self.lines()) + "\n")
        os.replace(from_here + ".txt.tmp", from_here + ".txt")
        with open(from_here + ".json.tmp", "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(from_here + ".json.tmp", from_here + ".json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("SRU_CUPY_GPU_CHECK_OUT"),
                        help="results folder (default benchmarks/results/<device>-<date>)")
    parser.add_argument("--quick", action="store_true",
                        help="the short check: fewer benchmark configurations and repeats, no "
                             "gradcheck (under 3 minutes)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default 345, or 170 with --quick)")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments (both test stages)")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    budget = args.budget if args.budget is not None else BUDGET[mode]
    started = time.time()
    gpus, why_none = find_gpus()
    out_dir = args.out or os.path.join(
        ROOT, "benchmarks", "results", f"{_device_slug(gpus)}-{datetime.date.today().isoformat()}")
    os.makedirs(out_dir, exist_ok=True)
    print(f"GPU: {', '.join(gpus)}" if gpus else f"no GPU: {why_none}", flush=True)
    summary = Summary(out_dir, mode, gpus, why_none)
    cache = tempfile.mkdtemp(prefix="sru_cupy-gpu-check-")  # one kernel cache for every stage
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
        PYTHONUNBUFFERED="1", SRU_CUPY_CACHE_DIR=cache)
    py = sys.executable
    extra = args.pytest_args.split()
    failed = False

    def limit(stage):
        left = budget - (time.time() - started)
        return max(1, int(min(STAGE_LIMITS[mode][stage], left)))

    def run_stage(name, command, log_name, parse=None):
        nonlocal failed
        if budget - (time.time() - started) < 5:
            summary.stage(name, status="not run (time budget spent)")
            failed = True
            return
        t0 = time.time()
        rc, output = _run(name, command, out_dir, log_name, limit(name), env)
        stopped = f"[gpu-check] {name} stopped after" in output
        status = "stopped at its time limit" if stopped else ("passed" if rc == 0 else f"exit {rc}")
        failed |= rc != 0
        summary.stage(name, status=status, exit=rc, seconds=time.time() - t0,
                      detail=parse(output) if parse else "")

    try:
        if shutil.which("nvidia-smi"):
            with open(os.path.join(out_dir, "nvidia-smi.txt"), "w") as f:
                try:
                    subprocess.run(["nvidia-smi"], stdout=f, stderr=subprocess.STDOUT, timeout=30)
                except (OSError, subprocess.SubprocessError) as error:
                    f.write(f"\n[gpu-check] nvidia-smi failed: {error}\n")
        run_stage("environment", [py, "-m", "sru_cupy", "info"], "info.txt")
        # --quick leaves out gradcheck and the launch layer's case sweep (the op-level oracle
        # tests still compare every option against the reference on the GPU).
        deselect = (["-k", "not gradcheck and not test_cupy_backend_against_reference"]
                    if args.quick else [])
        # -v: one line per test as it finishes (a stopped stage still says which ran);
        # --durations: what to trim when a loan is shorter.
        run_stage("gpu-tests", [py, "-m", "pytest", "-v", "-rs", "--durations=15", "-m", "gpu",
                                "-p", "no:cacheprovider",
                                "--junitxml", os.path.join(out_dir, "gpu-junit.xml"), *deselect,
                                *gpu_test_files(), *extra], "gpu-tests.log", _pytest_counts)
        run_stage("cpu-smoke", [py, "-m", "pytest", "-q", "-m", "not gpu and not slow", "-p",
                                "no:cacheprovider", "--junitxml",
                                os.path.join(out_dir, "cpu-junit.xml"), *CPU_SMOKE, *extra],
                  "cpu-smoke.log", _pytest_counts)
        if gpus:
            run_stage("benchmark", [py, "-m", "sru_cupy", "bench", "--device", "cuda", "--out",
                                    out_dir, *BENCH_ARGS[mode]], "bench.log")
        else:
            summary.stage("benchmark", status="not run (no GPU)")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        summary.data["total_seconds"] = time.time() - started
        summary.write()
    print("\n".join(summary.lines()))
    print(f"results in {out_dir}")
    if failed:
        return 1
    return 0 if gpus else 2


if __name__ == "__main__":
    sys.exit(main())
