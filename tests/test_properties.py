"""Property-based tests (hypothesis): random options, dtypes, shapes, padding patterns and initial
states, every API layer against the float64 NumPy reference (sru_cupy.reference).

Drawn per example: bidirectional or not; the k variant (k = 3 with the skip term reading x, k = 4
with the learned skip slot, or no skip term); weight_c given or None (v1); use_tanh; a dropout mask
on h or none; scale_x; the dtype (float64, float32, float16, bfloat16); L in 1..40 (L = 1 drawn
often), B in 1..5, d in 1..9 (d = 1 drawn often); a padding pattern per batch element (none, all
padded, a padded prefix or suffix, or an arbitrary boolean per step); c0 and dL/dc_last present or
not; the data (a seed) and its magnitude.

Checked, each against the reference computed in float64 from the same (dtype-rounded) inputs:
  (a) the host launch layer ``sru_cupy.launch``: forward, the inference variant (bit-identical to the
      training forward), backward with the parameter sums;
  (b) the PyTorch op ``sru_cupy.ops.recurrence`` with autograd (CPU tensors);
  (c) ``sru_cupy.functional`` given torch tensors (read through DLPack, bfloat16 included) and the
      ``sru_cupy.arrays.SRUCell`` layer (GEMM + recurrence, against a float64 oracle built from the
      reference); each is skipped, with the reason, where its module does not exist.
Tolerances: float64 1e-10 and float32 1e-4, relative to max(1, max |reference|) (for the parameter
gradients, sums over steps and batch, relative to the sum of the magnitudes of their terms);
16-bit: relative RMS error <= 2e-2 (the RMS of the terms for the parameter gradients).

Profiles. ``ci`` (the default) runs a fixed, derandomized set of examples per property, so a CI
run is reproducible and short (< 60 s for the file). ``long`` draws many more random examples:

    SRU_CUPY_HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py

Every failure found by a run is kept as an explicit ``@example`` on the property it broke.
"""

import dataclasses
import importlib
import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sru_cupy import launch
from sru_cupy.backends import host
from sru_cupy.reference import recurrence_backward_reference, recurrence_forward_reference

pytestmark = pytest.mark.skipif(not host.available(), reason="host backend: no C++ compiler found")

