"""The SRU recurrence in plain NumPy operations: the path for NumPy arrays where no C++ compiler
exists (neither a system one nor the ziglang wheel of ``pip install sru_cupy[cpu]``).

The launch layer calls :func:`run` in place of the host kernels, with the call's description
(``sru_cupy.call.RecurrenceCall``) and its arrays by name, already checked and converted
(contiguous data in the storage dtype, parameters in the arithmetic dtype, mask_pad as bytes), the
outputs allocated; they are filled the way the kernels fill them. Vectorized
over batch and columns, a loop over time, computing in float32 (float64 for float64 data) like the
kernels: the state is carried in that type and rounded only where it is stored, and the backward
recomputes f and r from the stored c. Both directions run in one loop: processing step s is time s
for direction 0 and L-1-s for direction 1 (see ``torch_fallback`` for the PyTorch counterpart).
"""

import numpy as np

from . import implementation
from .call import BACKWARD, FORWARD


def _at_step(a, s, dirs):
    """Processing step s of an (L, B, dirs, ...) array: (B, dirs, ...), a view when dirs == 1."""
    if dirs == 1:
        return a[s]
    return np.stack((a[s, :, 0], a[a.shape[0] - 1 - s, :, 1]), axis=1)


def _put(out, s, value, dirs):
    """Stores (B, dirs, ...) ``value`` at processing step s of the (L, B, dirs, ...) ``out``,
    rounding to its dtype."""
    out[s, :, 0] = value[:, 0]
    if dirs == 2:
        out[out.shape[0] - 1 - s, :, 1] = value[:, 1]


class _Columns:
    """The inputs of one call, shaped (L, B, dirs, d[, k]) or (B, dirs, d), read step by step."""

    def __init__(self, call, arrays):
        self.L, self.B, self.dirs, self.d, self.k = (call.L, call.B, call.dirs, call.hidden_size,
                                                     call.k)
        self.A = np.dtype(call.arith)
        self.scale_x = self.A.type(call.scale_x)
        self.use_tanh = call.use_tanh
        self.skip = call.has_skip_term
        self.reads_x = call.reads_x
        cols = (self.B, self.dirs, self.d)
        weight_c, bias, c0, mask_h, mask_pad, V = (arrays.get(name) for name in (
            "weight_c", "bias", "c0", "mask_h", "mask_pad", "V"))
        self.U = arrays["U"].reshape(self.L, *cols, self.k)
        self.x = arrays["x"].reshape(self.L, *cols) if self.reads_x else None
        zeros = np.zeros((2, self.dirs, self.d), self.A)
        self.v = zeros if weight_c is None else weight_c.reshape(2, self.dirs, self.d)
        # V (L, B, D*2): per step and column, the forget then the reset offset of weight_c.
        self.V = None if V is None else V.reshape(self.L, *cols, 2)
        self.b = bias.reshape(2, self.dirs, self.d)
        self.state0 = np.zeros(cols, self.A) if c0 is None else c0.reshape(cols).astype(self.A)
        self.m = self.A.type(1) if mask_h is None else mask_h.reshape(cols)
        self.pad = None if mask_pad is None else np.broadcast_to(
            mask_pad.reshape(self.L, self.B, 1, 1) != 0, (self.L, self.B, self.dirs, 1))

    def step(self, s):
        """(u (B, dirs, d, k), x' or None, pad (B, dirs, 1) or None, (v_f, v_r)) of processing
        step s, in A: v is weight_c, plus V_s when V is given."""
        u = _at_step(self.U, s, self.dirs).astype(self.A)
        if not self.skip:
            skip = None
        elif self.k == 4:
            skip = u[..., 3]
        else:
            skip = self.scale_x * _at_step(self.x, s, self.dirs).astype(self.A)
        pad = None if self.pad is None else _at_step(self.pad, s, self.dirs)
        if self.V is None:
            v = (self.v[0], self.v[1])
        else:
            offsets = _at_step(self.V, s, self.dirs).astype(self.A)
            v = (self.v[0] + offsets[..., 0], self.v[1] + offsets[..., 1])
        return u, skip, pad, v

    def gates(self, u, v, c_prev):
        """f and r from c_{t-1}: sigmoid(u1 + v_f c + b_f), sigmoid(u2 + v_r c + b_r)."""
        one = self.A.type(1)
        f = one / (one + np.exp(-(u[..., 1] + v[0] * c_prev + self.b[0])))
        r = one / (one + np.exp(-(u[..., 2] + v[1] * c_prev + self.b[1])))
        return f, r


def run(kernel, call, arrays):
    """Runs ``kernel`` ("sru_recurrence_forward" or "sru_recurrence_backward") for ``call`` over
    ``arrays`` (inputs and outputs by the description's names)."""
    implementation.announce(implementation.NUMPY)
    {FORWARD: _forward, BACKWARD: _backward}[kernel](call, arrays)


