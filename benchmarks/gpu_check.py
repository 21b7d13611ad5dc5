#!/usr/bin/env python3
"""One-command GPU check: environment report, the whole test suite (GPU tests included), then the
GPU benchmark, with logs and results written to one folder.

    make gpu-check                                # results in benchmarks/results/<device>-<date>/
    make gpu-check GPU_CHECK_OUT=/some/folder     # or SRU_CUPY_GPU_CHECK_OUT=/some/folder

Meant for a GPU machine where torch, cupy and pytest are installed and nothing can be downloaded:
it runs from the source tree (the repository root is put on PYTHONPATH) and installs nothing.
Exit status: 0 when the tests passed and the benchmark ran, 1 otherwise.
"""

import argparse
import datetime
import os
import re
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(label, command, out_dir, log_name, timeout, env):
    """Runs a command, teeing its output to out_dir/log_name; returns (returncode, output). A command
    still running after ``timeout`` seconds is killed (whether or not it is printing)."""
    print(f"== {label}: {' '.join(command)}", flush=True)
    started = time.time()
    log_path = os.path.join(out_dir, log_name)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        timed_out = threading.Event()

        def stop():
            timed_out.set()
            process.kill()

        timer = threading.Timer(timeout, stop)
        timer.start()
        output = []
        try:
            for line in process.stdout:
                sys.stdout.write(line)
                log.write(line)
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


def _device_slug():
    try:
        import torch
        if torch.cuda.is_available():
            return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-")
    except Exception:
        pass
    return "no-gpu"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("SRU_CUPY_GPU_CHECK_OUT"),
                        help="results folder (default benchmarks/results/<device>-<date>)")
    parser.add_argument("--test-timeout", type=int, default=330)
    parser.add_argument("--bench-timeout", type=int, default=180)
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments")
    args = parser.parse_args(argv)
    out_dir = args.out or os.path.join(
        ROOT, "benchmarks", "results",
        f"{_device_slug()}-{datetime.date.today().isoformat()}")
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
        PYTHONUNBUFFERED="1")
    py = sys.executable
    summary = [f"device: {_device_slug()}", f"date: {datetime.datetime.now().isoformat()}"]

    rc_info, _ = _run("environment", [py, "-m", "sru_cupy", "info"], out_dir, "info.txt", 120, env)
    rc_tests, output = _run(
        "tests", [py, "-m", "pytest", "-q", "-rs", "--junitxml", os.path.join(out_dir, "junit.xml"),
                  *args.pytest_args.split()],
        out_dir, "pytest.log", args.test_timeout, env)
    counts = re.findall(r"^=*\s*(.*(?:passed|failed|error).*?)\s*=*$", output, re.MULTILINE)
    summary.append(f"tests: exit {rc_tests}: {counts[-1] if counts else 'no summary line'}")
    rc_bench, _ = _run("benchmark", [py, "-m", "sru_cupy", "bench", "--device", "cuda",
                                     "--out", out_dir], out_dir, "bench.log", args.bench_timeout,
                       env)
    summary.append(f"benchmark: exit {rc_bench}")
    summary.append(f"environment report: exit {rc_info}")
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write("\n".join(summary) + "\n")
    print("\n".join(summary))
    print(f"results in {out_dir}")
    return 0 if rc_tests == 0 and rc_bench == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
