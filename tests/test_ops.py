"""The PyTorch custom ops (``sru_cupy.ops``): ``recurrence`` and ``sru_cupy::recurrence_forward`` /
``sru_cupy::recurrence_backward``.

CPU tests run both CPU implementations, forced with a monkeypatch of ``implementation.for_torch_cpu``:
"host" (the C++ build of the kernels) and "torch" (``sru_cupy.torch_fallback``). Results are
compared with the float64 NumPy oracle in ``sru_cupy.reference``: forward h and c_last and every
gradient (U, x, weight_c, bias, c0) through ``.backward()``. Then gradcheck, opcheck, torch.compile,
the inference variant (store_c=False), batch consistency under padding, non-contiguous inputs and
argument checks. Tests marked ``gpu`` need CuPy and a CUDA device (zero-copy hand-off, streams,
CUDA graphs, multi-GPU, 16-bit, AMP); they are skipped with the reason elsewhere.
"""

import dataclasses
import itertools
import warnings
import zlib

import numpy as np
import pytest
import torch

from sru_cupy import implementation, interop, launch, ops
from sru_cupy.backends import host
from sru_cupy.call import FORWARD, OP_ARGUMENTS
from sru_cupy.reference import recurrence_backward_reference, recurrence_forward_reference


@pytest.fixture(autouse=True)
def _quiet_cpu_notice(monkeypatch):
    """The once-per-process notice about the torch fallback is tested on its own; elsewhere it is
    marked as already shown so that test order does not matter."""
    monkeypatch.setattr(implementation, "_announced", {"torch"})


# -- implementations ---------------------------------------------------------------------------

_NO_HOST = pytest.mark.skipif(not host.available(), reason="host backend: no C++ compiler found")
CPU_IMPLS = [pytest.param("host", marks=_NO_HOST), "torch"]
#: The CPU implementations plus the GPU (CuPy kernels through DLPack), for the oracle tests.
ALL_IMPLS = CPU_IMPLS + [pytest.param("cuda", marks=pytest.mark.gpu)]


def _need_torch_cuda():
    if not torch.cuda.is_available():
        pytest.skip("gpu: this torch build has no CUDA device")


def _use(monkeypatch, impl):
    """Forces the CPU implementation ("host" or "torch"); returns the device to put tensors on."""
    if impl == "cuda":
        _need_torch_cuda()
        return torch.device("cuda")
    monkeypatch.setattr(implementation, "for_torch_cpu", lambda: impl)
    return torch.device("cpu")


@pytest.fixture(params=CPU_IMPLS)
def cpu_impl(request, monkeypatch):
    _use(monkeypatch, request.param)
    return request.param


# -- problems ----------------------------------------------------------------------------------

DTYPES = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
#: dtype of weight_c, bias and mask_h for each storage dtype (float32 beside 16-bit U).
PARAM_DTYPES = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.float32,
                "f16": torch.float32}
KVARIANTS = {"k3": (3, True), "k4": (4, True), "noskip": (3, False)}
#: The differentiable inputs of ops.recurrence.
DIFFERENTIABLE = ("U", "x", "weight_c", "bias", "c0", "V")


@dataclasses.dataclass(frozen=True)
class Opts:
    """Options of one recurrence call. ``used`` says which outputs the loss reads."""
    bi: bool = False
    kvar: str = "k3"
    v1: bool = False          # weight_c None
    tanh: bool = False
    mh: bool = False          # dropout mask on h
    pad: str = "nopad"        # nopad, padend, padstart
    c0: bool = False
    sx: float = 1.0           # scale_x
    used: str = "both"        # both, h (grad_c_last None), clast (grad_h None)
    V: bool = False           # per-step offsets of weight_c (a transform module's V)

    @property
    def id(self):
        parts = ["bi" if self.bi else "uni", self.kvar]
        parts += [name for name, on in (("v1", self.v1), ("tanh", self.tanh), ("mh", self.mh),
                                        ("c0", self.c0), ("V", self.V)) if on]
        if self.pad != "nopad":
            parts.append(self.pad)
        if self.sx != 1.0:
            parts.append(f"sx{self.sx}")
        if self.used != "both":
            parts.append(f"only{self.used}")
        return "-".join(parts)

    @property
    def k(self):
        return KVARIANTS[self.kvar][0]

    @property
    def has_skip_term(self):
        return KVARIANTS[self.kvar][1]

    @property
    def reads_x(self):
        return self.has_skip_term and self.k == 3

    def kwargs(self, d):
        return dict(hidden_size=d, bidirectional=self.bi, has_skip_term=self.has_skip_term,
                    use_tanh=self.tanh, scale_x=self.sx)


def _seed(*parts):
    return zlib.crc32("/".join(map(str, parts)).encode())


def _lengths(L, B, pad):
    """Sequence lengths: batch 0 full, the last of B >= 3 empty, the others in between."""
    lengths = [L] + [max(1, L - 2 - 3 * i) for i in range(B - 1)]
    if B >= 3:
        lengths[-1] = 0
    return lengths[:B]


def _pad_mask(L, B, pad, lengths=None):
    if pad == "nopad":
        return None
    lengths = _lengths(L, B, pad) if lengths is None else lengths
    mask = torch.zeros(L, B, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if pad == "padend":
            mask[n:, b] = True
        else:
            mask[:L - n, b] = True
    return mask if pad == "padend" else mask.to(torch.uint8)  # any nonzero value is padding


def make_problem(opts, L, B, d, dtype=torch.float64, param_dtype=None, device="cpu", seed=0,
                 poison_padding=True, requires_grad=True, lengths=None):
    """Inputs of ops.recurrence as a dict of tensors (leaves requiring grad where differentiable).
    With ``poison_padding`` U and x hold NaN at padded steps: nothing may leak from there."""
    param_dtype = param_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    D = d * (2 if opts.bi else 1)
    g = torch.Generator().manual_seed(_seed(opts.id, L, B, d, dtype, seed))
    U = torch.randn(L, B, D * opts.k, generator=g, dtype=torch.float64)
    x = torch.randn(L, B, D, generator=g, dtype=torch.float64)
    weight_c = torch.rand(2 * D, generator=g, dtype=torch.float64) * 2 - 1
    bias = torch.randn(2 * D, generator=g, dtype=torch.float64) * 0.5
    c0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    mask_h = (torch.rand(B, D, generator=g, dtype=torch.float64) < 0.7).double() / 0.7
    mask_pad = _pad_mask(L, B, opts.pad, lengths)
    V = torch.randn(L, B, 2 * D, generator=g, dtype=torch.float64) * 0.5
    if poison_padding and mask_pad is not None:
        padded = (mask_pad != 0)[:, :, None]
        U = U.masked_fill(padded, float("nan"))
        x = x.masked_fill(padded, float("nan"))
        V = V.masked_fill(padded, float("nan"))
    problem = {
        "U": U.to(dtype),
        "x": x.to(dtype) if opts.reads_x else None,
        "weight_c": None if opts.v1 else weight_c.to(param_dtype),
        "bias": bias.to(param_dtype),
        "c0": c0.to(dtype) if opts.c0 else None,
        "mask_h": mask_h.to(param_dtype) if opts.mh else None,
        "mask_pad": mask_pad,
        "V": V.to(dtype) if opts.V else None,
    }
    for name, t in problem.items():
        if t is not None:
            t = t.to(device)
            if requires_grad and name in DIFFERENTIABLE:
                t.requires_grad_()
            problem[name] = t
    return problem


def call(problem, opts, d, fn=None):
    fn = fn or ops.recurrence
    p = problem
    extra = {} if p.get("V") is None else {"V": p["V"]}
    return fn(p["U"], p["x"], p["weight_c"], p["bias"], p["c0"], mask_h=p["mask_h"],
              mask_pad=p["mask_pad"], **extra, **opts.kwargs(d))


def _np(t):
    return None if t is None else t.detach().cpu().double().numpy()


def reference(problem, opts, d, grad_h, grad_c_last):
    """Float64 oracle outputs for the problem's (rounded) inputs; grad_h may be None (zeros)."""
    args = [_np(problem[n]) for n in ("U", "x", "weight_c", "bias", "c0")]
    kw = dict(opts.kwargs(d), mask_h=_np(problem["mask_h"]), mask_pad=_np(problem["mask_pad"]),
              V=_np(problem.get("V")))
    h, c, c_last = recurrence_forward_reference(*args, **kw)
    gh = np.zeros_like(h) if grad_h is None else grad_h
    grads = recurrence_backward_reference(gh, grad_c_last, *args, c, **kw)
    return h, c_last, grads


def rel_rms(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    scale = max(np.sqrt(np.mean(ref ** 2)) if ref.size else 0.0, 1e-6)
    return float(np.sqrt(np.mean((got - ref) ** 2)) / scale) if ref.size else 0.0


def assert_matches(name, got, ref, dtype):
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values {got}"
    if dtype == torch.float64:
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-11, err_msg=name)
    elif dtype == torch.float32:
        scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * scale, err_msg=name)
    else:
        err = rel_rms(got, ref)
        assert err <= 1e-2, f"{name}: relative RMS error {err:.3g} > 1e-2"


