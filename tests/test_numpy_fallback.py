"""The NumPy implementation (sru_cupy.numpy_fallback) that runs NumPy arrays where no C++ compiler
exists: against the float64 reference with the launch layer's case machinery (every kernel variant
and option, the sizes that stress the loops), its NaN confinement at padded steps, its notice, and
a process that can find no compiler at all running ``arrays.SRU`` forward and backward.

In this process the fallback is forced by making the host backend report no compiler; its
``launch`` and ``library`` then fail, so a result can only come from the fallback.
"""

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from sru_cupy import implementation
from sru_cupy.backends import host
from sru_cupy.launch import recurrence_backward, recurrence_forward
from sru_cupy.reference import recurrence_forward_reference

from child_env import REPO, child_env
from test_launch import DESIGN_CASES, SIZE_CASES, _check_case_on_host

#: The size cases once each: the columns per thread of the host build mean nothing here.
FALLBACK_SIZE_CASES = [case for case in SIZE_CASES if case.cols == "hostcols"]


@pytest.fixture
def no_compiler(monkeypatch):
    """The host backend finds no compiler, and any attempt to build or launch a kernel fails."""
    def refuse(*args, **kwargs):
        raise AssertionError("a host kernel was used although no compiler is available")

    monkeypatch.setattr(host, "available", lambda: False)
    monkeypatch.setattr(host, "launch", refuse)
    monkeypatch.setattr(host, "library", refuse)
    monkeypatch.setattr(implementation, "_announced", {"numpy"})  # the notice has its own test


@pytest.mark.parametrize("case", DESIGN_CASES, ids=[c.id for c in DESIGN_CASES])
def test_options_against_reference(no_compiler, case):
    _check_case_on_host(case)


@pytest.mark.parametrize("case", FALLBACK_SIZE_CASES, ids=[c.id for c in FALLBACK_SIZE_CASES])
def test_sizes_against_reference(no_compiler, case):
    _check_case_on_host(case)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_nan_and_inf_at_padded_steps_stay_there(no_compiler, bidirectional):
    """Inputs at padded steps never reach an output: the run equals one with those inputs zeroed,
    forward and backward, with no floating-point warning."""
    rng = np.random.default_rng(5)
    L, B, d = 6, 3, 4
    D = d * (2 if bidirectional else 1)
    mask_pad = np.zeros((L, B), bool)
    mask_pad[4:, 1] = True
    mask_pad[:2, 2] = True
    U = rng.standard_normal((L, B, 3 * D)).astype(np.float32)
    x = rng.standard_normal((L, B, D)).astype(np.float32)
    grad_h = rng.standard_normal((L, B, D)).astype(np.float32)
    bad_U, bad_x, bad_grad_h = U.copy(), x.copy(), grad_h.copy()
    bad_U[mask_pad] = np.array([np.nan, np.inf, -np.inf] * D, np.float32)
    bad_x[mask_pad] = np.inf
    bad_grad_h[mask_pad] = np.nan
    U[mask_pad], x[mask_pad], grad_h[mask_pad] = 0, 0, 0
    weight_c, bias = rng.standard_normal(2 * D), rng.standard_normal(2 * D)
    options = dict(hidden_size=d, bidirectional=bidirectional, use_tanh=True, mask_pad=mask_pad)
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for u, xs, gh in ((U, x, grad_h), (bad_U, bad_x, bad_grad_h)):
            h, c, c_last = recurrence_forward(u, xs, weight_c, bias, **options)
            grads = recurrence_backward(gh, None, u, xs, weight_c, bias, None, c, **options)
            results.append([h, c, c_last] + [grads[k] for k in ("U", "x", "c0", "weight_c", "bias")])
    for name, clean, dirty in zip(["h", "c", "c_last", "grad U", "grad x", "grad c0", "grad weight_c",
                                   "grad bias"], *results):
        assert np.all(np.isfinite(clean)), name
        assert np.array_equal(clean, dirty), f"{name}: padded inputs leaked into the result"


