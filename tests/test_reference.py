"""Checks of the NumPy SRU oracle: finite differences, a hand-computed step, padding, bad input."""

import dataclasses
import math

import numpy as np
import pytest

from sru_cupy.reference import recurrence_backward_reference, recurrence_forward_reference

PAD_PATTERNS = ("nopad", "padend", "padstart", "padmid")


@dataclasses.dataclass(frozen=True)
class Case:
    bidirectional: bool
    k: int
    has_skip_term: bool
    use_tanh: bool
    mask_pad: str  # one of PAD_PATTERNS
    with_weight_c: bool
    with_mask_h: bool
    with_c0: bool
    scale_x: float
    with_V: bool = False  # per-step offsets of weight_c (a transform module's V)
    L: int = 5
    B: int = 3
    d: int = 2

    @property
    def id(self):
        return "-".join([
            "bi" if self.bidirectional else "uni",
            f"k{self.k}",
            "skip" if self.has_skip_term else "noskip",
            "tanh" if self.use_tanh else "id",
            self.mask_pad,
            "v" if self.with_weight_c else "v1",
            "mh" if self.with_mask_h else "nomh",
            "c0" if self.with_c0 else "noc0",
            f"sx{self.scale_x}",
        ] + (["V"] if self.with_V else []) + [
            f"L{self.L}B{self.B}d{self.d}",
        ])


def _covering_cases():
    """All 64 combinations of (bidirectional, k, skip, tanh, mask_pad), with the five remaining
    two-valued options set by XOR parities of those bits. Distinct parities make every pair of
    option values occur together (a strength-2 orthogonal array) without the full 1024-case product.
    """
    cases = []
    for bi in (0, 1):
        for k4 in (0, 1):
            for skip in (0, 1):
                for tanh in (0, 1):
                    for pad_index, pad in enumerate(PAD_PATTERNS):
                        p0, p1 = pad_index & 1, pad_index >> 1
                        cases.append(Case(
                            bidirectional=bool(bi), k=4 if k4 else 3, has_skip_term=bool(skip),
                            use_tanh=bool(tanh), mask_pad=pad,
                            with_weight_c=bool(bi ^ k4 ^ p0 ^ 1),
                            with_mask_h=bool(skip ^ tanh ^ p1 ^ 1),
                            with_c0=bool(bi ^ skip ^ p0 ^ p1 ^ 1),
                            scale_x=1.7 if k4 ^ tanh ^ p0 ^ 1 else 1.0,
                            with_V=bool(bi ^ k4 ^ skip ^ tanh ^ p1)))
    return cases


SMALL_CASES = [
    Case(False, 3, True, False, "nopad", True, True, True, 1.7, L=1, B=1, d=1),
    Case(True, 4, True, True, "nopad", True, False, True, 1.0, L=1, B=2, d=1),
    Case(True, 3, True, True, "padmid", True, True, True, 1.7, L=4, B=2, d=1),
    Case(False, 4, False, False, "padend", True, True, False, 1.0, L=3, B=1, d=1),
    Case(True, 3, False, True, "nopad", False, True, True, 1.0, L=1, B=3, d=3),
    Case(True, 4, True, True, "padmid", False, True, True, 1.0, with_V=True, L=4, B=2, d=1),
    Case(False, 3, True, False, "nopad", True, False, False, 1.7, with_V=True, L=1, B=1, d=1),
]
ALL_CASES = _covering_cases() + SMALL_CASES


def _mask_pad(pattern, L, B):
    """Padding patterns; each keeps at least one real step and one padded step where L allows."""
    mask = np.zeros((L, B), dtype=bool)
    if pattern == "padend":  # right padding with lengths L, L-1, L-2, ...
        for b in range(B):
            mask[max(L - b, 1):, b] = True
    elif pattern == "padstart":  # left padding
        for b in range(B):
            mask[:min(b, L - 1), b] = True
    elif pattern == "padmid":  # holes, including one at t = 0 for batch 0
        mask[1:-1:2, :] = True
        mask[0, 0] = L > 1
    return mask