CI_EXAMPLES = 300
LONG_EXAMPLES = 3000
settings.register_profile(
    "ci", max_examples=CI_EXAMPLES, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "long", max_examples=LONG_EXAMPLES, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE_NAME = os.environ.get("SRU_CUPY_HYPOTHESIS_PROFILE", "ci")
PROFILE = settings.get_profile(PROFILE_NAME)  # applied per test, not loaded globally
#: Fewer examples for the slower layers (torch autograd, the arrays layer), same profile otherwise.
PROFILE_SMALL = settings(PROFILE, max_examples=max(1, PROFILE.max_examples * 2 // 3))

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float64": np.dtype(np.float64), "float32": np.dtype(np.float32),
          "float16": np.dtype(np.float16), "bfloat16": BF16}


# -- the drawn problem ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    dtype: str
    L: int
    B: int
    d: int
    bidirectional: bool = False
    variant: str = "k3"  # "k3" (skip reads x), "k4" (learned skip slot), "noskip"
    weight_c: bool = True
    use_tanh: bool = False
    mask_h: bool = False
    scale_x: float = 1.0
    pad: tuple = ()  # L x B booleans, row-major, or () for no mask_pad
    c0: bool = False
    grad_c_last: bool = False
    magnitude: float = 1.0
    seed: int = 0

    @property
    def D(self):
        return self.d * (2 if self.bidirectional else 1)

    @property
    def k(self):
        return 4 if self.variant == "k4" else 3

    @property
    def has_skip_term(self):
        return self.variant != "noskip"

    @property
    def reads_x(self):
        return self.variant == "k3"

    @property
    def options(self):
        return dict(hidden_size=self.d, bidirectional=self.bidirectional,
                    has_skip_term=self.has_skip_term, use_tanh=self.use_tanh, scale_x=self.scale_x)


def _pad_column(draw, L):
    kind = draw(st.sampled_from(["none", "none", "all", "prefix", "suffix", "random"]))
    if kind == "none":
        return [False] * L
    if kind == "all":
        return [True] * L
    if kind == "random":
        return draw(st.lists(st.booleans(), min_size=L, max_size=L))
    n = draw(st.integers(0, L))
    return [True] * n + [False] * (L - n) if kind == "prefix" else [False] * (L - n) + [True] * n


@st.composite
def problems(draw, dtypes=tuple(DTYPES)):
    L = draw(st.one_of(st.just(1), st.integers(1, 40)))
    B = draw(st.integers(1, 5))
    d = draw(st.one_of(st.just(1), st.integers(1, 9)))
    pad = ()
    if draw(st.booleans()):
        columns = [_pad_column(draw, L) for _ in range(B)]
        pad = tuple(columns[b][t] for t in range(L) for b in range(B))
    return Problem(
        dtype=draw(st.sampled_from(dtypes)), L=L, B=B, d=d,
        bidirectional=draw(st.booleans()),
        variant=draw(st.sampled_from(["k3", "k4", "noskip"])),
        weight_c=draw(st.booleans()), use_tanh=draw(st.booleans()), mask_h=draw(st.booleans()),
        scale_x=draw(st.sampled_from([1.0, 1.7320508075688772, 0.5])),
        pad=pad, c0=draw(st.booleans()), grad_c_last=draw(st.booleans()),
        magnitude=draw(st.sampled_from([1.0, 0.25, 3.0])),
        seed=draw(st.integers(0, 2 ** 32 - 1)))


def _round(values, dtype):
    """float64 values exactly representable in `dtype`."""
    return values.astype(dtype).astype(np.float64)


def make_data(p):
    """float64 arrays (data rounded to p.dtype, parameters to the arithmetic type), or None where
    the problem has none."""
    dtype = DTYPES[p.dtype]
    arith = np.float64 if p.dtype == "float64" else np.float32
    rng = np.random.default_rng(p.seed)
    L, B, D = p.L, p.B, p.D
    data = {
        "U": _round(rng.standard_normal((L, B, D * p.k)) * p.magnitude, dtype),
        "x": _round(rng.standard_normal((L, B, D)), dtype) if p.reads_x else None,
        "weight_c": _round(rng.standard_normal(2 * D) * 0.7, arith) if p.weight_c else None,
        "bias": _round(rng.standard_normal(2 * D) * 0.5, arith),
        "c0": _round(rng.standard_normal((B, D)), dtype) if p.c0 else None,
        "mask_h": (rng.choice([0.0, 1.0, 2.0, 1.25], size=(B, D)) if p.mask_h else None),
        "mask_pad": np.array(p.pad, bool).reshape(L, B) if p.pad else None,
        "grad_h": _round(rng.standard_normal((L, B, D)), dtype),
        "grad_c_last": _round(rng.standard_normal((B, D)), dtype) if p.grad_c_last else None,
    }
    return data


def reference(p, data):
    """(forward (h, c, c_last), backward dict) of the float64 reference, plus the magnitudes of
    the terms of the parameter gradients: {"weight_c": ..., "bias": ...} as (l1, l2) norms per
    entry."""
    kw = dict(mask_h=data["mask_h"], mask_pad=data["mask_pad"], **p.options)
    fwd = recurrence_forward_reference(data["U"], data["x"], data["weight_c"], data["bias"],
                                       data["c0"], **kw)
    bwd = recurrence_backward_reference(data["grad_h"], data["grad_c_last"], data["U"], data["x"],
                                        data["weight_c"], data["bias"], data["c0"], fwd[1], **kw)
    # terms of the parameter sums: bias_f = sum du1, bias_r = sum du2, v_f = sum du1 c_prev, ...
    L, B, D, dirs, d = p.L, p.B, p.D, (2 if p.bidirectional else 1), p.d
    gU = bwd["U"].reshape(L, B, D, p.k)
    c = fwd[1].reshape(L, B, dirs, d)
    c0 = np.zeros((B, dirs, d)) if data["c0"] is None else data["c0"].reshape(B, dirs, d)
    c_prev = np.empty_like(c)
    if L:
        c_prev[1:, :, 0], c_prev[0, :, 0] = c[:-1, :, 0], c0[:, 0]
        if dirs == 2:
            c_prev[:-1, :, 1], c_prev[-1, :, 1] = c[1:, :, 1], c0[:, 1]
    c_prev = c_prev.reshape(L, B, D)
    bias_terms = np.stack([gU[..., 1], gU[..., 2]])  # (2, L, B, D)
    wc_terms = bias_terms * c_prev
    scales = {name: (np.abs(t).sum(axis=(1, 2)).reshape(2 * D),
                     np.sqrt((t * t).sum(axis=(1, 2))).reshape(2 * D))
              for name, t in (("bias", bias_terms), ("weight_c", wc_terms))}
    return fwd, bwd, scales


def check(name, got, ref, p, term_scales=None, scale_floor=0.0):
    """Compares an output with the float64 reference under the dtype's tolerance. 16-bit: the RMS
    error relative to the RMS of the reference, or of the terms it sums (`term_scales`), or
    `scale_floor` when that is larger."""
    assert got is not None, f"{name}: missing"
    got = np.asarray(got).astype(np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape}, expected {ref.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values {got}"
    if p.dtype in ("float64", "float32"):
        tol = 1e-10 if p.dtype == "float64" else 1e-4
        if term_scales is None:
            atol = tol * max(1.0, float(np.abs(ref).max(initial=0.0)))
        else:  # a sum: its rounding error scales with the magnitudes of its terms
            atol = tol * np.maximum(1.0, term_scales[0])
        err = np.abs(got - ref)
        bad = err > atol + tol * np.abs(ref)
        assert not bad.any(), (f"{name} ({p.dtype}): max error {err.max():.3g} "
                               f"(allowed {np.max(atol):.3g}); got {got[bad][:4]}, "
                               f"expected {ref[bad][:4]}")
        return
    if term_scales is None:
        scale = np.sqrt(np.mean(ref * ref)) if ref.size else 0.0
    else:
        scale = np.sqrt(np.mean(term_scales[1] ** 2))
    scale = max(scale, scale_floor)
    rms = np.sqrt(np.mean((got - ref) ** 2)) if ref.size else 0.0
    if scale == 0.0:
        assert rms == 0.0, f"{name} ({p.dtype}): expected zeros, got RMS {rms:.3g}"
        return
    assert rms <= 2e-2 * scale, (f"{name} ({p.dtype}): relative RMS error {rms / scale:.3g} > 2e-2 "
                                 f"(RMS of the reference {scale:.3g})")


def check_all(p, got_fwd, got_grads, ref):
    """got_fwd: (h, c or None, c_last); got_grads: dict with U, x, c0, weight_c, bias (None where
    that gradient does not exist or was not asked for)."""
    (rh, rc, rcl), rg, scales = ref
    check("h", got_fwd[0], rh, p)
    if got_fwd[1] is not None:
        check("c", got_fwd[1], rc, p)
    check("c_last", got_fwd[2], rcl, p)
    if got_grads is None:
        return
    check("grad U", got_grads["U"], rg["U"], p)
    if p.reads_x:
        check("grad x", got_grads["x"], rg["x"], p)
    if got_grads.get("c0") is not None:
        # dL/dc0 = dc f + du1 v_f + du2 v_r at the first step: its terms can cancel, so in 16-bit
        # its error is relative to the size of the U gradients it is made of
        check("grad c0", got_grads["c0"], rg["c0"], p,
              scale_floor=float(np.sqrt(np.mean(rg["U"] ** 2))))
    for name in ("weight_c", "bias"):
        if got_grads.get(name) is not None:
            check(f"grad {name}", got_grads[name], rg[name], p, term_scales=scales[name])


# -- (a) the launch layer --------------------------------------------------------------------------


def _np(array, dtype):
    return None if array is None else array.astype(dtype)


@PROFILE
@given(p=problems())
@example(p=Problem("float16", L=1, B=1, d=1, pad=(True,), c0=True, grad_c_last=True))
@example(p=Problem("bfloat16", L=40, B=5, d=9, bidirectional=True, variant="k4", use_tanh=True,
                   mask_h=True, c0=True, grad_c_last=True, magnitude=3.0, seed=1))
@example(p=Problem("float64", L=9, B=2, d=2, bidirectional=True, variant="noskip", weight_c=False,
                   pad=(True, False) * 8 + (False, True), c0=True, seed=2))
# found by the long profile (tolerance: dL/dc0 far below the U gradients it is made of)
@example(p=Problem("float16", L=19, B=2, d=1, mask_h=True, c0=True, grad_c_last=True,
                   seed=579267461))
@example(p=Problem("bfloat16", L=1, B=2, d=1, bidirectional=True, variant="noskip", mask_h=True,
                   c0=True, magnitude=3.0, seed=43))
def test_launch_matches_reference(p):
    data = make_data(p)
    dtype = DTYPES[p.dtype]
    arith = np.float64 if p.dtype == "float64" else np.float32
    a = {name: _np(data[name], dtype) for name in ("U", "x", "c0", "grad_h", "grad_c_last")}
    params = {name: _np(data[name], arith) for name in ("weight_c", "bias", "mask_h")}
    kw = dict(mask_h=params["mask_h"], mask_pad=data["mask_pad"], **p.options)
    h, c, c_last = launch.recurrence_forward(a["U"], a["x"], params["weight_c"], params["bias"],
                                             a["c0"], **kw)
    for out in (h, c, c_last):
        assert out.dtype == dtype
    h_inf, c_none, c_last_inf = launch.recurrence_forward(
        a["U"], a["x"], params["weight_c"], params["bias"], a["c0"], store_c=False, **kw)
    assert c_none is None
    assert h_inf.tobytes() == h.tobytes() and c_last_inf.tobytes() == c_last.tobytes(), \
        "the inference kernel differs from the training forward"
    grads = launch.recurrence_backward(a["grad_h"], a["grad_c_last"], a["U"], a["x"],
                                       params["weight_c"], params["bias"], a["c0"], c, **kw)
    assert grads["U"].dtype == dtype and grads["c0"].dtype == dtype
    assert grads["bias"].dtype == np.dtype(arith)
    assert (grads["x"] is not None) == p.reads_x
    np.testing.assert_array_equal(grads["bias"], grads["bias_partial"].sum(axis=1).reshape(-1))
    ref = reference(p, data)
    check_all(p, (h, c, c_last), grads, ref)


# -- (b) the PyTorch op with autograd ------------------------------------------------------------


def _torch_dtype(name):
    import torch
    return {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[name]


@PROFILE_SMALL
@given(p=problems())
@example(p=Problem("bfloat16", L=1, B=1, d=1, variant="k4", weight_c=False, pad=(True,)))
@example(p=Problem("float16", L=33, B=3, d=5, bidirectional=True, use_tanh=True, mask_h=True,
                   c0=True, grad_c_last=True, pad=tuple([False] * 60 + [True] * 39), seed=4))
# found by the long profile: dL/dc0 = 1.9e-8 in the reference, 0 in float16
@example(p=Problem("float16", L=19, B=2, d=1, mask_h=True, c0=True, grad_c_last=True,
                   seed=579267461))
def test_ops_recurrence_autograd_matches_reference(p):
    torch = pytest.importorskip("torch")
    from sru_cupy import ops

    data = make_data(p)
    tdtype = _torch_dtype(p.dtype)
    pdtype = torch.float64 if p.dtype == "float64" else torch.float32

    def tensor(name, dtype, grad):
        if data[name] is None:
            return None
        return torch.tensor(data[name], dtype=dtype).requires_grad_(grad)

    U, x, c0 = (tensor(n, tdtype, True) for n in ("U", "x", "c0"))
    weight_c, bias = tensor("weight_c", pdtype, True), tensor("bias", pdtype, True)
    mask_h = tensor("mask_h", pdtype, False)
    mask_pad = None if data["mask_pad"] is None else torch.from_numpy(data["mask_pad"])
    h, c_last = ops.recurrence(U, x, weight_c, bias, c0, mask_h=mask_h, mask_pad=mask_pad,
                               **p.options)
    assert h.dtype == tdtype and c_last.dtype == tdtype
    loss = (h.double() * torch.from_numpy(data["grad_h"])).sum()
    if data["grad_c_last"] is not None:
        loss = loss + (c_last.double() * torch.from_numpy(data["grad_c_last"])).sum()
    loss.backward()

    def value(t):
        return None if t is None else t.detach().double().numpy()

    grads = {"U": value(U.grad), "x": value(x.grad) if x is not None else None,
             "c0": value(c0.grad) if c0 is not None else None,
             "weight_c": value(weight_c.grad) if weight_c is not None else None,
             "bias": value(bias.grad)}
    if c0 is not None:
        assert c0.grad is not None, "c0 got no gradient"
    if weight_c is not None:
        assert weight_c.grad is not None and weight_c.grad.dtype == pdtype
    check_all(p, (value(h), None, value(c_last)), grads, reference(p, data))


# -- (c) sru_cupy.functional and sru_cupy.arrays -------------------------------------------------


def _optional_module(name):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name == name:
            pytest.skip(f"{name} does not exist (yet)")
        raise


@PROFILE_SMALL
@given(p=problems())
@example(p=Problem("bfloat16", L=5, B=2, d=3, bidirectional=True, mask_h=True, c0=True,
                   grad_c_last=True, pad=(False, True) * 5, seed=5))
# found by the long profile: dL/dc0 = 3.6e-4 from cancelling O(1) terms, bfloat16
@example(p=Problem("bfloat16", L=1, B=2, d=1, bidirectional=True, variant="noskip", mask_h=True,
                   c0=True, magnitude=3.0, seed=43))
def test_functional_with_torch_tensors_matches_reference(p):
    """sru_cupy.functional given torch CPU tensors (DLPack producers; bfloat16 relabelled)."""
    F = _optional_module("sru_cupy.functional")
    torch = pytest.importorskip("torch")
    data = make_data(p)
    tdtype = _torch_dtype(p.dtype)
    pdtype = torch.float64 if p.dtype == "float64" else torch.float32

    def tensor(name, dtype):
        return None if data[name] is None else torch.tensor(data[name], dtype=dtype)

    t = {n: tensor(n, tdtype) for n in ("U", "x", "c0", "grad_h", "grad_c_last")}
    params = {n: tensor(n, pdtype) for n in ("weight_c", "bias", "mask_h")}
    mask_pad = None if data["mask_pad"] is None else torch.from_numpy(data["mask_pad"])
    kw = dict(mask_h=params["mask_h"], mask_pad=mask_pad, **p.options)
    h, c, c_last = F.recurrence_forward(t["U"], t["x"], params["weight_c"], params["bias"], t["c0"],
                                        **kw)
    assert isinstance(h, np.ndarray) and h.dtype == DTYPES[p.dtype]
    grads = F.recurrence_backward(t["grad_h"], t["grad_c_last"], t["U"], t["x"], params["weight_c"],
                                  params["bias"], t["c0"], c, **kw)
    check_all(p, (h, c, c_last), grads, reference(p, data))


def _arrays_oracle(cell, x, c0, mask_pad, mask_h, grad_h, grad_c):
    """float64 forward and gradients of one SRUCell (no layer norm, no projection): U = x W, the
    reference recurrence, and the chain rule through the GEMM."""
    P = {k: np.asarray(v, np.float64) for k, v in cell.params.items()}
    L, B, n_in = x.shape
    U = (x.reshape(L * B, n_in) @ P["weight"]).reshape(L, B, -1)
    skip_x = x if cell.has_skip_term and cell.num_matrices == 3 else None
    weight_c = None if cell.v1 else P["weight_c"]
    kw = dict(hidden_size=cell.hidden_size, bidirectional=cell.bidirectional,
              has_skip_term=cell.has_skip_term, use_tanh=cell.use_tanh,
              scale_x=float(P["scale_x"][0]), mask_h=mask_h, mask_pad=mask_pad)
    h, c, c_last = recurrence_forward_reference(U, skip_x, weight_c, P["bias"], c0, **kw)
    g = recurrence_backward_reference(grad_h, grad_c, U, skip_x, weight_c, P["bias"], c0, c, **kw)
    grad_U = g["U"].reshape(L * B, -1)
    grads = {"weight": x.reshape(L * B, n_in).T @ grad_U, "bias": g["bias"]}
    if not cell.v1:
        grads["weight_c"] = g["weight_c"]
    grad_x = (grad_U @ P["weight"].T).reshape(L, B, n_in)
    if g["x"] is not None:
        grad_x = grad_x + g["x"]
    return h, c_last, grad_x, g["c0"], grads


@PROFILE_SMALL
@given(p=problems(dtypes=("float64", "float32")), n_in=st.integers(1, 7), v1=st.booleans(),
       rescale=st.booleans(), training=st.booleans())
@example(p=Problem("float32", L=1, B=1, d=1, variant="noskip", pad=(True,)), n_in=1, v1=True,
         rescale=False, training=False)
def test_arrays_sru_cell_matches_reference(p, n_in, v1, rescale, training):
    """sru_cupy.arrays.SRUCell forward and backward: the GEMM plus the recurrence, float32 and
    float64, with dropout on h when training (the mask the forward drew is used by the oracle)."""
    arrays = _optional_module("sru_cupy.arrays")
    dtype = DTYPES[p.dtype]
    cell = arrays.SRUCell(n_in, p.d, bidirectional=p.bidirectional, use_tanh=p.use_tanh,
                          has_skip_term=p.has_skip_term, rescale=rescale, v1=v1,
                          highway_bias=-1.0 if rescale else 0.0,
                          dropout=0.3 if training and p.mask_h else 0.0, dtype=dtype, seed=p.seed)
    rng = np.random.default_rng(p.seed)
    L, B, out = p.L, p.B, cell.output_size
    x = _round(rng.standard_normal((L, B, n_in)), dtype)
    c0 = _round(rng.standard_normal((B, out)), dtype) if p.c0 else None
    grad_h = _round(rng.standard_normal((L, B, out)), dtype)
    grad_c = _round(rng.standard_normal((B, out)), dtype) if p.grad_c_last else None
    mask_pad = np.array(p.pad, bool).reshape(L, B) if p.pad else None
    h, c_last, cache = cell.forward(x.astype(dtype), None if c0 is None else c0.astype(dtype),
                                    mask_pad=mask_pad, training=training, rng=p.seed)
    mask_h = cache["options"].get("mask_h")
    grad_x, grad_c0, grads = cell.backward(cache, grad_h.astype(dtype),
                                           None if grad_c is None else grad_c.astype(dtype))
    mask_h = None if mask_h is None else np.asarray(mask_h, np.float64)
    rh, rcl, rgx, rgc0, rgrads = _arrays_oracle(cell, x, c0, mask_pad, mask_h, grad_h, grad_c)
    q = dataclasses.replace(p, c0=c0 is not None)
    check("h", h, rh, q)
    check("c_last", c_last, rcl, q)
    check("grad x", grad_x, rgx, q)
    check("grad c0", grad_c0, rgc0, q)
    for name, ref in rgrads.items():
        check(f"grad {name}", grads[name], ref, q)
    assert set(grads) == set(cell.trainable_names())
