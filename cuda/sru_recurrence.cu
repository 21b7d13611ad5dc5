// SRU elementwise recurrence: forward (training and inference) and backward.
//
// After the one GEMM U = x W over all steps, everything left is elementwise and serial only along
// time, independently for each column (b, dir, j): b < B, dir < dirs, j < d, D = dirs * d.
// One thread runs N consecutive columns through time (template parameter N). The GPU build uses
// N = 1: neighbouring threads then read neighbouring columns, so loads coalesce. The host build uses
// N > 1 and interleaves the columns step by step, so a CPU core overlaps N independent dependency
// chains (exp, divide) instead of waiting on one.
//
// Layouts (row-major, every array contiguous):
//   u        (L, B, D, K)  slot 0: u0 candidate, 1: u1 forget, 2: u2 reset, 3: u3 learned skip (K = 4)
//   x        (L, B, D)     skip input when K = 3 (x' = scale_x * x)
//   h, c     (L, B, D)     outputs; c is the state after every step (kept for backward)
//   c0, c_last, mask_h     (B, D)
//   weight_c, bias         (2, D): forget values then reset values, in the arithmetic type A
//   V        (L, B, D, 2)  optional per-step offsets of weight_c (forget, reset) for each column:
//                          the gates then use weight_c + V_t (a transform module's second output)
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

// Where a column's inputs are at its next processed step, and how far one processed step moves.
template <typename T>
struct sru_input_cursor {
    const T* up;                // u (K values)
    const T* xp;                // x; null unless the skip term reads x (K = 3 with skip)
    const unsigned char* padp;  // mask_pad; null without padding
    const T* vp;                // V (2 values); null without per-step weight_c offsets
    long long step;             // elements of (L, B, D) per processed step: +-B*D
    long long pad_step;         // elements of mask_pad (L, B) per processed step: +-B
};

template <typename T, int K, bool WITH_V>
__device__ __forceinline__ void sru_advance(sru_input_cursor<T>& in, int steps)
{
    in.up += steps * in.step * K;
    if (in.xp) in.xp += steps * in.step;
    if (in.padp) in.padp += steps * in.pad_step;
    if (WITH_V) in.vp += steps * in.step * 2;
}

// Where one column sits: its constants, and a cursor at its first processed step (t0 = 0, or L - 1
// when walking time down). Returns that step's element offset in (L, B, D), or -1 for a column
// past the last one (col >= B * D).
template <typename T, int K>
__device__ __forceinline__ long long sru_locate_column(
    const T* __restrict__ u, const T* __restrict__ x, const unsigned char* __restrict__ mask_pad,
    const typename sru_acc<T>::type* __restrict__ weight_c, const T* __restrict__ V,
    const typename sru_acc<T>::type* __restrict__ bias,
    const typename sru_acc<T>::type* __restrict__ mask_h, long long length, long long batch,
    int d, int dirs, int flags, long long col, bool backwards,
    sru_column<typename sru_acc<T>::type>& column, sru_input_cursor<T>& in)
{
    typedef typename sru_acc<T>::type A;
    const long long D = (long long)dirs * d;
    const long long ncols = batch * D;
    if (col >= ncols) return -1;
    const long long b = col / D;
    const long long unit = col - b * D;
    // Direction 1 runs time backwards; the backward pass walks each direction the other way.
    const bool time_down = (unit >= d) != backwards;
    const long long t0 = time_down ? length - 1 : 0;
    column.skip = (flags & SRU_FLAG_SKIP) != 0;
    column.use_tanh = (flags & SRU_FLAG_TANH) != 0;
    column.v_f = weight_c ? weight_c[unit] : A(0);
    column.v_r = weight_c ? weight_c[unit + D] : A(0);
    column.b_f = bias[unit];
    column.b_r = bias[unit + D];
    column.m = mask_h ? mask_h[col] : A(1);
    const long long first = t0 * ncols + col;
    in.up = u + first * K;
    in.xp = (column.skip && K == 3) ? x + first : 0;
    in.padp = mask_pad ? mask_pad + t0 * batch + b : 0;
    in.vp = V ? V + first * 2 : 0;
    in.step = time_down ? -ncols : ncols;
    in.pad_step = time_down ? -batch : batch;
    return first;
}

