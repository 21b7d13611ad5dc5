// SRU elementwise recurrence: forward (training and inference) and backward.
//
// After the one GEMM U = x W over all steps, everything left is elementwise and serial only along
// time, independently for each column (b, dir, j): b < B, dir < dirs, j < d, D = dirs * d.
// One thread runs one column through time.
//
// Layouts (row-major, every array contiguous):
//   u        (L, B, D, K)  slot 0: u0 candidate, 1: u1 forget, 2: u2 reset, 3: u3 learned skip (K = 4)
//   x        (L, B, D)     skip input when K = 3 (x' = scale_x * x)
//   h, c     (L, B, D)     outputs; c is the state after every step (kept for backward)
//   c0, c_last, mask_h     (B, D)
//   weight_c, bias         (2, D): forget values then reset values, in the arithmetic type A
//   mask_pad (L, B)        nonzero = padding: the step is skipped (c carries over, h = 0)
// Direction 0 runs t = 0 .. L-1, direction 1 (units d .. 2d-1 of D) runs t = L-1 .. 0.
//
// Storage type T is float, double, sru_half or sru_bfloat16; arithmetic A is float (double for
// double). Indices are 64-bit: L * B * D * K may pass 2^31. No shared memory, barriers or warp
// intrinsics, so the host emulation runs the same source faithfully.
#include "sru_numeric.cuh"

// Option bits of the `flags` argument (uniform across the grid, so the branches do not diverge).
#define SRU_FLAG_SKIP 1  // h has the highway term (1 - r m) x'
#define SRU_FLAG_TANH 2  // g(c) = tanh(c) instead of c

// Steps whose inputs are loaded together before they are used: U and x do not depend on c, so their
// loads are issued back to back and their latencies overlap instead of adding up.
#define SRU_FORWARD_PREFETCH 8
#define SRU_BACKWARD_PREFETCH 4

// Per-column constants of one launch.
template <typename A>
struct sru_column {
    A v_f, v_r, b_f, b_r, m;  // weight_c, bias and the dropout mask of this column
    bool skip, use_tanh;
};

// The column this thread runs: col (of B * D), its batch entry b, its direction, and its
// constants. False for the threads past the last column.
template <typename A>
__device__ __forceinline__ bool sru_thread_column(
    const A* __restrict__ weight_c, const A* __restrict__ bias, const A* __restrict__ mask_h,
    long long batch, int d, int dirs, int flags, long long& col, long long& b, bool& reverse,
    sru_column<A>& column)
{
    const long long D = (long long)dirs * d;
    col = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= batch * D) return false;
    b = col / D;
    const long long unit = col - b * D;
    reverse = unit >= d;
    column.skip = (flags & SRU_FLAG_SKIP) != 0;
    column.use_tanh = (flags & SRU_FLAG_TANH) != 0;
    column.v_f = weight_c ? weight_c[unit] : A(0);
    column.v_r = weight_c ? weight_c[unit + D] : A(0);
    column.b_f = bias[unit];
    column.b_r = bias[unit + D];
    column.m = mask_h ? mask_h[col] : A(1);
    return true;
}

// The inputs of one step, loaded before they are needed. x' is scale_x * x (K = 3 with skip),
// u3 (K = 4) or unused.
template <typename A>
struct sru_step_inputs {
    A u0, u1, u2, skip_in;
    bool pad;
};

template <typename T, int K>
__device__ __forceinline__ sru_step_inputs<typename sru_acc<T>::type> sru_load_step(
    const T* up, const T* xp, const unsigned char* padp, typename sru_acc<T>::type scale_x)
{
    typedef typename sru_acc<T>::type A;
    sru_step_inputs<A> in;
    in.u0 = sru_load(up);
    in.u1 = sru_load(up + 1);
    in.u2 = sru_load(up + 2);
    in.skip_in = K == 4 ? sru_load(up + (K - 1)) : (xp ? scale_x * sru_load(xp) : A(0));
    in.pad = padp != 0 && *padp != 0;
    return in;
}

