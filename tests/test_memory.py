"""Memory and resource hygiene: no growth of resident memory over 10,000 forward+backward calls
(through the PyTorch op with autograd and through the launch layer), no file descriptors kept by
loading the host library or by calls, and results that do not depend on the caller keeping its
inputs alive (inputs deleted and their memory reused right after the call). GPU variants (marked
``gpu``): no growth of allocated device memory across calls, and inputs freed right after a call
on a side stream do not corrupt its results.

Resident memory is read from /proc/self/statm (Linux); the tests that need it are skipped
elsewhere.
"""

import gc
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import sru_cupy
from sru_cupy import errors, launch
from sru_cupy.backends import host
from sru_cupy.reference import recurrence_backward_reference, recurrence_forward_reference

from child_env import child_env

REPO = Path(sru_cupy.__file__).resolve().parent.parent
needs_compiler = pytest.mark.skipif(not host.available(), reason="host backend: no C++ compiler found")
needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                reason="needs /proc/self/statm and /proc/self/fd (Linux)")

CALLS = 10_000
WARMUP = 1_000
RSS_TOLERANCE = 2 * 2 ** 20  # bytes


def rss_bytes():
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def _problem(rng, L=6, B=3, d=4, dtype=np.float32):
    D = 2 * d
    return {"U": rng.standard_normal((L, B, 3 * D)).astype(dtype),
            "x": rng.standard_normal((L, B, D)).astype(dtype),
            "weight_c": rng.standard_normal(2 * D).astype(dtype),
            "bias": rng.standard_normal(2 * D).astype(dtype),
            "c0": rng.standard_normal((B, D)).astype(dtype),
            "mask_pad": rng.random((L, B)) < 0.2,
            "grad_h": rng.standard_normal((L, B, D)).astype(dtype), "d": d}


def _reference(p):
    kw = dict(hidden_size=p["d"], bidirectional=True, mask_pad=p["mask_pad"])
    h, c, c_last = recurrence_forward_reference(p["U"], p["x"], p["weight_c"], p["bias"], p["c0"],
                                                **kw)
    g = recurrence_backward_reference(p["grad_h"], None, p["U"], p["x"], p["weight_c"], p["bias"],
                                      p["c0"], c, **kw)
    return h, c, c_last, g


def _measure(step, calls=CALLS, warmup=WARMUP):
    """Runs step() `calls` times: -> (RSS after `warmup` calls, RSS after all, seconds).

    The cyclic garbage collector runs every 1,000 calls, so that garbage in reference cycles (see
    test_host_launch_creates_no_reference_cycles) does not show up as growth: this measures leaks,
    not the collector's timing."""
    start = time.perf_counter()
    for i in range(calls):
        if i == warmup:
            after_warmup = rss_bytes()
        elif i % 1000 == 0:
            gc.collect()
        step()
    return after_warmup, rss_bytes(), time.perf_counter() - start


# -- resident memory -----------------------------------------------------------------------------


@needs_compiler
@needs_proc
def test_rss_is_flat_over_10000_autograd_calls():
    torch = pytest.importorskip("torch")
    from sru_cupy import ops
    p = _problem(np.random.default_rng(0))
    leaves = {k: torch.tensor(p[k], requires_grad=True) for k in ("U", "x", "weight_c", "bias", "c0")}
    mask_pad = torch.from_numpy(p["mask_pad"])
    grad_h = torch.from_numpy(p["grad_h"])

    def step():
        for t in leaves.values():
            t.grad = None
        h, c_last = ops.recurrence(leaves["U"], leaves["x"], leaves["weight_c"], leaves["bias"],
                                   leaves["c0"], hidden_size=p["d"], bidirectional=True,
                                   mask_pad=mask_pad)
        ((h * grad_h).sum() + c_last.sum()).backward()

    before, after, seconds = _measure(step)
    print(f"ops.recurrence forward+backward: {CALLS} calls in {seconds:.1f} s, RSS after "
          f"{WARMUP}: {before / 2**20:.1f} MiB, after {CALLS}: {after / 2**20:.1f} MiB")
    assert after - before <= RSS_TOLERANCE, (
        f"RSS grew by {(after - before) / 2**20:.2f} MiB between call {WARMUP} and call {CALLS}")
    # and the calls were real: the last gradients match the reference
    h, c, c_last, g = _reference(p)
    np.testing.assert_allclose(leaves["U"].grad.numpy(),
                               recurrence_backward_reference(
                                   p["grad_h"], np.ones_like(c_last), p["U"], p["x"], p["weight_c"],
                                   p["bias"], p["c0"], c, hidden_size=p["d"], bidirectional=True,
                                   mask_pad=p["mask_pad"])["U"], rtol=1e-4, atol=1e-5)


