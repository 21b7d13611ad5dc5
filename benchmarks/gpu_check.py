#!/usr/bin/env python3
"""One-command GPU check, sized for one short loan of a GPU machine (about 15 minutes, machine
start included): the environment report, a smoke check of the GPU path, the GPU tests ordered by
value, the GPU benchmark and a small CPU test set, each stage with a time limit, all within a
budget of 520 s (240 s with --quick).

    make gpu-check GPU_CHECK_OUT=$OUT                       # everything packed into $OUT
    make gpu-check GPU_CHECK_OUT=$OUT GPU_CHECK_ARGS=--quick  # the short version
    make gpu-check                   # plain files in benchmarks/results/<device>-<date>/
    python benchmarks/gpu_check.py --plan   # the stages, limits and commands; runs nothing

Stages, in order (what a stopped run loses is what comes last):

  environment  info.txt (python -m sru_cupy info), nvidia-smi.txt (nvidia-smi, nvidia-smi -q),
               packages.txt (pip list)
  smoke        smoke.log: benchmarks/gpu_smoke.py, one PASS/FAIL/SKIP line per check (every
               kernel variant compiled and loaded, each dtype against the host build, CUDA graph
               capture, a new thread's first launch inside capture, compute-sanitizer memcheck,
               torch.compile), under 90 s
  gpu-launch   the launch layer's kernels against the host build and the NumPy reference, every
               variant and dtype at small sizes (test_cupy_backend.py, test_launch_gpu.py)
  gpu-modules  the layers and ops on CUDA (test_modules_gpu.py, test_ops.py's GPU tests, ...)
  gpu-streams  side streams, CUDA graphs, several devices, TorchScript (the GPU tests whose names
               say stream, graph, capture, device, torchscript or compile)
  benchmark    bench.log, bench.json, bench.md, bench.png (python -m sru_cupy bench; bench.json
               and bench.md are rewritten after every section it measures)
  gpu-sweeps   the op-level sweep against the reference and gradcheck (not with --quick)
  cpu-smoke    the backend, errors, info and functional CPU tests (not with --quick)

Every GPU test stage writes <stage>.log and <stage>-junit.xml, runs pytest -v (one line per test
as it finishes) and, where pytest-timeout is importable, with a per-test limit (-p timeout
--timeout N; without it the log says so). A stage past its limit gets SIGINT (pytest then writes
its junit file and summary line and exits 2), and SIGKILL to its whole process group 10 s later.

Output. With --out (or $SRU_CUPY_GPU_CHECK_OUT, or make's GPU_CHECK_OUT) the stages work in a
scratch folder, and --out receives three files only, all rewritten atomically after every stage
(so a run stopped half-way still leaves what it did): summary.txt, summary.json and
gpu-check.tar.gz, which holds every file of the run (logs, junit files, the benchmark's files, the
nvidia-smi output, the environment report, the summary, gpu-check.log with this script's own
lines) under one folder named <device>-<date>. To keep the results in the repository:

    tar -xzf $OUT/gpu-check.tar.gz -C benchmarks/results/
    git add benchmarks/results/<device>-<date> && git commit

Without --out the files are written as they come into benchmarks/results/<device>-<date>/ itself
(no archive): that folder is the one to commit.

This process never initialises CUDA (under exclusive-process compute mode it would lock the
stages out) and never imports torch or CuPy: the GPU is found with nvidia-smi, and everything
that touches CUDA runs in a child. Without a GPU the check still runs the report, the smoke
script (every GPU check SKIP) and the test stages (the GPU tests skip), leaves the benchmark out
(printing what it would have run), and exits with 2. Meant for a GPU machine where torch, CuPy
and pytest are installed and nothing can be downloaded: it runs from the source tree (the
repository root on PYTHONPATH) and installs nothing. Exit status: 0 when every stage passed on a
GPU, 1 when a stage failed or was stopped, 2 when there is no GPU. A SIGTERM or SIGINT to this
process stops the stage running (SIGINT, as above), writes the summary (that stage
"interrupted") and the archive once more, and exits with 1.
"""