// Forward of one step: updates the state and returns h_t.
//   f_t = sigmoid(u1_t + v_f c_{t-1} + b_f)      r_t = sigmoid(u2_t + v_r c_{t-1} + b_r)
//   c_t = f_t c_{t-1} + (1 - f_t) u0_t           g_t = c_t or tanh(c_t)
//   h_t = (g_t - x'_t) m r_t + x'_t  (skip)   or   h_t = g_t m r_t  (no skip)
// A padded step keeps c and gives h_t = 0.
template <typename A>
__device__ __forceinline__ A sru_forward_step(const sru_column<A>& col, const sru_step_inputs<A>& in,
                                              A& state)
{
    if (in.pad) return A(0);
    const A f = sru_sigmoid(in.u1 + col.v_f * state + col.b_f);
    const A r = sru_sigmoid(in.u2 + col.v_r * state + col.b_r);
    state = (state - in.u0) * f + in.u0;
    const A g = col.use_tanh ? sru_tanh(state) : state;
    return col.skip ? (g - in.skip_in) * col.m * r + in.skip_in : g * col.m * r;
}

// Forward kernel: writes h (L, B, D), c (L, B, D; null for inference) and c_last (B, D).
// Steps are taken P at a time: the P steps' inputs are loaded, then the P steps are computed.
template <typename T, int K>
__global__ void sru_recurrence_forward(
    T* __restrict__ h,
    T* __restrict__ c,
    T* __restrict__ c_last,
    const T* __restrict__ u,
    const T* __restrict__ x,
    const typename sru_acc<T>::type* __restrict__ weight_c,
    const typename sru_acc<T>::type* __restrict__ bias,
    const T* __restrict__ c0,
    const typename sru_acc<T>::type* __restrict__ mask_h,
    const unsigned char* __restrict__ mask_pad,
    const typename sru_acc<T>::type scale_x,
    const long long length,
    const long long batch,
    const int d,
    const int dirs,
    const int flags)
{
    typedef typename sru_acc<T>::type A;
    const int P = SRU_FORWARD_PREFETCH;
    const long long ncols = batch * dirs * d;
    long long col, b;
    bool reverse;
    sru_column<A> column;
    if (!sru_thread_column(weight_c, bias, mask_h, batch, d, dirs, flags, col, b, reverse, column))
        return;
    // Offsets of this column's first processed step, and strides per processed step.
    const long long t0 = reverse ? length - 1 : 0;
    const long long step = reverse ? -ncols : ncols;
    const long long pad_step = reverse ? -batch : batch;
    const T* up = u + (t0 * ncols + col) * K;
    const T* xp = (column.skip && K == 3) ? x + t0 * ncols + col : 0;
    const unsigned char* padp = mask_pad ? mask_pad + t0 * batch + b : 0;
    T* hp = h + t0 * ncols + col;
    T* cp = c ? c + t0 * ncols + col : 0;

    A state = c0 ? sru_load(c0 + col) : A(0);
    long long s = 0;
    for (; s + P <= length; s += P) {
        sru_step_inputs<A> in[P];
#pragma unroll
        for (int i = 0; i < P; ++i)
            in[i] = sru_load_step<T, K>(up + i * step * K, xp ? xp + i * step : 0,
                                        padp ? padp + i * pad_step : 0, scale_x);
#pragma unroll
        for (int i = 0; i < P; ++i) {
            sru_store(hp + i * step, sru_forward_step(column, in[i], state));
            if (cp) sru_store(cp + i * step, state);
        }
        up += P * step * K;
        if (xp) xp += P * step;
        if (padp) padp += P * pad_step;
        hp += P * step;
        if (cp) cp += P * step;
    }
    for (; s < length; ++s) {
        const sru_step_inputs<A> in = sru_load_step<T, K>(up, xp, padp, scale_x);
        sru_store(hp, sru_forward_step(column, in, state));
        if (cp) sru_store(cp, state);
        up += step * K;
        if (xp) xp += step;
        if (padp) padp += pad_step;
        hp += step;
        if (cp) cp += step;
    }
    sru_store(c_last + col, state);
}

