"""The launch layer (sru_cupy.launch) on the host backend, against the float64 NumPy oracle.

Every kernel instantiation (float64, float32, float16, bfloat16 storage; k = 3, k = 4) and every
option that changes what a kernel computes (direction, skip term, weight_c or v1, tanh, dropout
mask, padding, c0, scale_x, dL/dc_last, per-step weight_c offsets V) is run through forward (training and inference) and
backward. Direction x k-variant x dtype is covered fully; the other options by a pairwise covering
design built below (and checked by a test). Outputs are passed in NaN-poisoned ``out=`` arrays so
that an element a kernel forgets to write cannot pass.
"""

import dataclasses
import itertools
import zlib

import ml_dtypes
import numpy as np
import pytest

from sru_cupy.backends import host
from sru_cupy.launch import recurrence_backward, recurrence_forward
from sru_cupy.reference import recurrence_backward_reference, recurrence_forward_reference

pytestmark = pytest.mark.skipif(not host.available(), reason="host backend: no C++ compiler found")


DTYPES = {
    "f64": np.dtype(np.float64),
    "f32": np.dtype(np.float32),
    "f16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
}
#: Arithmetic dtype of the parameters (weight_c, bias, mask_h) and the parameter gradients.
ARITH = {"f64": np.dtype(np.float64), "f32": np.dtype(np.float32),
         "f16": np.dtype(np.float32), "bf16": np.dtype(np.float32)}
#: k-variant -> (k, has_skip_term)
KVARIANTS = {"k3": (3, True), "k4": (4, True), "noskip": (3, False)}
PADS = ("nopad", "padend", "padstart", "padholes")

#: The options spread by the covering design, with their values (first value = "off").
OTHER_FACTORS = {
    "wc": ("v", "v1"),            # weight_c given, or None (v1)
    "tanh": ("id", "tanh"),
    "mh": ("nomh", "mh"),         # dropout mask on h
    "pad": PADS,
    "c0": ("noc0", "c0"),
    "sx": ("sx1", "sx1.7"),       # scale_x
    "gcl": ("nogcl", "gcl"),      # dL/dc_last given or None
    "cols": ("hostcols", "cols1"),  # host columns per thread: the host's own, or the GPU's (1)
    "V": ("noV", "V"),            # per-step offsets of weight_c (a transform module's V)
}
CORE_FACTORS = {"dir": ("uni", "bi"), "kvar": tuple(KVARIANTS), "dtype": tuple(DTYPES)}


@dataclasses.dataclass(frozen=True)
class Case:
    dir: str
    kvar: str
    dtype: str
    wc: str = "v"
    tanh: str = "tanh"
    mh: str = "mh"
    pad: str = "padend"
    c0: str = "c0"
    sx: str = "sx1.7"
    gcl: str = "gcl"
    cols: str = "hostcols"
    V: str = "noV"
    L: int = 11  # 8 + 3 and 2 * 4 + 3: the prefetched loops and their tails both run
    B: int = 4
    d: int = 9   # uni: 36 columns, bi: 72: partial blocks, and (uni) a thread with 4 of its 8 columns

    @property
    def id(self):
        return "-".join([self.dir, self.kvar, self.dtype, self.wc, self.tanh, self.mh, self.pad,
                         self.c0, self.sx, self.gcl, self.cols, self.V, f"L{self.L}B{self.B}d{self.d}"])

    @property
    def bidirectional(self):
        return self.dir == "bi"

    @property
    def k(self):
        return KVARIANTS[self.kvar][0]

    @property
    def has_skip_term(self):
        return KVARIANTS[self.kvar][1]

    @property
    def scale_x(self):
        return 1.7 if self.sx == "sx1.7" else 1.0

    @property
    def columns_per_thread(self):
        """Columns per thread of the host launch (the CuPy backend always runs 1)."""
        return 1 if self.cols == "cols1" else host.COLUMNS_PER_THREAD

    @property
    def dirs(self):
        return 2 if self.bidirectional else 1

    @property
    def D(self):
        return self.dirs * self.d


ALL_FACTORS = {**CORE_FACTORS, **OTHER_FACTORS}


def _pairs(row):
    """The (factor, value, factor, value) pairs one assignment covers."""
    names = sorted(row)
    return {(a, row[a], b, row[b]) for a, b in itertools.combinations(names, 2)}


def _all_pairs():
    names = sorted(ALL_FACTORS)
    return {(a, va, b, vb) for a, b in itertools.combinations(names, 2)
            for va in ALL_FACTORS[a] for vb in ALL_FACTORS[b]}


def _covering_design(rounds=2):
    """Rows over ALL_FACTORS: in each round, the full product of CORE_FACTORS with the other factors
    chosen greedily so that every pair of values of any two factors occurs in some row of the round
    (rows are appended until it does). Among rows equal on that, the one whose pairs have occurred
    least often so far wins, so the rounds differ. Deterministic (integer scores, first maximum
    in a fixed order), so the case ids are the same in every process."""
    other_names = list(OTHER_FACTORS)
    other_choices = [dict(zip(other_names, values))
                     for values in itertools.product(*OTHER_FACTORS.values())]
    core_rows = [dict(zip(CORE_FACTORS, values)) for values in itertools.product(*CORE_FACTORS.values())]
    rows, seen = [], {}  # seen: pair -> rows holding it
    for _ in range(rounds):
        uncovered = _all_pairs()

        def score(row):
            pairs = _pairs(row)
            return len(pairs & uncovered), -sum(seen.get(p, 0) ** 2 for p in pairs)  # exact: ints

        def add(row):
            rows.append(row)
            uncovered.difference_update(_pairs(row))
            for p in _pairs(row):
                seen[p] = seen.get(p, 0) + 1

        def best(candidates):  # a row already in the design adds nothing
            return max((row for row in candidates if row not in rows), key=score)

        for core in core_rows:
            add(best({**core, **other} for other in other_choices))
        while uncovered:
            add(best({**core, **other} for core in core_rows for other in other_choices))
    return rows


DESIGN_ROWS = _covering_design()
DESIGN_CASES = [Case(**row) for row in DESIGN_ROWS]