@needs_compiler
@needs_proc
def test_rss_is_flat_over_10000_launch_calls():
    p = _problem(np.random.default_rng(1))
    kw = dict(hidden_size=p["d"], bidirectional=True, mask_pad=p["mask_pad"])
    last = {}

    def step():
        h, c, c_last = launch.recurrence_forward(p["U"], p["x"], p["weight_c"], p["bias"], p["c0"],
                                                 **kw)
        last["h"] = h
        last["g"] = launch.recurrence_backward(p["grad_h"], None, p["U"], p["x"], p["weight_c"],
                                               p["bias"], p["c0"], c, **kw)

    before, after, seconds = _measure(step)
    print(f"launch forward+backward: {CALLS} calls in {seconds:.1f} s, RSS after {WARMUP}: "
          f"{before / 2**20:.1f} MiB, after {CALLS}: {after / 2**20:.1f} MiB")
    assert after - before <= RSS_TOLERANCE, (
        f"RSS grew by {(after - before) / 2**20:.2f} MiB between call {WARMUP} and call {CALLS}")
    h, c, c_last, g = _reference(p)
    np.testing.assert_allclose(last["h"], h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last["g"]["U"], g["U"], rtol=1e-4, atol=1e-5)


@needs_proc
def test_rss_check_detects_a_leak():
    """The measurement above can fail: a step that keeps 16 KiB per call (144 MiB over the measured
    calls, more than the free heap earlier tests may leave to reuse) grows RSS past the tolerance."""
    kept = []
    before, after, _ = _measure(lambda: kept.append(np.ones(2048)))
    assert after - before > RSS_TOLERANCE


@needs_compiler
def test_host_launch_creates_no_reference_cycles():
    """A forward+backward through the launch layer leaves no garbage that only the cyclic collector
    can free. (ctypes.cast(ctypes.pointer(v), c_void_p), used to build the kernel's argument array,
    makes a reference cycle per argument; ctypes.addressof(v) would not.) Such garbage is freed
    late, in bulk: about 1.2 MiB of extra RSS over 9,000 autograd calls without explicit
    collections, and collector work on every call."""
    p = _problem(np.random.default_rng(10))
    kw = dict(hidden_size=p["d"], bidirectional=True, mask_pad=p["mask_pad"])

    def step():
        h, c, c_last = launch.recurrence_forward(p["U"], p["x"], p["weight_c"], p["bias"], p["c0"],
                                                 **kw)
        launch.recurrence_backward(p["grad_h"], None, p["U"], p["x"], p["weight_c"], p["bias"],
                                   p["c0"], c, **kw)

    step()
    gc.collect()
    gc.disable()
    try:
        for _ in range(100):
            step()
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert unreachable == 0, (f"{unreachable / 100:.0f} objects in reference cycles per "
                              "forward+backward call (freed only by the cyclic collector)")


# -- file descriptors ----------------------------------------------------------------------------


@needs_compiler
@needs_proc
def test_calls_and_library_lookups_keep_no_file_descriptors():
    p = _problem(np.random.default_rng(2))
    kw = dict(hidden_size=p["d"], bidirectional=True, mask_pad=p["mask_pad"])
    host.library()
    launch.recurrence_forward(p["U"], p["x"], p["weight_c"], p["bias"], p["c0"], **kw)
    before = open_fds()
    for _ in range(500):
        h, c, _ = launch.recurrence_forward(p["U"], p["x"], p["weight_c"], p["bias"], p["c0"], **kw)
        launch.recurrence_backward(p["grad_h"], None, p["U"], p["x"], p["weight_c"], p["bias"],
                                   p["c0"], c, **kw)
        host.library()
    compiler = host.find_compiler()
    for _ in range(20):  # the cache lookup: record check, digest, folder checks
        host._build(compiler)
    assert open_fds() == before, f"file descriptors: {before} before, {open_fds()} after"