// Partial sums of one column for the parameter gradients, accumulated in A.
template <typename A>
struct sru_param_grads {
    A v_f, v_r, b_f, b_r;
};

// Backward of one step, recomputing f and r from the saved c_{t-1}. With gh = dL/dh_t and
// gc = dL/dc_t carried from the later step (dL/dc_last at the start):
//   dr      = gh (g_t - x'_t) m       (skip)   or   gh g_t m
//   du2     = dr r (1 - r)
//   dc      = gh m r g'(c_t) + gc      g' = 1, or 1 - tanh^2(c_t)
//   du1     = dc (c_{t-1} - u0_t) f (1 - f)
//   du0     = dc (1 - f)
//   dx'     = gh (1 - m r)             (du3 when K = 4; grad_x = scale_x dx' when K = 3)
//   gc_prev = dc f + du1 v_f + du2 v_r   (dL/dc_{t-1})
//   dv_f += du1 c_{t-1}, dv_r += du2 c_{t-1}, db_f += du1, db_r += du2
// A padded step has zero input gradients and passes gc through unchanged.
template <typename T, int K>
__device__ __forceinline__ void sru_backward_step(
    const sru_column<typename sru_acc<T>::type>& col,
    const sru_step_inputs<typename sru_acc<T>::type>& in,
    typename sru_acc<T>::type c_prev, typename sru_acc<T>::type c_cur, typename sru_acc<T>::type gh,
    typename sru_acc<T>::type scale_x, typename sru_acc<T>::type& gc,
    sru_param_grads<typename sru_acc<T>::type>& grads, T* gup, T* gxp)
{
    typedef typename sru_acc<T>::type A;
    A du0 = A(0), du1 = A(0), du2 = A(0), dskip = A(0);
    if (!in.pad) {
        const A f = sru_sigmoid(in.u1 + col.v_f * c_prev + col.b_f);
        const A r = sru_sigmoid(in.u2 + col.v_r * c_prev + col.b_r);
        const A g = col.use_tanh ? sru_tanh(c_cur) : c_cur;
        const A dr = col.skip ? gh * (g - in.skip_in) * col.m : gh * g * col.m;
        du2 = dr * r * (A(1) - r);
        const A dg = gh * col.m * r;
        const A dc = (col.use_tanh ? dg * (A(1) - g * g) : dg) + gc;
        du1 = dc * (c_prev - in.u0) * f * (A(1) - f);
        du0 = dc * (A(1) - f);
        dskip = col.skip ? gh * (A(1) - col.m * r) : A(0);
        gc = dc * f + du1 * col.v_f + du2 * col.v_r;
        grads.b_f += du1;
        grads.b_r += du2;
        grads.v_f += du1 * c_prev;
        grads.v_r += du2 * c_prev;
    }
    sru_store(gup, du0);
    sru_store(gup + 1, du1);
    sru_store(gup + 2, du2);
    if (K == 4) sru_store(gup + (K - 1), dskip);
    if (gxp) sru_store(gxp, scale_x * dskip);
}

