"""The SRU recurrence in plain PyTorch operations: the CPU path where no C++ compiler exists.

Vectorized over batch and columns, a loop over time, computing in float32 (float64 for float64
data) like the kernels, with the same outputs as ``sru_cupy::recurrence_forward`` and
``sru_cupy::recurrence_backward``. Both directions run in one loop: the reverse direction's inputs
are flipped in time, so processing step s is time s for direction 0 and L-1-s for direction 1.
"""

import torch

from . import torch_support


def _processing_order(t, dirs):
    """(L, B, dirs, ...) in time order <-> processing order (an involution)."""
    if dirs == 1:
        return t
    return torch.stack((t[:, :, 0], t[:, :, 1].flip(0)), dim=2)


def _prepare(call, arrays):
    U, x, weight_c, bias, c0, mask_h, mask_pad, V = (arrays.get(name) for name in (
        "U", "x", "weight_c", "bias", "c0", "mask_h", "mask_pad", "V"))
    dirs, L, B, d, D, k = call.dirs, call.L, call.B, call.hidden_size, call.D, call.k
    scale_x = call.scale_x
    A = torch.float64 if U.dtype == torch.float64 else torch.float32
    u = _processing_order(U.to(A).reshape(L, B, dirs, d, k), dirs)
    if not call.has_skip_term:
        skip = None
    elif k == 4:
        skip = u[..., 3]
    else:
        skip = _processing_order(x.to(A).reshape(L, B, dirs, d), dirs) * scale_x
    zeros = U.new_zeros((2, dirs, d), dtype=A)
    v = zeros if weight_c is None else weight_c.to(A).reshape(2, dirs, d)
    # weight_c (2, dirs, d), or with V the per-step (L, 2, B, dirs, d) in processing order.
    if V is not None:
        steps = _processing_order(V.to(A).reshape(L, B, dirs, d, 2), dirs)
        v = v.unsqueeze(1) + steps.permute(0, 4, 1, 2, 3)
    b = bias.to(A).reshape(2, dirs, d)
    state0 = U.new_zeros((B, dirs, d), dtype=A) if c0 is None else c0.to(A).reshape(B, dirs, d)
    m = 1.0 if mask_h is None else mask_h.to(A).reshape(B, dirs, d)
    if mask_pad is None:
        pad = None
    else:
        pad = (mask_pad != 0).reshape(L, B, 1, 1).expand(L, B, dirs, 1)
        pad = _processing_order(pad, dirs)
    return dirs, L, B, D, k, A, u, skip, v, b, state0, m, pad


def _step_weights(v, s, per_step):
    """(v_f, v_r) of processing step s."""
    w = v[s] if per_step else v
    return w[0], w[1]


def recurrence_forward(call, arrays):
    """``sru_cupy::recurrence_forward``'s results (h, c ((0,) unless call.store_c), c_last) for
    ``call`` over ``arrays`` (the op's inputs by name)."""
    dirs, L, B, D, k, A, u, skip, v, b, state, m, pad = _prepare(call, arrays)
    U, V, use_tanh = arrays["U"], arrays.get("V"), call.use_tanh
    hs, cs = [], []
    for s in range(L):
        v_f, v_r = _step_weights(v, s, V is not None)
        f = torch.sigmoid(u[s, ..., 1] + v_f * state + b[0])
        r = torch.sigmoid(u[s, ..., 2] + v_r * state + b[1])
        new_state = (state - u[s, ..., 0]) * f + u[s, ..., 0]
        g = torch.tanh(new_state) if use_tanh else new_state
        h = (g - skip[s]) * m * r + skip[s] if skip is not None else g * m * r
        if pad is not None:
            new_state = torch.where(pad[s], state, new_state)
            h = torch.where(pad[s], torch.zeros_like(h), h)
        state = new_state
        hs.append(h)
        cs.append(state)
    shape = (L, U.shape[1], D)
    h = _processing_order(torch.stack(hs), dirs).reshape(shape) if L else U.new_zeros(shape, dtype=A)
    c = _processing_order(torch.stack(cs), dirs).reshape(shape) if L else U.new_zeros(shape, dtype=A)
    # Fresh contiguous outputs, as the op's fake implementation promises (never an input's alias).
    return (h.to(U.dtype).contiguous(),
            c.to(U.dtype).contiguous() if call.store_c else U.new_empty((0,)),
            state.reshape(B, D).to(U.dtype, copy=True).contiguous())