def forward_backward(problem, opts, d, seed=0):
    """Runs ops.recurrence and .backward() with random grad_h / grad_c_last (per ``opts.used``).
    Returns (h, c_last, {name: grad}, grad_h, grad_c_last) with the float64 grads that reached
    the op (rounded to the storage dtype, as autograd casts them)."""
    h, c_last = call(problem, opts, d)
    dtype = problem["U"].dtype
    g = torch.Generator().manual_seed(_seed("grads", opts.id, seed))
    gh = torch.randn(h.shape, generator=g, dtype=torch.float64).to(dtype).double()
    gcl = torch.randn(c_last.shape, generator=g, dtype=torch.float64).to(dtype).double()
    loss = 0
    if opts.used in ("both", "h"):
        loss = loss + (h.double() * gh.to(h.device)).sum()
    if opts.used in ("both", "clast"):
        loss = loss + (c_last.double() * gcl.to(h.device)).sum()
    loss.backward()
    grads = {n: problem[n].grad for n in DIFFERENTIABLE if problem.get(n) is not None}
    return (h, c_last, grads, gh.numpy() if opts.used != "clast" else None,
            gcl.numpy() if opts.used != "h" else None)


# -- 1. ops.recurrence against the NumPy reference ---------------------------------------------

#: Option sets spread over every value of every option; crossed with direction and k-variant.
OPTION_SETS = {
    "plain": dict(),
    "v1-tanh-mh-padend-c0-sx": dict(v1=True, tanh=True, mh=True, pad="padend", c0=True, sx=1.7),
    "tanh-padstart-c0-onlyh": dict(tanh=True, pad="padstart", c0=True, used="h"),
    "mh-padend-sx-onlyclast": dict(mh=True, pad="padend", sx=0.6, used="clast"),
    "v1-mh-padstart": dict(v1=True, mh=True, pad="padstart"),
    "all": dict(tanh=True, mh=True, pad="padend", c0=True, sx=1.7),
    "V-tanh-mh-padend-c0": dict(V=True, tanh=True, mh=True, pad="padend", c0=True),
    "v1-V-padstart-onlyh": dict(v1=True, V=True, pad="padstart", used="h"),
}
ORACLE_CASES = [Opts(bi=bi, kvar=kvar, **extra)
                for bi, kvar, extra in itertools.product((False, True), KVARIANTS,
                                                         OPTION_SETS.values())]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("opts", ORACLE_CASES, ids=[o.id for o in ORACLE_CASES])
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_against_reference(monkeypatch, impl, opts, dtype_name):
    device = _use(monkeypatch, impl)
    dtype, param_dtype = DTYPES[dtype_name], PARAM_DTYPES[dtype_name]
    L, B, d = 7, 4, 5
    p = make_problem(opts, L, B, d, dtype, param_dtype, device=device)
    h, c_last, grads, gh, gcl = forward_backward(p, opts, d)
    ref_h, ref_c_last, ref_grads = reference(p, opts, d, gh, gcl)

    D = d * (2 if opts.bi else 1)
    assert h.shape == (L, B, D) and c_last.shape == (B, D)
    assert h.dtype == dtype and c_last.dtype == dtype
    assert h.device == c_last.device == p["U"].device
    assert_matches("h", _np(h), ref_h, dtype)
    assert_matches("c_last", _np(c_last), ref_c_last, dtype)
    assert set(grads) == {n for n in DIFFERENTIABLE if p[n] is not None}
    for name, grad in grads.items():
        assert grad is not None, f"{name}: no gradient"
        assert grad.dtype == p[name].dtype, f"{name}: grad dtype {grad.dtype} != {p[name].dtype}"
        assert grad.shape == p[name].shape
        assert_matches(f"grad {name}", _np(grad), ref_grads[name], dtype)
    if p["mask_pad"] is not None:  # padding: h is exactly 0, no gradient to padded inputs
        padded = p["mask_pad"].cpu() != 0
        assert (h.detach().cpu()[padded] == 0).all()
        assert (grads["U"].cpu()[padded] == 0).all()
        if "x" in grads:
            assert (grads["x"].cpu()[padded] == 0).all()


@pytest.mark.parametrize("dtype_name", ["f64", "f32", "bf16"])
@pytest.mark.parametrize("kvar", ["k3", "k4"])
def test_unread_x_gets_no_gradient(cpu_impl, kvar, dtype_name):
    """x passed where it is not read (k = 4, or no skip term): no effect, and a None gradient."""
    dtype = DTYPES[dtype_name]
    opts = Opts(bi=True, kvar=kvar if kvar == "k4" else "noskip", tanh=True, c0=True)
    p = make_problem(opts, 5, 3, 4, dtype)
    x = torch.randn(5, 3, 8, dtype=dtype, requires_grad=True)
    h, c_last = call(p, opts, 4)
    h2, c_last2 = ops.recurrence(p["U"], x, p["weight_c"], p["bias"], p["c0"], **opts.kwargs(4))
    assert torch.equal(h, h2) and torch.equal(c_last, c_last2)
    (h2.double().sum() + c_last2.double().sum()).backward()
    assert x.grad is None
    assert p["U"].grad is not None and torch.isfinite(p["U"].grad).all()


def test_float32_parameters_beside_float64_data(cpu_impl):
    """weight_c, bias and mask_h may have another floating dtype than U; grads keep their dtype."""
    opts = Opts(bi=True, mh=True, c0=True, tanh=True, pad="padend")
    p = make_problem(opts, 6, 3, 4, torch.float64, param_dtype=torch.float32)
    h, c_last, grads, gh, gcl = forward_backward(p, opts, 4)
    ref_h, ref_c_last, ref_grads = reference(p, opts, 4, gh, gcl)
    assert grads["weight_c"].dtype == grads["bias"].dtype == torch.float32
    assert_matches("h", _np(h), ref_h, torch.float64)
    for name in ("weight_c", "bias"):
        assert_matches(name, _np(grads[name]), ref_grads[name], torch.float32)
    for name in ("U", "x", "c0"):
        assert_matches(name, _np(grads[name]), ref_grads[name], torch.float64)