def test_notice_is_one_warning_per_process(no_compiler, monkeypatch):
    monkeypatch.setattr(implementation, "_announced", set())
    U = np.full((2, 1, 3), 0.5, np.float32)
    args = (U, np.ones((2, 1, 1), np.float32), None, np.zeros(2, np.float32))
    with pytest.warns(UserWarning, match="vectorized NumPy implementation") as record:
        h, _, _ = recurrence_forward(*args, hidden_size=1)
    notices = [w for w in record if "sru_cupy" in str(w.message)]
    assert len(notices) == 1
    message = str(notices[0].message)
    assert "\n" not in message and "pip install sru_cupy[cpu]" in message
    assert notices[0].filename == __file__, "the warning should point at the caller's line"
    ref_h, _, _ = recurrence_forward_reference(*(a.astype(np.float64) if a is not None else None
                                                 for a in args), hidden_size=1)
    np.testing.assert_allclose(h, ref_h, rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shown once per process, not per call
        recurrence_forward(*args, hidden_size=1)


# -- a process without any compiler --------------------------------------------------------------

#: Runs arrays.SRU forward and backward (bidirectional, two layers, k = 3 and 4, layer norm,
#: dropout, padding, c0) with ziglang unimportable, and saves the results.
_ARRAYS_RUN = """
    import json, sys, warnings
    if {hide_ziglang}:
        sys.modules["ziglang"] = None  # the ziglang wheel cannot be imported
    import numpy as np
    from sru_cupy.arrays import SRU
    from sru_cupy.backends import host

    rng = np.random.default_rng(0)
    L, B = 7, 3
    model = SRU(5, 4, num_layers=2, bidirectional=True, layer_norm=True, dropout=0.2,
                rnn_dropout=0.1, device="cpu", seed=1)
    x = rng.standard_normal((L, B, 5)).astype(np.float32)
    c0 = rng.standard_normal((2, B, 8)).astype(np.float32)
    mask_pad = np.zeros((L, B), bool)
    mask_pad[5:, 1] = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h, c, cache = model.forward(x, c0=c0, mask_pad=mask_pad, training=True,
                                    rng=np.random.default_rng(2))
        grad_x, grad_c0, grads = model.backward(cache, rng.standard_normal(h.shape).astype(np.float32),
                                                rng.standard_normal(c.shape).astype(np.float32))
    np.savez({out!r}, h=h, c=c, grad_x=grad_x, grad_c0=grad_c0,
             **{{"grad " + k: v for k, v in grads.items()}})
    print(json.dumps({{"compiler": host.compiler_command(),
                      "warnings": [str(w.message) for w in caught]}}))
"""


def _run_arrays_sru(tmp_path, name, env, hide_ziglang):
    out = tmp_path / f"{name}.npz"
    code = textwrap.dedent(_ARRAYS_RUN.format(out=str(out), hide_ziglang=hide_ziglang))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), dict(np.load(out)), proc.stderr


@pytest.mark.skipif(not host.available(), reason="the comparison run needs the host kernels")
def test_arrays_sru_runs_where_every_compiler_is_hidden(tmp_path):
    """CXX unset, a PATH without any compiler, ziglang not importable: arrays.SRU still runs forward
    and backward, on the NumPy implementation, with one notice and nothing built; its results
    match the same model on the host kernels."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    cache = tmp_path / "cache"
    info, fallback, stderr = _run_arrays_sru(tmp_path, "fallback",
                                             child_env(cache, CXX=None, PATH=empty), True)
    assert info["compiler"] is None
    notices = [w for w in info["warnings"] if "vectorized NumPy implementation" in w]
    assert len(notices) == 1, info["warnings"]
    assert "compiling the CPU kernels" not in stderr
    assert not (cache / "host").exists(), "something was built without a compiler"

    _, compiled, _ = _run_arrays_sru(tmp_path, "compiled", child_env(), False)
    assert sorted(fallback) == sorted(compiled)
    assert any(key.startswith("grad ") for key in fallback)
    for key in compiled:
        np.testing.assert_allclose(fallback[key], compiled[key], rtol=1e-4, atol=1e-5, err_msg=key)