// The inputs of one step, loaded before they are needed. x' is scale_x * x (K = 3 with skip),
// u3 (K = 4) or unused.
template <typename A>
struct sru_step_inputs {
    A u0, u1, u2, skip_in;
    bool pad;
};

// The inputs i processed steps past the cursor.
template <typename T, int K>
__device__ __forceinline__ sru_step_inputs<typename sru_acc<T>::type> sru_load_step(
    const sru_input_cursor<T>& at, int i, typename sru_acc<T>::type scale_x)
{
    typedef typename sru_acc<T>::type A;
    const T* up = at.up + i * at.step * K;
    const T* xp = at.xp ? at.xp + i * at.step : 0;
    const unsigned char* padp = at.padp ? at.padp + i * at.pad_step : 0;
    sru_step_inputs<A> in;
    in.u0 = sru_load(up);
    in.u1 = sru_load(up + 1);
    in.u2 = sru_load(up + 2);
    in.skip_in = K == 4 ? sru_load(up + (K - 1)) : (xp ? scale_x * sru_load(xp) : A(0));
    in.pad = padp != 0 && *padp != 0;
    return in;
}

// The gate coefficients of one step: weight_c, plus the step's offsets V_t when V is given (vp not
// null). V is read here, not prefetched with U. The kernels run steps with V (a rare option) through
// their own instantiation of the step loops (WITH_V) without prefetching, so that the common path
// keeps its register count.
template <typename T>
__device__ __forceinline__ void sru_step_weights(const sru_column<typename sru_acc<T>::type>& col,
                                                 const T* vp, typename sru_acc<T>::type& v_f,
                                                 typename sru_acc<T>::type& v_r)
{
    v_f = col.v_f;
    v_r = col.v_r;
    if (vp) {
        v_f += sru_load(vp);
        v_r += sru_load(vp + 1);
    }
}

// Forward of one step: updates the state and returns h_t. v_f, v_r are weight_c (+ V_t).
//   f_t = sigmoid(u1_t + v_f c_{t-1} + b_f)      r_t = sigmoid(u2_t + v_r c_{t-1} + b_r)
//   c_t = f_t c_{t-1} + (1 - f_t) u0_t           g_t = c_t or tanh(c_t)
//   h_t = (g_t - x'_t) m r_t + x'_t  (skip)   or   h_t = g_t m r_t  (no skip)
// A padded step keeps c and gives h_t = 0.
template <typename T>
__device__ __forceinline__ typename sru_acc<T>::type sru_forward_step(
    const sru_column<typename sru_acc<T>::type>& col,
    const sru_step_inputs<typename sru_acc<T>::type>& in, const T* vp,
    typename sru_acc<T>::type& state)
{
    typedef typename sru_acc<T>::type A;
    if (in.pad) return A(0);
    A v_f, v_r;
    sru_step_weights(col, vp, v_f, v_r);
    const A f = sru_sigmoid(in.u1 + v_f * state + col.b_f);
    const A r = sru_sigmoid(in.u2 + v_r * state + col.b_r);
    state = (state - in.u0) * f + in.u0;
    const A g = col.use_tanh ? sru_tanh(state) : state;
    return col.skip ? (g - in.skip_in) * col.m * r + in.skip_in : g * col.m * r;
}

// One column of the forward pass: constants, state and pointers at its next processed step.
template <typename T>
struct sru_forward_column {
    typedef typename sru_acc<T>::type A;
    sru_column<A> column;
    A state;
    sru_input_cursor<T> in;
    T* hp;
    T* cp;                       // null for inference
};