@pytest.mark.parametrize("bi", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("L,B", [(0, 3), (4, 0)], ids=["L0", "B0"])
@pytest.mark.parametrize("with_c0", [False, True], ids=["noc0", "c0"])
def test_empty_sequence_or_batch(cpu_impl, L, B, bi, with_c0):
    """L = 0: c_last is c0 (zeros without), dL/dc0 = dL/dc_last; B = 0: empty outputs."""
    d = 3
    D = d * (2 if bi else 1)
    opts = Opts(bi=bi, c0=with_c0, tanh=True)
    p = make_problem(opts, L, B, d, torch.float32)
    h, c_last = call(p, opts, d)
    assert h.shape == (L, B, D) and c_last.shape == (B, D)
    expected = p["c0"].detach().clone() if with_c0 else torch.zeros(B, D)
    assert torch.equal(c_last, expected)
    gcl = torch.randn(B, D)
    (h.sum() + (c_last * gcl).sum()).backward()
    assert p["U"].grad.shape == p["U"].shape and p["x"].grad.shape == p["x"].shape
    assert not p["weight_c"].grad.any() and not p["bias"].grad.any()
    if with_c0:
        assert torch.equal(p["c0"].grad, gcl)
        c_last.detach().zero_()  # an output must not alias the input c0
        assert torch.equal(p["c0"].detach(), expected)


# -- 2. gradcheck ------------------------------------------------------------------------------

GRADCHECK_CASES = [
    Opts(bi=bi, kvar=kvar, v1=v1, tanh=tanh, mh=mh, pad=pad, c0=c0, sx=1.7 if kvar == "k3" else 1.0)
    for bi, kvar, v1, tanh, mh, pad, c0 in itertools.product(
        (False, True), KVARIANTS, (False, True), (False, True), (False, True),
        ("nopad", "padend", "padstart"), (False, True))
]
# V (per-step weight_c offsets) over a spread sixth of the combinations.
GRADCHECK_CASES += [dataclasses.replace(o, V=True) for o in GRADCHECK_CASES[::6]]


def _gradcheck(opts, device="cpu", fast_mode=True):
    L, B, d = 4, 2, 3
    p = make_problem(opts, L, B, d, torch.float64, device=device, poison_padding=False)
    names = [n for n in DIFFERENTIABLE if p[n] is not None]

    def fn(*tensors):
        q = dict(p, **dict(zip(names, tensors)))
        return call(q, opts, d)

    assert torch.autograd.gradcheck(fn, tuple(p[n] for n in names), fast_mode=fast_mode,
                                    atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("opts", GRADCHECK_CASES, ids=[o.id for o in GRADCHECK_CASES])
def test_gradcheck_every_option_combination(cpu_impl, opts):
    _gradcheck(opts)


EXACT_GRADCHECK_CASES = [
    Opts(kvar="k3", tanh=True, mh=True, pad="padend", c0=True, sx=1.7),
    Opts(bi=True, kvar="k3", pad="padstart", c0=True, sx=0.8),
    Opts(bi=True, kvar="k4", v1=True, tanh=True, mh=True, pad="padend", c0=True),
    Opts(bi=True, kvar="noskip", tanh=True, mh=True, pad="padstart", c0=True),
    Opts(bi=True, kvar="k4", tanh=True, pad="padend", c0=True, V=True),
    Opts(bi=True, kvar="k3", v1=True, mh=True, pad="padstart", V=True, sx=1.7),
]


@pytest.mark.parametrize("opts", EXACT_GRADCHECK_CASES, ids=[o.id for o in EXACT_GRADCHECK_CASES])
def test_gradcheck_full_jacobian(cpu_impl, opts):
    _gradcheck(opts, fast_mode=False)


# -- 3. opcheck --------------------------------------------------------------------------------

OPCHECK_SETS = {
    "uni-k3-f64-all": (Opts(kvar="k3", tanh=True, mh=True, pad="padend", c0=True, sx=1.7),
                       torch.float64, False),
    "bi-k4-f32-v1-padstart": (Opts(bi=True, kvar="k4", v1=True, pad="padstart"),
                              torch.float32, False),
    "bi-noskip-bf16-c0-mh": (Opts(bi=True, kvar="noskip", tanh=True, mh=True, c0=True),
                             torch.bfloat16, False),
    "uni-k3-f32-noncontiguous": (Opts(kvar="k3", c0=True, pad="padend"), torch.float32, True),
    "bi-k3-f16-noncontiguous": (Opts(bi=True, kvar="k3", c0=True, tanh=True), torch.float16, True),
    "bi-k4-f32-V-padend": (Opts(bi=True, kvar="k4", c0=True, pad="padend", V=True),
                           torch.float32, False),
    "uni-k3-f64-V-noncontiguous": (Opts(kvar="k3", tanh=True, mh=True, V=True), torch.float64,
                                   True),
}


def _opcheck_inputs(name, requires_grad):
    opts, dtype, noncontiguous = OPCHECK_SETS[name]
    L, B, d = 4, 3, 2
    p = make_problem(opts, L, B, d, dtype, requires_grad=requires_grad, poison_padding=False)
    if noncontiguous:  # same values, transposed (L, B) storage
        for n in ("U", "x", "c0", "V"):
            if p[n] is not None:
                t = p[n].detach()
                t = t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() == 3 else \
                    t.t().contiguous().t()
                assert not t.is_contiguous()
                p[n] = t.requires_grad_(requires_grad)
    return opts, d, p


@pytest.mark.parametrize("store_c", [True, False], ids=["store_c", "inference"])
@pytest.mark.parametrize("name", list(OPCHECK_SETS))
def test_opcheck_forward(cpu_impl, name, store_c):
    # Backward through store_c=False raises by design: its inputs do not require grad.
    opts, d, p = _opcheck_inputs(name, requires_grad=store_c)
    args = (p["U"], p["x"], p["weight_c"], p["bias"], p["c0"], p["mask_h"], p["mask_pad"], d,
            opts.bi, opts.has_skip_term, opts.tanh, opts.sx, store_c, p["V"])
    torch.library.opcheck(ops.recurrence_forward_op, args)


@pytest.mark.parametrize("with_grad_c_last", [True, False], ids=["gcl", "nogcl"])
@pytest.mark.parametrize("name", list(OPCHECK_SETS))
def test_opcheck_backward(cpu_impl, name, with_grad_c_last):
    opts, d, p = _opcheck_inputs(name, requires_grad=False)
    _, c, c_last = ops.recurrence_forward_op(
        p["U"], p["x"], p["weight_c"], p["bias"], p["c0"], p["mask_h"], p["mask_pad"], d, opts.bi,
        opts.has_skip_term, opts.tanh, opts.sx, True, p["V"])
    g = torch.Generator().manual_seed(1)
    grad_h = torch.randn(c.shape, generator=g).to(c.dtype)
    grad_c_last = torch.randn(c_last.shape, generator=g).to(c.dtype) if with_grad_c_last else None
    args = (grad_h, grad_c_last, p["U"], p["x"], p["weight_c"], p["bias"], p["c0"], c, p["mask_h"],
            p["mask_pad"], d, opts.bi, opts.has_skip_term, opts.tanh, opts.sx, p["V"])
    torch.library.opcheck(ops.recurrence_backward_op, args)


def test_backward_op_outputs_are_contiguous(cpu_impl):
    """The fake impl promises contiguous gradients; the real outputs must have those strides."""
    L, B, d = 5, 3, 4
    U = torch.randn(B, L, 3 * d).transpose(0, 1)
    x = torch.randn(B, L, d).transpose(0, 1)
    c0 = torch.randn(d, B).t()
    bias = torch.randn(2 * d)
    _, c, _ = ops.recurrence_forward_op(U, x, None, bias, c0, None, None, d, False, True, False,
                                        1.0, True)
    grads = ops.recurrence_backward_op(torch.randn(L, B, d), torch.randn(B, d), U, x, None, bias,
                                       c0, c, None, None, d, False, True, False, 1.0)
    for name, grad in zip(("U", "x", "weight_c", "bias", "c0"), grads):
        assert grad.is_contiguous(), f"grad {name}: strides {grad.stride()} are not contiguous"


# -- 4. torch.compile --------------------------------------------------------------------------

@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    yield torch._dynamo
    torch._dynamo.reset()


COMPILE_OPTS = Opts(bi=True, kvar="k3", tanh=True, mh=True, pad="padend", c0=True, sx=1.3)


def _compile_fn(opts, d):
    def fn(U, x, weight_c, bias, c0, mask_h, mask_pad):
        h, c_last = ops.recurrence(U * 1.5, x, weight_c, bias, c0, mask_h=mask_h,
                                   mask_pad=mask_pad, **opts.kwargs(d))
        return torch.tanh(h) * 2, c_last + 1
    return fn


def _run_with_grads(fn, p):
    for n in ("U", "x", "weight_c", "bias", "c0"):
        if p[n] is not None:
            p[n].grad = None
    h, c_last = fn(*(p[n] for n in ("U", "x", "weight_c", "bias", "c0", "mask_h", "mask_pad")))
    g = torch.Generator().manual_seed(3)
    (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum().add(
        (c_last * torch.randn(c_last.shape, generator=g, dtype=h.dtype)).sum()).backward()
    grads = {n: p[n].grad.clone() for n in ("U", "x", "weight_c", "bias", "c0")
             if p[n] is not None}
    return h.detach(), c_last.detach(), grads


def _assert_same(a, b, exact=True):
    if exact:
        assert torch.equal(a, b), f"max difference {(a - b).abs().max().item()}"
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_matches_eager(cpu_impl, dynamo, backend):
    d = 3
    fn = _compile_fn(COMPILE_OPTS, d)
    p = make_problem(COMPILE_OPTS, 6, 3, d, torch.float32, poison_padding=False)
    eager = _run_with_grads(fn, p)
    compiled = _run_with_grads(torch.compile(fn, backend=backend, fullgraph=True), p)
    for a, b in zip(eager[:2], compiled[:2]):
        _assert_same(a, b)
    for name in eager[2]:
        _assert_same(eager[2][name], compiled[2][name])

def test_compile_warns_nothing(cpu_impl, dynamo, monkeypatch):
    """Compiling a call of the op warns nothing (dynamo warns, once per process, about any memo it
    traces through: the call's description is not memoised while it is traced)."""
    seen = getattr(torch._dynamo.utils, "warn_once_cache", None)
    if seen is not None:  # forget what dynamo warned about earlier in this process
        monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())
    d = 3
    p = make_problem(COMPILE_OPTS, 6, 3, d, torch.float32, poison_padding=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_with_grads(torch.compile(_compile_fn(COMPILE_OPTS, d), backend="eager",
                                      fullgraph=True), p)
    assert [str(w.message) for w in caught] == []



@pytest.mark.skipif(host.find_compiler() is None, reason="inductor on the CPU needs a C++ compiler")
def test_compile_fullgraph_inductor_matches_eager(cpu_impl, dynamo):
    """The slowest test here (inductor compiles C++: about 25 s with a cold inductor cache)."""
    d = 3
    fn = _compile_fn(COMPILE_OPTS, d)
    p = make_problem(COMPILE_OPTS, 6, 3, d, torch.float32, poison_padding=False)
    eager = _run_with_grads(fn, p)
    compiled = _run_with_grads(torch.compile(fn, backend="inductor", fullgraph=True), p)
    for a, b in zip(eager[:2], compiled[:2]):
        _assert_same(a, b, exact=False)
    for name in eager[2]:
        _assert_same(eager[2][name], compiled[2][name], exact=False)


def _recording_backend(graphs):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(kind):
        def record(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return record
    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))


def _op_calls(gm, op):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op]


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_compiled_graph_holds_the_custom_ops(cpu_impl, dynamo, grad):
    """Forward graph: one sru_cupy::recurrence_forward with store_c as the mode asks; backward
    graph: one sru_cupy::recurrence_backward."""
    d = 3
    graphs = {"forward": [], "backward": []}
    fn = torch.compile(_compile_fn(COMPILE_OPTS, d), backend=_recording_backend(graphs),
                       fullgraph=True)
    p = make_problem(COMPILE_OPTS, 5, 2, d, torch.float32, poison_padding=False,
                     requires_grad=grad)
    if grad:
        h, _, _ = _run_with_grads(fn, p)
    else:
        with torch.no_grad():
            h, _ = fn(*(p[n] for n in ("U", "x", "weight_c", "bias", "c0", "mask_h",
                                        "mask_pad")))
    assert len(graphs["forward"]) == 1
    calls = _op_calls(graphs["forward"][0], torch.ops.sru_cupy.recurrence_forward.default)
    assert len(calls) == 1
    assert calls[0].args[-1] is grad, "store_c should be True exactly when training"
    if grad:
        assert len(graphs["backward"]) == 1
        assert len(_op_calls(graphs["backward"][0],
                             torch.ops.sru_cupy.recurrence_backward.default)) == 1
    else:
        assert graphs["backward"] == []
    with torch.no_grad():
        expected, _ = _compile_fn(COMPILE_OPTS, d)(
            *(p[n] for n in ("U", "x", "weight_c", "bias", "c0", "mask_h", "mask_pad")))
    _assert_same(h, expected)


def test_compile_dynamic_shapes_one_graph(cpu_impl, dynamo):
    """The fake impls work with symbolic sizes: two sequence lengths, one compiled frame."""
    from torch._dynamo.testing import CompileCounterWithBackend
    d = 3
    opts = Opts(kvar="k3", tanh=True, c0=True, sx=1.3)
    fn = _compile_fn(opts, d)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for L in (5, 9):
        p = make_problem(opts, L, 2, d, torch.float32, poison_padding=False)
        eager = _run_with_grads(fn, p)
        got = _run_with_grads(compiled, p)
        for a, b in zip(eager[:2], got[:2]):
            _assert_same(a, b)
        for name in eager[2]:
            _assert_same(eager[2][name], got[2][name])
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0], "recompiled for another sequence length"


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_compile_fullgraph_on_the_first_call_of_the_process(monkeypatch, dynamo, impl):
    """The first CPU call of a process looks up the CPU implementation (a search for a C++
    compiler) and shows a notice (a warning with the torch fallback); a compiled first call must
    not break the graph for that. "host" uses the real ``implementation.for_torch_cpu``."""
    if impl == "torch":
        monkeypatch.setattr(implementation, "for_torch_cpu", lambda: "torch")
    monkeypatch.setattr(implementation, "_announced", set())
    d = 3
    fn = _compile_fn(COMPILE_OPTS, d)
    p = make_problem(COMPILE_OPTS, 4, 2, d, torch.float32, poison_padding=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = _run_with_grads(torch.compile(fn, backend="eager", fullgraph=True), p)
    eager = _run_with_grads(fn, p)
    _assert_same(eager[0], compiled[0])
    for name in eager[2]:
        _assert_same(eager[2][name], compiled[2][name])


def test_cpu_fallback_notice_is_shown_once(monkeypatch):
    monkeypatch.setattr(implementation, "for_torch_cpu", lambda: "torch")
    monkeypatch.setattr(implementation, "_announced", set())
    opts = Opts()
    p = make_problem(opts, 3, 2, 2, torch.float32)
    with pytest.warns(UserWarning, match="sru_cupy: no C\\+\\+ compiler found"):
        call(p, opts, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(p, opts, 2)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_sru_module(cpu_impl, dynamo, backend):
    from sru_cupy.modules import SRU
    torch.manual_seed(0)
    model = SRU(4, 3, num_layers=2, bidirectional=True, rescale=True, highway_bias=-1.0)
    x = torch.randn(6, 2, 4, requires_grad=True)

    def run(m):
        x.grad = None
        model.zero_grad()
        h, c = m(x)
        (h.pow(2).sum() + c.sum()).backward()
        return [h.detach(), c.detach(), x.grad.clone()] + [p.grad.clone()
                                                           for p in model.parameters()]

    eager = run(model)
    compiled = run(torch.compile(model, backend=backend, fullgraph=True))
    for a, b in zip(eager, compiled):
        _assert_same(a, b, exact=False)


# -- 4b. eager start-up and backward without waste ----------------------------------------------

@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_eager_calls_do_not_import_dynamo(impl):
    """The ops are reached in eager mode without torch._dynamo (about a second to import): a
    fresh process runs an SRU forward and backward on the CPU, and the ops directly."""
    import subprocess
    import sys
    import textwrap
    from child_env import child_env
    script = textwrap.dedent(f"""
        import sys, warnings
        import torch
        from sru_cupy import SRU, implementation, ops
        implementation.for_torch_cpu = lambda: {impl!r}
        warnings.simplefilter("ignore")
        model = SRU(4, 4, num_layers=2)
        x = torch.randn(3, 2, 4, requires_grad=True)
        h, c = model(x)
        (h.sum() + c.sum()).backward()
        assert x.grad is not None and model.rnn_lst[0].weight_c.grad is not None
        U, xs, bias = torch.randn(3, 2, 12), torch.randn(3, 2, 4), torch.zeros(8)
        _, cs, _ = ops.recurrence_forward_op(U, xs, None, bias, None, None, None, 4, False, True,
                                             False, 1.0, True)
        ops.recurrence_backward_op(torch.ones(3, 2, 4), None, U, xs, None, bias, None, cs, None,
                                   None, 4, False, True, False, 1.0)
        print("DYNAMO-IMPORTED" if "torch._dynamo" in sys.modules else "NO-DYNAMO")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=child_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "NO-DYNAMO", out.stdout


def test_ops_are_declared_for_tracing():
    """Tagged pt2_compliant (as torch.library.custom_op would), with CPU and CUDA kernels, a fake
    (Meta) implementation and an autograd formula registered with the dispatcher."""
    for op in (torch.ops.sru_cupy.recurrence_forward.default,
               torch.ops.sru_cupy.recurrence_backward.default):
        assert torch.Tag.pt2_compliant_tag in op.tags
        for key in ("CPU", "CUDA", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), (op, key)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "sru_cupy::recurrence_forward", "Autograd")
    assert ops.recurrence_forward_op is torch.ops.sru_cupy.recurrence_forward.default


ROUTE_OPTS = [Opts(bi=True, kvar="k3", tanh=True, mh=True, pad="padend", c0=True, sx=1.3),
              Opts(kvar="k4", v1=True, pad="padstart", V=True),
              Opts(bi=True, kvar="noskip", c0=True, V=True, used="h")]


@pytest.mark.parametrize("opts", ROUTE_OPTS, ids=lambda o: o.id)
def test_eager_route_matches_the_registered_autograd(cpu_impl, opts):
    """recurrence() in eager mode records its own autograd node (the registered formula, without
    PyTorch's re-binding of the 14 operator arguments per call); the operator called directly
    records the formula registered with torch.library. Same outputs and gradients, bit for bit."""
    d = 3

    def direct(U, x, weight_c, bias, c0, mask_h=None, mask_pad=None, V=None, **options):
        values = dict(U=U, x=x, weight_c=weight_c, bias=bias, c0=c0, mask_h=mask_h,
                      mask_pad=mask_pad, V=V, store_c=True, **options)
        h, _, c_last = ops.recurrence_forward_op(
            *(values[name] for name, _ in OP_ARGUMENTS[FORWARD]))
        return h, c_last

    results = []
    for fn in (None, direct):
        p = make_problem(opts, 5, 3, d, torch.float64, requires_grad=True)
        h, c_last = call(p, opts, d, fn)
        results.append((h, c_last, p, type(h.grad_fn).__name__))
        g = torch.Generator().manual_seed(4)
        loss = (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()
        if opts.used != "h":
            loss = loss + (c_last * torch.randn(c_last.shape, generator=g, dtype=h.dtype)).sum()
        loss.backward()
    (h_a, c_a, p_a, node_a), (h_b, c_b, p_b, node_b) = results
    assert node_a != node_b, f"both calls recorded {node_a}: the eager route was not taken"
    assert torch.equal(h_a, h_b) and torch.equal(c_a, c_b)
    for name in DIFFERENTIABLE:
        if p_a.get(name) is None:
            continue
        got, want = p_a[name].grad, p_b[name].grad
        assert (got is None) == (want is None), name
        assert got is None or torch.equal(got, want), name


@pytest.mark.parametrize("loss_of", ["h", "c_last", "both"])
def test_backward_fills_no_zero_gradient_for_unused_outputs(cpu_impl, loss_of):
    """The stored c (L, B, D) is never part of a loss: its gradient is not materialized as zeros
    (a full pass over memory); h's is made only when the loss reads c_last alone."""
    from torch.profiler import ProfilerActivity, profile
    L, B, d = 5, 3, 4
    opts = Opts()
    p = make_problem(opts, L, B, d, torch.float32)
    h, c_last = call(p, opts, d)
    loss = {"h": h.sum(), "c_last": c_last.sum(), "both": h.sum() + c_last.sum()}[loss_of]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()
    filled = [e.input_shapes[0] for e in prof.events()
              if e.name in ("aten::zero_", "aten::fill_") and e.input_shapes
              and e.input_shapes[0] == [L, B, d]]
    assert bool(filled) == (loss_of == "c_last"), filled
    assert p["U"].grad is not None


# -- 5. inference variant ----------------------------------------------------------------------

@pytest.fixture
def forward_spy(monkeypatch):
    calls = []
    real = ops.recurrence_forward_op

    def spy(*args):
        calls.append(args[12])  # store_c
        return real(*args)
    monkeypatch.setattr(ops, "recurrence_forward_op", spy)
    return calls


INFERENCE_OPTS = Opts(bi=True, kvar="k3", tanh=True, mh=True, pad="padstart", c0=True, sx=1.7)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_input_requires_grad"])
@pytest.mark.parametrize("dtype_name", ["f32", "bf16"])
def test_inference_variant_skips_c_and_matches_training(cpu_impl, forward_spy, mode, dtype_name):
    d = 4
    dtype = DTYPES[dtype_name]
    p = make_problem(INFERENCE_OPTS, 6, 3, d, dtype, PARAM_DTYPES[dtype_name])
    h_train, c_train = call(p, INFERENCE_OPTS, d)
    assert forward_spy == [True] and h_train.requires_grad
    if mode == "no_grad":
        with torch.no_grad():
            h, c_last = call(p, INFERENCE_OPTS, d)
    elif mode == "inference_mode":
        with torch.inference_mode():
            h, c_last = call(p, INFERENCE_OPTS, d)
    else:
        q = {n: (t.detach() if t is not None else None) for n, t in p.items()}
        h, c_last = call(q, INFERENCE_OPTS, d)
    assert forward_spy == [True, False]
    assert not h.requires_grad and not c_last.requires_grad
    assert torch.equal(h, h_train.detach()) and torch.equal(c_last, c_train.detach())


def test_parameter_requiring_grad_alone_selects_training(cpu_impl, forward_spy):
    opts = Opts(c0=True)
    p = make_problem(opts, 4, 2, 3, torch.float32, requires_grad=False)
    p["bias"].requires_grad_()
    h, _ = call(p, opts, 3)
    assert forward_spy == [True]
    h.sum().backward()
    assert p["bias"].grad is not None and p["bias"].grad.abs().sum() > 0


def test_forward_op_without_c_returns_empty_c_and_refuses_backward(cpu_impl):
    opts = INFERENCE_OPTS
    d = 3
    p = make_problem(opts, 5, 2, d, torch.float32, poison_padding=False)
    args = (p["U"], p["x"], p["weight_c"], p["bias"], p["c0"], p["mask_h"], p["mask_pad"], d,
            opts.bi, opts.has_skip_term, opts.tanh, opts.sx)
    h, c, c_last = ops.recurrence_forward_op(*args, False)
    h2, c2, c_last2 = ops.recurrence_forward_op(*args, True)
    assert c.shape == (0,) and c2.shape == h2.shape
    assert torch.equal(h, h2) and torch.equal(c_last, c_last2)
    assert torch.equal(c2[-1][:, :d], c_last2[:, :d]) and torch.equal(c2[0][:, d:], c_last2[:, d:])
    with pytest.raises(RuntimeError, match="store_c=False"):
        h.sum().backward()


# -- 6. batch consistency under padding --------------------------------------------------------

@pytest.mark.parametrize("kvar", ["k3", "k4"])
@pytest.mark.parametrize("pad", ["padend", "padstart"])
@pytest.mark.parametrize("bi", [False, True], ids=["uni", "bi"])
def test_padded_batch_equals_each_sequence_alone(cpu_impl, bi, pad, kvar):
    L, d = 7, 3
    lengths = [7, 4, 1, 6]
    B = len(lengths)
    opts = Opts(bi=bi, kvar=kvar, tanh=True, c0=True, mh=True, sx=1.4, pad=pad)
    p = make_problem(opts, L, B, d, torch.float64, lengths=lengths)
    h, c_last = call(p, opts, d)
    grad_h = torch.randn(h.shape, dtype=torch.float64)
    grad_c_last = torch.randn(c_last.shape, dtype=torch.float64)
    ((h * grad_h).sum() + (c_last * grad_c_last).sum()).backward()
    sum_param_grads = {n: torch.zeros_like(p[n]) for n in ("weight_c", "bias")}
    for b, n in enumerate(lengths):
        steps = slice(0, n) if pad == "padend" else slice(L - n, L)
        alone = {
            "U": p["U"].detach()[steps, b:b + 1].clone().requires_grad_(),
            "x": None if p["x"] is None else p["x"].detach()[steps, b:b + 1].clone().requires_grad_(),
            "c0": p["c0"].detach()[b:b + 1].clone().requires_grad_(),
            "weight_c": p["weight_c"].detach().clone().requires_grad_(),
            "bias": p["bias"].detach().clone().requires_grad_(),
            "mask_h": p["mask_h"][b:b + 1], "mask_pad": None,
        }
        h1, c1 = call(alone, opts, d)
        ((h1 * grad_h[steps, b:b + 1]).sum() + (c1 * grad_c_last[b:b + 1]).sum()).backward()
        torch.testing.assert_close(h[steps, b:b + 1].detach(), h1.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c_last[b:b + 1].detach(), c1.detach(), rtol=1e-12, atol=1e-12)
        padded = torch.ones(L, dtype=torch.bool)
        padded[steps] = False
        assert (h[padded, b] == 0).all()
        for name in ("U", "x"):
            if p[name] is not None:
                torch.testing.assert_close(p[name].grad[steps, b:b + 1], alone[name].grad,
                                           rtol=1e-12, atol=1e-12)
                assert (p[name].grad[padded, b] == 0).all()
        torch.testing.assert_close(p["c0"].grad[b:b + 1], alone["c0"].grad, rtol=1e-12,
                                   atol=1e-12)
        for name in sum_param_grads:
            sum_param_grads[name] += alone[name].grad
    for name, total in sum_param_grads.items():
        torch.testing.assert_close(p[name].grad, total, rtol=1e-10, atol=1e-12)


# -- 7. non-contiguous inputs ------------------------------------------------------------------

def _strided(t, how):
    """The same values in a non-contiguous layout: 'step' (every other element of a wider tensor)
    or 'transposed' (storage with the first two axes swapped)."""
    t = t.detach()
    if how == "step":
        wide = torch.full(t.shape[:-1] + (2 * t.shape[-1],), float("nan"), dtype=t.dtype)
        wide[..., ::2] = t
        out = wide[..., ::2]
    else:
        out = t.transpose(0, 1).contiguous().transpose(0, 1)
    assert not out.is_contiguous() and torch.equal(out.nan_to_num(), t.nan_to_num())
    return out


NONCONTIGUOUS = {
    "U-step": {"U": "step"},
    "U-transposed": {"U": "transposed"},
    "x-transposed": {"x": "transposed"},
    "x-step": {"x": "step"},
    "c0-transposed": {"c0": "transposed"},
    "params-step": {"weight_c": "step", "bias": "step", "mask_h": "step"},
    "masks-transposed": {"mask_pad": "transposed", "mask_h": "transposed"},
    "all": {"U": "transposed", "x": "step", "c0": "transposed", "weight_c": "step",
            "bias": "step", "mask_h": "transposed", "mask_pad": "transposed"},
}


@pytest.mark.parametrize("dtype_name", ["f64", "f32", "bf16"])
@pytest.mark.parametrize("bi", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("layout", list(NONCONTIGUOUS))
def test_noncontiguous_inputs_match_contiguous(cpu_impl, layout, bi, dtype_name):
    dtype = DTYPES[dtype_name]
    opts = Opts(bi=bi, kvar="k3", tanh=True, mh=True, pad="padend", c0=True, sx=1.3)
    d = 3
    p = make_problem(opts, 5, 3, d, dtype, PARAM_DTYPES[dtype_name])
    q = dict(p)
    for name, how in NONCONTIGUOUS[layout].items():
        t = p[name]
        if name == "mask_pad" and how == "transposed":
            t = t.t().contiguous().t()
            assert not t.is_contiguous()
        else:
            t = _strided(t, how)
        q[name] = t.requires_grad_() if p[name].requires_grad else t
    expected = forward_backward(p, opts, d)
    got = forward_backward(q, opts, d)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert set(got[2]) == set(expected[2])
    for name in expected[2]:
        assert torch.equal(got[2][name].nan_to_num(), expected[2][name].nan_to_num()), name


# -- 8. bad input ------------------------------------------------------------------------------

def _bad_base():
    opts = Opts(bi=True, kvar="k3", c0=True, mh=True, pad="padend")
    p = make_problem(opts, 4, 2, 3, torch.float32, requires_grad=False, poison_padding=False)
    return opts, p


def _meta(t):
    return t.to("meta")


#: (id, {argument: replacement or function of the good tensor}, exception, message start)
BAD_INPUTS = [
    ("U-not-a-tensor", {"U": lambda t: t.numpy()}, TypeError, r"^U: "),
    ("U-int-dtype", {"U": lambda t: t.to(torch.int32)}, TypeError, r"^U: "),
    ("U-complex-dtype", {"U": lambda t: t.to(torch.complex64)}, TypeError, r"^U: "),
    ("U-rank2", {"U": lambda t: t[0]}, ValueError, r"^U: "),
    ("U-rank4", {"U": lambda t: t[None]}, ValueError, r"^U: "),
    ("U-last-axis", {"U": lambda t: t[..., :-1]}, ValueError, r"^U: "),
    ("U-meta-device", {"U": _meta}, ValueError, r"^U: "),
    ("x-None-when-read", {"x": None}, ValueError, r"^x: "),
    ("x-shape", {"x": lambda t: t[:-1]}, ValueError, r"^x: "),
    ("x-rank2", {"x": lambda t: t[0]}, ValueError, r"^x: "),
    ("x-dtype", {"x": lambda t: t.double()}, TypeError, r"^x: "),
    ("x-not-a-tensor", {"x": lambda t: t.tolist()}, TypeError, r"^x: "),
    ("x-meta-device", {"x": _meta}, ValueError, r"^x: "),
    ("c0-shape", {"c0": lambda t: t[:, :-1]}, ValueError, r"^c0: "),
    ("c0-rank3", {"c0": lambda t: t[None]}, ValueError, r"^c0: "),
    ("c0-dtype", {"c0": lambda t: t.half()}, TypeError, r"^c0: "),
    ("c0-meta-device", {"c0": _meta}, ValueError, r"^c0: "),
    ("weight_c-shape", {"weight_c": lambda t: t[:-1]}, ValueError, r"^weight_c: "),
    ("weight_c-2d", {"weight_c": lambda t: t.reshape(2, -1)}, ValueError, r"^weight_c: "),
    ("weight_c-int-dtype", {"weight_c": lambda t: t.to(torch.int64)}, TypeError, r"^weight_c: "),
    ("weight_c-meta-device", {"weight_c": _meta}, ValueError, r"^weight_c: "),
    ("bias-None", {"bias": None}, ValueError, r"^bias: "),
    ("bias-shape", {"bias": lambda t: torch.cat([t, t])}, ValueError, r"^bias: "),
    ("bias-bool-dtype", {"bias": lambda t: t > 0}, TypeError, r"^bias: "),
    ("bias-meta-device", {"bias": _meta}, ValueError, r"^bias: "),
    ("mask_h-shape", {"mask_h": lambda t: t.t()}, ValueError, r"^mask_h: "),
    ("mask_h-int-dtype", {"mask_h": lambda t: t.to(torch.int32)}, TypeError, r"^mask_h: "),
    ("mask_h-meta-device", {"mask_h": _meta}, ValueError, r"^mask_h: "),
    ("mask_pad-shape-BL", {"mask_pad": lambda t: t.t()}, ValueError, r"^mask_pad: "),
    ("mask_pad-rank3", {"mask_pad": lambda t: t[..., None]}, ValueError, r"^mask_pad: "),
    ("mask_pad-meta-device", {"mask_pad": _meta}, ValueError, r"^mask_pad: "),
]


@pytest.mark.parametrize("change,exc,match", [row[1:] for row in BAD_INPUTS],
                         ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_rejected_naming_the_argument(cpu_impl, monkeypatch, change, exc, match):
    opts, p = _bad_base()
    for name, new in change.items():
        p[name] = new(p[name]) if callable(new) else new
    launched = []
    monkeypatch.setattr(ops, "recurrence_forward_op", lambda *a: launched.append(a))
    with pytest.raises(exc, match=match):
        call(p, opts, 3)
    assert launched == [], "the op ran before the arguments were checked"


@pytest.mark.parametrize("hidden_size,width", [(0, 9), (-1, 9), (3.0, 9), (True, 3), ("3", 9)],
                         ids=["zero", "negative", "float", "bool", "str"])
def test_bad_hidden_size_is_rejected_naming_it(cpu_impl, hidden_size, width):
    """hidden_size must be a positive int (3.0 and True fit U's width here, so only a check of
    hidden_size itself can reject them)."""
    U = torch.randn(3, 2, width)
    x = torch.randn(3, 2, width // 3)
    with pytest.raises((ValueError, TypeError), match=r"^hidden_size"):
        ops.recurrence(U, x, None, torch.zeros(2 * (width // 3)), hidden_size=hidden_size)


# -- hypothesis: random shapes and options, both CPU implementations agree with the oracle ---

try:
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    @settings(max_examples=30, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(L=st.integers(1, 9), B=st.integers(1, 4), d=st.integers(1, 5),
           bi=st.booleans(), kvar=st.sampled_from(list(KVARIANTS)), v1=st.booleans(),
           tanh=st.booleans(), mh=st.booleans(), pad=st.sampled_from(["nopad", "padend",
                                                                       "padstart"]),
           c0=st.booleans(), sx=st.sampled_from([1.0, 0.5, 2.25]),
           used=st.sampled_from(["both", "h", "clast"]))
    def test_random_problems_against_reference(cpu_impl, L, B, d, bi, kvar, v1, tanh, mh, pad,
                                               c0, sx, used):
        opts = Opts(bi=bi, kvar=kvar, v1=v1, tanh=tanh, mh=mh, pad=pad, c0=c0, sx=sx, used=used)
        p = make_problem(opts, L, B, d, torch.float64)
        h, c_last, grads, gh, gcl = forward_backward(p, opts, d)
        ref_h, ref_c_last, ref_grads = reference(p, opts, d, gh, gcl)
        assert_matches("h", _np(h), ref_h, torch.float64)
        assert_matches("c_last", _np(c_last), ref_c_last, torch.float64)
        for name, grad in grads.items():
            assert_matches(f"grad {name}", _np(grad), ref_grads[name], torch.float64)


# -- 9. GPU ------------------------------------------------------------------------------------

GPU_OPTS = Opts(bi=True, kvar="k3", tanh=True, mh=True, pad="padend", c0=True, sx=1.3)


@pytest.fixture
def cuda():
    _need_torch_cuda()
    yield torch.device("cuda")
    torch.cuda.synchronize()


def _gpu_problem(opts=GPU_OPTS, L=9, B=3, d=8, dtype=torch.float32, device="cuda", seed=0,
                 requires_grad=True):
    return make_problem(opts, L, B, d, dtype, PARAM_DTYPES["f32" if dtype != torch.float64
                                                           else "f64"],
                        device=device, seed=seed, poison_padding=False,
                        requires_grad=requires_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("side_stream", [False, True], ids=["default_stream", "side_stream"])
@pytest.mark.parametrize("dtype_name", ["f32", "bf16", "f16"])
def test_gpu_zero_copy_on_the_current_stream(monkeypatch, cuda, dtype_name, side_stream):
    """The launch gets the tensors' own device addresses (inputs and outputs: nothing copied) and
    PyTorch's current stream and device."""
    import cupy
    captured = {}
    real = launch.run_checked

    def spy(kernel, call, addresses, backend, convert, stream=None):
        captured.update(kernel=kernel, addresses=dict(addresses), stream=stream,
                        device=cupy.cuda.Device().id)
        return real(kernel, call, addresses, backend, convert, stream)
    monkeypatch.setattr(launch, "run_checked", spy)
    dtype = DTYPES[dtype_name]
    d = 8
    p = _gpu_problem(dtype=dtype, d=d, requires_grad=False)
    p["mask_pad"] = p["mask_pad"].to(torch.uint8)
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        h, c, c_last = ops.recurrence_forward_op(
            p["U"], p["x"], p["weight_c"], p["bias"], p["c0"], p["mask_h"], p["mask_pad"], d,
            GPU_OPTS.bi, GPU_OPTS.has_skip_term, GPU_OPTS.tanh, GPU_OPTS.sx, True)
        # PyTorch's default stream (handle 0) is named as cudaStreamLegacy (1) for CuPy.
        expected_stream = torch.cuda.current_stream().cuda_stream or 1
    torch.cuda.current_stream().wait_stream(stream)
    assert captured["kernel"] == "sru_recurrence_forward"
    addresses = captured["addresses"]
    for name in ("U", "x", "weight_c", "bias", "c0", "mask_h", "mask_pad"):
        assert int(addresses[name]) == p[name].data_ptr(), f"{name} was copied"
    for name, t in (("h", h), ("c", c), ("c_last", c_last)):
        assert int(addresses[name]) == t.data_ptr(), f"output {name} is not the returned tensor"
    assert captured["stream"] == (p["U"].device.index, expected_stream)
    assert captured["device"] == p["U"].device.index
    ref_h, ref_c_last, _ = reference(p, GPU_OPTS, d, None, None)
    assert_matches("h", _np(h), ref_h, dtype)
    assert_matches("c_last", _np(c_last), ref_c_last, dtype)


@pytest.mark.gpu
def test_gpu_side_stream_matches_default_stream(cuda):
    """On a side stream whose inputs are written just before the call (after a long sleep on that
    stream), results equal the default stream's: a launch on another stream would read stale
    memory."""
    d = 64
    p = _gpu_problem(L=33, B=8, d=d)
    grad_h = torch.randn(33, 8, 2 * d, device="cuda")
    grad_c_last = torch.randn(8, 2 * d, device="cuda")
    names = ("U", "x", "weight_c", "bias", "c0")

    def run(q):
        h, c_last = call(q, GPU_OPTS, d)
        ((h * grad_h).sum() + (c_last * grad_c_last).sum()).backward()
        return [h.detach(), c_last.detach()] + [q[n].grad for n in names]

    expected = run(p)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        q = dict(p)
        for n in names:
            q[n] = (p[n].detach() * 1).requires_grad_()  # written on the side stream, late
        got = run(q)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["inference", "training_forward"])
def test_gpu_cuda_graph_capture_and_replay(cuda, variant):
    d = 16
    opts = GPU_OPTS
    static = _gpu_problem(opts, L=12, B=4, d=d, requires_grad=False)

    def run(q):
        if variant == "inference":
            with torch.no_grad():
                h, c_last = call(q, opts, d)
            return h, c_last
        h, _, c_last = ops.recurrence_forward_op(
            q["U"], q["x"], q["weight_c"], q["bias"], q["c0"], q["mask_h"], q["mask_pad"], d,
            opts.bi, opts.has_skip_term, opts.tanh, opts.sx, True)
        return h, c_last

    warmup = torch.cuda.Stream()
    warmup.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warmup):
        for _ in range(3):
            run(static)
    torch.cuda.current_stream().wait_stream(warmup)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h_static, c_last_static = run(static)
    for seed in (1, 2):
        fresh = _gpu_problem(opts, L=12, B=4, d=d, seed=seed, requires_grad=False)
        for name in ("U", "x", "weight_c", "bias", "c0", "mask_h"):
            static[name].copy_(fresh[name])
        graph.replay()
        h_eager, c_last_eager = run(fresh)
        torch.cuda.synchronize()
        assert torch.equal(h_static, h_eager), f"replay {seed}: h differs from eager"
        assert torch.equal(c_last_static, c_last_eager), f"replay {seed}: c_last differs"
        ref_h, ref_c_last, _ = reference(fresh, opts, d, None, None)
        assert_matches("h", _np(h_static), ref_h, torch.float32)
        assert_matches("c_last", _np(c_last_static), ref_c_last, torch.float32)


@pytest.mark.gpu
def test_gpu_second_device_while_first_is_current(monkeypatch, cuda):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    _use(monkeypatch, "host" if host.available() else "torch")  # for the CPU comparison
    d = 8
    p = _gpu_problem(d=d, device="cuda:1")
    cpu = {n: (None if t is None else t.detach().cpu().requires_grad_(t.requires_grad))
           for n, t in p.items()}
    with torch.cuda.device(0):  # device 0 current, its current stream the default one
        h, c_last, grads, gh, gcl = forward_backward(p, GPU_OPTS, d)
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)
    assert h.device == c_last.device == torch.device("cuda:1")
    h_cpu, c_last_cpu, grads_cpu, _, _ = forward_backward(cpu, GPU_OPTS, d)
    torch.testing.assert_close(h.cpu(), h_cpu.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_last.cpu(), c_last_cpu.detach(), rtol=1e-5, atol=1e-5)
    for name in grads:
        assert grads[name].device == torch.device("cuda:1")
        torch.testing.assert_close(grads[name].cpu(), grads_cpu[name], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["x", "weight_c", "bias", "c0", "mask_h", "mask_pad"])
def test_gpu_argument_on_another_device_is_rejected(cuda, monkeypatch, name):
    """One argument on the CPU (or on cuda:1) beside a CUDA U: a ValueError naming it."""
    d = 4
    p = _gpu_problem(d=d, requires_grad=False)
    launched = []
    monkeypatch.setattr(ops, "recurrence_forward_op", lambda *a: launched.append(a))
    others = [p[name].cpu()]
    if torch.cuda.device_count() >= 2:
        others.append(p[name].to("cuda:1"))
    for other in others:
        q = dict(p, **{name: other})
        with pytest.raises(ValueError, match=rf"^{name}: "):
            call(q, GPU_OPTS, d)
    assert launched == []


GPU_VS_CPU_CASES = [Opts(bi=bi, kvar=kvar, **extra)
                    for bi, kvar, extra in itertools.product(
                        (False, True), KVARIANTS,
                        (OPTION_SETS["all"], OPTION_SETS["v1-mh-padstart"]))]


@pytest.mark.gpu
@pytest.mark.parametrize("opts", GPU_VS_CPU_CASES, ids=[o.id for o in GPU_VS_CPU_CASES])
def test_gpu_matches_cpu_host_float32(monkeypatch, cuda, opts):
    if not host.available():
        pytest.skip("host backend: no C++ compiler found")
    _use(monkeypatch, "host")
    d = 16
    gpu = make_problem(opts, 20, 5, d, torch.float32, device="cuda")
    cpu = make_problem(opts, 20, 5, d, torch.float32, device="cpu")
    h_g, c_g, grads_g, _, _ = forward_backward(gpu, opts, d)
    h_c, c_c, grads_c, _, _ = forward_backward(cpu, opts, d)
    torch.testing.assert_close(h_g.detach().cpu(), h_c.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_g.detach().cpu(), c_c.detach(), rtol=1e-5, atol=1e-5)
    assert set(grads_g) == set(grads_c)
    for name in grads_c:
        torch.testing.assert_close(grads_g[name].cpu(), grads_c[name], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("opts", EXACT_GRADCHECK_CASES, ids=[o.id for o in EXACT_GRADCHECK_CASES])
def test_gpu_gradcheck(cuda, opts):
    _gradcheck(opts, device="cuda", fast_mode=False)


@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_gpu_autocast_sru_forward_and_grad_scaler_step(cuda, amp_dtype):
    from sru_cupy import SRU
    torch.manual_seed(0)
    model = SRU(8, 16, num_layers=2, bidirectional=True, dropout=0.1).cuda()
    x = torch.randn(12, 4, 8, device="cuda")
    model.eval()
    with torch.no_grad():
        ref_h, ref_c = model(x)
        with torch.autocast("cuda", dtype=amp_dtype):
            h, c = model(x)
    assert h.dtype == amp_dtype, "the recurrence should run in the autocast dtype"
    assert torch.isfinite(h).all() and torch.isfinite(c).all()
    assert rel_rms(_np(h), _np(ref_h)) <= 3e-2
    assert rel_rms(_np(c), _np(ref_c)) <= 3e-2

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=amp_dtype):
        h, c = model(x)
        loss = h.float().pow(2).mean() + c.float().pow(2).mean()
    assert torch.isfinite(loss)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name}: no gradient"
        assert param.grad.dtype == param.dtype
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}: zero gradient"
    scaler.step(optimizer)
    scaler.update()
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters())), \
        "the optimizer step was skipped"


# -- CuPy's view of PyTorch's stream (CPU, against stand-ins) --------------------------------------


def test_first_cuda_call_inside_capture_is_refused_before_cupy_is_touched(monkeypatch):
    """CPU stand-ins for torch.cuda: capturing with the device's kernels not loaded raises
    CaptureNotReadyError naming the device, without importing CuPy; with them loaded the launch
    goes on, on PyTorch's current stream of that device; not capturing and not loaded goes on to
    load them with CuPy (here missing: ImportError)."""
    import contextlib
    import sys
    from sru_cupy import launch
    from sru_cupy.backends import cupy_backend
    from sru_cupy.call import RecurrenceCall
    from sru_cupy.errors import CaptureNotReadyError
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(cupy_backend, "_modules", {})
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(ops, "_current_raw_stream", lambda index: 0x7F00 + index)
    launched = []
    monkeypatch.setattr(launch, "run_checked", lambda *args: launched.append(args))
    call = RecurrenceCall.describe((2, 1, 3), "float32", 1)
    device = torch.device("cuda", 3)
    with pytest.raises(CaptureNotReadyError, match=r"first call on cuda:3 is inside CUDA graph"):
        ops._run(FORWARD, call, {}, device)
    assert launched == []
    monkeypatch.setattr(cupy_backend, "_modules", {3: object()})  # loaded: capture may go on
    ops._run(FORWARD, call, {}, device)
    assert len(launched) == 1 and launched[0][3] is cupy_backend
    assert launched[0][-1] == (3, 0x7F03)
    monkeypatch.setattr(cupy_backend, "_modules", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.raises(ImportError):
        ops._run(FORWARD, call, {}, device)


# -- GPU: streams, events, deprecations ------------------------------------------------------------


def _gpu_op_call(p, d):
    h, c, c_last = ops.recurrence_forward_op(
        p["U"], p["x"], p["weight_c"], p["bias"], p["c0"], p["mask_h"], p["mask_pad"], d,
        GPU_OPTS.bi, GPU_OPTS.has_skip_term, GPU_OPTS.tanh, GPU_OPTS.sx, True)
    return h, c, c_last


def _event_calls(prof):
    names = ("cudaEventRecord", "cudaStreamWaitEvent", "cuEventRecord", "cuStreamWaitEvent")
    return sum(e.count for e in prof.key_averages() if any(n in e.key for n in names))


@pytest.mark.gpu
def test_gpu_ops_on_a_side_stream_record_no_events(cuda):
    """The forward and backward ops on a side stream add no event record or wait (the tensors are
    exported with stream=-1); the profiler does see the ones a plain cupy.from_dlpack adds."""
    import cupy
    from torch.profiler import ProfilerActivity, profile
    d = 8
    p = _gpu_problem(d=d, requires_grad=False)
    _gpu_op_call(p, d)  # compiled and loaded before profiling
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        grad_h = torch.randn(9, 3, 2 * d, device="cuda")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            h, c, c_last = _gpu_op_call(p, d)
            ops.recurrence_backward_op(grad_h, None, p["U"], p["x"], p["weight_c"], p["bias"],
                                       p["c0"], c, p["mask_h"], p["mask_pad"], d, GPU_OPTS.bi,
                                       GPU_OPTS.has_skip_term, GPU_OPTS.tanh, GPU_OPTS.sx)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as baseline:
            with cupy.cuda.ExternalStream(side.cuda_stream) if not hasattr(
                    cupy.cuda.Stream, "from_external") else cupy.cuda.Stream.from_external(
                    interop._StreamHandle(side.cuda_stream)):
                cupy.from_dlpack(p["U"].detach())
    torch.cuda.synchronize()
    assert _event_calls(baseline) >= 1, "the profiler does not show event calls: the check is blind"
    assert _event_calls(prof) == 0


@pytest.mark.gpu
def test_gpu_ops_raise_no_deprecation_warning(cuda):
    """With DeprecationWarning as an error (CuPy 14 deprecates ExternalStream), forward and backward
    on the default and a side stream run."""
    d = 8
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for stream in (torch.cuda.current_stream(), torch.cuda.Stream()):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                p = _gpu_problem(d=d)
                h, c_last = call(p, GPU_OPTS, d)
                (h.sum() + c_last.sum()).backward()
            torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_per_thread_default_stream_of_cupy(cuda):
    """CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1 in a fresh process: an SRU forward and backward on
    PyTorch's default stream run and match the CPU."""
    import subprocess
    import sys
    import textwrap
    from child_env import child_env
    script = textwrap.dedent("""
        import torch
        from sru_cupy import SRU
        torch.manual_seed(0)
        model = SRU(6, 8, num_layers=2, bidirectional=True)
        x = torch.randn(7, 3, 6)
        h_cpu, c_cpu = model(x)
        h_cpu.sum().backward()
        g_cpu = model.rnn_lst[0].weight_c.grad.clone()
        model.zero_grad()
        model.cuda()
        h, c = model(x.cuda())
        h.sum().backward()
        torch.testing.assert_close(h.cpu(), h_cpu, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.rnn_lst[0].weight_c.grad.cpu(), g_cpu, rtol=1e-4,
                                   atol=1e-5)
        print("PER-THREAD-OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=child_env(CUPY_CUDA_PER_THREAD_DEFAULT_STREAM="1"))
    assert out.returncode == 0 and "PER-THREAD-OK" in out.stdout, out.stderr[-3000:]


# -- the operators called directly (torch.ops, TorchScript): checked before raw memory is read -----


def _direct_args(L=3, B=2, d=4, k=3):
    g = torch.Generator().manual_seed(3)
    D = d
    return dict(U=torch.randn(L, B, k * D, generator=g), x=torch.randn(L, B, D, generator=g),
                weight_c=torch.randn(2 * D, generator=g), bias=torch.randn(2 * D, generator=g),
                c0=torch.randn(B, D, generator=g), mask_h=None, mask_pad=None)


DIRECT_FORWARD_ERRORS = {
    "c0-shape": (dict(c0=torch.zeros(2, 2)), ValueError, r"c0: expected shape \(2, 4\)"),
    "c0-dtype": (dict(c0=torch.zeros(2, 4, dtype=torch.float16)), TypeError,
                 "c0: expected dtype torch.float32 like U"),
    "x-shape": (dict(x=torch.zeros(3, 2, 3)), ValueError, r"x: expected shape \(3, 2, 4\)"),
    "x-missing": (dict(x=None), ValueError, "x: required"),
    "mask_pad-shape": (dict(mask_pad=torch.zeros(3, dtype=torch.bool)), ValueError,
                       r"mask_pad: expected shape \(L, B\) = \(3, 2\)"),
    "bias-size": (dict(bias=torch.zeros(5)), ValueError, r"bias: expected shape \(8,\), got \(5,\)"),
    "mask_h-size": (dict(mask_h=torch.ones(2, 3)), ValueError,
                    r"mask_h: expected shape \(2, 4\), got \(2, 3\)"),
    "mask_pad-complex": (dict(mask_pad=torch.zeros(3, 2, dtype=torch.complex64)), TypeError,
                         "mask_pad: expected a bool, integer or floating dtype"),
    "U-int": (dict(U=torch.zeros(3, 2, 12, dtype=torch.int32)), TypeError,
              "U: expected dtype float16, bfloat16, float32 or float64"),
    "U-width": (dict(U=torch.zeros(3, 2, 10)), ValueError, r"U: expected last axis D\*3 = 12"),
}


@pytest.mark.skipif(not host.available(), reason="host backend: no C++ compiler found")
@pytest.mark.parametrize("change,exc,match", DIRECT_FORWARD_ERRORS.values(),
                         ids=DIRECT_FORWARD_ERRORS.keys())
def test_operator_called_directly_checks_what_the_kernels_read(change, exc, match):
    a = dict(_direct_args(), **change)
    with pytest.raises(exc, match=match):
        ops.recurrence_forward_op(a["U"], a["x"], a["weight_c"], a["bias"], a["c0"], a["mask_h"],
                                  a["mask_pad"], 4, False, True, False, 1.0, True)


@pytest.mark.skipif(not host.available(), reason="host backend: no C++ compiler found")
def test_operator_checks_k4_needs_the_skip_term_and_the_backward_arrays():
    a = _direct_args(k=4)
    with pytest.raises(ValueError, match="k = 4 .* needs has_skip_term=True"):
        ops.recurrence_forward_op(a["U"], None, a["weight_c"], a["bias"], None, None, None, 4,
                                  False, False, False, 1.0, True)
    a = _direct_args()
    h, c, _ = ops.recurrence_forward_op(a["U"], a["x"], a["weight_c"], a["bias"], a["c0"], None,
                                        None, 4, False, True, False, 1.0, True)
    for name, bad in (("c", torch.zeros(0)), ("grad_h", torch.zeros(3, 2, 3)),
                      ("grad_c_last", torch.zeros(2, 4, dtype=torch.float64))):
        args = dict(dict(grad_h=torch.ones_like(h), c=c, grad_c_last=None), **{name: bad})
        with pytest.raises((ValueError, TypeError), match=name):
            ops.recurrence_backward_op(args["grad_h"], args["grad_c_last"], a["U"], a["x"],
                                       a["weight_c"], a["bias"], a["c0"], args["c"], None, None,
                                       4, False, True, False, 1.0)


def test_negative_views_are_read_as_their_values():
    """A tensor with the negative bit (torch._neg_view) holds -values in memory-unnegated form:
    the op materialises it before the kernels read the memory."""
    a = _direct_args()
    negated = torch._neg_view(-a["U"])
    assert negated.is_neg()
    want, _ = ops.recurrence(a["U"], a["x"], a["weight_c"], a["bias"], a["c0"], hidden_size=4)
    got, _ = ops.recurrence(negated, a["x"], torch._neg_view(-a["weight_c"]), a["bias"], a["c0"],
                            hidden_size=4)
    torch.testing.assert_close(got, want)
