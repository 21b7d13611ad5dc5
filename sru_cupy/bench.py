"""Benchmarks: the SRU layer against torch.nn.LSTM (cuDNN on GPU), torch.nn.Conv1d (kernel 3) and
the ``sru`` package, SRU++ against a Transformer encoder of the same width, the recurrence kernel
against its memory floor, and the kernel compile cost.

Run with ``python -m sru_cupy bench [--device auto|cpu|cuda] [--out DIR]``. Prints tables and
writes ``bench.json``, ``bench.md`` and ``bench.png`` to the output folder.

What is timed (medians of ``--repeats`` runs after ``--warmup`` runs; CUDA events on GPU):
- forward: inference (``torch.no_grad``; the SRU runs its inference kernel, no per-step state);
- forward+backward: training step on inputs that require grad, so the backward includes the
  input-gradient GEMM, with ``h.sum()`` as the loss.
The recurrence alone is compared with its memory floor: the bytes it must move (U and x in, h and
c out per element for training forward; 10 values per element for backward, REFERENCE figures)
divided by the device-to-device copy bandwidth measured in the same run. On a GPU the kernel time is
that of ``KERNEL_LAUNCHES`` calls captured in one CUDA graph and replayed back to back (timed with
CUDA events, divided by the count: no Python between launches, nothing subtracted); the same calls
run eagerly back to back, and the host time to issue one call (the launch overhead), are reported
beside it. The compile cost is the first call in a fresh process with an empty kernel cache, then
with a warm one, with the imports and the CUDA context creation timed apart before it.
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


class Timer:
    """Median wall time of a callable, in ms: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device, repeats, warmup):
        import torch
        self.torch = torch
        self.device = device
        self.repeats = repeats
        self.warmup = warmup

    def __call__(self, fn):
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            for _ in range(self.repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


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


def _layer_rows(cfg, device, dtype, timer):
    import torch
    x = torch.randn(cfg["L"], cfg["B"], cfg["d"], device=device, dtype=dtype)
    models, skipped = _models(cfg, device, dtype)
    rows = []
    for name, model in models.items():
        def forward():
            with torch.no_grad():
                model(x)

        x_grad = x.clone().requires_grad_(True)

        def train_step():
            out, _ = model(x_grad)
            out.float().sum().backward()

        try:
            with warnings.catch_warnings():
                # the sru package warns on every CPU training call
                warnings.filterwarnings("ignore", message="Running SRU on CPU")
                fwd = timer(forward)
                fwd_bwd = timer(train_step)
            rows.append({"model": name, "forward_ms": fwd, "forward_backward_ms": fwd_bwd})
        except Exception as error:
            skipped[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return rows, skipped


def copy_bandwidth(device, timer, nbytes=None):
    """Bytes per second of a device-to-device (or host memcpy) copy: read + write counted."""
    import torch
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms / 1e3)


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
        for name, (fn, values) in kernels.items():
            row = kernel_timing(fn, timer) if device.type == "cuda" else {"ms": timer(fn)}
            floor_ms = values * size * elements / bandwidth * 1e3
            row.update(kernel=name, floor_ms=floor_ms, percent_of_floor=100.0 * floor_ms / row["ms"])
            rows.append(row)
    return rows


_COMPILE_COST_CHILD = """
import json, sys, time
device = sys.argv[1]
t0 = time.perf_counter()
import torch, sru_cupy
t1 = time.perf_counter()
times = {"import torch and sru_cupy": t1 - t0}
if device == "cuda":
    import cupy
    t2 = time.perf_counter()
    torch.zeros(1, device="cuda")  # the primary context, shared by CuPy
    cupy.cuda.Device(torch.cuda.current_device()).use()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    times.update({"import cupy": t2 - t0 - times["import torch and sru_cupy"],
                  "CUDA context": t1 - t2})
U = torch.zeros(2, 1, 3, device=device)
b = torch.zeros(2, device=device)
sru_cupy.recurrence(U, torch.zeros(2, 1, 1, device=device), None, b, hidden_size=1)
if device == "cuda":
    torch.cuda.synchronize()
times["first call"] = time.perf_counter() - t1
print(json.dumps(times))
"""


def compile_cost(device):
    """Seconds of the first call in a fresh process, with an empty kernel cache ("cold cache": the
    kernels are compiled) and then with the cache it left ("warm cache"). Imports (torch and
    sru_cupy; CuPy) and the CUDA context creation come before the timed call and are reported
    apart, from the cold process."""
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, SRU_CUPY_CACHE_DIR=cache, CUPY_CACHE_DIR=os.path.join(cache, "cupy"))
        env.pop("SRU_CUPY_PTX_DIR", None)
        for label in ("cold cache", "warm cache"):
            out = subprocess.run([sys.executable, "-c", _COMPILE_COST_CHILD, device.type], env=env,
                                 capture_output=True, text=True)
            if out.returncode != 0:
                results[label] = None
                results["error"] = out.stderr.strip().splitlines()[-1:]
                break
            times = json.loads(out.stdout.strip().splitlines()[-1])
            results[label] = times.pop("first call")
            if label == "cold cache":
                results.update(times)
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
    bandwidth = copy_bandwidth(device, timer)
    result["copy_bandwidth_GBps"] = bandwidth / 1e9
    echo(f"device: {result['device']}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
         f"median of {repeats} runs after {warmup} warm-up")
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
            echo(format_layer_table([r for r in rows]) + "\n")
            write_partial(result, out_dir)  # a run stopped later still leaves these
    result["compile_seconds"] = compile_cost(device)
    result["complete"] = True
    markdown = format_markdown(result)
    echo(markdown)
    if out_dir:
        write_outputs(result, markdown, out_dir)
        echo(f"wrote {os.path.join(out_dir, 'bench.json')}, bench.md, bench.png")
    return result