def recurrence_backward(call, arrays):
    """``sru_cupy::recurrence_backward``'s results (grad U, grad x ((0,) unless x is read), grad
    weight_c, grad bias, grad c0, grad V ((0,) without V)) for ``call`` over ``arrays``."""
    dirs, L, B, D, k, A, u, skip, v, b, state0, m, pad = _prepare(call, arrays)
    U, V, c, grad_h, grad_c_last = (arrays.get(name) for name in (
        "U", "V", "c", "grad_h", "grad_c_last"))
    d, use_tanh, scale_x = call.hidden_size, call.use_tanh, call.scale_x
    cp = _processing_order(c.to(A).reshape(L, B, dirs, d), dirs)
    gh_all = _processing_order(grad_h.to(A).reshape(L, B, dirs, d), dirs)
    gc = state0.new_zeros(state0.shape) if grad_c_last is None else grad_c_last.to(A).reshape(
        B, dirs, d)
    grad_u = torch.zeros_like(u)
    grad_skip = torch.zeros_like(u[..., 0])
    grad_v = torch.zeros((2, B, dirs, d), dtype=A, device=U.device)
    grad_b = torch.zeros((2, B, dirs, d), dtype=A, device=U.device)
    grad_steps = torch.zeros((L, 2, B, dirs, d), dtype=A, device=U.device) if V is not None \
        else None
    for s in range(L - 1, -1, -1):
        c_prev = cp[s - 1] if s > 0 else state0
        c_cur = cp[s]
        gh = gh_all[s]
        v_f, v_r = _step_weights(v, s, V is not None)
        f = torch.sigmoid(u[s, ..., 1] + v_f * c_prev + b[0])
        r = torch.sigmoid(u[s, ..., 2] + v_r * c_prev + b[1])
        g = torch.tanh(c_cur) if use_tanh else c_cur
        dr = gh * (g - skip[s]) * m if skip is not None else gh * g * m
        du2 = dr * r * (1 - r)
        dg = gh * m * r
        dc = (dg * (1 - g * g) if use_tanh else dg) + gc
        du1 = dc * (c_prev - u[s, ..., 0]) * f * (1 - f)
        du0 = dc * (1 - f)
        dskip = gh * (1 - m * r) if skip is not None else torch.zeros_like(gh)
        gc_prev = dc * f + du1 * v_f + du2 * v_r
        step = torch.stack((du0, du1, du2, dskip)[:k], dim=-1)
        parts = torch.stack((du1, du2, du1 * c_prev, du2 * c_prev))
        if pad is not None:
            # torch.where, not a product: values computed at a padded step may be inf or nan
            step = torch.where(pad[s].unsqueeze(-1), 0.0, step)
            dskip = torch.where(pad[s], 0.0, dskip)
            parts = torch.where(pad[s], 0.0, parts)
            gc_prev = torch.where(pad[s], gc, gc_prev)
        grad_u[s] = step
        grad_skip[s] = dskip
        grad_b += parts[:2]
        grad_v += parts[2:]
        if grad_steps is not None:
            grad_steps[s] = parts[2:]
        gc = gc_prev
    grad_U = _processing_order(grad_u, dirs).reshape(U.shape).to(U.dtype)
    grad_x = (_processing_order(grad_skip, dirs).reshape(L, B, D) * scale_x).to(U.dtype) \
        if call.reads_x else U.new_empty((0,))
    if grad_steps is None:
        grad_V = U.new_empty((0,))
    else:  # (L, 2, B, dirs, d) in processing order -> (L, B, D*2) in time order
        grad_V = _processing_order(grad_steps.permute(0, 2, 3, 4, 1), dirs).reshape(L, B, 2 * D)
        grad_V = grad_V.to(U.dtype).contiguous()
    return (grad_U.contiguous(), grad_x.contiguous(), grad_v.sum(1).reshape(2 * D),
            grad_b.sum(1).reshape(2 * D), gc.reshape(B, D).to(U.dtype, copy=True).contiguous(),
            grad_V)


# -- the scan over time, for ONNX export --------------------------------------------------------
#
# The step (one column; the math of cuda/sru_recurrence.cu):
#     f = sigmoid(u1 + v_f c + b_f)    r = sigmoid(u2 + v_r c + b_r)    c' = (c - u0) f + u0
#     g = c' or tanh(c')    h = (g - x') m r + x'  (skip)  or  g m r    padded step: c' = c, h = 0


def _scan_op():
    """PyTorch's scan operator (a private one: the ONNX exporter writes it as ONNX Scan)."""
    torch_support.require("onnx_export")
    try:
        from torch._higher_order_ops.scan import scan_op
    except ImportError as error:
        raise torch_support.missing("onnx_export", "torch._higher_order_ops.scan.scan_op") \
            from error
    return scan_op


