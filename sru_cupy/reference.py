"""Plain NumPy oracle for the SRU elementwise recurrence (forward and backward).

This module is what the CUDA kernels are tested against, so it favours being obviously right over
being fast: it loops over time, is vectorised over batch and hidden units, and computes in float64
whatever the input dtype. It imports neither torch nor cupy.

For every column (batch b, direction, unit j), with u0..u3 the k values of U for that column,
v_f, v_r = weight_c (plus, when V is given, that step's offsets V_t: v_f = weight_c_f + V_t[..., 0],
v_r = weight_c_r + V_t[..., 1]), b_f, b_r = bias, and m = mask_h[b, column]:

    f_t = sigmoid(u1_t + v_f * c_{t-1} + b_f)
    r_t = sigmoid(u2_t + v_r * c_{t-1} + b_r)
    c_t = f_t * c_{t-1} + (1 - f_t) * u0_t
    g_t = tanh(c_t) if use_tanh else c_t
    h_t = (g_t - x'_t) * m * r_t + x'_t    if has_skip_term
    h_t = g_t * m * r_t                    otherwise
with the skip input x'_t = scale_x * x_t when k == 3, and u3_t when k == 4.

c_{-1} = c0. A padded step (mask_pad[t, b] != 0) keeps c_t = c_{t-1}, outputs h_t = 0, and passes
the gradient of c through unchanged; its inputs get zero gradient. The forward direction runs
t = 0 .. L-1, the reverse direction (columns d .. 2d-1) runs t = L-1 .. 0.

Layouts (L steps, B batch, d = hidden_size, dirs = 2 if bidirectional else 1, D = dirs * d):
    U (L, B, D*k) read as (L, B, dirs, d, k);  x, h, c (L, B, D);  c0, c_last, mask_h (B, D);
    weight_c, bias (2*D,) read as (2, dirs, d): the forget gate's D values (v_f, b_f), then the
    reset gate's (v_r, b_r);  mask_pad (L, B);  V (L, B, D*2) read as (L, B, dirs, d, 2): per step
    and column, the forget then the reset offset (the layout of the `sru` package's custom V).
"""

import numpy as np

from .call import RecurrenceCall, keywords

__all__ = ["recurrence_forward_reference", "recurrence_backward_reference"]

#: Keyword arguments of both functions beyond hidden_size, with their defaults.
KEYWORDS = {"bidirectional": False, "has_skip_term": True, "use_tanh": False, "scale_x": 1.0,
            "mask_h": None, "mask_pad": None, "V": None}


def _sigmoid(z):
    # Same function as 1 / (1 + exp(-z)), written with tanh so large |z| cannot overflow.
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _as_float64(name, value, expected_shape):
    array = np.asarray(value, dtype=np.float64)
    if array.shape != tuple(expected_shape):
        raise ValueError(f"{name}: expected shape {tuple(expected_shape)}, got {array.shape}")
    return array