def _forward(call, arrays):
    """Fills h, c (absent for inference) and c_last as ``sru_recurrence_forward`` does:
    c_t = f c_{t-1} + (1 - f) u0, h_t = (g - x') m r + x' (or g m r without skip), g = c or tanh(c);
    a padded step keeps c and gives h = 0."""
    q = _Columns(call, arrays)
    shape = (q.L, q.B, q.dirs, q.d)
    h4 = arrays["h"].reshape(shape)
    c4 = arrays["c"].reshape(shape) if call.store_c else None
    state = q.state0
    with np.errstate(all="ignore"):  # inf and nan propagate as in the kernels, silently
        for s in range(q.L):
            u, skip, pad, v = q.step(s)
            f, r = q.gates(u, v, state)
            new_state = (state - u[..., 0]) * f + u[..., 0]
            g = np.tanh(new_state) if q.use_tanh else new_state
            out = (g - skip) * q.m * r + skip if skip is not None else g * q.m * r
            if pad is not None:
                new_state = np.where(pad, state, new_state)
                out = np.where(pad, q.A.type(0), out)
            state = new_state
            _put(h4, s, out, q.dirs)
            if c4 is not None:
                _put(c4, s, state, q.dirs)
    arrays["c_last"][...] = state.reshape(arrays["c_last"].shape)


def _backward(call, arrays):
    """Fills grad_U, grad_x (when x is read), grad_c0 and the per-column partials
    grad_weight_c_partial, grad_bias_partial (2, B, D) and, with V, grad_V (L, B, D*2) as
    ``sru_recurrence_backward`` does.
    With gh = dL/dh_t and gc = dL/dc_t: dr = gh (g - x') m, du2 = dr r (1 - r),
    dc = gh m r g'(c) + gc, du1 = dc (c_{t-1} - u0) f (1 - f), du0 = dc (1 - f), dx' = gh (1 - m r),
    dL/dc_{t-1} = dc f + du1 v_f + du2 v_r, dV_t = (du1 c_{t-1}, du2 c_{t-1}); a padded step has zero
    gradients and passes gc on."""
    q = _Columns(call, arrays)
    shape = (q.L, q.B, q.dirs, q.d)
    c4 = arrays["c"].reshape(shape)
    gh4 = arrays["grad_h"].reshape(shape)
    grad_c_last = arrays.get("grad_c_last")
    gU = arrays["grad_U"].reshape(*shape, q.k)
    gx = arrays["grad_x"].reshape(shape) if call.reads_x else None
    gV = arrays["grad_V"].reshape(*shape, 2) if call.with_v else None
    A, one, zero = q.A, q.A.type(1), q.A.type(0)
    gc = np.zeros(shape[1:], A) if grad_c_last is None else grad_c_last.reshape(shape[1:]).astype(A)
    partials = np.zeros((4,) + shape[1:], A)  # db_f, db_r, dv_f, dv_r
    with np.errstate(all="ignore"):
        for s in range(q.L - 1, -1, -1):
            u, skip, pad, v = q.step(s)
            c_prev = _at_step(c4, s - 1, q.dirs).astype(A) if s > 0 else q.state0
            c_cur = _at_step(c4, s, q.dirs).astype(A)
            gh = _at_step(gh4, s, q.dirs).astype(A)
            f, r = q.gates(u, v, c_prev)
            g = np.tanh(c_cur) if q.use_tanh else c_cur
            dr = gh * (g - skip) * q.m if skip is not None else gh * g * q.m
            du2 = dr * r * (one - r)
            dg = gh * q.m * r
            dc = (dg * (one - g * g) if q.use_tanh else dg) + gc
            du1 = dc * (c_prev - u[..., 0]) * f * (one - f)
            du0 = dc * (one - f)
            dskip = gh * (one - q.m * r) if skip is not None else np.zeros_like(gh)
            gc_prev = dc * f + du1 * v[0] + du2 * v[1]
            step = np.stack((du0, du1, du2, dskip)[:q.k], axis=-1)
            parts = np.stack((du1, du2, du1 * c_prev, du2 * c_prev))
            if pad is not None:
                # np.where, not a product: values computed at a padded step may be inf or nan
                step = np.where(pad[..., None], zero, step)
                dskip = np.where(pad, zero, dskip)
                parts = np.where(pad, zero, parts)
                gc_prev = np.where(pad, gc, gc_prev)
            _put(gU, s, step, q.dirs)
            if gx is not None:
                _put(gx, s, q.scale_x * dskip, q.dirs)
            partials += parts
            if gV is not None:
                _put(gV, s, np.stack((parts[2], parts[3]), axis=-1), q.dirs)
            gc = gc_prev
    for name, value in (("grad_c0", gc), ("grad_bias_partial", partials[:2]),
                        ("grad_weight_c_partial", partials[2:])):
        arrays[name][...] = value.reshape(arrays[name].shape)
