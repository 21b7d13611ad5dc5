#!/usr/bin/env python3
"""Smoke check of the GPU path, in under 90 s: one line per check, ``PASS name: what was seen``,
``FAIL name: what went wrong`` or ``SKIP name: why``, carrying on after a failure. The first test
stage of benchmarks/gpu_check.py; runs on its own too:

    python benchmarks/gpu_smoke.py [--budget SECONDS] [--check NAME ...] [--list]

Checks, in this order, each in a fresh child process with a time limit (this process imports
neither torch nor CuPy, so it never holds a CUDA context a child would have to wait for):

  versions            what the run depends on: Python, torch (its CUDA, cuDNN), CuPy (CUDA
                      runtime, NVRTC), NumPy, the driver (nvidia-smi and CuPy), whether
                      torch.Tensor.__dlpack__ takes stream / max_version, whether
                      torch._higher_order_ops.scan.scan_op and torch.export.Dim.AUTO exist,
                      pytest-timeout, compute-sanitizer, the host build; and whether CuPy sees a GPU
  kernels             every kernel variant compiled (or read from the kernel cache) and loaded:
                      sru_cupy.backends.cupy_backend.ensure_loaded
  dtype-<dtype>       float32, float64, float16, bfloat16: sru_cupy.launch.recurrence_forward and
                      recurrence_backward on CuPy arrays against the host build on NumPy arrays,
                      same inputs, k 3 and 4, one and two directions, every option on. The GPU
                      contracts a*b+c into FMA and the host build does not (-ffp-contract=off), so
                      the tolerances are a few float32 ulps per step: rtol = atol = 1e-5 for
                      float32, 1e-12 for float64, a relative RMS of 1e-2 for the 16-bit types
  capture-cold        a fresh process whose first call is inside CUDA graph capture: it is
                      captured and replays right, or raises the package's CaptureNotReadyError
  capture-unlaunched  a fresh process: one call, then a capture of variants never launched
                      (loaded lazily inside the capture), replayed bit for bit against eager calls
  thread-capture      the first launch from a new thread, inside a capture on that thread's stream
  memcheck            forward and backward of every dtype and variant under compute-sanitizer
                      --tool memcheck (benchmarks/gpu_memcheck.py, CuPy's memory pool off), where
                      the tool is found; it runs beside the checks after it
  compile-default     torch.compile(sru_cupy.SRU, fullgraph=True) on CUDA against eager,
                      forward and backward
  compile-reduce-overhead  the same with mode="reduce-overhead" (CUDA graphs), training and
                      inference steps

Without a GPU (CuPy missing, or no device) every GPU check is a SKIP with the reason, and the
exit status is 0. Exit status: 1 when a check failed, else 0. The last line counts the results:
``smoke: P passed, F failed, S skipped``. The checks use the package's public interfaces only.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # gpu_check's stage runner
import gpu_check  # noqa: E402

#: (check, the result names it reports, time limit in seconds), in the order they run.
CHECKS = [
    ("versions", ["versions"], 30),
    ("kernels", ["kernels"], 60),
    ("dtypes", ["dtype-float32", "dtype-float64", "dtype-float16", "dtype-bfloat16"], 40),
    ("capture-cold", ["capture-cold"], 25),
    ("capture-unlaunched", ["capture-unlaunched"], 25),
    ("thread-capture", ["thread-capture"], 25),
    ("memcheck", ["memcheck"], 60),
    ("compile", ["compile-default", "compile-reduce-overhead"], 70),
]
#: The whole smoke check's default budget in seconds.
BUDGET = 85
#: Seconds between a stopped check's SIGINT and its SIGKILL.
GRACE = 3
STATE = "SMOKE-STATE "  # the versions child's machine-readable line (not printed)
_RESULT = re.compile(r"(PASS|FAIL|SKIP) (\S+): ")

DTYPES = ("float32", "float64", "float16", "bfloat16")
#: Tolerances of the GPU against the host build: (rtol, atol), or a relative RMS for 16-bit.
TOLERANCE = {"float32": (1e-5, 1e-5), "float64": (1e-12, 1e-12), "float16": 1e-2,
             "bfloat16": 1e-2}


def result(status, name, detail):
    print(f"{status} {name}: {detail}", flush=True)


# -- problems shared by the checks and gpu_memcheck.py ------------------------------------------


def to_bfloat16_bits(values):
    """float32 values -> their bfloat16 bits (uint16), rounded to nearest even."""
    import numpy as np
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_storage(array, dtype):
    """A host array of ``dtype`` storage as float64 values (bfloat16 data comes as uint16 bits;
    its float32 parameters and their gradients as they are)."""
    import numpy as np
    if dtype == "bfloat16" and np.asarray(array).dtype == np.uint16:
        return (np.asarray(array).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.asarray(array).astype(np.float64)


def problem(dtype, k, bidirectional, L=9, B=3, d=5, seed=0):
    """Host (NumPy) arguments of one recurrence call with every option on: (args, options,
    grad_h, grad_c_last). bfloat16 data is uint16 bits, with storage_dtype in the options."""
    import numpy as np
    rng = np.random.default_rng([seed, k, int(bidirectional), DTYPES.index(dtype)])
    dirs = 2 if bidirectional else 1
    D = dirs * d
    arith = np.float64 if dtype == "float64" else np.float32

    def data(*shape, scale=1.0):
        values = rng.standard_normal(shape) * scale
        if dtype == "bfloat16":
            return to_bfloat16_bits(values)
        return values.astype(dtype)

    mask_pad = np.zeros((L, B), dtype=np.uint8)
    mask_pad[L - 2:, 0] = 1  # the first sequence ends two steps early
    options = dict(hidden_size=d, bidirectional=bidirectional, has_skip_term=True, use_tanh=True,
                   scale_x=1.7 if k == 3 else 1.0, mask_pad=mask_pad,
                   mask_h=(rng.random((B, D)) > 0.2).astype(arith) / arith(0.8))
    if dtype == "bfloat16":
        options["storage_dtype"] = "bfloat16"
    args = (data(L, B, D * k, scale=0.5), data(L, B, D) if k == 3 else None,
            (rng.standard_normal(2 * D) * 0.5).astype(arith),
            (rng.standard_normal(2 * D) * 0.1).astype(arith), data(B, D))
    return args, options, data(L, B, D), data(B, D)


def to_device(value):
    """CuPy copies of the NumPy arrays in ``value`` (a tuple, a dict or one array; None stays)."""
    import cupy
    if isinstance(value, dict):
        return {key: to_device(v) for key, v in value.items()}
    if isinstance(value, tuple):
        return tuple(to_device(v) for v in value)
    return cupy.asarray(value) if hasattr(value, "dtype") and hasattr(value, "shape") else value


def _gpu_missing():
    """None when CuPy sees a CUDA device, else why not."""
    try:
        import cupy
    except Exception as error:
        return f"CuPy is not importable ({type(error).__name__}: {str(error)[:120]})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        return f"no CUDA device ({type(error).__name__}: {str(error)[:120]})"
    return None if count > 0 else "no CUDA device"


# -- the checks (each runs in a child: python gpu_smoke.py --child NAME) --------------------------


def check_versions():
    import importlib
    import importlib.metadata
    import inspect
    import platform

    def line(label, fn):
        try:
            value = fn()
        except Exception as error:
            value = f"unavailable ({type(error).__name__}: {str(error)[:160]})"
        print(f"  {label}: {value}", flush=True)
        return value

    def version(name):
        return importlib.metadata.version(name)

    def torch_line():
        import torch
        return (f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
                f"{torch.backends.cudnn.version() if torch.version.cuda else None})")

    def cupy_line():
        import cupy
        rt = cupy.cuda.runtime.runtimeGetVersion()
        nvrtc = cupy.cuda.nvrtc.getVersion()
        return f"{cupy.__version__} (CUDA runtime {rt // 1000}.{rt % 1000 // 10}, NVRTC " \
               f"{nvrtc[0]}.{nvrtc[1]})"

    def driver_line():
        parts = []
        smi = shutil.which("nvidia-smi")
        if smi:
            out = subprocess.run([smi, "--query-gpu=name,driver_version,compute_cap,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20)
            parts.append(f"nvidia-smi: {'; '.join(out.stdout.strip().splitlines()) or out.stderr.strip()[:120]}")
        try:
            import cupy
            v = cupy.cuda.runtime.driverGetVersion()
            parts.append(f"driverGetVersion: CUDA {v // 1000}.{v % 1000 // 10}")
        except Exception as error:
            parts.append(f"driverGetVersion: {type(error).__name__}")
        return "; ".join(parts)

    def dlpack_line():
        import torch
        params = inspect.signature(torch.Tensor.__dlpack__).parameters
        return (f"torch.Tensor.__dlpack__{inspect.signature(torch.Tensor.__dlpack__)}: stream "
                f"{'yes' if 'stream' in params else 'no'}, max_version "
                f"{'yes' if 'max_version' in params else 'no'}")

    def scan_line():
        module = importlib.import_module("torch._higher_order_ops.scan")
        return "yes" if hasattr(module, "scan_op") else "no (module without scan_op)"

    def dim_auto_line():
        import torch.export
        return "yes" if hasattr(torch.export.Dim, "AUTO") else "no"

    def sanitizer_line():
        return _sanitizer() or "not found"

    def host_line():
        from sru_cupy import info
        return info.cpu_path()

    print("versions:", flush=True)
    line("Python", lambda: f"{platform.python_version()} ({sys.executable})")
    torch_version = line("torch", torch_line)
    cupy_version = line("CuPy", cupy_line)
    line("NumPy", lambda: version("numpy"))
    driver = line("driver", driver_line)
    line("DLPack", dlpack_line)
    line("torch._higher_order_ops.scan.scan_op", scan_line)
    line("torch.export.Dim.AUTO", dim_auto_line)
    line("pytest", lambda: version("pytest"))
    line("pytest-timeout", lambda: version("pytest-timeout"))
    line("ml_dtypes", lambda: version("ml_dtypes"))
    line("onnx / onnxruntime", lambda: f"{version('onnx')} / {version('onnxruntime')}")
    line("compute-sanitizer", sanitizer_line)
    line("host build", host_line)
    line("CUDA_MODULE_LOADING", lambda: os.environ.get("CUDA_MODULE_LOADING", "(unset: lazy)"))
    missing = _gpu_missing()
    print(STATE + json.dumps({"no_gpu": missing}), flush=True)
    result("PASS", "versions", f"torch {str(torch_version).split()[0]}, CuPy "
           f"{str(cupy_version).split()[0]}, {driver if not missing else 'no GPU: ' + missing}")


def check_kernels():
    from sru_cupy import kernels
    from sru_cupy.backends import cupy_backend
    names = kernels.all_kernel_names()
    started = time.perf_counter()
    cupy_backend.ensure_loaded(0)
    seconds = time.perf_counter() - started
    source = cupy_backend.loaded_from.get(0)
    result("PASS", "kernels", f"{len(names)} variants compiled or read from the cache and loaded "
           f"in {seconds:.1f} s (from {source[0]}: {source[1]})")


def _compare(name, gpu, host, dtype):
    """None when the GPU's ``gpu`` (CuPy) matches the host's ``host`` within the dtype's
    tolerance, else what differs; with the error measure."""
    import cupy
    import numpy as np
    a, b = from_storage(cupy.asnumpy(gpu), dtype), from_storage(host, dtype)
    if a.shape != b.shape:
        return f"{name}: shape {a.shape} against the host's {b.shape}", 0.0
    if not np.isfinite(a).all():
        return f"{name}: {int((~np.isfinite(a)).sum())} values not finite", 0.0
    tolerance = TOLERANCE[dtype]
    if isinstance(tolerance, tuple):
        rtol, atol = tolerance
        excess = np.abs(a - b) - (atol + rtol * np.abs(b))
        error = float(np.max(np.abs(a - b) / (atol + rtol * np.abs(b)))) if a.size else 0.0
        if (excess > 0).any():
            i = np.unravel_index(np.argmax(excess), a.shape)
            return (f"{name}: |gpu - host| {abs(a[i] - b[i]):.3g} at {tuple(map(int, i))} "
                    f"(gpu {a[i]:.9g}, host {b[i]:.9g}) over atol {atol} + rtol {rtol}"), error
        return None, error
    rms = float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b ** 2)), 1e-30))
    if rms > tolerance:
        return f"{name}: relative RMS {rms:.3g} over {tolerance}", rms
    return None, rms


def check_dtypes():
    import cupy
    from sru_cupy.launch import recurrence_backward, recurrence_forward
    for dtype in DTYPES:
        problems, worst = [], 0.0
        try:
            for k in (3, 4):
                for bidirectional in (False, True):
                    args, options, grad_h, grad_c_last = problem(dtype, k, bidirectional)
                    case = f"k={k} {'bi' if bidirectional else 'uni'}"
                    host_fwd = recurrence_forward(*args, **options)
                    dev_args, dev_options = to_device(args), to_device(options)
                    gpu_fwd = recurrence_forward(*dev_args, **dev_options)
                    host_bwd = recurrence_backward(grad_h, grad_c_last, *args, host_fwd[1],
                                                   **options)
                    # the host's c: the same inputs for both backward calls
                    gpu_bwd = recurrence_backward(to_device(grad_h), to_device(grad_c_last),
                                                  *dev_args, to_device(host_fwd[1]),
                                                  **dev_options)
                    cupy.cuda.get_current_stream().synchronize()
                    pairs = list(zip(("h", "c", "c_last"), gpu_fwd, host_fwd))
                    pairs += [(f"grad {n}", gpu_bwd[n], host_bwd[n])
                              for n in ("U", "x", "c0", "weight_c", "bias")
                              if host_bwd[n] is not None]
                    for name, gpu, host in pairs:
                        problem_text, error = _compare(f"{case} {name}", gpu, host, dtype)
                        worst = max(worst, error)
                        if problem_text:
                            problems.append(problem_text)
        except Exception as error:
            result("FAIL", f"dtype-{dtype}", f"{type(error).__name__}: {str(error)[:300]}")
            continue
        measure = ("relative RMS" if not isinstance(TOLERANCE[dtype], tuple)
                   else "error / tolerance")
        if problems:
            result("FAIL", f"dtype-{dtype}", f"{len(problems)} arrays differ from the host "
                   f"build: " + "; ".join(problems[:4]))
        else:
            result("PASS", f"dtype-{dtype}", f"forward and backward, k 3 and 4, one and two "
                   f"directions, match the host build (worst {measure} {worst:.3g})")


def _nan_outputs(args, options, store_c=True):
    """Preallocated forward outputs filled with NaN (no allocation inside a capture)."""
    import cupy
    U = args[0]
    L, B = U.shape[:2]
    D = options["hidden_size"] * (2 if options["bidirectional"] else 1)
    fill = 0x7FC0 if options.get("storage_dtype") == "bfloat16" else float("nan")
    out = {"h": cupy.full((L, B, D), fill, U.dtype), "c_last": cupy.full((B, D), fill, U.dtype)}
    if store_c:
        out["c"] = cupy.full((L, B, D), fill, U.dtype)
    return out


def _same_bits(a, b):
    import cupy
    return bool(cupy.array_equal(a.view(cupy.uint8), b.view(cupy.uint8)))


def _device_problem(dtype, k, bidirectional):
    args, options, grad_h, grad_c_last = problem(dtype, k, bidirectional)
    return to_device(args), to_device(options), to_device(grad_h), to_device(grad_c_last)


def _capture(stream, launches):
    """Captures ``launches()`` on ``stream`` (made current) into a CUDA graph, launches the graph
    and waits for it. Returns whether the launches ran during the capture instead of being
    captured (``launches()`` returns the output arrays it filled, NaN before). An error inside
    the capture propagates, the capture ended."""
    import cupy
    with stream:
        outputs = launches(False)
        before = [array.copy() for array in outputs]
        cupy.cuda.Device().synchronize()
        stream.begin_capture()
        try:
            launches(True)
        finally:
            graph = stream.end_capture()
        stream.synchronize()
        ran_early = not all(_same_bits(a, b) for a, b in zip(outputs, before))
        graph.launch(stream)
        stream.synchronize()
    return ran_early


def _forward_launches(args, options):
    """A ``launches`` for :func:`_capture`: one forward into NaN-filled outputs; returns them and
    the outputs dict (filled once the graph ran)."""
    from sru_cupy.launch import recurrence_forward
    out = _nan_outputs(args, options)

    def launches(capturing):
        if capturing:
            recurrence_forward(*args, **options, out=out)
        return [out["h"], out["c"], out["c_last"]]
    return launches, out


def check_capture_cold():
    import cupy
    from sru_cupy.errors import CaptureNotReadyError
    from sru_cupy.launch import recurrence_forward
    args, options, _, _ = _device_problem("float32", 3, False)
    stream = cupy.cuda.Stream(non_blocking=True)
    launches, out = _forward_launches(args, options)
    try:
        ran_early = _capture(stream, launches)
    except CaptureNotReadyError as error:
        # What the error advises: one call, then the capture works.
        eager = recurrence_forward(*args, **options)
        launches, out = _forward_launches(args, options)
        ran_early = _capture(stream, launches)
        if ran_early or not _same_bits(out["h"], eager[0]):
            result("FAIL", "capture-cold", "CaptureNotReadyError, but after one call the capture "
                   "ran early or its replayed h differs from the eager call's")
        else:
            result("PASS", "capture-cold", f"CaptureNotReadyError ({str(error)[:90]}...); after "
                   "one call the capture replays bit for bit")
        return
    eager = recurrence_forward(*args, **options)
    if not ran_early and _same_bits(out["h"], eager[0]) and _same_bits(out["c_last"], eager[2]):
        result("PASS", "capture-cold", "the first call was captured (kernels loaded inside the "
               "capture) and replays bit for bit")
    else:
        result("FAIL", "capture-cold", "the first call was captured without error, but it ran "
               "during the capture or the replayed h or c_last differs from the eager call's")


def check_capture_unlaunched():
    import cupy
    from sru_cupy.launch import recurrence_backward, recurrence_forward
    first, first_options, _, _ = _device_problem("float32", 3, False)
    recurrence_forward(*first, **first_options)  # loads the module: one variant launched
    fwd, fwd_options, _, _ = _device_problem("bfloat16", 3, True)
    bwd, bwd_options, grad_h, grad_c_last = _device_problem("float64", 4, True)
    _, c, _ = recurrence_forward(*bwd, **bwd_options)  # float64 forward: its backward is new
    forward_launches, fwd_out = _forward_launches(fwd, fwd_options)
    U = bwd[0]
    B, D = U.shape[1], U.shape[2] // 4
    bwd_out = {"U": cupy.full(U.shape, cupy.nan, U.dtype),
               "c0": cupy.full((B, D), cupy.nan, U.dtype),
               "weight_c_partial": cupy.full((2, B, D), cupy.nan, U.dtype),
               "bias_partial": cupy.full((2, B, D), cupy.nan, U.dtype)}

    def launches(capturing):
        # never launched in this process: bfloat16 k=3 forward, float64 k=4 backward
        outputs = forward_launches(capturing)
        if capturing:
            recurrence_backward(grad_h, grad_c_last, *bwd, c, **bwd_options, out=bwd_out,
                                reduce_params=False)
        return outputs + list(bwd_out.values())

    if _capture(cupy.cuda.Stream(non_blocking=True), launches):
        result("FAIL", "capture-unlaunched", "the launches ran during the capture instead of "
               "being captured")
        return
    eager_fwd = recurrence_forward(*fwd, **fwd_options)
    eager_bwd = recurrence_backward(grad_h, grad_c_last, *bwd, c, **bwd_options,
                                    reduce_params=False)
    differ = [name for name, a, b in (("forward h", fwd_out["h"], eager_fwd[0]),
                                      ("forward c", fwd_out["c"], eager_fwd[1]),
                                      ("backward U", bwd_out["U"], eager_bwd["U"]),
                                      ("backward c0", bwd_out["c0"], eager_bwd["c0"]))
              if not _same_bits(a, b)]
    if differ:
        result("FAIL", "capture-unlaunched", f"replay differs from eager calls: {', '.join(differ)}")
    else:
        result("PASS", "capture-unlaunched", "bfloat16 forward and float64 k=4 backward, never "
               "launched before, captured after one other call and replayed bit for bit")


def check_thread_capture():
    import cupy
    from sru_cupy.launch import recurrence_forward
    first, first_options, _, _ = _device_problem("float32", 3, False)
    recurrence_forward(*first, **first_options)  # the main thread loads the kernels
    cupy.cuda.Device().synchronize()
    args, options, _, _ = _device_problem("float16", 4, True)
    seen = {}

    def worker():
        try:
            launches, seen["out"] = _forward_launches(args, options)
            seen["ran early"] = _capture(cupy.cuda.Stream(non_blocking=True), launches)
        except BaseException as error:  # reported by the main thread
            seen["error"] = error

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=20)
    if thread.is_alive():
        result("FAIL", "thread-capture", "the thread's capture did not finish in 20 s")
        return
    if "error" in seen:
        error = seen["error"]
        result("FAIL", "thread-capture", f"{type(error).__name__}: {str(error)[:300]}")
        return
    if seen["ran early"]:
        result("FAIL", "thread-capture", "the launch ran during the capture instead of being "
               "captured on the thread's stream")
        return
    eager = recurrence_forward(*args, **options)
    if _same_bits(seen["out"]["h"], eager[0]) and _same_bits(seen["out"]["c"], eager[1]):
        result("PASS", "thread-capture", "a new thread's first launch (float16, k=4, two "
               "directions) captured on its own stream and replayed bit for bit")
    else:
        result("FAIL", "thread-capture", "the thread's replayed h or c differs from the eager "
               "call's")


def _compile_case(torch):
    import sru_cupy
    torch.manual_seed(0)
    model = sru_cupy.SRU(32, 32, num_layers=2, use_tanh=True).cuda()
    x = torch.randn(16, 4, 32, device="cuda")

    def train_step(fn):
        model.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        h, c = fn(xg)
        (h.float().pow(2).sum() + c.float().sum()).backward()
        return [h.detach().clone(), c.detach().clone(), xg.grad.clone()] + [
            None if p.grad is None else p.grad.clone() for p in model.parameters()]

    def inference(fn):
        with torch.no_grad():
            h, c = fn(x)
        return [h.clone(), c.clone()]

    return model, train_step, inference


def _close(torch, got, want):
    """None when the lists of tensors match (compiled against eager), else the first mismatch."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None or b is None:
            if (a is None) != (b is None):
                return f"output {i}: a gradient is None on one side only"
            continue
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            return f"output {i}: max |compiled - eager| {float((a - b).abs().max()):.3g}"
    return None