class _Problem:
    """Validated float64 inputs, reshaped so that direction and unit are separate axes; the sizes
    and shapes are those of the call's description (sru_cupy.call), the arithmetic is this
    module's own."""

    def __init__(self, U, x, weight_c, bias, c0, hidden_size, options):
        U = np.asarray(U)
        V = options["V"]
        # The sizes and shapes of the call; has_skip_term=True there because the reference also
        # runs k = 4 without the skip term (u3 unread), which the kernels' callers refuse.
        call = RecurrenceCall.describe(U.shape, "float64", hidden_size, options["bidirectional"],
                                       True, options["use_tanh"], options["scale_x"],
                                       with_v=V is not None)
        self.has_skip_term = bool(options["has_skip_term"])
        self.uses_x = self.has_skip_term and call.k == 3
        if self.uses_x and x is None:
            raise ValueError("x: expected an (L, B, D) array because k == 3 and has_skip_term,"
                             " got None")
        L, B, d, dirs, D, k = call.L, call.B, call.hidden_size, call.dirs, call.D, call.k
        self.call = call
        self.L, self.B, self.d, self.dirs, self.D, self.k = L, B, d, dirs, D, k
        self.use_tanh = call.use_tanh
        self.scale_x = call.scale_x

        self.U = _as_float64("U", U, call.shape("U")).reshape(L, B, dirs, d, k)
        # x is validated whenever it is given, even if this configuration ignores it.
        self.x = None if x is None else _as_float64("x", x, call.shape("x")).reshape(L, B, dirs, d)
        if weight_c is None:  # v1 mode: no peephole on c
            weight_c = np.zeros(2 * D)
        if bias is None:
            bias = np.zeros(2 * D)
        v = _as_float64("weight_c", weight_c, call.shape("weight_c")).reshape(2, dirs, d)
        b = _as_float64("bias", bias, call.shape("bias")).reshape(2, dirs, d)
        self.v_f, self.v_r = v[0], v[1]
        self.V = None if V is None else _as_float64("V", V, call.shape("V")).reshape(
            L, B, dirs, d, 2)
        self.b_f, self.b_r = b[0], b[1]
        self.c0 = (np.zeros((B, dirs, d)) if c0 is None
                   else _as_float64("c0", c0, call.shape("c0")).reshape(B, dirs, d))
        mask_h, mask_pad = options["mask_h"], options["mask_pad"]
        self.mask_h = (np.ones((B, dirs, d)) if mask_h is None
                       else _as_float64("mask_h", mask_h, call.shape("mask_h")).reshape(B, dirs, d))
        if mask_pad is None:
            self.padded = np.zeros((L, B), dtype=bool)
        else:
            mask_pad = np.asarray(mask_pad)
            if mask_pad.shape != call.shape("mask_pad"):
                raise ValueError(f"mask_pad: expected shape {call.shape('mask_pad')}, got "
                                 f"{mask_pad.shape}")
            self.padded = mask_pad != 0

    def time_order(self, direction):
        """The steps in the order the given direction processes them."""
        return range(self.L) if direction == 0 else range(self.L - 1, -1, -1)

    def gate_weights(self, t, direction):
        """(v_f, v_r) at step t, shape (d,) or (B, d): weight_c plus V_t when V is given."""
        v_f, v_r = self.v_f[direction], self.v_r[direction]
        if self.V is None:
            return v_f, v_r
        return v_f + self.V[t, :, direction, :, 0], v_r + self.V[t, :, direction, :, 1]

    def skip_input(self, t, direction):
        """x'_t for one direction, shape (B, d); None without a skip term."""
        if not self.has_skip_term:
            return None
        if self.k == 4:
            return self.U[t, :, direction, :, 3]
        return self.scale_x * self.x[t, :, direction, :]


def recurrence_forward_reference(U, x, weight_c, bias, c0=None, *, hidden_size, **options):
    """-> (h (L,B,D), c (L,B,D) the state after every step, c_last (B,D)), all float64.

    Keyword arguments: hidden_size, and those of KEYWORDS (bidirectional, has_skip_term,
    use_tanh, scale_x, mask_h, mask_pad, V)."""
    p = _Problem(U, x, weight_c, bias, c0, hidden_size,
                 keywords("recurrence_forward_reference", options, KEYWORDS))
    h = np.zeros((p.L, p.B, p.dirs, p.d))
    c = np.zeros((p.L, p.B, p.dirs, p.d))
    c_last = np.zeros((p.B, p.dirs, p.d))
    for direction in range(p.dirs):
        b_f, b_r = p.b_f[direction], p.b_r[direction]
        m = p.mask_h[:, direction]
        c_prev = p.c0[:, direction]
        for t in p.time_order(direction):
            v_f, v_r = p.gate_weights(t, direction)
            u0, u1, u2 = (p.U[t, :, direction, :, slot] for slot in range(3))
            f = _sigmoid(u1 + v_f * c_prev + b_f)
            r = _sigmoid(u2 + v_r * c_prev + b_r)
            c_new = f * c_prev + (1.0 - f) * u0
            g = np.tanh(c_new) if p.use_tanh else c_new
            x_skip = p.skip_input(t, direction)
            h_new = g * m * r if x_skip is None else (g - x_skip) * m * r + x_skip
            pad = p.padded[t][:, None]  # (B, 1), broadcasts over units
            c_t = np.where(pad, c_prev, c_new)
            h[t, :, direction] = np.where(pad, 0.0, h_new)
            c[t, :, direction] = c_t
            c_prev = c_t
        c_last[:, direction] = c_prev
    shape = (p.L, p.B, p.D)
    return h.reshape(shape), c.reshape(shape), c_last.reshape(p.B, p.D)