// Runs P steps of each of the n (<= N) columns: the P steps' inputs of every column are loaded,
// then each step is computed for every column in turn, so the N dependency chains interleave.
// `more`: steps remain after these, so the pointers move on (past the last step they would point
// outside the arrays).
template <typename T, int K, int N, int P, bool WITH_V>
__device__ __forceinline__ void sru_forward_steps(sru_forward_column<T> (&cols)[N], int n,
                                                  typename sru_acc<T>::type scale_x, bool more)
{
    typedef typename sru_acc<T>::type A;
    sru_step_inputs<A> in[N][P];
#pragma unroll
    for (int j = 0; j < N; ++j) {
        if (j >= n) break;
        const sru_forward_column<T>& q = cols[j];
#pragma unroll
        for (int i = 0; i < P; ++i)
            in[j][i] = sru_load_step<T, K>(q.in, i, scale_x);
    }
#pragma unroll
    for (int i = 0; i < P; ++i) {
#pragma unroll
        for (int j = 0; j < N; ++j) {
            if (j >= n) break;
            sru_forward_column<T>& q = cols[j];
            const T* vp = WITH_V ? q.in.vp + i * q.in.step * 2 : 0;
            sru_store(q.hp + i * q.in.step, sru_forward_step(q.column, in[j][i], vp, q.state));
            if (q.cp) sru_store(q.cp + i * q.in.step, q.state);
        }
    }
    if (!more) return;
#pragma unroll
    for (int j = 0; j < N; ++j) {
        if (j >= n) break;
        sru_forward_column<T>& q = cols[j];
        sru_advance<T, K, WITH_V>(q.in, P);
        q.hp += P * q.in.step;
        if (q.cp) q.cp += P * q.in.step;
    }
}

// Forward kernel: writes h (L, B, D), c (L, B, D; null for inference) and c_last (B, D).
// V (L, B, D, 2) may be null (no per-step offsets of weight_c).
// Thread i runs columns i*N .. i*N+N-1; steps are taken P at a time, then one at a time (one at a
// time throughout with V).
template <typename T, int K, int N>
__global__ void sru_recurrence_forward(
    T* __restrict__ h,
    T* __restrict__ c,
    T* __restrict__ c_last,
    const T* __restrict__ u,
    const T* __restrict__ x,
    const typename sru_acc<T>::type* __restrict__ weight_c,
    const T* __restrict__ V,
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
    const long long first_col = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N;
    sru_forward_column<T> cols[N];
    int n = 0;  // columns this thread runs: N, fewer in the last thread, 0 past the end
#pragma unroll
    for (int j = 0; j < N; ++j) {
        sru_forward_column<T>& q = cols[j];
        const long long col = first_col + j;
        const long long first = sru_locate_column<T, K>(u, x, mask_pad, weight_c, V, bias, mask_h,
                                                        length, batch, d, dirs, flags, col, false,
                                                        q.column, q.in);
        if (first < 0) break;
        q.state = c0 ? sru_load(c0 + col) : A(0);
        q.hp = h + first;
        q.cp = c ? c + first : 0;
        ++n;
    }
    if (n == 0) return;
    long long s = 0;
    if (V) {
        for (; s < length; ++s) sru_forward_steps<T, K, N, 1, true>(cols, n, scale_x, s + 1 < length);
    } else {
        for (; s + P <= length; s += P)
            sru_forward_steps<T, K, N, P, false>(cols, n, scale_x, s + P < length);
        for (; s < length; ++s) sru_forward_steps<T, K, N, 1, false>(cols, n, scale_x, s + 1 < length);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
        if (j >= n) break;
        sru_store(c_last + first_col + j, cols[j].state);
    }
}

// Partial sums of one column for the parameter gradients, accumulated in A.
template <typename A>
struct sru_param_grads {
    A v_f, v_r, b_f, b_r;
};