def check_compile():
    # One compile thread: no pool of compile workers to start and, at exit, to stop (seconds
    # each, for the few small kernels of this model).
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    import torch
    if not torch.cuda.is_available():
        for name in ("compile-default", "compile-reduce-overhead"):
            result("SKIP", name, "torch sees no CUDA device")
        return
    model, train_step, inference = _compile_case(torch)
    eager_train, eager_inference = train_step(model), inference(model)
    for mode in ("default", "reduce-overhead"):
        name = f"compile-{mode}"
        try:
            torch._dynamo.reset()
            compiled = torch.compile(model, mode=mode, fullgraph=True)
            started = time.perf_counter()
            runs = []
            for _ in range(3):  # reduce-overhead: warm-up, record, replay
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                runs.append(train_step(compiled))
            got_inference = inference(compiled)
            for _ in range(2):
                got_inference = inference(compiled)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            mismatch = (_close(torch, runs[-1], eager_train)
                        or _close(torch, got_inference, eager_inference))
        except Exception as error:
            result("FAIL", name, f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
            continue
        if mismatch:
            result("FAIL", name, f"compiled differs from eager (rtol 1e-4, atol 1e-5): {mismatch}")
        else:
            result("PASS", name, f"fullgraph training and inference steps match eager "
                   f"(rtol 1e-4, atol 1e-5); compile and 6 calls {seconds:.1f} s")


CHILDREN = {"versions": check_versions, "kernels": check_kernels, "dtypes": check_dtypes,
            "capture-cold": check_capture_cold, "capture-unlaunched": check_capture_unlaunched,
            "thread-capture": check_thread_capture, "compile": check_compile}


def _child(name):
    if name != "versions":
        missing = _gpu_missing()
        if missing:
            for reported in dict((c, r) for c, r, _ in CHECKS)[name]:
                result("SKIP", reported, f"no GPU: {missing}")
            return 0
    CHILDREN[name]()
    return 0


# -- the runner ----------------------------------------------------------------------------------


def _sanitizer():
    """The compute-sanitizer executable: on PATH, else in $CUDA_HOME/bin or /usr/local/cuda/bin."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for folder in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        path = os.path.join(folder, "bin", "compute-sanitizer") if folder else None
        if path and os.access(path, os.X_OK):
            return path
    return None


class Runner:
    """Runs checks in children within a budget, prints their lines and counts the results."""

    def __init__(self, budget):
        self.deadline = time.monotonic() + budget
        self.budget = budget
        self.counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
        self.no_gpu = None
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
            [ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))

    def report(self, status, name, detail):
        self.counts[status] += 1
        result(status, name, detail)

    def left(self):
        return self.deadline - time.monotonic()

    def run(self, command, names, limit):
        """Runs ``command`` (at most ``limit`` seconds, and never past the budget) and passes its
        lines through; a result of ``names`` it did not report is a FAIL (it crashed, or was
        stopped at its limit)."""
        limit = max(1, min(limit, self.left()))
        lines, reported = [], set()

        def on_line(line):
            if line.startswith(STATE):
                self.no_gpu = json.loads(line[len(STATE):])["no_gpu"]
                return
            lines.append(line)
            found = _RESULT.match(line)
            if found and found.group(2) in names:
                reported.add(found.group(2))
                self.counts[found.group(1)] += 1
            sys.stdout.write(line)
            sys.stdout.flush()

        started = time.monotonic()
        returncode, stopped = gpu_check.run_command(command, limit, on_line, env=self.env,
                                                    grace=GRACE)
        seconds = time.monotonic() - started
        print(f"-- {', '.join(names)}: {seconds:.1f} s" + (
            " (stopped at its limit after reporting every result)"
            if stopped and reported == set(names) else " (stopped)" if stopped else ""),
            flush=True)
        tail = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
        for name in names:
            if name in reported:
                continue
            if stopped:
                self.report("FAIL", name, f"stopped after {limit:.0f} s (limit of the check, or "
                            "what was left of the smoke budget)")
            else:
                self.report("FAIL", name, f"exit {returncode} without a result after "
                            f"{seconds:.1f} s; last line: {tail[:300]}")

    def check(self, name, names, limit):
        if self.left() < 3:
            for reported in names:
                self.report("SKIP", reported, f"not run: the smoke budget of {self.budget:.0f} s "
                            "is spent")
            return
        if self.no_gpu and name != "versions":
            for reported in names:
                self.report("SKIP", reported, f"no GPU: {self.no_gpu}")
            return
        self.run([sys.executable, os.path.abspath(__file__), "--child", name], names, limit)

    def start_memcheck(self, limit):
        """Starts memcheck beside the checks after it; returns a function that waits for it and
        prints its lines and result (None when it is not run: reported as a SKIP at once)."""
        sanitizer = _sanitizer()
        if self.no_gpu or sanitizer is None or self.left() < 3:
            why = (f"no GPU: {self.no_gpu}" if self.no_gpu else
                   "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"
                   if sanitizer is None else
                   f"not run: the smoke budget of {self.budget:.0f} s is spent")
            self.report("SKIP", "memcheck", why)
            return None
        command = [sanitizer, "--tool", "memcheck", "--error-exitcode", "99", "--print-limit",
                   "20", sys.executable, os.path.join(HERE, "gpu_memcheck.py")]
        print(f"memcheck: {shlex.join(command)} (beside the checks after it)", flush=True)
        done = {}

        def work():
            done["lines"] = self._memcheck_lines(command, limit)

        thread = threading.Thread(target=work)
        thread.start()

        def finish():
            thread.join()
            lines, returncode, stopped, seconds = done["lines"]
            print("-- memcheck output:", flush=True)
            sys.stdout.write("".join(lines))
            summary = next((line.strip() for line in reversed(lines)
                            if "ERROR SUMMARY" in line), "no ERROR SUMMARY line")
            target_done = any(line.startswith("memcheck target: done") for line in lines)
            if stopped:
                self.report("FAIL", "memcheck", f"stopped after {limit:.0f} s")
            elif returncode == 0 and target_done and "0 errors" in summary:
                self.report("PASS", "memcheck", f"{summary} in {seconds:.0f} s")
            else:
                self.report("FAIL", "memcheck", f"exit {returncode}: {summary}" +
                            ("" if target_done else "; the target did not finish"))
        return finish

    def _memcheck_lines(self, command, limit):
        limit = max(1, min(limit, self.left()))
        lines = []
        started = time.monotonic()
        returncode, stopped = gpu_check.run_command(command, limit, lines.append, env=self.env,
                                                    grace=GRACE)
        return lines, returncode, stopped, time.monotonic() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=BUDGET,
                        help="seconds for all the checks (default %(default)s)")
    parser.add_argument("--check", action="append", dest="checks",
                        choices=[name for name, _, _ in CHECKS],
                        help="run only these checks (repeatable; versions always runs)")
    parser.add_argument("--list", action="store_true", help="print the checks and their limits")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child)
    if args.list:
        for name, names, limit in CHECKS:
            print(f"{name:20} {limit:3d} s  {', '.join(names)}")
        return 0
    runner = Runner(args.budget)
    print(f"smoke: budget {args.budget:.0f} s; checks: "
          + ", ".join(name for name, _, _ in CHECKS), flush=True)
    finish_memcheck = None
    for name, names, limit in CHECKS:
        if args.checks and name not in args.checks and name != "versions":
            continue
        if name == "memcheck":
            finish_memcheck = runner.start_memcheck(limit)
            continue
        runner.check(name, names, limit)
    if finish_memcheck:
        finish_memcheck()
    counts = runner.counts
    print(f"smoke: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped",
          flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