@needs_compiler
@needs_proc
def test_rebuilding_a_corrupt_library_keeps_no_file_descriptors(tmp_path, monkeypatch):
    """The rebuild path (lock file, temporary build folder, atomic writes) closes what it opens.
    (Built with -O0 through a compiler wrapper, to be quick.)"""
    from sru_cupy import cache
    monkeypatch.setenv("SRU_CUPY_CACHE_DIR", str(tmp_path / "cache"))
    compiler = tmp_path / "fast-cxx"
    compiler.write_text("#!/bin/sh\nfor a in \"$@\"; do shift; if [ \"$a\" = -O3 ]; then "
                        "set -- \"$@\" -O0; else set -- \"$@\" \"$a\"; fi; done\n"
                        f"exec \"{host.find_compiler()}\" \"$@\"\n")
    compiler.chmod(0o755)
    compiler = str(compiler)
    path = host._build(compiler)
    before = open_fds()
    for _ in range(2):
        with open(path, "r+b") as f:
            f.truncate(100)
        monkeypatch.setattr(errors, "_warned", set())
        with pytest.warns(cache.CacheWarning, match="rebuilding"):
            assert host._build(compiler) == path
    assert open_fds() == before, f"file descriptors: {before} before, {open_fds()} after"


_FDS_CHILD = """
    import json, os
    def fds():
        return sorted(os.listdir("/proc/self/fd"))
    import numpy as np
    from sru_cupy.backends import host
    from sru_cupy.launch import recurrence_forward, recurrence_backward
    start = fds()
    lib = host.library()
    loaded = fds()
    U = np.ones((5, 2, 6), np.float32); x = np.ones((5, 2, 2), np.float32)
    bias = np.zeros(4, np.float32)
    for _ in range(200):
        h, c, cl = recurrence_forward(U, x, None, bias, hidden_size=2)
        recurrence_backward(h, cl, U, x, None, bias, None, c, hidden_size=2)
    print(json.dumps({"start": len(start), "loaded": len(loaded), "after_calls": len(fds()),
                      "new": sorted(set(loaded) - set(start)), "path": lib.path}))
"""


@needs_compiler
@needs_proc
def test_library_loads_in_fresh_processes_keep_no_file_descriptors(tmp_path):
    """Three fresh interpreters (the first builds into an empty cache, the others load it): loading
    the library and 200 forward+backward calls leave the number of open descriptors unchanged."""
    env = child_env(tmp_path / "cache")
    results = []
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_FDS_CHILD)], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for r in results:
        assert r["loaded"] == r["start"], f"loading the library kept descriptors open: {r}"
        assert r["after_calls"] == r["start"], f"calls kept descriptors open: {r}"
    assert len({r["path"] for r in results}) == 1


# -- inputs freed by the caller right after the call ---------------------------------------------


def _scribble(n_arrays=40, size=1 << 16):
    """Allocations of every size class filled with nan, to reuse memory that was just freed."""
    gc.collect()
    junk = [np.full(size >> (i % 8), np.nan, np.float32) for i in range(n_arrays)]
    junk += [np.full(s, np.nan) for s in (7, 31, 96, 144, 288, 1000)]
    return junk


