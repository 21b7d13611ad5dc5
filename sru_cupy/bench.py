"""Benchmarks: the SRU layer against torch.nn.LSTM (cuDNN on GPU), torch.nn.Conv1d (kernel 3) and
the ``sru`` package, SRU++ against a Transformer encoder of the same width, the recurrence kernel
against its memory floor, and the start-up costs (imports, first call with a cold and a warm kernel
cache).

Run with ``python -m sru_cupy bench [--device auto|cpu|cuda] [--out DIR]``. Prints tables and
writes ``bench.json``, ``bench.md`` and ``bench.png`` to the output folder.

What is timed, in interleaved rounds: after ``--warmup`` rounds, each of ``--repeats`` rounds runs
every model once in turn (A B C A B C ...), so load that drifts during the run falls on all of them
alike. Reported: the median time per model with its interquartile range, and the median over the
rounds of each model's time / the SRU's time in the same round, with its interquartile range
(CUDA events on GPU, perf_counter on CPU):
- forward: inference (``torch.no_grad``; the SRU runs its inference kernel, no per-step state);
- forward+backward: training step on inputs that require grad, so the backward includes the
  input-gradient GEMM, with ``h.sum()`` as the loss.
The recurrence alone is compared with its memory floor: the bytes it must move (U and x in, h and
c out per element for training forward; 10 values per element for backward, REFERENCE figures)
divided by the copy bandwidth. On the CPU a copy of ``COPY_BYTES`` runs in the same rounds as the
kernels, each round's floor comes from that round's copy, and the % of floor is the median over
the rounds; the time per element per core is the kernel time x threads / (L B D). On a GPU the
kernel time is that of ``KERNEL_LAUNCHES`` calls captured in one CUDA graph and replayed back to
back (timed with CUDA events, divided by the count: no Python between launches, nothing
subtracted); the same calls run eagerly back to back, and the host time to issue one call (the
launch overhead), are reported beside it; the floor uses the bandwidth measured at the start.
The per-call cost at a tiny shape (``PER_CALL_CONFIG``: L=1, B=1, d=32, one layer, float32), where
the Python and launch work around the kernels is all there is: the SRU's forward against
``nn.LSTM``'s (interleaved rounds of ``PER_CALL_BATCH`` calls each, medians and per-round ratios),
and the host time per call of the SRU's and the LSTM's forward and forward+backward: on a GPU,
``PER_CALL_BATCH`` calls issued back to back timed on the CPU side with one synchronisation after
them (so the figure is what Python and the launches cost, not the kernels), on the CPU the whole
call. On a GPU it is compared with ``PER_CALL_GOALS``.
The start-up costs come from fresh processes: import of torch and of sru_cupy, then the first SRU
forward with an empty kernel cache (cold: the kernels are compiled) and with the cache it left
(warm; medians of ``STARTUP_WARM_RUNS`` processes, also as the excess of the first forward over
the second), with CUDA context creation timed apart before it.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

# Paper configurations (GTX 1070 figures in the 2017 paper), then larger ones.
CONFIGS = [
    {"name": "L32-B32-d256", "L": 32, "B": 32, "d": 256, "layers": 1, "bidirectional": False},
    {"name": "L128-B32-d512", "L": 128, "B": 32, "d": 512, "layers": 1, "bidirectional": False},
    {"name": "L256-B64-d1024", "L": 256, "B": 64, "d": 1024, "layers": 1, "bidirectional": False,
     "gpu_only": True},
    {"name": "L128-B32-d512-4layer-bi", "L": 128, "B": 32, "d": 512, "layers": 4,
     "bidirectional": True},
    # SRU++ (attention in every layer, and in every 4th as in the paper's large models) against
    # nn.TransformerEncoderLayer of the same width; long sequences, where attention costs most.
    {"name": "srupp-L512-B8-d512-4layer", "L": 512, "B": 8, "d": 512, "layers": 4,
     "bidirectional": False, "srupp": True},
    {"name": "srupp-L2048-B2-d512-4layer", "L": 2048, "B": 2, "d": 512, "layers": 4,
     "bidirectional": False, "srupp": True, "gpu_only": True},
]

#: Storage dtypes the layers can be timed in.
DTYPES = ("float32", "bfloat16", "float16", "float64")

PAPER_MS = {  # (forward, forward+backward) in ms, GTX 1070, batch 32, one layer
    "L32-B32-d256": {"cuDNN LSTM": (2.68, 6.51), "conv k=3": (0.23, 0.54), "SRU": (0.18, 0.40)},
    "L128-B32-d512": {"cuDNN LSTM": (15.1, 38.9), "conv k=3": (2.14, 4.49), "SRU": (1.66, 3.38)},
}


#: Recurrence calls per timed batch on a GPU (one CUDA graph, or one eager run back to back).
KERNEL_LAUNCHES = 50

#: Bytes of the copy that measures the bandwidth (beyond the CPU's caches).
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}

#: Fresh processes with a warm kernel cache whose start-up times give the medians reported.
STARTUP_WARM_RUNS = 3

#: The tiny shape of the per-call section: all Python and launch overhead.
PER_CALL_CONFIG = {"name": "L1-B1-d32", "L": 1, "B": 1, "d": 32, "layers": 1,
                   "bidirectional": False}
#: Calls per timed batch in the per-call section.
PER_CALL_BATCH = 20
#: What the per-call figures should reach on a GPU: (what, key, goal), the value at most the goal.
PER_CALL_GOALS = [
    ("forward time / nn.LSTM's", "forward_ratio_to_lstm", 1.5),
    ("host us per forward", "host_us_forward", 40.0),
    ("host us per forward+backward", "host_us_forward_backward", 80.0),
]


class Timer:
    """Wall times of callables, in ms: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device, repeats, warmup):
        import torch
        self.torch = torch
        self.device = device
        self.repeats = repeats
        self.warmup = warmup

    def once(self, fn):
        """ms of one call of ``fn``."""
        if self.device.type == "cuda":
            torch = self.torch
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def __call__(self, fn):
        """Median of ``repeats`` calls after ``warmup`` calls."""
        for _ in range(self.warmup):
            fn()
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
        return statistics.median([self.once(fn) for _ in range(self.repeats)])

    def rounds(self, fns):
        """name -> the ``repeats`` per-call times of ``fns[name]``, the callables run in turn in
        each round (A B C A B C ...) after ``warmup`` such rounds."""
        for _ in range(self.warmup):
            for fn in fns.values():
                fn()
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
        times = {name: [] for name in fns}
        for _ in range(self.repeats):
            for name, fn in fns.items():
                times[name].append(self.once(fn))
        return times