import argparse
import collections
import datetime
import glob
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Whole-run budgets in seconds: a loan of 15 minutes includes the machine's start, and one
#: command may run 10 minutes.
BUDGET = {"full": 520, "quick": 240}
#: Per-stage limits in seconds, in the order the stages run; they add up to the budget. A stage
#: missing from a mode is not run in it.
STAGE_LIMITS = {
    "full": {"environment": 25, "smoke": 90, "gpu-launch": 70, "gpu-modules": 65,
             "gpu-streams": 40, "benchmark": 125, "gpu-sweeps": 65, "cpu-smoke": 40},
    "quick": {"environment": 15, "smoke": 60, "gpu-launch": 45, "gpu-modules": 45,
              "gpu-streams": 25, "benchmark": 50},
}
#: Seconds between a stopped stage's SIGINT and the SIGKILL of its process group.
STOP_GRACE = 10
#: pytest-timeout's per-test limit in seconds, where it is importable.
TEST_TIMEOUT = {"full": 60, "quick": 40}
#: The file --out receives beside summary.txt and summary.json.
ARCHIVE = "gpu-check.tar.gz"
#: A file larger than this goes into the archive as its first quarter and its last three quarters
#: of this size, so the archive stays far below the 16 MiB a file may have when it comes back.
MEMBER_LIMIT = 2 << 20

#: The GPU test files of the launch layer, run first (the kernels against the host build).
LAUNCH_FILES = ["tests/test_cupy_backend.py", "tests/test_launch_gpu.py"]
#: The other GPU test files in the order they run within a stage; a file with GPU tests that is not
#: listed runs after these.
MODULE_FILES = ["tests/test_modules_gpu.py", "tests/test_ops.py", "tests/test_functional.py",
                "tests/test_arrays.py", "tests/test_srupp.py", "tests/test_memory.py",
                "tests/test_modules.py", "tests/test_bench.py"]
#: pytest -k expressions that split the GPU tests of the other files into stages: every test is
#: in exactly one (the sweeps take theirs first, the streams what is left of theirs, the modules
#: the rest).
SWEEPS_K = "gradcheck or test_against_reference"
STREAMS_K = "stream or graph or capture or device or torchscript or compile"
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


def _default_sigint():
    """Lets children get Python's default SIGINT handling: a shell that starts a job in the
    background ignores SIGINT, children inherit that, and an ignored SIGINT would not stop pytest
    (exec resets a handled signal to its default, not an ignored one)."""
    if (signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            and threading.current_thread() is threading.main_thread()):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _stop_on_sigterm():
    """A SIGTERM to this process (a runner's time limit) ends the run as Ctrl-C does: the stage
    running is stopped with SIGINT, and the summary and the archive are written a last time."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _stop_group(process, grace=STOP_GRACE):
    """SIGINT to the process group of ``process`` (pytest then writes its junit file and summary
    line, and exits 2), and SIGKILL to what is left of the group after ``grace`` seconds."""
    try:
        os.killpg(process.pid, signal.SIGINT)
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


def run_command(command, timeout, on_line, env=None, cwd=ROOT, grace=STOP_GRACE):
    """Runs ``command`` in a session of its own, passing every line of its output (stdout and
    stderr together) to ``on_line`` as it comes; past ``timeout`` seconds (whether or not it is
    printing) its process group is stopped (:func:`_stop_group`). Returns (returncode, stopped)."""
    _default_sigint()
    # A session of its own, so that a stage past its limit is stopped with everything it started
    # (subprocess tests, the benchmark's start-up probes), which would otherwise hold the GPU
    # into the next stage.
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                               start_new_session=True)
    stopped = threading.Event()

    def stop():
        stopped.set()
        _stop_group(process, grace)

    timer = threading.Timer(timeout, stop)
    timer.daemon = True
    timer.start()
    try:
        for line in process.stdout:
            on_line(line)
    except BaseException:  # this process interrupted: leave nothing of the stage running
        timer.cancel()
        _stop_group(process, grace)
        raise
    finally:
        returncode = process.wait()
        timer.cancel()
    return returncode, stopped.is_set()


def _run(label, command, out_dir, log_name, timeout, env, header=""):
    """Runs a command, teeing its output line by line to out_dir/log_name (after ``header``);
    returns (returncode, output). A command still running after ``timeout`` seconds is stopped,
    and the log says so."""
    print(f"== {label}: {shlex.join(command)}", flush=True)
    started = time.time()
    output = [header] if header else []
    with open(os.path.join(out_dir, log_name), "w") as log:
        log.write(header)

        def tee(line):
            sys.stdout.write(line)
            log.write(line)
            log.flush()  # a stage stopped later still leaves what it printed
            output.append(line)

        returncode, stopped = run_command(command, timeout, tee, env=env)
        if stopped:
            note = (f"[gpu-check] {label} stopped after {timeout} s (SIGINT to its process group, "
                    f"SIGKILL {STOP_GRACE} s later)\n")
            log.write("\n" + note)
            output.append(note)
    sys.stdout.flush()
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


def gpu_test_stages():
    """{stage: (test files in the order they run, -k expression or None)}: every GPU test in
    exactly one stage, the launch layer first, the sweeps and gradcheck last."""
    found = gpu_test_files()
    launch = [f for f in LAUNCH_FILES if f in found]
    others = [f for f in MODULE_FILES if f in found]
    others += [f for f in found if f not in launch and f not in others]
    return {
        "gpu-launch": (launch, None),
        "gpu-modules": (others, f"not ({STREAMS_K}) and not ({SWEEPS_K})"),
        "gpu-streams": (others, f"({STREAMS_K}) and not ({SWEEPS_K})"),
        "gpu-sweeps": (others, SWEEPS_K),
    }


def pytest_timeout_available():
    """True when pytest-timeout can be loaded by the stages (found without importing it)."""
    return importlib.util.find_spec("pytest_timeout") is not None


def _pytest_counts(output):
    counts = re.findall(r"^=*\s*(.*(?:passed|failed|error|skipped|deselected|no tests ran).*?)\s*=*$",
                        output, re.MULTILINE)
    return counts[-1] if counts else "no summary line"


_SMOKE_RESULT = re.compile(r"^(PASS|FAIL|SKIP) (\S+): (.*)$", re.MULTILINE)


def _smoke_counts(output):
    """The smoke script's last line, and the checks that failed or were skipped."""
    counts = re.findall(r"^smoke: .*$", output, re.MULTILINE)
    text = counts[-1][len("smoke: "):] if counts else "no summary line"
    results = _SMOKE_RESULT.findall(output)
    failed = [name for status, name, _ in results if status == "FAIL"]
    skipped = [name for status, name, _ in results if status == "SKIP"]
    if failed:
        text += "; failed: " + ", ".join(failed)
    if skipped:
        text += "; skipped: " + ", ".join(skipped)
    return text