def _direction_scan(u, skip, v, b, c0, m, pad, V, use_tanh, reverse):
    """One direction over time: u (L, B, d, k), skip (L, B, d) or None, v, b (2, d), c0 (B, d),
    m (B, d) or None, pad (L, B, 1) bool or None, V (L, B, d, 2) or None -> (h, c (L, B, d),
    c_last (B, d)), time order kept (``reverse`` runs t = L-1 .. 0)."""
    scan_op = _scan_op()
    xs = [u] + [t for t in (skip, pad, V) if t is not None]
    if reverse:
        xs = [t.flip(0) for t in xs]
    additional = [v, b] + ([m] if m is not None else [])
    has_skip, has_pad, has_V, has_m = skip is not None, pad is not None, V is not None, \
        m is not None

    def step(c, u_t, *rest):
        rest = list(rest)
        skip_t = rest.pop(0) if has_skip else None
        pad_t = rest.pop(0) if has_pad else None
        V_t = rest.pop(0) if has_V else None
        v_, b_ = rest.pop(0), rest.pop(0)
        m_ = rest.pop(0) if has_m else None
        v_f, v_r = v_[0], v_[1]
        if V_t is not None:
            v_f, v_r = v_f + V_t[..., 0], v_r + V_t[..., 1]
        f = torch.sigmoid(u_t[..., 1] + v_f * c + b_[0])
        r = torch.sigmoid(u_t[..., 2] + v_r * c + b_[1])
        c_new = (c - u_t[..., 0]) * f + u_t[..., 0]
        g = torch.tanh(c_new) if use_tanh else c_new
        gate = r if m_ is None else m_ * r
        h = (g - skip_t) * gate + skip_t if skip_t is not None else g * gate
        if pad_t is not None:
            c_new = torch.where(pad_t, c, c_new)
            h = torch.where(pad_t, 0.0, h)
        return [c_new, h, c_new.clone()]  # the carry and its per-step copy must not alias

    c_last, h, c = scan_op(step, [c0], xs, tuple(additional))
    if reverse:
        h, c = h.flip(0), c.flip(0)
    return h, c, c_last


def recurrence_scan(call, arrays):
    """``sru_cupy::recurrence_forward``'s results for ``call`` over ``arrays`` as scans over time
    in standard operations, for ONNX export; inference only: no gradient flows back (the inputs
    are detached; in torch 2.13 the scan's autograd fails on symbolic sizes when the ONNX exporter
    decomposes the graph). ``call`` holds the sizes of the traced example, the arrays' shapes stay
    symbolic."""
    U, x, weight_c, bias, c0, mask_h, V = (None if t is None else t.detach() for t in (
        arrays.get(name) for name in ("U", "x", "weight_c", "bias", "c0", "mask_h", "V")))
    mask_pad = arrays.get("mask_pad")
    dirs, d = call.dirs, call.hidden_size
    L, B = U.shape[0], U.shape[1]
    D = dirs * d
    A = torch.float64 if U.dtype == torch.float64 else torch.float32
    u = U.to(A).reshape(L, B, dirs, d, -1)
    k = U.shape[2] // D
    v = (weight_c.to(A).reshape(2, dirs, d) if weight_c is not None
         else torch.zeros((2, dirs, d), dtype=A, device=U.device))
    b = bias.to(A).reshape(2, dirs, d)
    state0 = (c0.to(A).reshape(B, dirs, d) if c0 is not None
              else torch.zeros((B, dirs, d), dtype=A, device=U.device))
    m = mask_h.to(A).reshape(B, dirs, d) if mask_h is not None else None
    pad = (mask_pad != 0).reshape(L, B, 1) if mask_pad is not None else None
    steps = V.to(A).reshape(L, B, dirs, d, 2) if V is not None else None
    skip = None
    if call.has_skip_term:
        skip = u[..., 3] if k == 4 else x.to(A).reshape(L, B, dirs, d) * call.scale_x
    hs = []
    cs = []
    lasts = []
    for j in range(dirs):
        h_j, c_j, last_j = _direction_scan(
            u[:, :, j].contiguous(), None if skip is None else skip[:, :, j].contiguous(),
            v[:, j], b[:, j], state0[:, j].contiguous(), None if m is None else m[:, j],
            pad, None if steps is None else steps[:, :, j].contiguous(), call.use_tanh, j == 1)
        hs.append(h_j)
        cs.append(c_j)
        lasts.append(last_j)
    h = torch.stack(hs, dim=2).reshape(L, B, D).to(U.dtype)
    c = (torch.stack(cs, dim=2).reshape(L, B, D).to(U.dtype) if call.store_c
         else U.new_empty((0,)))
    c_last = torch.stack(lasts, dim=1).reshape(B, D).to(U.dtype)
    return h, c, c_last