def spread(values):
    """(median, [first quartile, third quartile]) of a non-empty list of numbers."""
    if len(values) == 1:
        return values[0], [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), [q1, q3]


class _ConvStack:
    """`layers` Conv1d(d, d, 3, padding=1) on (L, B, d) input (transposed to (B, d, L))."""

    def __init__(self, d, layers, device, dtype):
        import torch
        self.net = torch.nn.Sequential(*[torch.nn.Conv1d(d, d, 3, padding=1)
                                         for _ in range(layers)]).to(device, dtype)

    def parameters(self):
        return self.net.parameters()

    def __call__(self, x):
        return self.net(x.permute(1, 2, 0)), None


class _FirstOutput:
    """A module whose output is a tensor, or a tuple that starts with one, called as (output, _)."""

    def __init__(self, module):
        self.module = module

    def parameters(self):
        return self.module.parameters()

    def __call__(self, x):
        out = self.module(x)
        return (out[0] if isinstance(out, tuple) else out), None


def _srupp_models(cfg, device, dtype):
    """SRU++ with attention in every layer and in every 4th (attention width d/4, one head, as in
    the paper), a Transformer encoder (8 heads, feed-forward 4d, as in the original Transformer)
    and the SRU, all ``layers`` deep and d wide; attention over the whole sequence (no mask)."""
    import torch
    from .modules import SRU
    from .srupp import SRUpp
    d, layers = cfg["d"], cfg["layers"]
    encoder = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(d, nhead=8, dim_feedforward=4 * d, dropout=0.0),
        num_layers=layers, enable_nested_tensor=False)
    return {
        "sru_cupy SRU": SRU(d, d, num_layers=layers).to(device, dtype),
        "SRU++ (all)": _FirstOutput(SRUpp(d, d, d // 4, num_layers=layers).to(device, dtype)),
        "SRU++ (1 of 4)": _FirstOutput(SRUpp(d, d, d // 4, num_layers=layers,
                                             attention_every_n_layers=4).to(device, dtype)),
        "Transformer": _FirstOutput(encoder.to(device, dtype)),
    }


def _models(cfg, device, dtype):
    """name -> callable(x) -> (output, _) ; models that cannot be built are skipped with a reason."""
    import torch
    from .modules import SRU
    if cfg.get("srupp"):
        return _srupp_models(cfg, device, dtype), {}
    d, layers, bi = cfg["d"], cfg["layers"], cfg["bidirectional"]
    hidden = d // 2 if bi else d
    models, skipped = {}, {}
    models["sru_cupy SRU"] = SRU(d, hidden, num_layers=layers, bidirectional=bi).to(device, dtype)
    lstm = torch.nn.LSTM(d, hidden, num_layers=layers, bidirectional=bi).to(device, dtype)
    models["cuDNN LSTM" if device.type == "cuda" else "torch LSTM"] = lstm
    models["conv k=3"] = _ConvStack(d, layers, device, dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sru
        models["sru package"] = sru.SRU(d, hidden, num_layers=layers,
                                        bidirectional=bi).to(device, dtype)
    except Exception as error:  # not installed, or its extension does not build here
        skipped["sru package"] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return models, skipped


def _step_functions(model, x, x_grad):
    """(forward, train_step) of a model called as (output, _) = model(x): inference under
    torch.no_grad, and forward+backward of the output's sum on the input that requires grad."""
    import torch

    def forward():
        with torch.no_grad():
            model(x)

    def train_step():
        out, _ = model(x_grad)
        out.float().sum().backward()
    return forward, train_step


def _layer_rows(cfg, device, dtype, timer, only=None, batch=1):
    """One row per model (those named in ``only``, else all): median forward and forward+backward
    times (ms per call; each timed run makes ``batch`` calls) with their interquartile ranges,
    and the medians of the per-round ratios to the SRU with theirs."""
    import torch
    x = torch.randn(cfg["L"], cfg["B"], cfg["d"], device=device, dtype=dtype)
    x_grad = x.clone().requires_grad_(True)
    models, skipped = _models(cfg, device, dtype)
    if only is not None:
        models = {name: model for name, model in models.items() if name in only}
        skipped = {name: why for name, why in skipped.items() if name in only}
    steps = {}
    for name, model in models.items():
        forward, train_step = _step_functions(model, x, x_grad)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Running SRU on CPU")
                forward()
                train_step()  # a model that fails is left out before the rounds start
            steps[name] = (forward, train_step)
        except Exception as error:
            skipped[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    fns = {(name, key): step[i] for name, step in steps.items()
           for i, key in enumerate(("forward", "forward_backward"))}
    if batch > 1:
        fns = {key: _repeated(fn, batch) for key, fn in fns.items()}
    with warnings.catch_warnings():
        # the sru package warns on every CPU training call
        warnings.filterwarnings("ignore", message="Running SRU on CPU")
        times = timer.rounds(fns)
    times = {key: [t / batch for t in values] for key, values in times.items()}
    rows = []
    for name in steps:
        row = {"model": name}
        for key in ("forward", "forward_backward"):
            row[f"{key}_ms"], row[f"{key}_ms_iqr"] = spread(times[(name, key)])
            base = times.get(("sru_cupy SRU", key))
            if base:
                row[f"{key}_ratio"], row[f"{key}_ratio_iqr"] = spread(
                    [t / b for t, b in zip(times[(name, key)], base)])
        rows.append(row)
    return rows, skipped


def _repeated(fn, count):
    """A callable that calls ``fn`` ``count`` times."""
    def run():
        for _ in range(count):
            fn()
    return run


def host_time_per_call(fn, device, repeats, warmup, batch=PER_CALL_BATCH):
    """Median over ``repeats`` batches (after ``warmup`` calls) of the host microseconds per call
    of ``fn``: ``batch`` calls back to back timed with perf_counter. On a GPU nothing synchronises
    inside the batch (one synchronisation after it, outside the time), so this is the time Python
    and the launches take; on the CPU it is the whole call."""
    import torch
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        times.append((time.perf_counter() - t0) / batch * 1e6)
        if cuda:
            torch.cuda.synchronize(device)
    return statistics.median(times)


def per_call_section(device, timer):
    """The per-call section at ``PER_CALL_CONFIG`` in float32: the SRU's and nn.LSTM's rows
    (forward and forward+backward ms per call, ratios to the SRU), their host microseconds per
    call, and on a GPU the goals with the values measured."""
    import torch
    cfg = PER_CALL_CONFIG
    lstm_name = "cuDNN LSTM" if device.type == "cuda" else "torch LSTM"
    rows, skipped = _layer_rows(cfg, device, torch.float32, timer,
                                only=("sru_cupy SRU", lstm_name), batch=PER_CALL_BATCH)
    x = torch.randn(cfg["L"], cfg["B"], cfg["d"], device=device)
    x_grad = x.clone().requires_grad_(True)
    models, _ = _models(cfg, device, torch.float32)
    host_us = {}
    for name in [r["model"] for r in rows]:
        forward, train_step = _step_functions(models[name], x, x_grad)
        host_us[name] = {
            "forward": host_time_per_call(forward, device, timer.repeats, timer.warmup),
            "forward_backward": host_time_per_call(train_step, device, timer.repeats,
                                                   timer.warmup)}
    section = {"config": dict(cfg, dtype="float32"), "batch": PER_CALL_BATCH, "rows": rows,
               "host_us": host_us, "skipped": skipped,
               "host_timing": (f"{PER_CALL_BATCH} calls back to back timed on the CPU side, one "
                               "synchronisation after them" if device.type == "cuda" else
                               f"whole calls, {PER_CALL_BATCH} back to back")}
    lstm = next((r for r in rows if r["model"] == lstm_name), None)
    values = {}
    if "sru_cupy SRU" in host_us:  # else the SRU failed, and skipped says why
        values = {"host_us_forward": host_us["sru_cupy SRU"]["forward"],
                  "host_us_forward_backward": host_us["sru_cupy SRU"]["forward_backward"]}
    if lstm is not None and "forward_ratio" in lstm:
        values["forward_ratio_to_lstm"] = 1.0 / lstm["forward_ratio"]
    section.update(values)
    if device.type == "cuda":
        section["goals"] = [{"what": what, "key": key, "goal": goal, "value": values[key],
                             "met": values[key] <= goal}
                            for what, key, goal in PER_CALL_GOALS if key in values]
    return section


def _copy_step(device, nbytes=None):
    """(a callable that copies ``nbytes`` from one buffer to another, nbytes)."""
    import torch
    nbytes = nbytes or COPY_BYTES[device.type]
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), nbytes


def copy_bandwidth(device, timer, nbytes=None):
    """Bytes per second of a device-to-device (or host memcpy) copy: read + write counted."""
    copy, nbytes = _copy_step(device, nbytes)
    return 2 * nbytes / (timer(copy) / 1e3)


def kernel_timing(fn, timer, launches=KERNEL_LAUNCHES):
    """Per-call times of ``fn`` (one op call, one kernel) on a GPU; medians over ``timer.repeats``
    batches of ``launches`` calls after ``timer.warmup`` calls:

    - ``ms``: the calls captured in one CUDA graph, replayed, between two CUDA events, per call
      (GPU time of the kernel with the graph's launch gaps, no Python);
    - ``eager_ms``: the same calls run eagerly back to back between two CUDA events, per call;
    - ``launch_overhead_us``: host time to issue one eager call (perf_counter over the batch).

    Where capture fails, ``ms`` is the eager time and ``graph_error`` says why."""
    import torch
    for _ in range(timer.warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    eager, host = [], []
    for _ in range(timer.repeats):
        start.record()
        t0 = time.perf_counter()
        for _ in range(launches):
            fn()
        host.append((time.perf_counter() - t0) / launches * 1e6)
        end.record()
        end.synchronize()
        eager.append(start.elapsed_time(end) / launches)
    row = {"eager_ms": statistics.median(eager), "launch_overhead_us": statistics.median(host),
           "launches": launches}
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(launches):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        replays = []
        for _ in range(timer.repeats):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            replays.append(start.elapsed_time(end) / launches)
        row["ms"] = statistics.median(replays)
        row["timing"] = f"CUDA graph of {launches} calls"
        del graph
    except Exception as error:  # capture refused: the eager figure, said so
        row["ms"] = row["eager_ms"]
        row["timing"] = f"{launches} eager calls back to back"
        row["graph_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return row


def _recurrence_rows(cfg, device, dtype, timer, bandwidth):
    """The forward (training and inference) and backward kernels of one of the config's layers
    alone, vs their memory floor."""
    import torch
    from . import ops
    L, B, D, bi = cfg["L"], cfg["B"], cfg["d"], cfg["bidirectional"]
    g = torch.Generator(device="cpu").manual_seed(0)
    U = (torch.randn(L, B, 3 * D, generator=g) * 0.5).to(device, dtype)
    x = torch.randn(L, B, D, generator=g).to(device, dtype)
    weight_c = torch.randn(2 * D, generator=g).to(device)
    bias = torch.zeros(2 * D, device=device)
    options = (D // 2 if bi else D, bi, True, False, 1.0)
    _, c, _ = ops.recurrence_forward_op(U, x, weight_c, bias, None, None, None, *options, True)
    grad_h = torch.randn_like(x)
    size = torch.tensor([], dtype=dtype).element_size()
    elements = L * B * D
    kernels = {
        "forward (training)": (lambda: ops.recurrence_forward_op(
            U, x, weight_c, bias, None, None, None, *options, True), 6),
        "forward (inference)": (lambda: ops.recurrence_forward_op(
            U, x, weight_c, bias, None, None, None, *options, False), 5),
        "backward": (lambda: ops.recurrence_backward_op(
            grad_h, None, U, x, weight_c, bias, None, c, None, None, *options), 10),
    }
    rows = []
    with torch.no_grad():
        if device.type == "cuda":
            for name, (fn, values) in kernels.items():
                row = kernel_timing(fn, timer)
                floor_ms = values * size * elements / bandwidth * 1e3
                row.update(kernel=name, floor_ms=floor_ms,
                           percent_of_floor=100.0 * floor_ms / row["ms"])
                rows.append(row)
            return rows
        copy, nbytes = _copy_step(device)
        fns = dict({name: fn for name, (fn, _) in kernels.items()}, copy=copy)
        times = timer.rounds(fns)
        threads = torch.get_num_threads()
        for name, (_, values) in kernels.items():
            # each round's floor from the copy of the same round: bytes moved / (2 nbytes / copy)
            floors = [values * size * elements * copy_ms / (2 * nbytes)
                      for copy_ms in times["copy"]]
            row = {"kernel": name}
            row["ms"], row["ms_iqr"] = spread(times[name])
            row["floor_ms"] = statistics.median(floors)
            row["percent_of_floor"], row["percent_of_floor_iqr"] = spread(
                [100.0 * f / t for f, t in zip(floors, times[name])])
            row["ns_per_element_per_core"] = row["ms"] * 1e6 * threads / elements
            rows.append(row)
    return rows


_STARTUP_CHILD = """
import json, sys, time
device = sys.argv[1]
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import sru_cupy
t2 = time.perf_counter()
times = {"import torch": t1 - t0, "import sru_cupy": t2 - t1}
if device == "cuda":
    import cupy
    t3 = time.perf_counter()
    torch.zeros(1, device="cuda")  # the primary context, shared by CuPy
    cupy.cuda.Device(torch.cuda.current_device()).use()
    torch.cuda.synchronize()
    times.update({"import cupy": t3 - t2, "CUDA context": time.perf_counter() - t3})
layer = sru_cupy.SRU(8, 8, num_layers=1).to(device)
x = torch.randn(4, 2, 8, device=device)


def forward():
    t = time.perf_counter()
    layer(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


times["first call"] = forward()
times["second call"] = forward()
print(json.dumps(times))
"""


def startup_cost(device, warm_runs=STARTUP_WARM_RUNS):
    """Seconds of the start-up steps in fresh processes: the imports (torch, sru_cupy; CuPy and
    the CUDA context on a GPU), then the first SRU forward with an empty kernel cache ("cold
    cache": the kernels are compiled) and with the cache it left ("warm cache"), and the warm
    first forward's excess over the second in the same process. The imports and the warm
    figures are medians over ``warm_runs`` processes."""
    cold, warm, error = None, [], None
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, SRU_CUPY_CACHE_DIR=cache, CUPY_CACHE_DIR=os.path.join(cache, "cupy"))
        env.pop("SRU_CUPY_PTX_DIR", None)
        for _ in range(1 + warm_runs):
            out = subprocess.run([sys.executable, "-c", _STARTUP_CHILD, device.type], env=env,
                                 capture_output=True, text=True)
            if out.returncode != 0:
                error = out.stderr.strip().splitlines()[-1:]
                break
            times = json.loads(out.stdout.strip().splitlines()[-1])
            if cold is None:
                cold = times
            else:
                warm.append(times)
    results = {}
    runs = warm or ([cold] if cold else [])
    if runs:
        for key in runs[0]:
            if key not in ("first call", "second call"):
                results[key] = statistics.median(t[key] for t in runs)
    if cold:
        results["first call, cold cache"] = cold["first call"]
    if warm:
        results["first call, warm cache"] = statistics.median(t["first call"] for t in warm)
        results["first call over the second, warm cache"] = statistics.median(
            t["first call"] - t["second call"] for t in warm)
    if error:
        results["error"] = error
    return results


def select_device(device):
    """The torch.device for "auto" (cuda when PyTorch sees one, else cpu), "cpu" or "cuda[:N]"."""
    import torch
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected auto, cpu or cuda[:N], got {device!r}") from None
    if chosen.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected auto, cpu or cuda[:N], got {device!r}")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested, but PyTorch sees no CUDA device")
    return chosen


def select_configs(device, configs=None, include_all=False):
    """The configurations to run: those named (any of CONFIGS, GPU-only ones included), else all
    of them on a GPU or with ``include_all``, else those that are not GPU-only."""
    if configs is None:
        return [c for c in CONFIGS
                if include_all or device.type == "cuda" or not c.get("gpu_only")]
    names = [c["name"] for c in CONFIGS]
    unknown = [name for name in configs if name not in names]
    if unknown:
        raise ValueError(f"configs: expected names among {names}, got unknown {unknown}")
    return [c for c in CONFIGS if c["name"] in configs]


def select_dtypes(device, dtypes=None):
    """float32, and bfloat16 on a GPU, unless ``dtypes`` names others (from DTYPES)."""
    if dtypes is None:
        return ["float32", "bfloat16"] if device.type == "cuda" else ["float32"]
    unknown = [name for name in dtypes if name not in DTYPES]
    if unknown or not dtypes:
        raise ValueError(f"dtypes: expected names among {list(DTYPES)}, got {list(dtypes)}")
    return list(dict.fromkeys(dtypes))


def run(device="auto", out_dir=None, repeats=20, warmup=5, dtypes=None, configs=None,
        include_all=False, echo=print):
    """Runs the benchmark, prints its tables through ``echo`` and returns the result dict (also
    written to ``out_dir`` as bench.json, bench.md and bench.png when given). Raises ValueError
    for an unknown device, configuration or dtype, before anything is timed."""
    import torch
    device = select_device(device)
    dtypes = select_dtypes(device, dtypes)
    selected = select_configs(device, configs, include_all)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats, warmup: expected >= 1 and >= 0, got {repeats}, {warmup}")
    timer = Timer(device, repeats, warmup)
    torch.manual_seed(0)
    from . import info
    result = {"device": info.device_name(device), "torch": torch.__version__,
              "repeats": repeats, "warmup": warmup, "threads": torch.get_num_threads(),
              "layers": [], "recurrence": [], "skipped": {}}
    if device.type == "cpu":
        from . import cpu_gemm
        result["cpu_gemm"] = cpu_gemm.describe()
        result["cpu_kernels"] = info.cpu_path()
    bandwidth = copy_bandwidth(device, timer)
    result["copy_bandwidth_GBps"] = bandwidth / 1e9
    echo(f"device: {result['device']}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
         f"{repeats} interleaved rounds after {warmup} warm-up rounds")
    write_partial(result, out_dir)
    result["per_call"] = per_call_section(device, timer)
    echo(format_per_call(result["per_call"]) + "\n")
    write_partial(result, out_dir)
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for cfg in selected:
            rows, skipped = _layer_rows(cfg, device, dtype, timer)
            for row in rows:
                row.update(config=cfg["name"], dtype=dtype_name)
            result["layers"].extend(rows)
            for name, why in skipped.items():
                result["skipped"][f"{cfg['name']} {dtype_name} {name}"] = why
            rec = _recurrence_rows(cfg, device, dtype, timer, bandwidth)
            for row in rec:
                row.update(config=cfg["name"], dtype=dtype_name)
            result["recurrence"].extend(rec)
            echo(format_layer_table(rows) + "\n")
            write_partial(result, out_dir)  # a run stopped later still leaves these
    result["startup_seconds"] = startup_cost(device)
    write_partial(result, out_dir)
    result["complete"] = True
    markdown = format_markdown(result)
    echo(markdown)
    if out_dir:
        write_outputs(result, markdown, out_dir)
        echo(f"wrote {os.path.join(out_dir, 'bench.json')}, bench.md, bench.png")
    return result


def _ratio(row, key):
    """``row``'s median per-round ratio to the SRU with its interquartile range, e.g.
    "2.13 (2.05-2.20)"; "-" where the row has none."""
    if f"{key}_ratio" not in row:
        return "-"
    low, high = row.get(f"{key}_ratio_iqr", [row[f"{key}_ratio"]] * 2)
    return f"{row[f'{key}_ratio']:.2f} ({low:.2f}-{high:.2f})"


def format_layer_table(rows):
    lines = [f"{'config':26} {'dtype':9} {'model':14} {'fwd ms':>9} {'x SRU (IQR)':>17} "
             f"{'fwd+bwd ms':>11} {'x SRU (IQR)':>17}"]
    for r in rows:
        lines.append(f"{r['config']:26} {r['dtype']:9} {r['model']:14} {r['forward_ms']:9.3f} "
                     f"{_ratio(r, 'forward'):>17} {r['forward_backward_ms']:11.3f} "
                     f"{_ratio(r, 'forward_backward'):>17}")
    return "\n".join(lines)


def format_per_call(section):
    """The per-call section as markdown: its table, how the host time was taken, and the goals
    (on a GPU) with the values measured."""
    cfg = section["config"]
    out = [f"Per-call cost at L={cfg['L']} B={cfg['B']} d={cfg['d']}, {cfg['layers']} layer, "
           f"{cfg['dtype']} (times per call from batches of {section['batch']} calls; x SRU as "
           f"above; host us: {section['host_timing']}):", "",
           "| model | forward us | x SRU | fwd+bwd us | x SRU | host us forward "
           "| host us fwd+bwd |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in section["rows"]:
        host = section["host_us"].get(r["model"], {})
        out.append(f"| {r['model']} | {r['forward_ms'] * 1e3:.1f} | {_ratio(r, 'forward')} | "
                   f"{r['forward_backward_ms'] * 1e3:.1f} | {_ratio(r, 'forward_backward')} | "
                   f"{host.get('forward', float('nan')):.1f} | "
                   f"{host.get('forward_backward', float('nan')):.1f} |")
    if section.get("skipped"):
        out += ["", "Not measured: " + "; ".join(f"{k} ({v})" for k, v in section["skipped"].items())]
    if section.get("goals"):
        out += ["", "Goals (SRU forward time / nn.LSTM's is 1 / the LSTM's x SRU): " + "; ".join(
            f"{g['what']} {g['value']:.2f} <= {g['goal']:g}: {'met' if g['met'] else 'NOT met'}"
            for g in section["goals"])]
    return "\n".join(out)


def _seconds(value):
    """A duration for the start-up line: ms below one second, else s."""
    return f"{value * 1e3:.1f} ms" if abs(value) < 1 else f"{value:.2f} s"


def format_markdown(result):
    out = [f"Device: {result['device']} (torch {result['torch']}, {result['threads']} threads); "
           f"{result['repeats']} interleaved rounds (every model once per round) after "
           f"{result.get('warmup', 0)} warm-up rounds. Times are medians per model; x SRU is the "
           f"median over the rounds of time / sru_cupy SRU time in the same round, with its "
           f"interquartile range."]
    if "cpu_gemm" in result:
        out.append(f"CPU GEMM of the SRU layers: {result['cpu_gemm']}. Recurrence: "
                   f"{result['cpu_kernels']}.")
    out += ["", "| config | dtype | model | forward ms | x SRU | fwd+bwd ms | x SRU |",
            "|---|---|---|---:|---:|---:|---:|"]
    for r in result["layers"]:
        out.append(f"| {r['config']} | {r['dtype']} | {r['model']} | {r['forward_ms']:.3f} | "
                   f"{_ratio(r, 'forward')} | {r['forward_backward_ms']:.3f} | "
                   f"{_ratio(r, 'forward_backward')} |")
    out += ["", f"Recurrence kernel alone vs its memory floor (copy bandwidth "
                f"{result['copy_bandwidth_GBps']:.1f} GB/s):", "",
            "| config | dtype | kernel | ms | floor ms | % of floor | ns/element/core | eager ms "
            "| launch overhead us |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["recurrence"]:
        eager = f"{r['eager_ms']:.4f}" if "eager_ms" in r else "-"
        overhead = f"{r['launch_overhead_us']:.1f}" if "launch_overhead_us" in r else "-"
        percent = f"{r['percent_of_floor']:.1f}"
        if "percent_of_floor_iqr" in r:
            percent += " ({:.1f}-{:.1f})".format(*r["percent_of_floor_iqr"])
        per_core = (f"{r['ns_per_element_per_core']:.2f}" if "ns_per_element_per_core" in r
                    else "-")
        out.append(f"| {r['config']} | {r['dtype']} | {r['kernel']} | {r['ms']:.4f} | "
                   f"{r['floor_ms']:.4f} | {percent} | {per_core} | {eager} | {overhead} |")
    timings = sorted({r["timing"] for r in result["recurrence"] if "timing" in r})
    if timings:
        out += ["", "Kernel ms: " + "; ".join(timings) + ", per call (CUDA events); eager ms: the "
                "same calls from Python back to back; launch overhead: host time per eager call."]
    elif result["recurrence"]:
        out += ["", "Kernel ms: medians over rounds that also time the copy; % of floor: median "
                "over the rounds of that round's floor / kernel time (interquartile range); "
                "ns/element/core: kernel time x threads / (L B D)."]
    if "per_call" in result:
        out += ["", format_per_call(result["per_call"])]
    startup = result.get("startup_seconds", {})
    if startup:
        out += ["", "Start-up (fresh processes; first call: one SRU forward): "
                + "; ".join(f"{k}: {_seconds(v)}" if isinstance(v, (int, float)) else f"{k}: {v}"
                            for k, v in startup.items())]
    if result["skipped"]:
        out += ["", "Not measured: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items())]
    return "\n".join(out)


def write_partial(result, out_dir):
    """bench.json and bench.md with what is measured so far, the JSON marked ``"complete":
    false`` (no-op without ``out_dir``); called after every section, so a run stopped later
    leaves them; write_outputs replaces them at the end (``"complete": true``)."""
    if out_dir:
        from .cache import write_atomic
        os.makedirs(out_dir, exist_ok=True)
        partial = dict(result, complete=False)
        write_atomic(os.path.join(out_dir, "bench.json"), json.dumps(partial, indent=2).encode())
        write_atomic(os.path.join(out_dir, "bench.md"),
                     (format_markdown(partial) + "\n\n(incomplete: written during the run; its end "
                      "rewrites this file)\n").encode())


def write_outputs(result, markdown, out_dir):
    from .cache import write_atomic
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, "bench.json"), json.dumps(result, indent=2).encode())
    write_atomic(os.path.join(out_dir, "bench.md"), (markdown + "\n").encode())
    try:
        _chart(result, os.path.join(out_dir, "bench.png"))
    except ImportError:
        pass  # matplotlib is optional: the JSON and markdown carry the figures


def _chart(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["layers"]
    groups = sorted({(r["config"], r["dtype"]) for r in rows}, key=lambda g: (g[1], g[0]))
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(len(models), 1)
    for ax, key, title in ((axes[0], "forward_ms", "forward"),
                           (axes[1], "forward_backward_ms", "forward + backward")):
        for i, model in enumerate(models):
            values = [next((r[key] for r in rows if (r["config"], r["dtype"]) == g
                            and r["model"] == model), 0.0) for g in groups]
            ax.bar([j + i * width for j in range(len(groups))], values, width, label=model)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels([f"{c}\n{dt}" for c, dt in groups], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(f"{title} — {result['device']}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