def _bench_detail(work_dir):
    """A line from bench.json: complete or not, and the per-call figures against their goals."""
    try:
        with open(os.path.join(work_dir, "bench.json")) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return "no bench.json"
    parts = ["complete" if result.get("complete") else "incomplete bench.json"]
    for goal in result.get("per_call", {}).get("goals", []):
        parts.append(f"{goal['what']} {goal['value']:.3g} (goal {goal['goal']:g}: "
                     f"{'met' if goal['met'] else 'NOT met'})")
    return "; ".join(parts)


class Summary:
    """summary.txt / summary.json, rewritten (atomically) in every folder of ``folders`` after
    every stage."""

    def __init__(self, folders, mode, gpus, why_none, budget):
        self.folders = folders
        self.data = {"mode": mode, "device": _device_slug(gpus), "gpus": gpus,
                     "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "budget_seconds": budget, "stages": {}}
        if not gpus:
            self.data["no_gpu"] = why_none
        self.write()

    def stage(self, name, **fields):
        self.data["stages"][name] = fields
        self.write()

    def lines(self):
        d = self.data
        out = [f"device: {d['device']}", f"date: {d['date']}",
               f"mode: {d['mode']} (budget {d['budget_seconds']:.0f} s)"]
        out.append(f"GPU: {', '.join(d['gpus'])}" if d["gpus"]
                   else f"GPU: none ({d['no_gpu']}): the GPU tests skip and the benchmark is left out")
        if "per_test_timeout" in d:
            out.append(f"per-test limit: {d['per_test_timeout']}")
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
        text = ("\n".join(self.lines()) + "\n").encode()
        data = json.dumps(self.data, indent=1).encode()
        for folder in self.folders:
            _write_atomic(os.path.join(folder, "summary.txt"), text)
            _write_atomic(os.path.join(folder, "summary.json"), data)


def _write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _member_bytes(path):
    """The bytes of ``path`` for the archive: all of it, or its head and tail with a note between
    them when it is larger than MEMBER_LIMIT."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= MEMBER_LIMIT:
            return f.read()
        head = f.read(MEMBER_LIMIT // 4)
        f.seek(size - MEMBER_LIMIT * 3 // 4)
        tail = f.read()
    note = (f"\n[gpu-check] {size - len(head) - len(tail)} bytes of this {size}-byte file left "
            "out of the archive here\n").encode()
    return head + note + tail


def pack(work_dir, archive_path, top):
    """Writes every file under ``work_dir`` into the gzip tar ``archive_path`` under the folder
    ``top``, atomically (the old archive stays until the new one is complete)."""
    tmp = os.path.join(os.path.dirname(archive_path), "." + os.path.basename(archive_path) + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for folder, dirs, files in os.walk(work_dir):
            dirs.sort()
            for name in sorted(files):
                if name.endswith(".tmp"):
                    continue
                path = os.path.join(folder, name)
                data = _member_bytes(path)
                info = tarfile.TarInfo(f"{top}/{os.path.relpath(path, work_dir)}")
                info.size, info.mtime, info.mode = len(data), int(os.path.getmtime(path)), 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, archive_path)


Stage = collections.namedtuple("Stage", "name command log parse needs_gpu header")


def stages(mode, work_dir, extra=(), per_test_timeout=None):
    """The stages of a run, in order: Stage(name, command(limit) -> argv, log file,
    parse(output) -> summary detail or None, needs_gpu, header: the log's first lines)."""
    py = sys.executable
    timeout_args = (["-p", "timeout", "--timeout", str(per_test_timeout)] if per_test_timeout
                    else [])
    no_timeout = ("" if per_test_timeout else
                  "[gpu-check] pytest-timeout is not importable: the tests run without a per-test "
                  "time limit (only the stage's)\n")

    def pytest_stage(name, files, keyword):
        junit = os.path.join(work_dir, f"{name}-junit.xml")
        # -v: one line per test as it finishes (a stopped stage still says which ran);
        # --durations: what to trim when a loan is shorter.
        command = [py, "-m", "pytest", "-v", "-rfEs", "--durations=10", "-m", "gpu", "-p",
                   "no:cacheprovider", "--junitxml", junit, *timeout_args,
                   *(["-k", keyword] if keyword else []), *files, *extra]
        return Stage(name, lambda limit: command, f"{name}.log", _pytest_counts, False, no_timeout)

    tests = gpu_test_stages()
    out = [Stage("environment", lambda limit: [py, "-m", "sru_cupy", "info"], "info.txt", None,
                 False, ""),
           Stage("smoke", lambda limit: [py, os.path.join(ROOT, "benchmarks", "gpu_smoke.py"),
                                         "--budget", str(max(1, limit - 5))],
                 "smoke.log", _smoke_counts, False, "")]
    out += [pytest_stage(name, *tests[name]) for name in ("gpu-launch", "gpu-modules",
                                                           "gpu-streams")]
    bench = [py, "-m", "sru_cupy", "bench", "--device", "cuda", "--out", work_dir,
             *BENCH_ARGS[mode]]
    out.append(Stage("benchmark", lambda limit: bench, "bench.log",
                     lambda output: _bench_detail(work_dir), True, ""))
    out.append(pytest_stage("gpu-sweeps", *tests["gpu-sweeps"]))
    out.append(Stage("cpu-smoke", lambda limit: [
        py, "-m", "pytest", "-q", "-m", "not gpu and not slow", "-p", "no:cacheprovider",
        "--junitxml", os.path.join(work_dir, "cpu-junit.xml"), *CPU_SMOKE, *extra],
        "cpu-smoke.log", _pytest_counts, False, ""))
    return out


def _plan_lines(mode, budget, plan, per_test_timeout):
    lines = [f"plan ({mode}, budget {budget:.0f} s; a stage gets the smaller of its limit and "
             f"what is left of the budget):"]
    for stage in plan:
        limit = STAGE_LIMITS[mode].get(stage.name)
        if limit is None:
            lines.append(f"  {stage.name:12} not run with --{mode}")
            continue
        needs = " (needs a GPU)" if stage.needs_gpu else ""
        lines.append(f"  {stage.name:12} {limit:4d} s  {shlex.join(stage.command(limit))}{needs}")
    lines.append(f"  per-test limit: {per_test_timeout} s (pytest-timeout)" if per_test_timeout
                 else "  per-test limit: none (pytest-timeout is not importable here)")
    return lines


def _environment_files(work_dir, env):
    """nvidia-smi.txt and packages.txt: plain tools, no CUDA context in this process."""
    commands = {"nvidia-smi.txt": [["nvidia-smi"], ["nvidia-smi", "-q"]],
                "packages.txt": [[sys.executable, "-m", "pip", "list"]]}
    for name, runs in commands.items():
        if name == "nvidia-smi.txt" and not shutil.which("nvidia-smi"):
            continue
        with open(os.path.join(work_dir, name), "w") as f:
            for command in runs:
                f.write(f"$ {' '.join(command)}\n")
                f.flush()
                try:
                    subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=30,
                                   env=env)
                except (OSError, subprocess.SubprocessError) as error:
                    f.write(f"\n[gpu-check] {command[0]} failed: {error}\n")
                f.write("\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("SRU_CUPY_GPU_CHECK_OUT"),
                        help="folder that receives summary.txt, summary.json and " + ARCHIVE +
                             " (default: plain files in benchmarks/results/<device>-<date>)")
    parser.add_argument("--quick", action="store_true",
                        help="the short check: no sweeps, gradcheck or CPU tests, two benchmark "
                             "configurations (budget 240 s)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default 520, or 240 with --quick)")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments (test stages)")
    parser.add_argument("--plan", action="store_true",
                        help="print the stages, their limits and commands, and run nothing")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    budget = args.budget if args.budget is not None else BUDGET[mode]
    started = time.time()
    per_test_timeout = TEST_TIMEOUT[mode] if pytest_timeout_available() else None
    extra = args.pytest_args.split()
    if args.plan:
        plan = stages(mode, "<results>", extra, per_test_timeout)
        print("\n".join(_plan_lines(mode, budget, plan, per_test_timeout)))
        return 0

    _stop_on_sigterm()
    gpus, why_none = find_gpus()
    results_name = f"{_device_slug(gpus)}-{datetime.date.today().isoformat()}"
    scratch = None
    if args.out:
        out_dir = os.path.abspath(args.out)
        scratch = tempfile.mkdtemp(prefix="sru_cupy-gpu-check-")
        work_dir = os.path.join(scratch, results_name)
        archive = os.path.join(out_dir, ARCHIVE)
    else:
        out_dir = work_dir = os.path.join(ROOT, "benchmarks", "results", results_name)
        archive = None
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(work_dir, exist_ok=True)
    runner_log = open(os.path.join(work_dir, "gpu-check.log"), "w")

    def say(text):
        print(text, flush=True)
        runner_log.write(text + "\n")
        runner_log.flush()

    summary = Summary([work_dir] + ([out_dir] if archive else []), mode, gpus, why_none, budget)
    summary.data["per_test_timeout"] = (f"{per_test_timeout} s (pytest-timeout)" if per_test_timeout
                                        else "none (pytest-timeout is not importable)")

    def checkpoint():
        summary.write()
        if archive:
            pack(work_dir, archive, results_name)

    cache = tempfile.mkdtemp(prefix="sru_cupy-gpu-check-cache-")  # one kernel cache for all
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
        PYTHONUNBUFFERED="1", SRU_CUPY_CACHE_DIR=cache)
    plan = stages(mode, work_dir, extra, per_test_timeout)
    say(f"GPU: {', '.join(gpus)}" if gpus else f"no GPU: {why_none}")
    for line in _plan_lines(mode, budget, plan, per_test_timeout):
        say(line)
    say(f"results: {archive + ' (and summary.txt, summary.json beside it)' if archive else work_dir}")
    failed = False
    try:
        _environment_files(work_dir, env)
        checkpoint()
        for stage in plan:
            if stage.name not in STAGE_LIMITS[mode]:
                summary.stage(stage.name, status=f"not run (--{mode})")
                continue
            if stage.needs_gpu and not gpus:
                say(f"== {stage.name}: not run (no GPU); with one it would run: "
                    f"{shlex.join(stage.command(STAGE_LIMITS[mode][stage.name]))}")
                summary.stage(stage.name, status="not run (no GPU)")
                continue
            left = budget - (time.time() - started)
            limit = int(min(STAGE_LIMITS[mode][stage.name], left - STOP_GRACE))
            if limit < 5:
                say(f"== {stage.name}: not run (time budget spent)")
                summary.stage(stage.name, status="not run (time budget spent)")
                failed = True
                continue
            t0 = time.time()
            try:
                rc, output = _run(stage.name, stage.command(limit), work_dir, stage.log, limit,
                                  env, stage.header)
            except KeyboardInterrupt as error:  # SIGINT or SIGTERM to this process
                say(f"== {stage.name}: interrupted ({error or 'SIGINT'}); the run ends here")
                summary.stage(stage.name, status="interrupted: the run was stopped",
                              seconds=time.time() - t0, limit=limit)
                failed = True
                break
            stopped = f"[gpu-check] {stage.name} stopped after" in output
            status = ("stopped at its time limit" if stopped
                      else "passed" if rc == 0 else f"exit {rc}")
            say(f"== {stage.name}: {status}")
            failed |= rc != 0
            summary.stage(stage.name, status=status, exit=rc, seconds=time.time() - t0,
                          limit=limit, detail=stage.parse(output) if stage.parse else "")
            checkpoint()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        summary.data["total_seconds"] = time.time() - started
        for line in summary.lines():
            say(line)
        say(f"results in {archive or work_dir}")
        runner_log.close()
        checkpoint()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if failed:
        return 1
    return 0 if gpus else 2


if __name__ == "__main__":
    sys.exit(main())