def recurrence_backward_reference(grad_h, grad_c_last, U, x, weight_c, bias, c0, c, *, hidden_size,
                                  **options):
    """grad_h (L,B,D); grad_c_last (B,D) or None (zeros); c is the forward's c (L,B,D).

    -> dict with float64 arrays: 'U' (L,B,D*k), 'x' (L,B,D) or None when x is not used
       (k == 4 or not has_skip_term), 'weight_c' (2*D,) (returned even when weight_c is None: it is
       the gradient w.r.t. v), 'bias' (2*D,), 'c0' (B,D), 'V' (L,B,D*2) or None without V (its
       per-step terms sum over steps and batch to 'weight_c').
    """
    p = _Problem(U, x, weight_c, bias, c0, hidden_size,
                 keywords("recurrence_backward_reference", options, KEYWORDS))
    L, B, dirs, d = p.L, p.B, p.dirs, p.d
    grad_h = _as_float64("grad_h", grad_h, p.call.shape("grad_h")).reshape(L, B, dirs, d)
    grad_c_last = (np.zeros((B, dirs, d)) if grad_c_last is None
                   else _as_float64("grad_c_last", grad_c_last,
                                    p.call.shape("grad_c_last")).reshape(B, dirs, d))
    c = _as_float64("c", c, p.call.shape("c")).reshape(L, B, dirs, d)

    grad_U = np.zeros((L, B, dirs, d, p.k))
    grad_x_skip = np.zeros((L, B, dirs, d))  # gradient w.r.t. x'
    grad_v = np.zeros((2, dirs, d))
    grad_V = np.zeros((L, B, dirs, d, 2))
    grad_b = np.zeros((2, dirs, d))
    grad_c0 = np.zeros((B, dirs, d))
    for direction in range(dirs):
        b_f, b_r = p.b_f[direction], p.b_r[direction]
        m = p.mask_h[:, direction]
        order = list(p.time_order(direction))
        grad_c_carry = grad_c_last[:, direction]  # gradient w.r.t. c_t, from steps after t
        for position in range(L - 1, -1, -1):
            t = order[position]
            c_prev = p.c0[:, direction] if position == 0 else c[order[position - 1], :, direction]
            c_t = c[t, :, direction]
            u0, u1, u2 = (p.U[t, :, direction, :, slot] for slot in range(3))
            v_f, v_r = p.gate_weights(t, direction)
            # Recompute the gates from the saved state, as the kernels do.
            f = _sigmoid(u1 + v_f * c_prev + b_f)
            r = _sigmoid(u2 + v_r * c_prev + b_r)
            g = np.tanh(c_t) if p.use_tanh else c_t
            dg_dc = 1.0 - g * g if p.use_tanh else 1.0
            gh = grad_h[t, :, direction]
            x_skip = p.skip_input(t, direction)

            grad_r = gh * g * m if x_skip is None else gh * (g - x_skip) * m
            grad_u2 = grad_r * r * (1.0 - r)
            grad_c_t = gh * m * r * dg_dc + grad_c_carry
            grad_u1 = grad_c_t * (c_prev - u0) * f * (1.0 - f)
            grad_u0 = grad_c_t * (1.0 - f)
            grad_c_before = grad_c_t * f + grad_u1 * v_f + grad_u2 * v_r

            # A padded step is the identity on c and contributes nothing else. np.where, not a
            # multiply, so that non-finite values in padded inputs cannot leak in as 0 * inf.
            real = ~p.padded[t][:, None]  # (B, 1)
            grad_u0, grad_u1, grad_u2 = (np.where(real, grad, 0.0)
                                         for grad in (grad_u0, grad_u1, grad_u2))
            grad_U[t, :, direction, :, 0] = grad_u0
            grad_U[t, :, direction, :, 1] = grad_u1
            grad_U[t, :, direction, :, 2] = grad_u2
            if x_skip is not None:
                grad_x_skip[t, :, direction] = np.where(real, gh * (1.0 - m * r), 0.0)
            grad_b[0, direction] += grad_u1.sum(axis=0)
            grad_b[1, direction] += grad_u2.sum(axis=0)
            grad_V[t, :, direction, :, 0] = grad_u1 * c_prev
            grad_V[t, :, direction, :, 1] = grad_u2 * c_prev
            grad_v[0, direction] += grad_V[t, :, direction, :, 0].sum(axis=0)
            grad_v[1, direction] += grad_V[t, :, direction, :, 1].sum(axis=0)
            grad_c_carry = np.where(real, grad_c_before, grad_c_carry)
        grad_c0[:, direction] = grad_c_carry

    grad_x = None
    if p.has_skip_term and p.k == 4:
        grad_U[..., 3] = grad_x_skip
    elif p.uses_x:
        grad_x = (p.scale_x * grad_x_skip).reshape(L, B, p.D)
    return {
        "U": grad_U.reshape(L, B, p.D * p.k),
        "x": grad_x,
        "weight_c": grad_v.reshape(2 * p.D),
        "bias": grad_b.reshape(2 * p.D),
        "c0": grad_c0.reshape(B, p.D),
        "V": None if p.V is None else grad_V.reshape(L, B, 2 * p.D),
    }