def _make_inputs(case, seed):
    rng = np.random.default_rng(seed)
    dirs = 2 if case.bidirectional else 1
    D = dirs * case.d
    L, B = case.L, case.B
    mask_pad = None if case.mask_pad == "nopad" else _mask_pad(case.mask_pad, L, B)
    # mask_pad as uint8 in some cases: any nonzero numeric means padding.
    if mask_pad is not None and seed % 2:
        mask_pad = mask_pad.astype(np.uint8)
    return dict(
        U=rng.normal(size=(L, B, D * case.k)),
        x=rng.normal(size=(L, B, D)) if case.k == 3 and case.has_skip_term else None,
        weight_c=rng.normal(size=2 * D) if case.with_weight_c else None,
        bias=rng.normal(size=2 * D),
        c0=rng.normal(size=(B, D)) if case.with_c0 else None,
        mask_h=(rng.integers(0, 2, size=(B, D)) / 0.6) if case.with_mask_h else None,
        mask_pad=mask_pad,
        V=rng.normal(size=(L, B, 2 * D)) if case.with_V else None,
    )


def _options(case, mask_h, mask_pad):
    return dict(hidden_size=case.d, bidirectional=case.bidirectional,
                has_skip_term=case.has_skip_term, use_tanh=case.use_tanh, scale_x=case.scale_x,
                mask_h=mask_h, mask_pad=mask_pad)


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_backward_matches_central_finite_differences(case):
    seed = ALL_CASES.index(case)
    inputs = _make_inputs(case, seed)
    options = _options(case, inputs.pop("mask_h"), inputs.pop("mask_pad"))
    rng = np.random.default_rng(1000 + seed)
    h, c, c_last = recurrence_forward_reference(**inputs, **options)
    grad_h = rng.normal(size=h.shape)
    grad_c_last = rng.normal(size=c_last.shape)

    grads = recurrence_backward_reference(grad_h, grad_c_last, inputs["U"], inputs["x"],
                                          inputs["weight_c"], inputs["bias"], inputs["c0"], c,
                                          V=inputs["V"], **options)
    if case.k == 3 and case.has_skip_term:
        assert grads["x"].shape == inputs["x"].shape
    else:
        assert grads["x"] is None

    # weight_c None and c0 None mean zeros: differentiate at explicit zeros, which must give the
    # same forward, so that the returned gradients for them are checked too.
    D = h.shape[-1]
    point = dict(inputs)
    if point["weight_c"] is None:
        point["weight_c"] = np.zeros(2 * D)
    if point["c0"] is None:
        point["c0"] = np.zeros(c_last.shape)
    h0, c0_states, c_last0 = recurrence_forward_reference(**point, **options)
    np.testing.assert_array_equal(h0, h)
    np.testing.assert_array_equal(c0_states, c)
    np.testing.assert_array_equal(c_last0, c_last)

    def objective(values):
        h_, _, c_last_ = recurrence_forward_reference(**values, **options)
        return np.sum(grad_h * h_) + np.sum(grad_c_last * c_last_)

    eps = 1e-6
    if case.with_V:
        assert grads["V"].shape == inputs["V"].shape
        # dL/dweight_c is dL/dV summed over steps and batch (weight_c + V_t is what the gates use).
        D2 = grads["V"].shape[-1]
        np.testing.assert_allclose(
            grads["V"].reshape(-1, D2 // 2, 2).sum(0).T.reshape(-1), grads["weight_c"], rtol=1e-12)
    else:
        assert grads["V"] is None
    differentiable = [name for name in ("U", "x", "weight_c", "bias", "c0", "V")
                      if point[name] is not None]
    for name in differentiable:
        flat_size = point[name].size
        chosen = (np.arange(flat_size) if flat_size <= 20
                  else rng.choice(flat_size, size=20, replace=False))
        numeric = []
        for flat_index in chosen:
            index = np.unravel_index(flat_index, point[name].shape)
            values = {key: (val.copy() if key == name else val) for key, val in point.items()}
            values[name][index] = point[name][index] + eps
            plus = objective(values)
            values[name][index] = point[name][index] - eps
            minus = objective(values)
            numeric.append((plus - minus) / (2 * eps))
        analytic = grads[name].reshape(-1)[chosen]
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8, err_msg=name)


def test_one_step_by_hand():
    u0, u1, u2, x = 0.5, -0.3, 0.8, 0.4
    v_f, v_r, b_f, b_r = 0.6, -0.2, 0.1, -0.5
    c_prev, m, scale_x = 0.9, 1.25, 1.7

    def sigmoid(z):
        return 1.0 / (1.0 + math.exp(-z))

    f = sigmoid(u1 + v_f * c_prev + b_f)
    r = sigmoid(u2 + v_r * c_prev + b_r)
    c = f * c_prev + (1 - f) * u0
    g = math.tanh(c)
    x_skip = scale_x * x
    h = r * g * m + (1 - r * m) * x_skip

    arrays = dict(U=np.array([[[u0, u1, u2]]]), x=np.array([[[x]]]),
                  weight_c=np.array([v_f, v_r]), bias=np.array([b_f, b_r]),
                  c0=np.array([[c_prev]]))
    options = dict(hidden_size=1, use_tanh=True, scale_x=scale_x, mask_h=np.array([[m]]))
    h_out, c_out, c_last = recurrence_forward_reference(**arrays, **options)
    assert h_out.shape == c_out.shape == (1, 1, 1) and c_last.shape == (1, 1)
    assert h_out[0, 0, 0] == pytest.approx(h, rel=1e-14)
    assert c_out[0, 0, 0] == pytest.approx(c, rel=1e-14)
    assert c_last[0, 0] == pytest.approx(c, rel=1e-14)

    # d h / d(inputs) by hand, with grad_h = 1 and no gradient on c_last.
    grads = recurrence_backward_reference(np.ones((1, 1, 1)), None, **arrays, c=c_out, **options)
    dh_dc = m * r * (1 - g * g)
    dh_du2 = (g - x_skip) * m * r * (1 - r)
    dh_du1 = dh_dc * (c_prev - u0) * f * (1 - f)
    dh_du0 = dh_dc * (1 - f)
    np.testing.assert_allclose(grads["U"].reshape(3), [dh_du0, dh_du1, dh_du2], rtol=1e-13)
    np.testing.assert_allclose(grads["x"].reshape(1), [scale_x * (1 - m * r)], rtol=1e-13)
    np.testing.assert_allclose(grads["bias"], [dh_du1, dh_du2], rtol=1e-13)
    np.testing.assert_allclose(grads["weight_c"], [dh_du1 * c_prev, dh_du2 * c_prev], rtol=1e-13)
    np.testing.assert_allclose(grads["c0"].reshape(1),
                               [dh_dc * f + dh_du1 * v_f + dh_du2 * v_r], rtol=1e-13)


def _forward_one_column_at_a_time(U, x, weight_c, bias, c0, mask_h, mask_pad, V, *, d, dirs,
                                   has_skip_term, use_tanh, scale_x):
    """A second, scalar forward that reads every value by its flat index in the documented
    layouts, so that a layout mistake cannot hide behind matching reshapes."""
    L, B, width = U.shape
    D = dirs * d
    k = width // D
    h = np.zeros((L, B, D))
    c_last = np.zeros((B, D))
    for b in range(B):
        for direction in range(dirs):
            for j in range(d):
                col = direction * d + j
                v_f, v_r = weight_c[col], weight_c[D + col]
                b_f, b_r = bias[col], bias[D + col]
                c = c0[b, col]
                steps = range(L) if direction == 0 else reversed(range(L))
                for t in steps:
                    if mask_pad[t, b]:
                        continue
                    u = [U[t, b, col * k + slot] for slot in range(k)]
                    dv_f, dv_r = V[t, b, col * 2], V[t, b, col * 2 + 1]
                    f = 1.0 / (1.0 + math.exp(-(u[1] + (v_f + dv_f) * c + b_f)))
                    r = 1.0 / (1.0 + math.exp(-(u[2] + (v_r + dv_r) * c + b_r)))
                    c = f * c + (1.0 - f) * u[0]
                    g = math.tanh(c) if use_tanh else c
                    m = mask_h[b, col]
                    if has_skip_term:
                        x_skip = u[3] if k == 4 else scale_x * x[t, b, col]
                        h[t, b, col] = r * g * m + (1.0 - r * m) * x_skip
                    else:
                        h[t, b, col] = r * g * m
                c_last[b, col] = c
    return h, c_last


@pytest.mark.parametrize("case", _covering_cases()[::3], ids=[c.id for c in _covering_cases()[::3]])
def test_forward_matches_scalar_loop_over_documented_layouts(case):
    inputs = _make_inputs(case, 500)
    L, B = case.L, case.B
    dirs = 2 if case.bidirectional else 1
    D = dirs * case.d
    mask_h, mask_pad = inputs.pop("mask_h"), inputs.pop("mask_pad")
    h, _, c_last = recurrence_forward_reference(**inputs, **_options(case, mask_h, mask_pad))
    expected_h, expected_c_last = _forward_one_column_at_a_time(
        inputs["U"], inputs["x"],
        np.zeros(2 * D) if inputs["weight_c"] is None else inputs["weight_c"], inputs["bias"],
        np.zeros((B, D)) if inputs["c0"] is None else inputs["c0"],
        np.ones((B, D)) if mask_h is None else mask_h,
        np.zeros((L, B)) if mask_pad is None else mask_pad,
        np.zeros((L, B, 2 * D)) if inputs["V"] is None else inputs["V"],
        d=case.d, dirs=dirs, has_skip_term=case.has_skip_term, use_tanh=case.use_tanh,
        scale_x=case.scale_x)
    np.testing.assert_allclose(h, expected_h, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(c_last, expected_c_last, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("k", [3, 4], ids=["k3", "k4"])
def test_reverse_direction_is_forward_direction_on_reversed_time(k):
    """Bidirectional = forward run on columns [:d] + forward run on time-reversed columns [d:]."""
    rng = np.random.default_rng(21)
    L, B, d = 5, 2, 3
    arrays = _random_problem(rng, L, B, d, bidirectional=True, k=k)
    mask_h = rng.integers(0, 2, size=(B, 2 * d)) / 0.5
    mask_pad = rng.random((L, B)) < 0.3
    options = dict(hidden_size=d, use_tanh=True, scale_x=1.5)
    h, c, c_last = recurrence_forward_reference(**arrays, **options, bidirectional=True,
                                                mask_h=mask_h, mask_pad=mask_pad)
    grad_h = rng.normal(size=h.shape)
    grad_c_last = rng.normal(size=c_last.shape)
    grads = recurrence_backward_reference(grad_h, grad_c_last, **arrays, c=c, **options,
                                          bidirectional=True, mask_h=mask_h, mask_pad=mask_pad)
    U_by_direction = arrays["U"].reshape(L, B, 2, d * k)
    v = arrays["weight_c"].reshape(2, 2, d)
    bias = arrays["bias"].reshape(2, 2, d)
    for direction, time in ((0, slice(None)), (1, slice(None, None, -1))):
        cols = slice(direction * d, (direction + 1) * d)
        one = dict(U=U_by_direction[time, :, direction], x=arrays["x"][time, :, cols],
                   weight_c=v[:, direction].reshape(-1), bias=bias[:, direction].reshape(-1),
                   c0=arrays["c0"][:, cols])
        h1, c1, c_last1 = recurrence_forward_reference(**one, **options, mask_h=mask_h[:, cols],
                                                       mask_pad=mask_pad[time])
        np.testing.assert_allclose(h[time, :, cols], h1, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(c[time, :, cols], c1, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(c_last[:, cols], c_last1, rtol=1e-14, atol=1e-15)
        grads1 = recurrence_backward_reference(grad_h[time, :, cols], grad_c_last[:, cols], **one,
                                               c=c1, **options, mask_h=mask_h[:, cols],
                                               mask_pad=mask_pad[time])
        np.testing.assert_allclose(grads["U"].reshape(L, B, 2, d * k)[time, :, direction],
                                   grads1["U"], rtol=1e-13, atol=1e-15)
        if k == 3:
            np.testing.assert_allclose(grads["x"][time, :, cols], grads1["x"], rtol=1e-13,
                                       atol=1e-15)
        np.testing.assert_allclose(grads["c0"][:, cols], grads1["c0"], rtol=1e-13, atol=1e-15)
        for name in ("weight_c", "bias"):
            np.testing.assert_allclose(grads[name].reshape(2, 2, d)[:, direction].reshape(-1),
                                       grads1[name], rtol=1e-13, atol=1e-15)


def _random_problem(rng, L, B, d, bidirectional, k=3):
    D = (2 if bidirectional else 1) * d
    return dict(U=rng.normal(size=(L, B, D * k)), x=rng.normal(size=(L, B, D)),
                weight_c=rng.normal(size=2 * D), bias=rng.normal(size=2 * D),
                c0=rng.normal(size=(B, D)))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_padded_steps_output_zero_and_carry_c(bidirectional):
    rng = np.random.default_rng(7)
    L, B, d = 6, 3, 2
    arrays = _random_problem(rng, L, B, d, bidirectional)
    lengths = [6, 4, 1]
    mask_pad = np.array([[t >= n for n in lengths] for t in range(L)])
    h, c, c_last = recurrence_forward_reference(**arrays, hidden_size=d,
                                                bidirectional=bidirectional, mask_pad=mask_pad)
    assert np.all(h[mask_pad] == 0.0)
    assert np.all(h[~mask_pad] != 0.0)
    for b, n in enumerate(lengths):
        # Forward direction: c_last is the c of the last real step, carried through the padding.
        np.testing.assert_array_equal(c_last[b, :d], c[n - 1, b, :d])
        np.testing.assert_array_equal(c[n:, b, :d], np.broadcast_to(c[n - 1, b, :d], (L - n, d)))
        if bidirectional:
            # Reverse direction starts in the padding, which carries c0 until the last real step.
            np.testing.assert_array_equal(c[n:, b, d:],
                                          np.broadcast_to(arrays["c0"][b, d:], (L - n, d)))
            np.testing.assert_array_equal(c_last[b, d:], c[0, b, d:])


@pytest.mark.parametrize("padding_side", ["end", "start"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("k", [3, 4], ids=["k3", "k4"])
def test_sequence_alone_equals_sequence_in_padded_batch(padding_side, bidirectional, k):
    rng = np.random.default_rng(11)
    L, B, d = 6, 3, 2
    arrays = _random_problem(rng, L, B, d, bidirectional, k)
    D = (2 if bidirectional else 1) * d
    mask_h = rng.integers(0, 2, size=(B, D)) / 0.75
    lengths = [6, 4, 2]
    real_steps = [range(0, n) if padding_side == "end" else range(L - n, L) for n in lengths]
    mask_pad = np.ones((L, B), dtype=bool)
    for b, steps in enumerate(real_steps):
        mask_pad[list(steps), b] = False
    options = dict(hidden_size=d, bidirectional=bidirectional, use_tanh=True, scale_x=1.3)
    h, c, c_last = recurrence_forward_reference(**arrays, **options, mask_h=mask_h,
                                                mask_pad=mask_pad)
    grad_h = rng.normal(size=h.shape)
    grad_c_last = rng.normal(size=c_last.shape)
    grads = recurrence_backward_reference(grad_h, grad_c_last, **arrays, c=c, **options,
                                          mask_h=mask_h, mask_pad=mask_pad)
    for b, steps in enumerate(real_steps):
        steps = list(steps)
        alone = dict(U=arrays["U"][steps, b:b + 1], x=arrays["x"][steps, b:b + 1],
                     weight_c=arrays["weight_c"], bias=arrays["bias"],
                     c0=arrays["c0"][b:b + 1])
        h_alone, c_alone, c_last_alone = recurrence_forward_reference(
            **alone, **options, mask_h=mask_h[b:b + 1])
        np.testing.assert_allclose(h[steps, b:b + 1], h_alone, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(c[steps, b:b + 1], c_alone, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(c_last[b:b + 1], c_last_alone, rtol=1e-14, atol=1e-15)

        grads_alone = recurrence_backward_reference(
            grad_h[steps, b:b + 1], grad_c_last[b:b + 1], **alone, c=c_alone, **options,
            mask_h=mask_h[b:b + 1])
        np.testing.assert_allclose(grads["U"][steps, b:b + 1], grads_alone["U"], rtol=1e-13)
        if k == 3:
            np.testing.assert_allclose(grads["x"][steps, b:b + 1], grads_alone["x"], rtol=1e-13)
        np.testing.assert_allclose(grads["c0"][b:b + 1], grads_alone["c0"], rtol=1e-13)
        padded_steps = [t for t in range(L) if t not in steps]
        assert np.all(grads["U"][padded_steps, b] == 0.0)
        if k == 3:
            assert np.all(grads["x"][padded_steps, b] == 0.0)

    # Per-sequence bias and weight_c gradients add up to the batch's.
    total_bias = np.zeros(2 * D)
    total_weight_c = np.zeros(2 * D)
    for b, steps in enumerate(real_steps):
        steps = list(steps)
        h_alone, c_alone, _ = recurrence_forward_reference(
            arrays["U"][steps, b:b + 1], arrays["x"][steps, b:b + 1], arrays["weight_c"],
            arrays["bias"], arrays["c0"][b:b + 1], **options, mask_h=mask_h[b:b + 1])
        grads_alone = recurrence_backward_reference(
            grad_h[steps, b:b + 1], grad_c_last[b:b + 1], arrays["U"][steps, b:b + 1],
            arrays["x"][steps, b:b + 1], arrays["weight_c"], arrays["bias"],
            arrays["c0"][b:b + 1], c_alone, **options, mask_h=mask_h[b:b + 1])
        total_bias += grads_alone["bias"]
        total_weight_c += grads_alone["weight_c"]
    np.testing.assert_allclose(grads["bias"], total_bias, rtol=1e-12)
    np.testing.assert_allclose(grads["weight_c"], total_weight_c, rtol=1e-12)


def test_fully_padded_batch_entry_passes_state_and_gradient_through():
    rng = np.random.default_rng(3)
    L, B, d = 4, 2, 3
    arrays = _random_problem(rng, L, B, d, bidirectional=True)
    mask_pad = np.zeros((L, B), dtype=np.uint8)
    mask_pad[:, 1] = 1
    h, c, c_last = recurrence_forward_reference(**arrays, hidden_size=d, bidirectional=True,
                                                mask_pad=mask_pad)
    np.testing.assert_array_equal(c_last[1], arrays["c0"][1])
    assert np.all(h[:, 1] == 0.0)
    grad_c_last = rng.normal(size=c_last.shape)
    grads = recurrence_backward_reference(rng.normal(size=h.shape), grad_c_last, **arrays, c=c,
                                          hidden_size=d, bidirectional=True, mask_pad=mask_pad)
    np.testing.assert_array_equal(grads["c0"][1], grad_c_last[1])


def test_non_finite_values_in_padded_steps_do_not_leak():
    rng = np.random.default_rng(5)
    L, B, d = 3, 2, 2
    arrays = _random_problem(rng, L, B, d, bidirectional=True)
    mask_pad = np.zeros((L, B), dtype=bool)
    mask_pad[2, 0] = True
    clean = recurrence_forward_reference(**arrays, hidden_size=d, bidirectional=True,
                                         mask_pad=mask_pad)
    arrays["U"][2, 0] = np.nan
    arrays["x"][2, 0] = np.inf
    with np.errstate(invalid="ignore"):
        dirty = recurrence_forward_reference(**arrays, hidden_size=d, bidirectional=True,
                                             mask_pad=mask_pad)
        for a, b in zip(clean, dirty):
            np.testing.assert_array_equal(a, b)
        grads = recurrence_backward_reference(np.ones_like(clean[0]), np.ones_like(clean[2]),
                                              **arrays, c=dirty[1], hidden_size=d,
                                              bidirectional=True, mask_pad=mask_pad)
    for name in ("U", "x", "weight_c", "bias", "c0"):
        assert np.all(np.isfinite(grads[name])), name


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_low_precision_inputs_compute_in_float64(dtype):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    rng = np.random.default_rng(9)
    L, B, d = 4, 2, 2
    arrays = {name: value.astype(dtype)
              for name, value in _random_problem(rng, L, B, d, bidirectional=True).items()}
    upcast = {name: value.astype(np.float64) for name, value in arrays.items()}
    options = dict(hidden_size=d, bidirectional=True, use_tanh=True)
    for low, high in zip(recurrence_forward_reference(**arrays, **options),
                         recurrence_forward_reference(**upcast, **options)):
        assert low.dtype == np.float64
        np.testing.assert_array_equal(low, high)
    h, c, _ = recurrence_forward_reference(**upcast, **options)
    grad_h = rng.normal(size=h.shape)
    low = recurrence_backward_reference(grad_h.astype(dtype), None, **arrays, c=c.astype(dtype),
                                        **options)
    high = recurrence_backward_reference(grad_h.astype(dtype).astype(np.float64), None, **upcast,
                                         c=c.astype(dtype).astype(np.float64), **options)
    for name in ("U", "x", "weight_c", "bias", "c0"):
        assert low[name].dtype == np.float64
        np.testing.assert_array_equal(low[name], high[name])


def test_inputs_are_not_modified():
    rng = np.random.default_rng(2)
    arrays = _random_problem(rng, 3, 2, 2, bidirectional=True, k=4)
    saved = {name: value.copy() for name, value in arrays.items()}
    h, c, c_last = recurrence_forward_reference(**arrays, hidden_size=2, bidirectional=True)
    grad_h, grad_c_last = np.ones_like(h), np.ones_like(c_last)
    recurrence_backward_reference(grad_h, grad_c_last, **arrays, c=c, hidden_size=2,
                                  bidirectional=True)
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, saved[name])
    assert np.all(grad_h == 1.0) and np.all(grad_c_last == 1.0)


def test_empty_sequence_returns_c0():
    rng = np.random.default_rng(4)
    arrays = _random_problem(rng, 0, 2, 3, bidirectional=True)
    h, c, c_last = recurrence_forward_reference(**arrays, hidden_size=3, bidirectional=True)
    assert h.shape == c.shape == (0, 2, 6)
    np.testing.assert_array_equal(c_last, arrays["c0"])
    grad_c_last = rng.normal(size=(2, 6))
    grads = recurrence_backward_reference(h, grad_c_last, **arrays, c=c, hidden_size=3,
                                          bidirectional=True)
    np.testing.assert_array_equal(grads["c0"], grad_c_last)
    assert np.all(grads["bias"] == 0.0) and grads["U"].shape == (0, 2, 18)


def _good_problem():
    rng = np.random.default_rng(0)
    L, B, d = 3, 2, 2  # bidirectional: D = 4
    arrays = _random_problem(rng, L, B, d, bidirectional=True)
    return arrays, dict(hidden_size=d, bidirectional=True)


BAD_FORWARD_INPUTS = {
    "U-not-3d": ("U", dict(U=np.zeros((3, 24)))),
    "U-width-not-multiple-of-D": ("U", dict(U=np.zeros((3, 2, 13)))),
    "U-k-is-2": ("U", dict(U=np.zeros((3, 2, 8)))),
    "U-k-is-5": ("U", dict(U=np.zeros((3, 2, 20)))),
    "x-missing-for-k3-skip": ("x", dict(x=None)),
    "x-wrong-shape": ("x", dict(x=np.zeros((3, 2, 2)))),
    "weight_c-wrong-shape": ("weight_c", dict(weight_c=np.zeros(4))),
    "bias-wrong-shape": ("bias", dict(bias=np.zeros((2, 4)))),
    "c0-wrong-shape": ("c0", dict(c0=np.zeros((2, 2)))),
    "mask_h-wrong-shape": ("mask_h", dict(mask_h=np.ones((1, 4)))),
    "mask_pad-wrong-shape": ("mask_pad", dict(mask_pad=np.zeros((2, 3)))),
    "hidden_size-zero": ("hidden_size", dict(hidden_size=0)),
    "hidden_size-float": ("hidden_size", dict(hidden_size=2.0)),
}


@pytest.mark.parametrize("argument, change", BAD_FORWARD_INPUTS.values(),
                         ids=list(BAD_FORWARD_INPUTS))
def test_bad_forward_input_raises_value_error_naming_it(argument, change):
    arrays, options = _good_problem()
    kwargs = {**arrays, **options, **change}
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        recurrence_forward_reference(**kwargs)
    # The backward validates the same arguments.
    h, c, c_last = recurrence_forward_reference(**arrays, **options)
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        recurrence_backward_reference(h, c_last, **{**kwargs, "c": c})


BAD_BACKWARD_INPUTS = {
    "grad_h-wrong-shape": ("grad_h", dict(grad_h=np.zeros((3, 2, 2)))),
    "grad_c_last-wrong-shape": ("grad_c_last", dict(grad_c_last=np.zeros((3, 4)))),
    "c-wrong-shape": ("c", dict(c=np.zeros((2, 2, 4)))),
}


@pytest.mark.parametrize("argument, change", BAD_BACKWARD_INPUTS.values(),
                         ids=list(BAD_BACKWARD_INPUTS))
def test_bad_backward_input_raises_value_error_naming_it(argument, change):
    arrays, options = _good_problem()
    h, c, c_last = recurrence_forward_reference(**arrays, **options)
    kwargs = {**arrays, **options, "grad_h": h, "grad_c_last": c_last, "c": c, **change}
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        recurrence_backward_reference(**kwargs)


def test_x_may_be_none_when_unused():
    arrays, options = _good_problem()
    arrays["x"] = None
    h, c, c_last = recurrence_forward_reference(**arrays, **options, has_skip_term=False)
    grads = recurrence_backward_reference(h, c_last, **arrays, c=c, **options, has_skip_term=False)
    assert grads["x"] is None
    arrays["U"] = np.zeros((3, 2, 16))  # k = 4: the skip is u3, x is ignored
    h, c, c_last = recurrence_forward_reference(**arrays, **options)
    grads = recurrence_backward_reference(h, c_last, **arrays, c=c, **options)
    assert grads["x"] is None