@needs_compiler
def test_launch_results_survive_inputs_freed_after_the_call():
    """Non-contiguous inputs (launch makes contiguous temporaries), deleted with their bases right
    after the call and their memory reused: the outputs are intact, share no memory with the
    inputs, and the backward (given fresh copies) is right."""
    rng = np.random.default_rng(3)
    p = _problem(rng)
    expected = _reference(p)
    kw = dict(hidden_size=p["d"], bidirectional=True)
    # Fortran-ordered and sliced copies: views whose contiguous versions are temporaries
    U = np.asfortranarray(p["U"])
    x = np.repeat(p["x"], 2, axis=2)[:, :, ::2]
    c0 = np.asfortranarray(p["c0"])
    mask_pad = np.asfortranarray(p["mask_pad"].astype(np.int8))
    assert not U.flags.c_contiguous and not x.flags.c_contiguous
    h, c, c_last = launch.recurrence_forward(U, x, p["weight_c"].copy(), p["bias"].copy(), c0,
                                             mask_pad=mask_pad, **kw)
    for out in (h, c, c_last):
        for inp in (U, x, c0, mask_pad):
            assert not np.shares_memory(out, inp)
    del U, x, c0, mask_pad
    junk = _scribble()
    np.testing.assert_allclose(h, expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c, expected[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c_last, expected[2], rtol=1e-5, atol=1e-5)
    grad_h = np.asfortranarray(p["grad_h"])
    g = launch.recurrence_backward(grad_h, None, p["U"].copy(), p["x"].copy(), p["weight_c"],
                                   p["bias"], p["c0"].copy(), c, mask_pad=p["mask_pad"].copy(), **kw)
    del grad_h
    junk += _scribble()
    for name in ("U", "x", "c0", "weight_c", "bias"):
        np.testing.assert_allclose(g[name], expected[3][name], rtol=1e-4, atol=1e-5, err_msg=name)
    del junk


@needs_compiler
def test_autograd_survives_inputs_freed_between_forward_and_backward():
    """ops.recurrence on non-contiguous intermediates (transposes, slices) that the caller deletes
    before backward, with their memory reused: the forward outputs and every gradient are right
    (autograd keeps what it saved alive)."""
    torch = pytest.importorskip("torch")
    from sru_cupy import ops
    rng = np.random.default_rng(4)
    p = _problem(rng)
    expected = _reference(p)
    base = {k: torch.tensor(p[k], requires_grad=True) for k in ("U", "x", "weight_c", "bias", "c0")}
    # non-contiguous intermediates computed from the leaves
    U = base["U"].transpose(0, 1).contiguous().transpose(0, 1) * 1.0
    U = U.transpose(1, 2).transpose(1, 2)
    x = torch.stack([base["x"], base["x"]], dim=-1)[..., 0]
    c0 = base["c0"].t().contiguous().t()
    mask_pad = torch.from_numpy(p["mask_pad"]).t().contiguous().t()
    assert not x.is_contiguous() and not c0.is_contiguous()
    h, c_last = ops.recurrence(U, x, base["weight_c"] * 1.0, base["bias"] * 1.0, c0,
                               hidden_size=p["d"], bidirectional=True, mask_pad=mask_pad)
    del U, x, c0, mask_pad
    junk = [torch.full((n,), float("nan")) for n in (7, 64, 144, 288, 1000, 1 << 16)] * 4
    junk += _scribble()
    np.testing.assert_allclose(h.detach().numpy(), expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c_last.detach().numpy(), expected[2], rtol=1e-5, atol=1e-5)
    (h * torch.from_numpy(p["grad_h"])).sum().backward()
    for name in ("U", "x", "c0", "weight_c", "bias"):
        np.testing.assert_allclose(base[name].grad.numpy(), expected[3][name], rtol=1e-4,
                                   atol=1e-5, err_msg=name)
    del junk


@needs_compiler
def test_functional_outputs_survive_torch_inputs_and_out_tensors_being_freed():
    """sru_cupy.functional reads torch tensors through DLPack without a copy, and writes into torch
    `out=` tensors: deleting every tensor the caller passed (inputs and out) and reusing the memory
    leaves the returned arrays intact."""
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("sru_cupy.functional")
    rng = np.random.default_rng(5)
    p = _problem(rng)
    expected = _reference(p)
    t = {k: torch.tensor(p[k]) for k in ("U", "x", "weight_c", "bias", "c0")}
    L, B, D = p["x"].shape
    out = {"h": torch.empty((L, B, D)), "c": torch.empty((L, B, D)), "c_last": torch.empty((B, D))}
    h, c, c_last = F.recurrence_forward(t["U"], t["x"], t["weight_c"], t["bias"], t["c0"],
                                        hidden_size=p["d"], bidirectional=True,
                                        mask_pad=torch.from_numpy(p["mask_pad"]), out=out)
    del t, out
    junk = [torch.full((n,), float("nan")) for n in (L * B * D, B * D, 3 * L * B * D)] * 8
    junk += _scribble()
    np.testing.assert_allclose(h, expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c, expected[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c_last, expected[2], rtol=1e-5, atol=1e-5)
    del junk


# -- GPU -----------------------------------------------------------------------------------------


def _cuda_problem(torch, p, device="cuda"):
    return {k: torch.tensor(p[k], device=device, requires_grad=k != "mask_pad")
            for k in ("U", "x", "weight_c", "bias", "c0")}


@pytest.mark.gpu
def test_cuda_allocated_memory_does_not_grow_across_calls():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    from sru_cupy import ops
    p = _problem(np.random.default_rng(6), L=32, B=8, d=16)
    t = _cuda_problem(torch, p)
    mask_pad = torch.from_numpy(p["mask_pad"]).cuda()
    grad_h = torch.from_numpy(p["grad_h"]).cuda()

    def step():
        for v in t.values():
            v.grad = None
        h, c_last = ops.recurrence(t["U"], t["x"], t["weight_c"], t["bias"], t["c0"],
                                   hidden_size=p["d"], bidirectional=True, mask_pad=mask_pad)
        ((h * grad_h).sum() + c_last.sum()).backward()

    for _ in range(50):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(1000):
        step()
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    assert after <= before, f"allocated CUDA memory grew from {before} to {after} bytes"
    h, c, c_last, g = _reference(p)
    np.testing.assert_allclose(t["bias"].grad.cpu().numpy(),
                               recurrence_backward_reference(
                                   p["grad_h"], np.ones_like(c_last), p["U"], p["x"],
                                   p["weight_c"], p["bias"], p["c0"], c, hidden_size=p["d"],
                                   bidirectional=True, mask_pad=p["mask_pad"])["bias"],
                               rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_cupy_pool_does_not_grow_across_launch_calls():
    cupy = pytest.importorskip("cupy")
    p = _problem(np.random.default_rng(7), L=32, B=8, d=16)
    a = {k: cupy.asarray(p[k]) for k in ("U", "x", "weight_c", "bias", "c0", "grad_h")}
    mask_pad = cupy.asarray(p["mask_pad"])
    kw = dict(hidden_size=p["d"], bidirectional=True, mask_pad=mask_pad)
    pool = cupy.get_default_memory_pool()

    def step():
        h, c, c_last = launch.recurrence_forward(a["U"], a["x"], a["weight_c"], a["bias"], a["c0"],
                                                 **kw)
        return launch.recurrence_backward(a["grad_h"], None, a["U"], a["x"], a["weight_c"],
                                          a["bias"], a["c0"], c, **kw)

    for _ in range(50):
        step()
    cupy.cuda.Device().synchronize()
    before = pool.used_bytes()
    for _ in range(1000):
        g = step()
    cupy.cuda.Device().synchronize()
    del g
    assert pool.used_bytes() <= before, f"CuPy pool use grew from {before} to {pool.used_bytes()}"


@pytest.mark.gpu
def test_cuda_inputs_freed_right_after_the_call_on_a_side_stream():
    """On a side stream: non-contiguous CUDA inputs (the op makes contiguous temporaries) deleted
    right after the call, their memory immediately reused by nan-filled tensors on the same stream,
    before anything synchronizes; forward outputs and gradients are still right."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    from sru_cupy import ops
    p = _problem(np.random.default_rng(8), L=64, B=16, d=32)
    expected = _reference(p)
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        base = _cuda_problem(torch, p)
        U = base["U"].transpose(0, 1).contiguous().transpose(0, 1)
        x = torch.stack([base["x"], base["x"]], dim=-1)[..., 0]
        c0 = base["c0"].t().contiguous().t()
        mask_pad = torch.from_numpy(p["mask_pad"]).to("cuda", non_blocking=False).t().contiguous().t()
        torch.cuda._sleep(50_000_000)  # keep the stream busy so the launch is still queued
        h, c_last = ops.recurrence(U, x, base["weight_c"], base["bias"], c0, hidden_size=p["d"],
                                   bidirectional=True, mask_pad=mask_pad)
        del U, x, c0, mask_pad
        junk = [torch.full((n,), float("nan"), device="cuda") for n in
                (p["U"].size, p["x"].size, p["c0"].size, p["mask_pad"].size) * 4]
        (h * torch.from_numpy(p["grad_h"]).cuda()).sum().backward()
        junk += [torch.full((p["U"].size,), float("nan"), device="cuda") for _ in range(4)]
    torch.cuda.synchronize()
    np.testing.assert_allclose(h.detach().cpu().numpy(), expected[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(c_last.detach().cpu().numpy(), expected[2], rtol=1e-4, atol=1e-4)
    for name in ("U", "x", "c0", "weight_c", "bias"):
        np.testing.assert_allclose(base[name].grad.cpu().numpy(), expected[3][name], rtol=1e-3,
                                   atol=1e-3, err_msg=name)
    del junk


@pytest.mark.gpu
def test_cupy_inputs_freed_right_after_the_call_on_a_side_stream():
    cupy = pytest.importorskip("cupy")
    p = _problem(np.random.default_rng(9), L=64, B=16, d=32)
    expected = _reference(p)
    with cupy.cuda.Stream(non_blocking=True) as stream:
        U = cupy.asfortranarray(cupy.asarray(p["U"]))
        x = cupy.asarray(np.repeat(p["x"], 2, axis=2))[:, :, ::2]
        c0 = cupy.asfortranarray(cupy.asarray(p["c0"]))
        h, c, c_last = launch.recurrence_forward(U, x, cupy.asarray(p["weight_c"]),
                                                 cupy.asarray(p["bias"]), c0, hidden_size=p["d"],
                                                 bidirectional=True,
                                                 mask_pad=cupy.asarray(p["mask_pad"]))
        del U, x, c0
        junk = [cupy.full(n, cupy.nan, cupy.float32) for n in (p["U"].size, p["x"].size) * 4]
        stream.synchronize()
    np.testing.assert_allclose(cupy.asnumpy(h), expected[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cupy.asnumpy(c_last), expected[2], rtol=1e-4, atol=1e-4)
    del junk
