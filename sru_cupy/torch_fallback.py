"""The SRU recurrence in plain PyTorch operations: the CPU path where no C++ compiler exists.

Vectorized over batch and columns, a loop over time, computing in float32 (float64 for float64
data) like the kernels, with the same outputs as ``sru_cupy::recurrence_forward`` and
``sru_cupy::recurrence_backward``. Both directions run in one loop: the reverse direction's inputs
are flipped in time, so processing step s is time s for direction 0 and L-1-s for direction 1.
"""

import torch


def _processing_order(t, dirs):
    """(L, B, dirs, ...) in time order <-> processing order (an involution)."""
    if dirs == 1:
        return t
    return torch.stack((t[:, :, 0], t[:, :, 1].flip(0)), dim=2)


def _prepare(U, x, weight_c, bias, c0, mask_h, mask_pad, hidden_size, bidirectional,
             has_skip_term, scale_x, V):
    dirs = 2 if bidirectional else 1
    L, B = U.shape[0], U.shape[1]
    d = hidden_size
    D = dirs * d
    k = U.shape[2] // D
    A = torch.float64 if U.dtype == torch.float64 else torch.float32
    u = _processing_order(U.to(A).reshape(L, B, dirs, d, k), dirs)
    if not has_skip_term:
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


def recurrence_forward(U, x, weight_c, bias, c0, mask_h, mask_pad, hidden_size, bidirectional,
                       has_skip_term, use_tanh, scale_x, store_c, V=None):
    dirs, L, B, D, k, A, u, skip, v, b, state, m, pad = _prepare(
        U, x, weight_c, bias, c0, mask_h, mask_pad, hidden_size, bidirectional, has_skip_term,
        scale_x, V)
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
    return (h.to(U.dtype).contiguous(), c.to(U.dtype).contiguous() if store_c else U.new_empty((0,)),
            state.reshape(B, D).to(U.dtype, copy=True).contiguous())


def recurrence_backward(grad_h, grad_c_last, U, x, weight_c, bias, c0, c, mask_h, mask_pad,
                        hidden_size, bidirectional, has_skip_term, use_tanh, scale_x, V=None):
    dirs, L, B, D, k, A, u, skip, v, b, state0, m, pad = _prepare(
        U, x, weight_c, bias, c0, mask_h, mask_pad, hidden_size, bidirectional, has_skip_term,
        scale_x, V)
    d = hidden_size
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
    reads_x = has_skip_term and k == 3
    grad_x = (_processing_order(grad_skip, dirs).reshape(L, B, D) * scale_x).to(U.dtype) \
        if reads_x else U.new_empty((0,))
    if grad_steps is None:
        grad_V = U.new_empty((0,))
    else:  # (L, 2, B, dirs, d) in processing order -> (L, B, D*2) in time order
        grad_V = _processing_order(grad_steps.permute(0, 2, 3, 4, 1), dirs).reshape(L, B, 2 * D)
        grad_V = grad_V.to(U.dtype).contiguous()
    return (grad_U.contiguous(), grad_x.contiguous(), grad_v.sum(1).reshape(2 * D),
            grad_b.sum(1).reshape(2 * D), gc.reshape(B, D).to(U.dtype, copy=True).contiguous(),
            grad_V)