def _ratio_rows(rows):
    """Adds ratios to the sru_cupy SRU row of the same config and dtype."""
    out = []
    base = {(r["config"], r["dtype"]): r for r in rows if r["model"] == "sru_cupy SRU"}
    for r in rows:
        ref = base.get((r["config"], r["dtype"]))
        r = dict(r)
        if ref:
            r["forward_ratio"] = r["forward_ms"] / ref["forward_ms"]
            r["forward_backward_ratio"] = r["forward_backward_ms"] / ref["forward_backward_ms"]
        out.append(r)
    return out


def format_layer_table(rows):
    lines = [f"{'config':26} {'dtype':9} {'model':14} {'fwd ms':>9} {'x SRU':>6} "
             f"{'fwd+bwd ms':>11} {'x SRU':>6}"]
    for r in _ratio_rows(rows):
        lines.append(f"{r['config']:26} {r['dtype']:9} {r['model']:14} {r['forward_ms']:9.3f} "
                     f"{r.get('forward_ratio', float('nan')):6.2f} {r['forward_backward_ms']:11.3f} "
                     f"{r.get('forward_backward_ratio', float('nan')):6.2f}")
    return "\n".join(lines)


def format_markdown(result):
    out = [f"Device: {result['device']} (torch {result['torch']}, {result['threads']} threads); "
           f"medians of {result['repeats']} runs. Ratios are time / sru_cupy SRU time.", "",
           "| config | dtype | model | forward ms | x SRU | fwd+bwd ms | x SRU |",
           "|---|---|---|---:|---:|---:|---:|"]
    for r in _ratio_rows(result["layers"]):
        out.append(f"| {r['config']} | {r['dtype']} | {r['model']} | {r['forward_ms']:.3f} | "
                   f"{r.get('forward_ratio', float('nan')):.2f} | {r['forward_backward_ms']:.3f} | "
                   f"{r.get('forward_backward_ratio', float('nan')):.2f} |")
    out += ["", f"Recurrence kernel alone vs its memory floor (copy bandwidth "
                f"{result['copy_bandwidth_GBps']:.1f} GB/s):", "",
            "| config | dtype | kernel | ms | floor ms | % of floor | eager ms | launch overhead us |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in result["recurrence"]:
        eager = f"{r['eager_ms']:.4f}" if "eager_ms" in r else "-"
        overhead = f"{r['launch_overhead_us']:.1f}" if "launch_overhead_us" in r else "-"
        out.append(f"| {r['config']} | {r['dtype']} | {r['kernel']} | {r['ms']:.4f} | "
                   f"{r['floor_ms']:.4f} | {r['percent_of_floor']:.1f} | {eager} | {overhead} |")
    timings = sorted({r["timing"] for r in result["recurrence"] if "timing" in r})
    if timings:
        out += ["", "Kernel ms: " + "; ".join(timings) + ", per call (CUDA events); eager ms: the "
                "same calls from Python back to back; launch overhead: host time per eager call."]
    compile_s = result.get("compile_seconds", {})
    if compile_s:
        out += ["", "Kernel compile cost (first call in a new process; imports and CUDA context "
                    "before it, timed apart): "
                + ", ".join(f"{k}: {v:.2f} s" if isinstance(v, float) else f"{k}: {v}"
                            for k, v in compile_s.items())]
    if result["skipped"]:
        out += ["", "Not measured: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items())]
    return "\n".join(out)


def write_partial(result, out_dir):
    """bench.json with what is measured so far, marked ``"complete": false`` (no-op without
    ``out_dir``); write_outputs replaces it at the end (``"complete": true``)."""
    if out_dir:
        from .cache import write_atomic
        os.makedirs(out_dir, exist_ok=True)
        write_atomic(os.path.join(out_dir, "bench.json"),
                     json.dumps(dict(result, complete=False), indent=2).encode())


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