#: Sizes: one step, a length past both prefetch depths (129 = 16 * 8 + 1 = 32 * 4 + 1), B*D not a
#: multiple of the block size, d = 1, and a moderate case. Every option is on (padding at the end
#: or the start and dL/dc_last given or not alternate), over every direction, k-variant and dtype,
#: with the host's columns per thread and with the GPU's one.
SIZES = {"L1": (1, 3, 4), "L129": (129, 2, 3), "oddcols": (9, 5, 13), "d1": (10, 3, 1),
         "moderate": (33, 5, 37)}
SIZE_CASES = [
    Case(dir=direction, kvar=kvar, dtype=dtype, pad=("padend", "padstart")[i % 2],
         gcl=("gcl", "nogcl")[(i // 4) % 2], cols=cols, L=L, B=B, d=d)
    for size, (L, B, d) in SIZES.items()
    for cols in OTHER_FACTORS["cols"]
    for i, (direction, kvar, dtype) in enumerate(itertools.product(("uni", "bi"), KVARIANTS, DTYPES))
]
#: V runs its own step loop (no prefetch): the sizes again, over the directions and k-variants.
SIZE_CASES += [
    Case(dir=direction, kvar=kvar, dtype=("f32", "bf16", "f64", "f16")[i % 4],
         pad=("padend", "padstart")[i % 2], cols=OTHER_FACTORS["cols"][i % 2], V="V", L=L, B=B, d=d)
    for size, (L, B, d) in SIZES.items()
    for i, (direction, kvar) in enumerate(itertools.product(("uni", "bi"), KVARIANTS))
]


# -- inputs ------------------------------------------------------------------------------------


def _seed(text):
    return zlib.crc32(text.encode())


def _pad_mask(kind, L, B, rng):
    """(L, B) padding mask of the given kind, in a dtype chosen per kind (nonzero = padding)."""
    if kind == "nopad":
        return None
    if kind == "padholes":  # random holes, batch 0 never padded; int64 with assorted nonzeros
        holes = rng.random((L, B)) < 0.3
        holes[:, :1] = False
        return np.where(holes, rng.choice([-1, 7, 255], size=(L, B)), 0).astype(np.int64)
    # Sequence lengths: batch 0 full, the last (B >= 3) empty (padded everywhere), others random.
    lengths = ([L] + [int(rng.integers(0, L + 1)) for _ in range(B - 1)])[:B]
    if B >= 3:
        lengths[-1] = 0
    mask = np.zeros((L, B), dtype=bool)
    for b, length in enumerate(lengths):
        if kind == "padend":
            mask[length:, b] = True
        else:  # padstart
            mask[:L - length, b] = True
    return mask if kind == "padend" else mask.astype(np.uint8)


def _inputs(case, seed=None):
    """Random inputs of one case: storage arrays in the case's dtype, parameters in the arithmetic
    dtype, plus the backward's grad_h / grad_c_last."""
    rng = np.random.default_rng(_seed(case.id) if seed is None else seed)
    dtype, arith = DTYPES[case.dtype], ARITH[case.dtype]
    L, B, D = case.L, case.B, case.D

    def data(*shape):
        return (rng.standard_normal(shape) * 0.5).astype(dtype)

    return dict(
        U=data(L, B, D * case.k),
        x=data(L, B, D) if case.k == 3 and case.has_skip_term else None,
        weight_c=(rng.standard_normal(2 * D) * 0.5).astype(arith) if case.wc == "v" else None,
        bias=(rng.standard_normal(2 * D) * 0.5).astype(arith),
        c0=data(B, D) if case.c0 == "c0" else None,
        mask_h=((rng.random((B, D)) > 0.3) / 0.7).astype(arith) if case.mh == "mh" else None,
        mask_pad=_pad_mask(case.pad, L, B, rng),
        grad_h=data(L, B, D),
        grad_c_last=data(B, D) if case.gcl == "gcl" else None,
        V=data(L, B, 2 * D) if case.V == "V" else None,
    )


#: The array arguments of recurrence_forward (positional, in order, then by keyword) and those the
#: backward adds: together every array the kernels read (test_array_arguments_cover_the_kernels),
#: so a helper that moves them all (to float64 for the reference, to a GPU) misses none.
FORWARD_ARRAYS = ("U", "x", "weight_c", "bias", "c0")
KEYWORD_ARRAYS = ("mask_h", "mask_pad", "V")
BACKWARD_ARRAYS = ("grad_h", "grad_c_last")


def _options(case, inputs):
    return dict(hidden_size=case.d, bidirectional=case.bidirectional,
                has_skip_term=case.has_skip_term, use_tanh=case.tanh == "tanh",
                scale_x=case.scale_x, **{name: inputs[name] for name in KEYWORD_ARRAYS})


def _arguments(case, inputs, convert=None):
    """(forward's positional arrays, keyword arguments, backward's leading arrays) of a case, every
    array through ``convert`` (None: as they are)."""
    moved = {name: (value if convert is None or value is None else convert(value))
             for name, value in inputs.items()}
    return ([moved[name] for name in FORWARD_ARRAYS], _options(case, moved),
            [moved[name] for name in BACKWARD_ARRAYS])


def test_array_arguments_cover_the_kernels():
    """Every array the kernels read is an argument the helpers above convert, and the launch
    functions take exactly those."""
    import inspect
    from sru_cupy import call, launch
    forward = set(FORWARD_ARRAYS + KEYWORD_ARRAYS)
    assert forward == set(call.KERNEL_INPUTS[call.FORWARD])
    assert forward | set(BACKWARD_ARRAYS) | {"c"} == set(call.KERNEL_INPUTS[call.BACKWARD])
    positional = [p.name for p in inspect.signature(launch.recurrence_forward).parameters.values()
                  if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert tuple(positional) == FORWARD_ARRAYS
    assert set(KEYWORD_ARRAYS) <= set(launch.FORWARD_KEYWORDS)
    assert set(launch.FORWARD_KEYWORDS) & set(call.ARRAYS) == set(KEYWORD_ARRAYS)


def _f64(array):
    return None if array is None else np.asarray(array).astype(np.float64)


def _poisoned(shape, dtype):
    return np.full(shape, np.nan, dtype=dtype)


def _bits(array):
    return np.ascontiguousarray(array).view(np.uint8)


# -- comparisons -------------------------------------------------------------------------------


def _ulp(values, dtype):
    """The spacing of `dtype` at |values| (float64), subnormal range included."""
    info = ml_dtypes.finfo(dtype) if dtype == DTYPES["bf16"] else np.finfo(dtype)
    exponent = np.floor(np.log2(np.maximum(np.abs(values), float(info.smallest_normal))))
    return np.exp2(exponent - info.nmant)


def _assert_close(name, actual, ref, kind):
    """kind: "f64" / "f32" (max abs error scaled by max(1, max|ref|)), or "f16" / "bf16" (relative
    RMS error, and every element within one unit in the last place of the 16-bit type plus float32
    rounding)."""
    assert actual is not None, f"{name}: missing"
    assert tuple(actual.shape) == tuple(ref.shape), f"{name}: shape {actual.shape} != {ref.shape}"
    a = np.asarray(actual).astype(np.float64)
    assert np.all(np.isfinite(a)), f"{name}: non-finite values (an output element left unwritten?)"
    if ref.size == 0:
        return
    scale = max(1.0, float(np.abs(ref).max()))
    err = np.abs(a - ref)
    if kind in ("f64", "f32"):
        tol = (1e-12 if kind == "f64" else 1e-5) * scale
        worst = np.unravel_index(np.argmax(err), err.shape)
        assert err.max() <= tol, (f"{name}: max abs error {err.max():.3g} > {tol:.3g} at {worst} "
                                  f"(got {a[worst]!r}, expected {ref[worst]!r})")
        return
    norm = float(np.linalg.norm(ref))
    rel_rms = float(np.linalg.norm(a - ref)) / norm if norm else float(np.linalg.norm(a))
    assert rel_rms <= 1e-2, f"{name}: relative RMS error {rel_rms:.3g} > 1e-2"
    bound = _ulp(ref, DTYPES[kind]) + 1e-5 * scale
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (f"{name}: error {err[worst]:.3g} > one ulp ({bound[worst]:.3g}) "
                                  f"at {worst} (got {a[worst]!r}, expected {ref[worst]!r})")


def _padded_steps(mask_pad):
    """Boolean index (L, B) of padded steps, or None."""
    if mask_pad is None:
        return None
    return np.asarray(mask_pad) != 0


# -- the main check ----------------------------------------------------------------------------


def _check_case(case):
    previous = host.COLUMNS_PER_THREAD
    host.COLUMNS_PER_THREAD = case.columns_per_thread
    try:
        _check_case_on_host(case)
    finally:
        host.COLUMNS_PER_THREAD = previous


def _check_case_on_host(case):
    inputs = _inputs(case)
    options = _options(case, inputs)
    dtype, arith = DTYPES[case.dtype], ARITH[case.dtype]
    L, B, D, k = case.L, case.B, case.D, case.k
    reads_x = case.k == 3 and case.has_skip_term
    # The reference runs on the same (possibly 16-bit) values, upcast to float64.
    args, options, grad_args = _arguments(case, inputs)
    ref_args, ref_options, ref_grad_args = _arguments(case, inputs, _f64)
    padded = _padded_steps(inputs["mask_pad"])

    # Forward, training variant.
    out = {"h": _poisoned((L, B, D), dtype), "c": _poisoned((L, B, D), dtype),
           "c_last": _poisoned((B, D), dtype)}
    h, c, c_last = recurrence_forward(*args, **options, out=dict(out))
    assert h is out["h"] and c is out["c"] and c_last is out["c_last"], "out= arrays not used"
    ref_h, ref_c, ref_c_last = recurrence_forward_reference(*ref_args, **ref_options)
    _assert_close("h", h, ref_h, case.dtype)
    _assert_close("c", c, ref_c, case.dtype)
    _assert_close("c_last", c_last, ref_c_last, case.dtype)
    if padded is not None:
        assert np.all(h.astype(np.float64)[padded] == 0), "h at padded steps is not exactly 0"

    # Forward, inference variant: the same h and c_last, no c.
    out_inf = {"h": _poisoned((L, B, D), dtype), "c_last": _poisoned((B, D), dtype)}
    h_inf, c_inf, c_last_inf = recurrence_forward(*args, **options, store_c=False, out=dict(out_inf))
    assert c_inf is None
    assert h_inf is out_inf["h"] and c_last_inf is out_inf["c_last"]
    assert np.array_equal(_bits(h_inf), _bits(h)), "inference h differs from the training h"
    assert np.array_equal(_bits(c_last_inf), _bits(c_last)), "inference c_last differs"

    # Backward, from the kernel's c (both sides recompute the gates from the same saved states).
    gout = {"U": _poisoned((L, B, D * k), dtype), "c0": _poisoned((B, D), dtype),
            "weight_c_partial": _poisoned((2, B, D), arith),
            "bias_partial": _poisoned((2, B, D), arith)}
    if reads_x:
        gout["x"] = _poisoned((L, B, D), dtype)
    if case.V == "V":
        gout["V"] = _poisoned((L, B, 2 * D), dtype)
    grads = recurrence_backward(*grad_args, *args, c, **options, out=dict(gout))
    for key, array in gout.items():
        assert grads[key] is array, f"grads[{key!r}] is not the out= array"
    ref = recurrence_backward_reference(*ref_grad_args, *ref_args, _f64(c), **ref_options)
    _assert_close("grad U", grads["U"], ref["U"], case.dtype)
    _assert_close("grad c0", grads["c0"], ref["c0"], case.dtype)
    if reads_x:
        _assert_close("grad x", grads["x"], ref["x"], case.dtype)
    else:
        assert grads["x"] is None and ref["x"] is None
    if case.V == "V":
        _assert_close("grad V", grads["V"], ref["V"], case.dtype)
    else:
        assert grads["V"] is None and ref["V"] is None
    # Parameter gradients are accumulated in the arithmetic type, from the same stored inputs:
    # float32 accuracy even for 16-bit data.
    param_kind = "f64" if case.dtype == "f64" else "f32"
    for name in ("weight_c", "bias"):
        partial = grads[f"{name}_partial"]
        assert grads[name].dtype == arith and partial.dtype == arith
        assert grads[name].shape == (2 * D,)
        _assert_close(f"grad {name}", grads[name], ref[name], param_kind)
        np.testing.assert_allclose(partial.sum(axis=1).reshape(2 * D), grads[name], rtol=0, atol=0)
    # The per-column partials are each batch entry's own gradient.
    for b in range(B):
        sl = slice(b, b + 1)

        def one(a, batch_axis):
            if a is None:
                return None
            return a[sl] if batch_axis == 0 else a[:, sl]

        ref_b = recurrence_backward_reference(
            one(ref_grad_args[0], 1), one(ref_grad_args[1], 0), one(ref_args[0], 1),
            one(ref_args[1], 1), ref_args[2], ref_args[3], one(ref_args[4], 0), one(_f64(c), 1),
            **dict(ref_options, mask_h=one(ref_options["mask_h"], 0),
                   mask_pad=one(ref_options["mask_pad"], 1), V=one(ref_options["V"], 1)))
        for name in ("weight_c", "bias"):
            _assert_close(f"grad {name} partial, batch {b}",
                          grads[f"{name}_partial"][:, b, :].reshape(2 * D), ref_b[name], param_kind)
    if padded is not None:
        gU = grads["U"].astype(np.float64)
        assert np.all(gU[padded] == 0), "grad U at padded steps is not exactly 0"
        if reads_x:
            assert np.all(grads["x"].astype(np.float64)[padded] == 0)
        if case.V == "V":
            assert np.all(grads["V"].astype(np.float64)[padded] == 0)


@pytest.mark.parametrize("case", DESIGN_CASES, ids=[c.id for c in DESIGN_CASES])
def test_options_against_reference(case):
    _check_case(case)


@pytest.mark.parametrize("case", SIZE_CASES, ids=[c.id for c in SIZE_CASES])
def test_sizes_against_reference(case):
    _check_case(case)


PARALLEL_CASES = [Case("bi", kvar, dtype, pad="padholes", L=21, B=6, d=40)
                  for kvar, dtype in zip(("k3", "k4", "noskip", "k3"), DTYPES)]


@pytest.mark.parametrize("case", PARALLEL_CASES, ids=[c.id for c in PARALLEL_CASES])
def test_parallel_host_launches_against_reference(monkeypatch, case):
    """The cases above run on one thread (small work); here the OpenMP grid walk is forced."""
    if not hasattr(host, "PARALLEL_WORK"):
        pytest.skip("the host backend has no small-work threshold")
    monkeypatch.setattr(host, "PARALLEL_WORK", 0)
    _check_case(case)


def test_covering_design_covers_every_pair():
    covered = set().union(*(_pairs(row) for row in DESIGN_ROWS))
    missing = _all_pairs() - covered
    assert not missing, f"pairs of option values never tested together: {sorted(missing)[:10]}"
    core = {(row["dir"], row["kvar"], row["dtype"]) for row in DESIGN_ROWS}
    assert core == set(itertools.product(*CORE_FACTORS.values()))
    assert len({c.id for c in DESIGN_CASES}) == len(DESIGN_CASES), "duplicate cases"
    # Implied by the pairs, spelled out: the reverse direction with padding at either end.
    for pad in ("padend", "padstart"):
        assert any(c.bidirectional and c.pad == pad for c in DESIGN_CASES), pad


def test_check_detects_an_unwritten_output(monkeypatch):
    """The poisoning makes a skipped launch fail the comparison (the check can fail)."""
    monkeypatch.setattr(host, "launch", lambda *args, **kwargs: None)
    with pytest.raises(AssertionError, match="non-finite"):
        _check_case(Case("bi", "k3", "f32"))


# -- alternative argument forms give identical results -----------------------------------------


def _run_both(case, inputs):
    """Forward and backward outputs for the given inputs (backward from inputs["c"] if given)."""
    options = _options(case, inputs)
    args = [inputs[name] for name in ("U", "x", "weight_c", "bias", "c0")]
    h, c, c_last = recurrence_forward(*args, **options)
    grads = recurrence_backward(inputs["grad_h"], inputs["grad_c_last"], *args,
                                inputs.get("c", c), **options)
    results = {"h": h, "c": c, "c_last": c_last}
    results.update({f"grad {key}": value for key, value in grads.items() if value is not None})
    return results


def _assert_same(results, expected):
    assert results.keys() == expected.keys()
    for key in expected:
        assert results[key].dtype == expected[key].dtype, key
        assert np.array_equal(_bits(results[key]), _bits(expected[key])), f"{key} differs"


def _strided(array, rng):
    """The same values in a non-contiguous array: a view with a step along the last axis, or (for
    rank >= 2, chosen at random) the transpose of a transposed copy."""
    if array is None:
        return None
    if array.ndim >= 2 and rng.random() < 0.5:
        view = np.ascontiguousarray(array.T).T
    else:
        wide = np.zeros(array.shape[:-1] + (2 * array.shape[-1],), dtype=array.dtype)
        wide[..., ::2] = array
        view = wide[..., ::2]
    assert np.array_equal(_bits(np.ascontiguousarray(view)), _bits(array))
    assert not view.flags.c_contiguous or array.size <= 1
    return view


NONCONTIGUOUS_CASES = [Case("bi", "k3", "f32", pad="padholes", L=9, B=3, d=5),
                       Case("bi", "k4", "bf16", pad="padstart", L=9, B=3, d=5),
                       Case("uni", "noskip", "f64", pad="padend", L=9, B=3, d=5),
                       Case("bi", "k3", "f16", pad="padend", L=9, B=3, d=5),
                       Case("bi", "k4", "f32", pad="padholes", V="V", L=9, B=3, d=5)]


@pytest.mark.parametrize("case", NONCONTIGUOUS_CASES, ids=[c.id for c in NONCONTIGUOUS_CASES])
def test_noncontiguous_inputs_give_the_same_results(case):
    inputs = _inputs(case)
    expected = _run_both(case, inputs)
    rng = np.random.default_rng(1)
    strided = {key: _strided(value, rng) for key, value in inputs.items()}
    strided["c"] = _strided(expected["c"], rng)
    _assert_same(_run_both(case, strided), expected)
    # Reversed (negative-stride) views too.
    flipped = {key: (None if v is None else np.flip(np.flip(v).copy())) for key, v in inputs.items()}
    _assert_same(_run_both(case, flipped), expected)


def test_parameter_shapes_and_dtypes_are_equivalent():
    """weight_c and bias as (2*D,), (2, D) or (2, dirs, d), and parameters in another float dtype
    holding the same values, give identical results."""
    case = Case("bi", "k3", "f32", pad="padholes", L=7, B=3, d=4)
    inputs = _inputs(case)
    expected = _run_both(case, inputs)
    D, d = case.D, case.d
    variants = [
        dict(weight_c=inputs["weight_c"].reshape(2, D), bias=inputs["bias"].reshape(2, D)),
        dict(weight_c=inputs["weight_c"].reshape(2, 2, d), bias=inputs["bias"].reshape(2, 2, d)),
        dict(weight_c=inputs["weight_c"].astype(np.float64), bias=inputs["bias"].astype(np.float64),
             mask_h=inputs["mask_h"].astype(np.float64)),
    ]
    for variant in variants:
        _assert_same(_run_both(case, dict(inputs, **variant)), expected)


@pytest.mark.parametrize("mask_dtype", [bool, np.uint8, np.int8, np.int64, np.float32])
def test_mask_pad_any_nonzero_value_is_padding(mask_dtype):
    case = Case("bi", "k4", "f64", pad="padholes", L=6, B=3, d=2)
    inputs = _inputs(case)
    expected = _run_both(case, dict(inputs, mask_pad=inputs["mask_pad"] != 0))
    values = {bool: True, np.uint8: 200, np.int8: -3, np.int64: -(2 ** 40), np.float32: 0.5}
    mask = np.where(inputs["mask_pad"] != 0, values[mask_dtype], 0).astype(mask_dtype)
    _assert_same(_run_both(case, dict(inputs, mask_pad=mask)), expected)


def test_bfloat16_as_uint16_bits_with_storage_dtype():
    """bfloat16 data may come as uint16 bit patterns with storage_dtype="bfloat16"."""
    case = Case("bi", "k3", "bf16", pad="padend", L=6, B=3, d=3)
    inputs = _inputs(case)
    expected = _run_both(case, inputs)
    as_bits = {key: (v.view(np.uint16) if v is not None and v.dtype == DTYPES["bf16"] else v)
               for key, v in inputs.items()}
    options = _options(case, as_bits)
    args = [as_bits[name] for name in ("U", "x", "weight_c", "bias", "c0")]
    h, c, c_last = recurrence_forward(*args, **options, storage_dtype="bfloat16")
    assert h.dtype == np.uint16 and c.dtype == np.uint16 and c_last.dtype == np.uint16
    grads = recurrence_backward(as_bits["grad_h"], as_bits["grad_c_last"], *args, c, **options,
                                storage_dtype="bfloat16")
    for key, value in {"h": h, "c": c, "c_last": c_last, "grad U": grads["U"],
                       "grad x": grads["x"], "grad c0": grads["c0"]}.items():
        assert np.array_equal(_bits(value), _bits(expected[key])), key
    for key in ("weight_c", "bias"):
        assert np.array_equal(grads[key], expected[f"grad {key}"]), key


def test_native_and_byteswapped_arrays_agree_or_are_rejected():
    """An array in non-native byte order (e.g. '>f4' on little-endian) has dtype name float32; the
    kernels read raw native floats, so the launch layer must convert it (results equal to the
    native ones, outputs in native order) or reject it naming the argument."""
    case = Case("bi", "k3", "f32", pad="padend", L=5, B=3, d=3)
    inputs = _inputs(case)
    expected = _run_both(case, inputs)
    swapped_dtype = DTYPES["f32"].newbyteorder()
    swapped = {key: (v.astype(swapped_dtype) if key in ("U", "x", "c0", "grad_h", "grad_c_last",
                                                        "weight_c", "bias", "mask_h")
                     and v is not None else v) for key, v in inputs.items()}
    swapped["c"] = expected["c"].astype(swapped_dtype)
    for key in ("U", "x", "c0", "grad_h", "grad_c_last", "c"):
        assert not swapped[key].dtype.isnative
        np.testing.assert_array_equal(swapped[key], inputs.get(key, expected["c"]))
    try:
        results = _run_both(case, swapped)
    except (TypeError, ValueError) as exc:
        assert str(exc).startswith(("U", "x", "c0", "grad_h", "grad_c_last", "c")), exc
        return
    for key, value in results.items():
        assert value.dtype.isnative, f"{key}: output in non-native byte order"
    _assert_same(results, expected)


# -- empty problems: no launch -----------------------------------------------------------------


@pytest.fixture
def no_launch(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was launched (bad arguments accepted, or an empty problem run)")

    monkeypatch.setattr(host, "launch", refuse)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("with_state", [False, True], ids=["noc0", "c0"])
@pytest.mark.parametrize("L,B", [(0, 3), (5, 0), (0, 0)], ids=["L0", "B0", "L0B0"])
def test_empty_problem_does_not_launch(no_launch, L, B, with_state, dtype):
    case = Case("bi", "k3", dtype, L=L, B=B, d=3, c0="c0" if with_state else "noc0",
                gcl="gcl" if with_state else "nogcl", pad="padend")
    inputs = _inputs(case)
    inputs["mask_pad"] = np.ones((L, B), dtype=bool)
    options = _options(case, inputs)
    D, storage, arith = case.D, DTYPES[dtype], ARITH[dtype]
    args = [inputs[name] for name in ("U", "x", "weight_c", "bias", "c0")]
    out = {"h": _poisoned((L, B, D), storage), "c": _poisoned((L, B, D), storage),
           "c_last": _poisoned((B, D), storage)}
    h, c, c_last = recurrence_forward(*args, **options, out=dict(out))
    assert h.shape == c.shape == (L, B, D) and c_last.shape == (B, D)
    assert h.dtype == c.dtype == c_last.dtype == storage
    expected_c_last = inputs["c0"] if with_state else np.zeros((B, D), storage)
    assert np.array_equal(_bits(c_last), _bits(expected_c_last.astype(storage)))
    h2, c2, c_last2 = recurrence_forward(*args, **options, store_c=False)
    assert c2 is None and h2.shape == (L, B, D)
    assert np.array_equal(_bits(c_last2), _bits(c_last))

    gout = {"U": _poisoned((L, B, 3 * D), storage), "x": _poisoned((L, B, D), storage),
            "c0": _poisoned((B, D), storage), "weight_c_partial": _poisoned((2, B, D), arith),
            "bias_partial": _poisoned((2, B, D), arith)}
    grads = recurrence_backward(inputs["grad_h"], inputs["grad_c_last"], *args, c, **options,
                                out=dict(gout))
    assert grads["U"].shape == (L, B, 3 * D) and grads["x"].shape == (L, B, D)
    expected_gc0 = inputs["grad_c_last"] if with_state else np.zeros((B, D), storage)
    assert np.array_equal(_bits(grads["c0"]), _bits(expected_gc0.astype(storage)))
    for name in ("weight_c", "bias"):
        assert grads[name].shape == (2 * D,) and grads[name].dtype == arith
        assert np.all(grads[name] == 0)
        assert np.all(grads[f"{name}_partial"] == 0)


# -- bad input ---------------------------------------------------------------------------------


def _bad_case():
    """Valid arguments (c random: nothing runs) of a small case, for one bad change at a time."""
    case = Case("bi", "k3", "f32", pad="padend", L=4, B=3, d=2)
    inputs = _inputs(case)
    c = np.random.default_rng(0).standard_normal((case.L, case.B, case.D)).astype(np.float32)
    return case, dict(inputs, c=c), _options(case, inputs)


def _forward(inputs, options):
    return recurrence_forward(inputs["U"], inputs["x"], inputs["weight_c"], inputs["bias"],
                              inputs["c0"], **options)


def _backward(inputs, options):
    return recurrence_backward(inputs["grad_h"], inputs["grad_c_last"], inputs["U"], inputs["x"],
                               inputs["weight_c"], inputs["bias"], inputs["c0"], inputs["c"],
                               **options)


L_, B_, D_, d_ = 4, 3, 4, 2  # the sizes of _bad_case
BAD_INPUTS = [
    # (id, change to the inputs / options, exception, message regex)
    ("U-rank2", dict(U=np.zeros((L_, B_ * D_ * 3), np.float32)), ValueError, r"^U: .*rank 3"),
    ("U-rank4", dict(U=np.zeros((L_, B_, D_, 3), np.float32)), ValueError, r"^U: .*rank 3"),
    ("U-width", dict(U=np.zeros((L_, B_, D_ * 5), np.float32)), ValueError, r"^U: .*last axis"),
    ("U-width-2", dict(U=np.zeros((L_, B_, D_ * 2), np.float32)), ValueError, r"^U: .*last axis"),
    ("U-int", dict(U=np.zeros((L_, B_, D_ * 3), np.int32)), TypeError, r"^U: .*dtype"),
    ("U-complex", dict(U=np.zeros((L_, B_, D_ * 3), np.complex64)), TypeError, r"^U: .*dtype"),
    ("U-list", dict(U=np.zeros((L_, B_, D_ * 3)).tolist()), TypeError, r"^U: "),
    ("k4-noskip", dict(U=np.zeros((L_, B_, D_ * 4), np.float32), has_skip_term=False),
     ValueError, r"^U: .*has_skip_term"),
    ("hidden0", dict(hidden_size=0), ValueError, r"^hidden_size"),
    ("hidden-neg", dict(hidden_size=-2), ValueError, r"^hidden_size"),
    ("hidden-float", dict(hidden_size=2.0), ValueError, r"^hidden_size"),
    ("hidden-bool", dict(hidden_size=True), ValueError, r"^hidden_size"),
    ("hidden-wrong", dict(hidden_size=3), ValueError, r"^U: .*last axis"),
    ("x-missing", dict(x=None), ValueError, r"^x: "),
    ("x-shape", dict(x=np.zeros((L_, B_, D_ + 1), np.float32)), ValueError, r"^x: .*shape"),
    ("x-shape-L", dict(x=np.zeros((L_ + 1, B_, D_), np.float32)), ValueError, r"^x: .*shape"),
    ("x-dtype", dict(x=np.zeros((L_, B_, D_), np.float64)), TypeError, r"^x: .*dtype"),
    ("x-list", dict(x=np.zeros((L_, B_, D_)).tolist()), TypeError, r"^x: "),
    ("weight_c-size", dict(weight_c=np.zeros(2 * D_ + 1, np.float32)), ValueError, r"^weight_c: "),
    ("weight_c-shape", dict(weight_c=np.zeros((D_, 2), np.float32)), ValueError, r"^weight_c: "),
    ("weight_c-int", dict(weight_c=np.zeros(2 * D_, np.int64)), TypeError, r"^weight_c: "),
    ("bias-missing", dict(bias=None), ValueError, r"^bias: "),
    ("bias-size", dict(bias=np.zeros(D_, np.float32)), ValueError, r"^bias: "),
    ("c0-shape", dict(c0=np.zeros((B_, D_ + 1), np.float32)), ValueError, r"^c0: .*shape"),
    ("c0-transposed", dict(c0=np.zeros((D_, B_), np.float32)), ValueError, r"^c0: .*shape"),
    ("c0-dtype", dict(c0=np.zeros((B_, D_), np.float16)), TypeError, r"^c0: .*dtype"),
    ("mask_h-size", dict(mask_h=np.ones((B_, D_ + 1), np.float32)), ValueError, r"^mask_h: "),
    # Same size, wrong shape: must not be silently reinterpreted.
    ("mask_h-transposed", dict(mask_h=np.ones((D_, B_), np.float32)), ValueError, r"^mask_h: "),
    ("mask_h-flat", dict(mask_h=np.ones((1, B_ * D_), np.float32)), ValueError, r"^mask_h: "),
    ("mask_h-int", dict(mask_h=np.ones((B_, D_), np.int32)), TypeError, r"^mask_h: "),
    ("mask_pad-shape", dict(mask_pad=np.zeros((B_, L_), bool)), ValueError, r"^mask_pad: .*shape"),
    ("mask_pad-1d", dict(mask_pad=np.zeros(L_, bool)), ValueError, r"^mask_pad: .*shape"),
    ("mask_pad-complex", dict(mask_pad=np.zeros((L_, B_), np.complex64)), TypeError,
     r"^mask_pad: expected a bool, integer or floating dtype, got complex64"),
    ("mask_pad-strings", dict(mask_pad=np.full((L_, B_), "pad")), TypeError,
     r"^mask_pad: expected a bool, integer or floating dtype, got str96"),
    ("hidden-2**31", dict(hidden_size=2 ** 31), ValueError,
     r"^hidden_size: expected a positive int below 2\*\*31"),
    ("hidden-np-2**31", dict(hidden_size=np.int64(2 ** 31)), ValueError,
     r"^hidden_size: expected a positive int below 2\*\*31"),
    ("V-shape", dict(V=np.zeros((L_, B_, D_), np.float32)), ValueError, r"^V: .*shape"),
    ("V-interleaved-2d", dict(V=np.zeros((L_, B_, D_, 2), np.float32)), ValueError, r"^V: .*shape"),
    ("V-dtype", dict(V=np.zeros((L_, B_, 2 * D_), np.float64)), TypeError, r"^V: .*dtype"),
    ("storage_dtype-bad", dict(storage_dtype="int8"), TypeError, r"^storage_dtype: "),
    ("storage_dtype-mismatch", dict(storage_dtype="float16"), TypeError, r"^U: .*storage_dtype"),
]
BACKWARD_ONLY = [
    ("c-missing", dict(c=None), ValueError, r"^c: "),
    ("c-shape", dict(c=np.zeros((L_ - 1, B_, D_), np.float32)), ValueError, r"^c: .*shape"),
    ("c-dtype", dict(c=np.zeros((L_, B_, D_), np.float64)), TypeError, r"^c: .*dtype"),
    ("grad_h-shape", dict(grad_h=np.zeros((L_, B_, D_ * 3), np.float32)), ValueError,
     r"^grad_h: .*shape"),
    ("grad_h-missing", dict(grad_h=None), ValueError, r"^grad_h: "),
    ("grad_h-dtype", dict(grad_h=np.zeros((L_, B_, D_), np.float16)), TypeError, r"^grad_h: "),
    ("grad_c_last-shape", dict(grad_c_last=np.zeros((B_ + 1, D_), np.float32)), ValueError,
     r"^grad_c_last: .*shape"),
]
OPTION_KEYS = ("hidden_size", "has_skip_term", "storage_dtype", "mask_h", "mask_pad", "V")


def _apply(change, inputs, options):
    inputs, options = dict(inputs), dict(options)
    for key, value in change.items():
        (options if key in OPTION_KEYS else inputs)[key] = value
    return inputs, options


@pytest.mark.parametrize("which", ["forward", "backward"])
@pytest.mark.parametrize("change,exc,match", [row[1:] for row in BAD_INPUTS],
                         ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_rejected(no_launch, which, change, exc, match):
    case, inputs, options = _bad_case()
    assert (case.L, case.B, case.D, case.d) == (L_, B_, D_, d_)
    inputs, options = _apply(change, inputs, options)
    with pytest.raises(exc, match=match):
        (_forward if which == "forward" else _backward)(inputs, options)


@pytest.mark.parametrize("change,exc,match", [row[1:] for row in BACKWARD_ONLY],
                         ids=[row[0] for row in BACKWARD_ONLY])
def test_bad_backward_input_is_rejected(no_launch, change, exc, match):
    _, inputs, options = _bad_case()
    inputs, options = _apply(change, inputs, options)
    with pytest.raises(exc, match=match):
        _backward(inputs, options)


def _read_only(array):
    array.flags.writeable = False
    return array


BAD_OUT = [
    ("h-shape", "forward", "h", np.zeros((L_, B_, D_ + 1), np.float32)),
    ("h-dtype", "forward", "h", np.zeros((L_, B_, D_), np.float64)),
    ("c-shape", "forward", "c", np.zeros((L_ - 1, B_, D_), np.float32)),
    ("c_last-dtype", "forward", "c_last", np.zeros((B_, D_), np.float16)),
    ("h-noncontiguous", "forward", "h", np.zeros((L_, B_, 2 * D_), np.float32)[..., ::2]),
    ("h-fortran", "forward", "h", np.asfortranarray(np.zeros((L_, B_, D_), np.float32))),
    ("h-list", "forward", "h", np.zeros((L_, B_, D_)).tolist()),
    # Read-only memory must not be written (e.g. np.frombuffer over an immutable bytes object).
    ("h-readonly", "forward", "h", _read_only(np.zeros((L_, B_, D_), np.float32))),
    ("c_last-bytes", "forward", "c_last", np.frombuffer(bytes(4 * B_ * D_), np.float32).reshape(B_, D_)),
    ("c0-readonly", "backward", "c0", _read_only(np.zeros((B_, D_), np.float32))),
    ("U-shape", "backward", "U", np.zeros((L_, B_, D_ * 4), np.float32)),
    ("x-dtype", "backward", "x", np.zeros((L_, B_, D_), np.float16)),
    ("c0-shape", "backward", "c0", np.zeros((D_, B_), np.float32)),
    ("weight_c_partial-shape", "backward", "weight_c_partial", np.zeros((2 * D_, B_), np.float32)),
    ("bias_partial-dtype", "backward", "bias_partial", np.zeros((2, B_, D_), np.float64)),
]


@pytest.mark.parametrize("which,key,input_name", [
    ("forward", "h", "x"), ("forward", "c", "x"), ("forward", "c_last", "c0"),
    ("backward", "x", "grad_h"), ("backward", "c0", "grad_c_last"), ("backward", "U", "U"),
    ("backward", "x", "c")])
def test_an_out_array_overlapping_an_input_is_refused(no_launch, which, key, input_name):
    """An output written over an input the kernel still reads would compute wrong values
    silently: refused, naming both (the same memory, or a view of it)."""
    _, inputs, options = _bad_case()
    with pytest.raises(ValueError, match=rf"^out\[{key!r}\]: shares memory with {input_name}"):
        (_forward if which == "forward" else _backward)(
            inputs, dict(options, out={key: inputs[input_name]}))


def test_out_arrays_overlapping_each_other_are_refused(no_launch):
    _, inputs, options = _bad_case()
    both = np.zeros((L_ + 1, B_, D_), np.float32)
    with pytest.raises(ValueError, match=r"^out\['c'\]: shares memory with out\['h'\]"):
        _forward(inputs, dict(options, out={"h": both[:-1], "c": both[1:]}))


@pytest.mark.parametrize("which,key,array", [row[1:] for row in BAD_OUT],
                         ids=[row[0] for row in BAD_OUT])
def test_bad_out_array_is_rejected(no_launch, which, key, array):
    _, inputs, options = _bad_case()
    with pytest.raises((ValueError, TypeError), match=rf"^out\[{key!r}\]"):
        if which == "forward":
            recurrence_forward(inputs["U"], inputs["x"], inputs["weight_c"], inputs["bias"],
                               inputs["c0"], **options, out={key: array})
        else:
            recurrence_backward(inputs["grad_h"], inputs["grad_c_last"], inputs["U"], inputs["x"],
                                inputs["weight_c"], inputs["bias"], inputs["c0"], inputs["c"],
                                **options, out={key: array})


# -- kernels over addresses (the PyTorch op's path) -----------------------------------------------


def _address(array):
    import ctypes
    return None if array is None else ctypes.c_void_p(array.ctypes.data)


@pytest.mark.parametrize("case", DESIGN_CASES, ids=[c.id for c in DESIGN_CASES])
def test_run_checked_over_addresses_equals_the_checked_launch(case):
    """launch.run_checked runs the same kernels as recurrence_forward / recurrence_backward over
    arrays given by address and by name: bit for bit the same outputs, every element written."""
    from sru_cupy.call import RecurrenceCall
    from sru_cupy.launch import run_checked
    previous = host.COLUMNS_PER_THREAD
    host.COLUMNS_PER_THREAD = case.columns_per_thread
    try:
        inputs = _inputs(case)
        options = _options(case, inputs)
        dtype, arith = DTYPES[case.dtype], ARITH[case.dtype]
        L, B, D, k = case.L, case.B, case.D, case.k
        args = [inputs[name] for name in ("U", "x", "weight_c", "bias", "c0")]
        arrays = dict(inputs)
        if arrays["mask_pad"] is not None:
            arrays["mask_pad"] = np.ascontiguousarray(arrays["mask_pad"] != 0)
        call = RecurrenceCall.describe(
            (L, B, D * k), np.dtype(dtype).name, case.d, case.bidirectional,
            case.has_skip_term, case.tanh == "tanh", case.scale_x,
            with_v=inputs["V"] is not None)

        h, c, c_last = recurrence_forward(*args, **options)
        got = {"h": _poisoned((L, B, D), dtype), "c": _poisoned((L, B, D), dtype),
               "c_last": _poisoned((B, D), dtype)}
        run_checked("sru_recurrence_forward", call,
                    {n: _address(a) for n, a in {**arrays, **got}.items()}, host, None)
        for name, want in (("h", h), ("c", c), ("c_last", c_last)):
            assert np.array_equal(_bits(got[name]), _bits(want)), name

        want = recurrence_backward(inputs["grad_h"], inputs["grad_c_last"], *args, c, **options,
                                   reduce_params=False)
        got = {"U": _poisoned((L, B, D * k), dtype),
               "x": _poisoned((L, B, D), dtype) if call.reads_x else None,
               "weight_c_partial": _poisoned((2, B, D), arith),
               "bias_partial": _poisoned((2, B, D), arith), "c0": _poisoned((B, D), dtype),
               "V": _poisoned((L, B, 2 * D), dtype) if case.V == "V" else None}
        run_checked("sru_recurrence_backward", call,
                    {n: _address(a) for n, a in {**arrays, "c": c,
                                                  **{f"grad_{k}": v for k, v in got.items()},
                                                  "grad_h": inputs["grad_h"],
                                                  "grad_c_last": inputs["grad_c_last"]}.items()},
                    host, None)
        for name, array in got.items():
            if array is None:
                assert want[name] is None, name
            else:
                assert np.array_equal(_bits(array), _bits(want[name])), name
    finally:
        host.COLUMNS_PER_THREAD = previous


def test_run_checked_refuses_a_missing_address_and_an_empty_call():
    """The address path cannot check memory, but it checks what it can: every array the call
    requires has an address, and the call has steps and a batch."""
    from sru_cupy.call import RecurrenceCall
    from sru_cupy.launch import run_checked
    call = RecurrenceCall.describe((3, 2, 12), "float32", 4)
    U, x = np.zeros((3, 2, 12), np.float32), np.zeros((3, 2, 4), np.float32)
    arrays = {"U": U, "x": x, "bias": np.zeros(8, np.float32), "h": np.zeros((3, 2, 4), np.float32),
              "c": np.zeros((3, 2, 4), np.float32), "c_last": np.zeros((2, 4), np.float32)}
    for missing in ("x", "bias", "c", "h"):
        given = {n: _address(a) for n, a in arrays.items() if n != missing}
        with pytest.raises(ValueError, match=f"^{missing}: required for these options, got no "
                                             "address"):
            run_checked("sru_recurrence_forward", call, given, host, None)
    with pytest.raises(ValueError, match=r"^call: expected L >= 1 and B >= 1"):
        run_checked("sru_recurrence_forward", RecurrenceCall.describe((0, 2, 12), "float32", 4),
                    {n: _address(a) for n, a in arrays.items()}, host, None)
