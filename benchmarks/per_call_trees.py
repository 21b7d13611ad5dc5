"""Host time per call of two source trees of sru_cupy, side by side: is a change of the Python
path around the kernels (checks, dispatch, launch) cheaper or dearer per call?

    python benchmarks/per_call_trees.py BEFORE AFTER [--device cpu|cuda] [--processes 3]

BEFORE and AFTER are folders holding a ``sru_cupy`` package (a checkout, or
``git worktree add /tmp/before <commit>``). Each process imports one tree and times, at the
smallest shapes (where only the Python and launch work counts):

- ``forward``: SRU(32, 32, one layer) forward under no_grad at L=1 B=1, float32;
- ``step``: the same forward with autograd, then backward;
- ``op``: ``sru_cupy.recurrence`` alone at L=4 B=2 d=32 (no autograd);
- ``lstm_forward`` / ``lstm_step``: nn.LSTM of the same size, for scale (the same in both trees).

Host time per call of ``--calls`` calls issued back to back (on a GPU, synchronised before and
after; the time excludes the final synchronisation), ``--rounds`` interleaved rounds per process;
a process reports each function's fastest round. Processes alternate between the trees
(BEFORE, AFTER, BEFORE, ...), so drifts of a shared machine fall on both. Prints, per function,
the median over the processes of each tree and the ratio AFTER / BEFORE.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FUNCTIONS = ("forward", "step", "op", "lstm_forward", "lstm_step")


def _measure(tree, device, calls, rounds):
    """Runs in a child process: imports sru_cupy from ``tree``; returns {function: us per call}."""
    sys.path.insert(0, tree)
    import torch

    import sru_cupy
    if not os.path.abspath(sru_cupy.__file__).startswith(tree):
        raise SystemExit(f"{tree}: imported sru_cupy from {sru_cupy.__file__} instead")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    sru = sru_cupy.SRU(32, 32, num_layers=1).to(device)
    lstm = torch.nn.LSTM(32, 32, num_layers=1).to(device)
    x = torch.randn(1, 1, 32, device=device)
    x_grad = x.clone().requires_grad_()
    U = torch.randn(4, 2, 96, device=device)
    skip = torch.randn(4, 2, 32, device=device)
    zeros = torch.zeros(64, device=device)

    def forward(model):  # a forward without autograd
        def run():
            with torch.no_grad():
                model(x)
        return run

    def step(model):  # a forward with autograd, then backward
        def run():
            h, _ = model(x_grad)
            h.sum().backward()
        return run

    def op():
        sru_cupy.recurrence(U, skip, zeros, zeros, hidden_size=32)

    functions = dict(forward=forward(sru), step=step(sru), op=op, lstm_forward=forward(lstm),
                     lstm_step=step(lstm))
    for fn in functions.values():  # warm-up: compiles and loads the kernels, fills the caches
        for _ in range(calls):
            fn()
    sync()
    best = {}
    for _ in range(rounds):
        for name, fn in functions.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            elapsed = time.perf_counter() - start
            sync()
            best[name] = min(best.get(name, float("inf")), elapsed / calls * 1e6)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="folder holding the sru_cupy package to compare against")
    parser.add_argument("after", help="folder holding the sru_cupy package under test")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per tree")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per process")
    parser.add_argument("--calls", type=int, default=100, help="calls per timed batch")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds one process may take (default 300)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(os.path.abspath(args.after), args.device, args.calls,
                                  args.rounds)))
        return 0
    trees = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    for label, tree in trees.items():
        if not os.path.isfile(os.path.join(tree, "sru_cupy", "__init__.py")):
            parser.error(f"{label}: expected a folder holding sru_cupy/__init__.py, got {tree}")
    results = {label: [] for label in trees}
    for process in range(args.processes):
        for label, tree in trees.items():
            command = [sys.executable, os.path.abspath(__file__), tree, tree, "--child",
                       "--device", args.device, "--rounds", str(args.rounds),
                       "--calls", str(args.calls)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            if done.returncode != 0:
                print(f"{label} ({tree}) failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            results[label].append(figures)
            print(f"process {process + 1} {label}: " +
                  ", ".join(f"{name} {figures[name]:.1f}" for name in FUNCTIONS), flush=True)
    print(f"\nhost us per call, {args.device}, median over {args.processes} processes of each "
          f"one's fastest of {args.rounds} rounds of {args.calls} calls")
    print(f"{'function':14s} {'before':>9s} {'after':>9s} {'after/before':>13s}")
    for name in FUNCTIONS:
        before = statistics.median(r[name] for r in results["before"])
        after = statistics.median(r[name] for r in results["after"])
        print(f"{name:14s} {before:9.1f} {after:9.1f} {after / before:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