// Backward kernel, in reverse processing order. Writes grad_u (L, B, D, K), grad_x (L, B, D; null
// unless the skip term reads x, i.e. K = 3 with skip), grad_c0 (B, D), and per-column partial sums
// grad_weight_c, grad_bias (2, B, D) that the caller sums over B. grad_c_last may be null (zero).
template <typename T, int K>
__global__ void sru_recurrence_backward(
    T* __restrict__ grad_u,
    T* __restrict__ grad_x,
    typename sru_acc<T>::type* __restrict__ grad_weight_c,
    typename sru_acc<T>::type* __restrict__ grad_bias,
    T* __restrict__ grad_c0,
    const T* __restrict__ u,
    const T* __restrict__ x,
    const typename sru_acc<T>::type* __restrict__ weight_c,
    const typename sru_acc<T>::type* __restrict__ bias,
    const T* __restrict__ c0,
    const typename sru_acc<T>::type* __restrict__ mask_h,
    const unsigned char* __restrict__ mask_pad,
    const T* __restrict__ c,
    const T* __restrict__ grad_h,
    const T* __restrict__ grad_c_last,
    const typename sru_acc<T>::type scale_x,
    const long long length,
    const long long batch,
    const int d,
    const int dirs,
    const int flags)
{
    typedef typename sru_acc<T>::type A;
    const int P = SRU_BACKWARD_PREFETCH;
    const long long ncols = batch * dirs * d;
    long long col, b;
    bool reverse;
    sru_column<A> column;
    if (!sru_thread_column(weight_c, bias, mask_h, batch, d, dirs, flags, col, b, reverse, column))
        return;
    const A initial = c0 ? sru_load(c0 + col) : A(0);
    // Walk from the last processed step back to the first: time goes down for direction 0, up for
    // direction 1. `step` moves one processed step back.
    const long long t_last = reverse ? 0 : length - 1;
    const long long step = reverse ? ncols : -ncols;
    const long long pad_step = reverse ? batch : -batch;
    const long long offset = t_last * ncols + col;
    const T* up = u + offset * K;
    const T* xp = (column.skip && K == 3) ? x + offset : 0;
    const unsigned char* padp = mask_pad ? mask_pad + t_last * batch + b : 0;
    const T* cp = c + offset;
    const T* ghp = grad_h + offset;
    T* gup = grad_u + offset * K;
    T* gxp = grad_x ? grad_x + offset : 0;

    A gc = grad_c_last ? sru_load(grad_c_last + col) : A(0);
    sru_param_grads<A> grads = {A(0), A(0), A(0), A(0)};
    long long remaining = length;  // steps not yet processed; the current one is number remaining-1
    for (; remaining >= P; remaining -= P) {
        sru_step_inputs<A> in[P];
        A c_cur[P], c_prev[P], gh[P];
#pragma unroll
        for (int i = 0; i < P; ++i) {
            in[i] = sru_load_step<T, K>(up + i * step * K, xp ? xp + i * step : 0,
                                        padp ? padp + i * pad_step : 0, scale_x);
            c_cur[i] = sru_load(cp + i * step);
            c_prev[i] = remaining - i > 1 ? sru_load(cp + (i + 1) * step) : initial;
            gh[i] = sru_load(ghp + i * step);
        }
#pragma unroll
        for (int i = 0; i < P; ++i)
            sru_backward_step<T, K>(column, in[i], c_prev[i], c_cur[i], gh[i], scale_x, gc, grads,
                                    gup + i * step * K, gxp ? gxp + i * step : 0);
        up += P * step * K;
        if (xp) xp += P * step;
        if (padp) padp += P * pad_step;
        cp += P * step;
        ghp += P * step;
        gup += P * step * K;
        if (gxp) gxp += P * step;
    }
    for (; remaining > 0; --remaining) {
        const sru_step_inputs<A> in = sru_load_step<T, K>(up, xp, padp, scale_x);
        const A c_prev = remaining > 1 ? sru_load(cp + step) : initial;
        sru_backward_step<T, K>(column, in, c_prev, sru_load(cp), sru_load(ghp), scale_x, gc, grads,
                                gup, gxp);
        up += step * K;
        if (xp) xp += step;
        if (padp) padp += pad_step;
        cp += step;
        ghp += step;
        gup += step * K;
        if (gxp) gxp += step;
    }
    grad_weight_c[col] = grads.v_f;
    grad_weight_c[ncols + col] = grads.v_r;
    grad_bias[col] = grads.b_f;
    grad_bias[ncols + col] = grads.b_r;
    sru_store(grad_c0 + col, gc);
}