// Backward of one step, recomputing f and r from the saved c_{t-1}, v_f and v_r being weight_c
// (+ V_t). With gh = dL/dh_t and gc = dL/dc_t carried from the later step (dL/dc_last at the start):
//   dr      = gh (g_t - x'_t) m       (skip)   or   gh g_t m
//   du2     = dr r (1 - r)
//   dc      = gh m r g'(c_t) + gc      g' = 1, or 1 - tanh^2(c_t)
//   du1     = dc (c_{t-1} - u0_t) f (1 - f)
//   du0     = dc (1 - f)
//   dx'     = gh (1 - m r)             (du3 when K = 4; grad_x = scale_x dx' when K = 3)
//   gc_prev = dc f + du1 v_f + du2 v_r   (dL/dc_{t-1})
//   dv_f += du1 c_{t-1}, dv_r += du2 c_{t-1}, db_f += du1, db_r += du2
//   dV_t = (du1 c_{t-1}, du2 c_{t-1})   (the step's terms of dv_f, dv_r; written when V is given)
// A padded step has zero input gradients and passes gc through unchanged.
template <typename T, int K>
__device__ __forceinline__ void sru_backward_step(
    const sru_column<typename sru_acc<T>::type>& col,
    const sru_step_inputs<typename sru_acc<T>::type>& in,
    typename sru_acc<T>::type c_prev, typename sru_acc<T>::type c_cur, typename sru_acc<T>::type gh,
    typename sru_acc<T>::type scale_x, typename sru_acc<T>::type& gc,
    sru_param_grads<typename sru_acc<T>::type>& grads, const T* vp, T* gup, T* gxp, T* gvp)
{
    typedef typename sru_acc<T>::type A;
    A du0 = A(0), du1 = A(0), du2 = A(0), dskip = A(0);
    if (!in.pad) {
        A v_f, v_r;
        sru_step_weights(col, vp, v_f, v_r);
        const A f = sru_sigmoid(in.u1 + v_f * c_prev + col.b_f);
        const A r = sru_sigmoid(in.u2 + v_r * c_prev + col.b_r);
        const A g = col.use_tanh ? sru_tanh(c_cur) : c_cur;
        const A dr = col.skip ? gh * (g - in.skip_in) * col.m : gh * g * col.m;
        du2 = dr * r * (A(1) - r);
        const A dg = gh * col.m * r;
        const A dc = (col.use_tanh ? dg * (A(1) - g * g) : dg) + gc;
        du1 = dc * (c_prev - in.u0) * f * (A(1) - f);
        du0 = dc * (A(1) - f);
        dskip = col.skip ? gh * (A(1) - col.m * r) : A(0);
        gc = dc * f + du1 * v_f + du2 * v_r;
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
    if (gvp) {
        sru_store(gvp, du1 * c_prev);
        sru_store(gvp + 1, du2 * c_prev);
    }
}

// One column of the backward pass: constants, carried dL/dc, partial sums and pointers at its
// next step to process (processing runs against time).
template <typename T>
struct sru_backward_column {
    typedef typename sru_acc<T>::type A;
    sru_column<A> column;
    A initial;                   // c0 (the state before the first forward step)
    A gc;                        // dL/dc of the step last processed
    sru_param_grads<A> grads;
    sru_input_cursor<T> in;      // one processed step further is one forward step back
    const T* cp;
    const T* ghp;
    T* gup;
    T* gxp;                      // null unless grad_x is written
    T* gvp;                      // grad_V; null without V
};

// Runs P steps of each of the n (<= N) columns, `remaining` being the steps not yet processed (the
// current one is forward step number remaining - 1, whose c_{t-1} is c0 when it is the first).
// The pointers move on only while steps remain after these.
template <typename T, int K, int N, int P, bool WITH_V>
__device__ __forceinline__ void sru_backward_steps(sru_backward_column<T> (&cols)[N], int n,
                                                   long long remaining,
                                                   typename sru_acc<T>::type scale_x)
{
    typedef typename sru_acc<T>::type A;
    sru_step_inputs<A> in[N][P];
    A c_cur[N][P], c_prev[N][P], gh[N][P];
#pragma unroll
    for (int j = 0; j < N; ++j) {
        if (j >= n) break;
        const sru_backward_column<T>& q = cols[j];
#pragma unroll
        for (int i = 0; i < P; ++i) {
            const long long step = q.in.step;
            in[j][i] = sru_load_step<T, K>(q.in, i, scale_x);
            c_cur[j][i] = sru_load(q.cp + i * step);
            c_prev[j][i] = remaining - i > 1 ? sru_load(q.cp + (i + 1) * step) : q.initial;
            gh[j][i] = sru_load(q.ghp + i * step);
        }
    }
#pragma unroll
    for (int i = 0; i < P; ++i) {
#pragma unroll
        for (int j = 0; j < N; ++j) {
            if (j >= n) break;
            sru_backward_column<T>& q = cols[j];
            const long long step = q.in.step;
            sru_backward_step<T, K>(q.column, in[j][i], c_prev[j][i], c_cur[j][i], gh[j][i], scale_x,
                                    q.gc, q.grads, WITH_V ? q.in.vp + i * step * 2 : 0,
                                    q.gup + i * step * K, q.gxp ? q.gxp + i * step : 0,
                                    WITH_V ? q.gvp + i * step * 2 : 0);
        }
    }
    if (remaining == P) return;
#pragma unroll
    for (int j = 0; j < N; ++j) {
        if (j >= n) break;
        sru_backward_column<T>& q = cols[j];
        const long long step = q.in.step;
        sru_advance<T, K, WITH_V>(q.in, P);
        q.cp += P * step;
        q.ghp += P * step;
        q.gup += P * step * K;
        if (q.gxp) q.gxp += P * step;
        if (WITH_V) q.gvp += P * step * 2;
    }
}

// Backward kernel, in reverse processing order. Writes grad_u (L, B, D, K), grad_x (L, B, D; null
// unless the skip term reads x, i.e. K = 3 with skip), grad_c0 (B, D), and per-column partial sums
// grad_weight_c, grad_bias (2, B, D) that the caller sums over B, and grad_V (L, B, D, 2) when V
// is given (null otherwise). grad_c_last may be null (zero).
// Thread i runs columns i*N .. i*N+N-1, as in the forward kernel.
template <typename T, int K, int N>
__global__ void sru_recurrence_backward(
    T* __restrict__ grad_u,
    T* __restrict__ grad_x,
    typename sru_acc<T>::type* __restrict__ grad_weight_c,
    typename sru_acc<T>::type* __restrict__ grad_bias,
    T* __restrict__ grad_c0,
    T* __restrict__ grad_V,
    const T* __restrict__ u,
    const T* __restrict__ x,
    const typename sru_acc<T>::type* __restrict__ weight_c,
    const T* __restrict__ V,
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
    const long long first_col = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N;
    sru_backward_column<T> cols[N];
    int n = 0;  // columns this thread runs: N, fewer in the last thread, 0 past the end
#pragma unroll
    for (int j = 0; j < N; ++j) {
        sru_backward_column<T>& q = cols[j];
        const long long col = first_col + j;
        // Start at the last processed forward step: time goes down for direction 0, up for 1.
        const long long first = sru_locate_column<T, K>(u, x, mask_pad, weight_c, V, bias, mask_h,
                                                        length, batch, d, dirs, flags, col, true,
                                                        q.column, q.in);
        if (first < 0) break;
        q.initial = c0 ? sru_load(c0 + col) : A(0);
        q.gc = grad_c_last ? sru_load(grad_c_last + col) : A(0);
        q.grads.v_f = q.grads.v_r = q.grads.b_f = q.grads.b_r = A(0);
        q.cp = c + first;
        q.ghp = grad_h + first;
        q.gup = grad_u + first * K;
        q.gxp = grad_x ? grad_x + first : 0;
        q.gvp = V ? grad_V + first * 2 : 0;
        ++n;
    }
    if (n == 0) return;
    long long remaining = length;  // steps not yet processed
    if (V) {
        for (; remaining > 0; --remaining)
            sru_backward_steps<T, K, N, 1, true>(cols, n, remaining, scale_x);
    } else {
        for (; remaining >= P; remaining -= P)
            sru_backward_steps<T, K, N, P, false>(cols, n, remaining, scale_x);
        for (; remaining > 0; --remaining)
            sru_backward_steps<T, K, N, 1, false>(cols, n, remaining, scale_x);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
        if (j >= n) break;
        const long long col = first_col + j;
        grad_weight_c[col] = cols[j].grads.v_f;
        grad_weight_c[ncols + col] = cols[j].grads.v_r;
        grad_bias[col] = cols[j].grads.b_f;
        grad_bias[ncols + col] = cols[j].grads.b_r;
        sru_store(grad_c0 + col, cols[j].gc);
    }
}
