// SRU elementwise recurrence: forward (training and inference) and backward.
//
// After the one GEMM U = x W over all steps, everything left is elementwise and serial only along
// time, independently for each column (b, dir, j): b < B, dir < dirs, j < d, D = dirs * d.
// One thread runs N consecutive columns through time (template parameter N). The GPU build uses
// N = 1: neighbouring threads then read neighbouring columns, so loads coalesce. The host build uses
// N > 1 (a power of two): when a thread's N columns lie in one direction of one batch element they
// are the lanes of one SIMD value (sru_lanes in sru_numeric.cuh), loaded and stored as vectors and
// computed with vector instructions; otherwise (a thread straddling a direction or batch boundary,
// or the last, partly filled one) its columns run as N scalar columns interleaved step by step.
// The arithmetic is written once for a lane type: plain A on the GPU and for scalar columns.
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
//
// V is a template flag (WITH_V) of both kernels, not a run-time test: the instantiations without it
// have no code for V and keep the register count they had before V existed (ptxas, NVRTC 13.0,
// sm_90: 77-80 for the forward in float, half and bfloat16, against 87-96 with both step loops in
// one kernel). The WITH_V ones take their steps one at a time (V is rare; its loads then need no
// registers held ahead). What a launch passes must match the instantiation, which the launch layer
// ensures (it picks WITH_V exactly when V is given); otherwise the result is still defined: WITH_V
// with a null V runs with zero offsets and writes no grad_V, and an instantiation without WITH_V
// ignores V and grad_V.
//
// Fused multiply-adds: the GPU build lets NVRTC contract a * b + c into one FMA (--fmad=true, said
// explicitly in the compile options): faster, and each contracted operation is rounded once instead
// of twice. The host build compiles with -ffp-contract=off, so that a SIMD lane computes bit for bit
// what a scalar column computes. GPU results therefore differ from the host build's by the rounding
// of the contracted operations, a few ulps per step that the recurrence carries on: GPU-vs-host
// comparisons need a tolerance (relative about 1e-5 in float32 at the tested lengths), not bit
// equality, while host lanes and host scalar columns stay bit-exact.
#include "sru_numeric.cuh"

// Option bits of the `flags` argument (uniform across the grid, so the branches do not diverge).
#define SRU_FLAG_SKIP 1  // h has the highway term (1 - r m) x'
#define SRU_FLAG_TANH 2  // g(c) = tanh(c) instead of c

// Steps whose inputs are loaded together before they are used: U and x do not depend on c, so their
// loads are issued back to back and their latencies overlap instead of adding up.
#define SRU_FORWARD_PREFETCH 8
#define SRU_BACKWARD_PREFETCH 4

// Host lanes: a thread's rows are far apart in memory (one row of W values per array and step, B*D
// values apart), so the CPU's own prefetchers, which stay within a 4 KiB page, do not see the next
// one coming. The kernels ask for the rows this many steps ahead. With 16 lanes they also take steps
// one at a time: loading several steps' inputs up front, as scalar columns do, then only adds
// register spills around the vector exp calls (AVX-512, one core: 2.1 -> 1.6 ns per element
// forward, 3.8 -> 2.3 backward); with 8 (AVX2) loading ahead still pays (3.8 -> 3.5, 5.6 -> 4.8).
#define SRU_HOST_PREFETCH_DISTANCE 16

// Steps a column loads together (P): `prefetch`, but one with 16 host lanes (see above) and in the
// WITH_V instantiations, a rare option, whose registers are then spent on V.
template <typename Lanes, bool WITH_V>
__host__ __device__ constexpr int sru_steps_loaded_together(int prefetch)
{
    return Lanes::width >= 16 || WITH_V ? 1 : prefetch;
}

// Host: asks the CPU to bring the cache lines of p[0 .. values) in (for writing when WRITE).
// Nothing on the GPU.
template <bool WRITE, typename T>
__device__ __forceinline__ void sru_prefetch(const T* p, int values)
{
#ifndef __CUDA_ARCH__
    const char* bytes = (const char*)p;
    const int size = values * (int)sizeof(T);
    for (int offset = 0; offset < size; offset += 64) __builtin_prefetch(bytes + offset, WRITE ? 1 : 0);
    __builtin_prefetch(bytes + size - 1, WRITE ? 1 : 0);
#endif
}

// Per-column constants of one launch (L: the arithmetic type, or lanes of it, one per column).
template <typename L>
struct sru_column {
    L v_f, v_r, b_f, b_r, m;  // weight_c, bias and the dropout mask of this column
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
    if (WITH_V && in.vp) in.vp += steps * in.step * 2;
}

// Where one column sits (or, for lanes, the first of Lanes' W consecutive columns of one direction
// and batch element): its constants, and a cursor at its first processed step (t0 = 0, or L - 1
// when walking time down). Returns that step's element offset in (L, B, D), or -1 for a column
// past the last one (col >= B * D).
template <typename T, int K, typename Lanes>
__device__ __forceinline__ long long sru_locate_column(
    const T* __restrict__ u, const T* __restrict__ x, const unsigned char* __restrict__ mask_pad,
    const typename sru_acc<T>::type* __restrict__ weight_c, const T* __restrict__ V,
    const typename sru_acc<T>::type* __restrict__ bias,
    const typename sru_acc<T>::type* __restrict__ mask_h, long long length, long long batch,
    int d, int dirs, int flags, long long col, bool backwards,
    sru_column<typename Lanes::type>& column, sru_input_cursor<T>& in)
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
    if constexpr (Lanes::width == 1) {  // written as before: the GPU's PTX keeps its register count
        column.v_f = weight_c ? weight_c[unit] : A(0);
        column.v_r = weight_c ? weight_c[unit + D] : A(0);
        column.b_f = bias[unit];
        column.b_r = bias[unit + D];
        column.m = mask_h ? mask_h[col] : A(1);
    } else {  // W consecutive columns of one direction: consecutive parameters
        column.v_f = weight_c ? Lanes::template load<1>(weight_c + unit) : Lanes::splat(A(0));
        column.v_r = weight_c ? Lanes::template load<1>(weight_c + unit + D) : Lanes::splat(A(0));
        column.b_f = Lanes::template load<1>(bias + unit);
        column.b_r = Lanes::template load<1>(bias + unit + D);
        column.m = mask_h ? Lanes::template load<1>(mask_h + col) : Lanes::splat(A(1));
    }
    const long long first = t0 * ncols + col;
    in.up = u + first * K;
    in.xp = (column.skip && K == 3) ? x + first : 0;
    in.padp = mask_pad ? mask_pad + t0 * batch + b : 0;
    in.vp = V ? V + first * 2 : 0;  // the kernels pass null unless WITH_V
    in.step = time_down ? -ncols : ncols;
    in.pad_step = time_down ? -batch : batch;
    return first;
}

// The inputs of one step, loaded before they are needed. x' is scale_x * x (K = 3 with skip),
// u3 (K = 4) or unused.
// L is A or lanes of A; lanes share one batch element, hence one padding flag.
template <typename L>
struct sru_step_inputs {
    L u0, u1, u2, skip_in;
    bool pad;
};

// The inputs i processed steps past the cursor (for lanes, lane j's are the values of the column j
// past the cursor's).
template <typename T, int K, typename Lanes>
__device__ __forceinline__ sru_step_inputs<typename Lanes::type> sru_load_step(
    const sru_input_cursor<T>& at, int i, typename sru_acc<T>::type scale_x)
{
    typedef typename sru_acc<T>::type A;
    const T* up = at.up + i * at.step * K;
    const T* xp = at.xp ? at.xp + i * at.step : 0;
    const unsigned char* padp = at.padp ? at.padp + i * at.pad_step : 0;
    sru_step_inputs<typename Lanes::type> in;
    if constexpr (Lanes::width == 1) {  // as before, for the GPU's register count
        in.u0 = sru_load(up);
        in.u1 = sru_load(up + 1);
        in.u2 = sru_load(up + 2);
        in.skip_in = K == 4 ? sru_load(up + (K - 1)) : (xp ? scale_x * sru_load(xp) : A(0));
    } else {  // the K values of W consecutive columns: K vector loads, then lane shuffles
        typename Lanes::type slots[K];
        Lanes::template load_slots<K>(up, slots);
        in.u0 = slots[0];
        in.u1 = slots[1];
        in.u2 = slots[2];
        in.skip_in = K == 4 ? slots[K - 1] : (xp ? scale_x * Lanes::template load<1>(xp) : Lanes::splat(A(0)));
    }
    in.pad = padp != 0 && *padp != 0;
    return in;
}

// The gate coefficients of one step: weight_c, plus the step's offsets V_t when V is given (vp not
// null; always null in a kernel instantiated without WITH_V, so the test folds away there). V is
// read here, when the step is computed, not loaded ahead with U.
template <typename T, typename Lanes>
__device__ __forceinline__ void sru_step_weights(const sru_column<typename Lanes::type>& col,
                                                 const T* vp, typename Lanes::type& v_f,
                                                 typename Lanes::type& v_r)
{
    v_f = col.v_f;
    v_r = col.v_r;
    if (vp) {
        if constexpr (Lanes::width == 1) {  // as before, for the GPU's register count
            v_f += sru_load(vp);
            v_r += sru_load(vp + 1);
        } else {
            typename Lanes::type offsets[2];
            Lanes::template load_slots<2>(vp, offsets);
            v_f += offsets[0];
            v_r += offsets[1];
        }
    }
}

// Forward of one step: updates the state and returns h_t. v_f, v_r are weight_c (+ V_t).
//   f_t = sigmoid(u1_t + v_f c_{t-1} + b_f)      r_t = sigmoid(u2_t + v_r c_{t-1} + b_r)
//   c_t = f_t c_{t-1} + (1 - f_t) u0_t           g_t = c_t or tanh(c_t)
//   h_t = (g_t - x'_t) m r_t + x'_t  (skip)   or   h_t = g_t m r_t  (no skip)
// A padded step keeps c and gives h_t = 0.
template <typename T, typename Lanes>
__device__ __forceinline__ typename Lanes::type sru_forward_step(
    const sru_column<typename Lanes::type>& col, const sru_step_inputs<typename Lanes::type>& in,
    const T* vp, typename Lanes::type& state)
{
    typedef typename sru_acc<T>::type A;
    typedef typename Lanes::type L;
    if (in.pad) return Lanes::splat(A(0));
    L v_f, v_r;
    sru_step_weights<T, Lanes>(col, vp, v_f, v_r);
    const L f = sru_sigmoid<Lanes>(in.u1 + v_f * state + col.b_f);
    const L r = sru_sigmoid<Lanes>(in.u2 + v_r * state + col.b_r);
    state = (state - in.u0) * f + in.u0;
    const L g = col.use_tanh ? Lanes::tanh(state) : state;
    return col.skip ? (g - in.skip_in) * col.m * r + in.skip_in : g * col.m * r;
}

// One column (or lanes of columns) of the forward pass: constants, state and pointers at its next
// processed step.
template <typename T, typename Lanes>
struct sru_forward_column {
    typedef typename Lanes::type L;
    sru_column<L> column;
    L state;
    sru_input_cursor<T> in;
    T* hp;
    T* cp;                       // null for inference
};

// Host lanes: ask for the rows of U and x `at` elements of (L, B, D) past the cursor (the inputs
// the forward and the backward both read), then, for one column, the rows of the step `ahead`
// processed steps past its cursor, or of its first steps, which no earlier step asked for.
template <int K, typename Lanes, typename T>
__device__ __forceinline__ void sru_prefetch_inputs(const sru_input_cursor<T>& in, long long at)
{
    sru_prefetch<false>(in.up + at * K, Lanes::width * K);
    if (in.xp) sru_prefetch<false>(in.xp + at, Lanes::width);
}

template <int K, typename T, typename Lanes>
__device__ __forceinline__ void sru_prefetch_step(const sru_forward_column<T, Lanes>& q,
                                                  long long ahead)
{
    const long long at = ahead * q.in.step;
    sru_prefetch_inputs<K, Lanes>(q.in, at);
    sru_prefetch<true>(q.hp + at, Lanes::width);
    if (q.cp) sru_prefetch<true>(q.cp + at, Lanes::width);
}

template <int K, typename Column>
__device__ __forceinline__ void sru_prefetch_first_steps(const Column& q, long long length)
{
    for (long long ahead = 0; ahead < SRU_HOST_PREFETCH_DISTANCE && ahead < length; ++ahead)
        sru_prefetch_step<K>(q, ahead);
}

// Runs P steps of each of the n (<= G) columns (lane groups when Lanes has several lanes): the P
// steps' inputs of every column are loaded, then each step is computed for every column in turn, so
// the G dependency chains interleave. `more`: steps remain after these, so the pointers move on
// (past the last step they would point outside the arrays); `left`: how many (host lanes ask for
// the rows ahead while there are some).
template <typename T, int K, int G, int P, bool WITH_V, typename Lanes>
__device__ __forceinline__ void sru_forward_steps(sru_forward_column<T, Lanes> (&cols)[G], int n,
                                                  typename sru_acc<T>::type scale_x, bool more,
                                                  long long left)
{
    typedef typename Lanes::type L;
    if constexpr (Lanes::width > 1) {
        for (int i = 0; i < P; ++i) {
            const long long ahead = i + SRU_HOST_PREFETCH_DISTANCE;
            if (ahead >= P + left) break;
            sru_prefetch_step<K>(cols[0], ahead);
        }
    }
    sru_step_inputs<L> in[G][P];
#pragma unroll
    for (int j = 0; j < G; ++j) {
        if (j >= n) break;
        const sru_forward_column<T, Lanes>& q = cols[j];
#pragma unroll
        for (int i = 0; i < P; ++i)
            in[j][i] = sru_load_step<T, K, Lanes>(q.in, i, scale_x);
    }
#pragma unroll
    for (int i = 0; i < P; ++i) {
#pragma unroll
        for (int j = 0; j < G; ++j) {
            if (j >= n) break;
            sru_forward_column<T, Lanes>& q = cols[j];
            const T* vp = WITH_V && q.in.vp ? q.in.vp + i * q.in.step * 2 : 0;
            Lanes::template store<1>(q.hp + i * q.in.step,
                                     sru_forward_step<T, Lanes>(q.column, in[j][i], vp, q.state));
            if (q.cp) Lanes::template store<1>(q.cp + i * q.in.step, q.state);
        }
    }
    if (!more) return;
#pragma unroll
    for (int j = 0; j < G; ++j) {
        if (j >= n) break;
        sru_forward_column<T, Lanes>& q = cols[j];
        sru_advance<T, K, WITH_V>(q.in, P);
        q.hp += P * q.in.step;
        if (q.cp) q.cp += P * q.in.step;
    }
}

// All steps of the n (<= G) columns: P at a time, then one at a time.
template <typename T, int K, bool WITH_V, int G, typename Lanes>
__device__ __forceinline__ void sru_forward_run(sru_forward_column<T, Lanes> (&cols)[G], int n,
                                                typename sru_acc<T>::type scale_x, long long length)
{
    constexpr int P = sru_steps_loaded_together<Lanes, WITH_V>(SRU_FORWARD_PREFETCH);
    if constexpr (Lanes::width > 1) sru_prefetch_first_steps<K>(cols[0], length);
    long long s = 0;
    for (; s + P <= length; s += P)
        sru_forward_steps<T, K, G, P, WITH_V>(cols, n, scale_x, s + P < length, length - s - P);
    if constexpr (P > 1) {  // the steps left over (none when P = 1)
        for (; s < length; ++s)
            sru_forward_steps<T, K, G, 1, WITH_V>(cols, n, scale_x, s + 1 < length, length - s - 1);
    }
}

// Whether the n columns from first_col are all columns (< B * D) of one direction of one batch
// element: then they are consecutive in every array and share their padding, and run as lanes.
__device__ __forceinline__ bool sru_columns_are_lanes(long long first_col, int n, long long batch,
                                                      int d, int dirs)
{
    const long long D = (long long)dirs * d;
    const long long last = first_col + n - 1;
    if (last >= batch * D) return false;
    const long long b = first_col / D;
    return last / D == b && (first_col - b * D) / d == (last - b * D) / d;
}

// Forward kernel: writes h (L, B, D), c (L, B, D; null for inference) and c_last (B, D).
// V (L, B, D, 2) is read only by the WITH_V instantiations, where a null V means zero offsets.
// Thread i runs columns i*N .. i*N+N-1: on the host as the lanes of one vector where they can be
// (sru_columns_are_lanes), else, as on the GPU, as N scalar columns.
template <typename T, int K, bool WITH_V, int N>
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
    const long long first_col = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (!WITH_V) V = 0;  // a V given to an instantiation without WITH_V is ignored
#ifndef __CUDA_ARCH__
    if constexpr (N > 1 && sru_is_power_of_two(N)) {
        typedef sru_lanes<A, N> Lanes;
        if (sru_columns_are_lanes(first_col, N, batch, d, dirs)) {
            sru_forward_column<T, Lanes> lanes[1];
            sru_forward_column<T, Lanes>& q = lanes[0];
            const long long first = sru_locate_column<T, K, Lanes>(
                u, x, mask_pad, weight_c, V, bias, mask_h, length, batch, d, dirs, flags, first_col,
                false, q.column, q.in);
            q.state = c0 ? Lanes::template load<1>(c0 + first_col) : Lanes::splat(A(0));
            q.hp = h + first;
            q.cp = c ? c + first : 0;
            sru_forward_run<T, K, WITH_V, 1>(lanes, 1, scale_x, length);
            Lanes::template store<1>(c_last + first_col, q.state);
            return;
        }
    }
#endif
    typedef sru_lanes<A, 1> One;
    sru_forward_column<T, One> cols[N];
    int n = 0;  // columns this thread runs: N, fewer in the last thread, 0 past the end
#pragma unroll
    for (int j = 0; j < N; ++j) {
        sru_forward_column<T, One>& q = cols[j];
        const long long col = first_col + j;
        const long long first = sru_locate_column<T, K, One>(u, x, mask_pad, weight_c, V, bias,
                                                             mask_h, length, batch, d, dirs, flags,
                                                             col, false, q.column, q.in);
        if (first < 0) break;
        q.state = c0 ? sru_load(c0 + col) : A(0);
        q.hp = h + first;
        q.cp = c ? c + first : 0;
        ++n;
    }
    if (n == 0) return;
    sru_forward_run<T, K, WITH_V, N>(cols, n, scale_x, length);
#pragma unroll
    for (int j = 0; j < N; ++j) {
        if (j >= n) break;
        sru_store(c_last + first_col + j, cols[j].state);
    }
}

// Partial sums of one column (or lanes of columns) for the parameter gradients, accumulated in A.
template <typename L>
struct sru_param_grads {
    L v_f, v_r, b_f, b_r;
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
template <typename T, int K, typename Lanes>
__device__ __forceinline__ void sru_backward_step(
    const sru_column<typename Lanes::type>& col, const sru_step_inputs<typename Lanes::type>& in,
    typename Lanes::type c_prev, typename Lanes::type c_cur, typename Lanes::type gh,
    typename sru_acc<T>::type scale_x, typename Lanes::type& gc,
    sru_param_grads<typename Lanes::type>& grads, const T* vp, T* gup, T* gxp, T* gvp)
{
    typedef typename sru_acc<T>::type A;
    typedef typename Lanes::type L;
    L du0 = Lanes::splat(A(0)), du1 = du0, du2 = du0, dskip = du0;
    if (!in.pad) {
        L v_f, v_r;
        sru_step_weights<T, Lanes>(col, vp, v_f, v_r);
        const L f = sru_sigmoid<Lanes>(in.u1 + v_f * c_prev + col.b_f);
        const L r = sru_sigmoid<Lanes>(in.u2 + v_r * c_prev + col.b_r);
        const L g = col.use_tanh ? Lanes::tanh(c_cur) : c_cur;
        const L dr = col.skip ? gh * (g - in.skip_in) * col.m : gh * g * col.m;
        du2 = dr * r * (A(1) - r);
        const L dg = gh * col.m * r;
        const L dc = (col.use_tanh ? dg * (A(1) - g * g) : dg) + gc;
        du1 = dc * (c_prev - in.u0) * f * (A(1) - f);
        du0 = dc * (A(1) - f);
        dskip = col.skip ? gh * (A(1) - col.m * r) : Lanes::splat(A(0));
        gc = dc * f + du1 * v_f + du2 * v_r;
        grads.b_f += du1;
        grads.b_r += du2;
        grads.v_f += du1 * c_prev;
        grads.v_r += du2 * c_prev;
    }
    L du[K];  // in grad_u's order: du0, du1, du2 (and du3 = dx' when K = 4)
    du[0] = du0;
    du[1] = du1;
    du[2] = du2;
    if (K == 4) du[K - 1] = dskip;
    Lanes::template store_slots<K>(gup, du);
    if (gxp) Lanes::template store<1>(gxp, scale_x * dskip);
    if (gvp) {
        L dv[2];
        dv[0] = du1 * c_prev;
        dv[1] = du2 * c_prev;
        Lanes::template store_slots<2>(gvp, dv);
    }
}

// One column (or lanes of columns) of the backward pass: constants, carried dL/dc, partial sums and
// pointers at its next step to process (processing runs against time).
template <typename T, typename Lanes>
struct sru_backward_column {
    typedef typename Lanes::type L;
    sru_column<L> column;
    L initial;                   // c0 (the state before the first forward step)
    L gc;                        // dL/dc of the step last processed
    sru_param_grads<L> grads;
    sru_input_cursor<T> in;      // one processed step further is one forward step back
    const T* cp;
    const T* ghp;
    T* gup;
    T* gxp;                      // null unless grad_x is written
    T* gvp;                      // grad_V; null without V
};

// Host lanes: the rows of the backward's step `ahead` processed steps past the column's cursor.
template <int K, typename T, typename Lanes>
__device__ __forceinline__ void sru_prefetch_step(const sru_backward_column<T, Lanes>& q,
                                                  long long ahead)
{
    const long long at = ahead * q.in.step;
    sru_prefetch_inputs<K, Lanes>(q.in, at);
    sru_prefetch<false>(q.cp + at, Lanes::width);
    sru_prefetch<false>(q.ghp + at, Lanes::width);
    sru_prefetch<true>(q.gup + at * K, Lanes::width * K);
    if (q.gxp) sru_prefetch<true>(q.gxp + at, Lanes::width);
}

// Runs P steps of each of the n (<= G) columns, `remaining` being the steps not yet processed (the
// current one is forward step number remaining - 1, whose c_{t-1} is c0 when it is the first).
// The pointers move on only while steps remain after these.
template <typename T, int K, int G, int P, bool WITH_V, typename Lanes>
__device__ __forceinline__ void sru_backward_steps(sru_backward_column<T, Lanes> (&cols)[G], int n,
                                                   long long remaining,
                                                   typename sru_acc<T>::type scale_x)
{
    typedef typename Lanes::type L;
    if constexpr (Lanes::width > 1) {
        for (int i = 0; i < P; ++i) {
            const long long ahead = i + SRU_HOST_PREFETCH_DISTANCE;
            if (ahead >= remaining) break;
            sru_prefetch_step<K>(cols[0], ahead);
        }
    }
    sru_step_inputs<L> in[G][P];
    L c_cur[G][P], c_prev[G][P], gh[G][P];
#pragma unroll
    for (int j = 0; j < G; ++j) {
        if (j >= n) break;
        const sru_backward_column<T, Lanes>& q = cols[j];
#pragma unroll
        for (int i = 0; i < P; ++i) {
            const long long step = q.in.step;
            in[j][i] = sru_load_step<T, K, Lanes>(q.in, i, scale_x);
            c_cur[j][i] = Lanes::template load<1>(q.cp + i * step);
            c_prev[j][i] = remaining - i > 1 ? Lanes::template load<1>(q.cp + (i + 1) * step) : q.initial;
            gh[j][i] = Lanes::template load<1>(q.ghp + i * step);
        }
    }
#pragma unroll
    for (int i = 0; i < P; ++i) {
#pragma unroll
        for (int j = 0; j < G; ++j) {
            if (j >= n) break;
            sru_backward_column<T, Lanes>& q = cols[j];
            const long long step = q.in.step;
            sru_backward_step<T, K, Lanes>(q.column, in[j][i], c_prev[j][i], c_cur[j][i], gh[j][i],
                                           scale_x, q.gc, q.grads,
                                           WITH_V && q.in.vp ? q.in.vp + i * step * 2 : 0,
                                           q.gup + i * step * K, q.gxp ? q.gxp + i * step : 0,
                                           WITH_V && q.gvp ? q.gvp + i * step * 2 : 0);
        }
    }
    if (remaining == P) return;
#pragma unroll
    for (int j = 0; j < G; ++j) {
        if (j >= n) break;
        sru_backward_column<T, Lanes>& q = cols[j];
        const long long step = q.in.step;
        sru_advance<T, K, WITH_V>(q.in, P);
        q.cp += P * step;
        q.ghp += P * step;
        q.gup += P * step * K;
        if (q.gxp) q.gxp += P * step;
        if (WITH_V && q.gvp) q.gvp += P * step * 2;
    }
}

// All steps of the n (<= G) columns, against time: P at a time, then one at a time.
template <typename T, int K, bool WITH_V, int G, typename Lanes>
__device__ __forceinline__ void sru_backward_run(sru_backward_column<T, Lanes> (&cols)[G], int n,
                                                 typename sru_acc<T>::type scale_x,
                                                 long long length)
{
    constexpr int P = sru_steps_loaded_together<Lanes, WITH_V>(SRU_BACKWARD_PREFETCH);
    if constexpr (Lanes::width > 1) sru_prefetch_first_steps<K>(cols[0], length);
    long long remaining = length;  // steps not yet processed
    for (; remaining >= P; remaining -= P)
        sru_backward_steps<T, K, G, P, WITH_V>(cols, n, remaining, scale_x);
    if constexpr (P > 1) {  // the steps left over (none when P = 1)
        for (; remaining > 0; --remaining)
            sru_backward_steps<T, K, G, 1, WITH_V>(cols, n, remaining, scale_x);
    }
}

// Where a column (or lanes of columns) starts in the backward pass: its constants, c0, dL/dc_last
// and the pointers at its first step to process. Returns false for a column past the last one.
template <typename T, int K, typename Lanes>
__device__ __forceinline__ bool sru_backward_locate(
    T* grad_u, T* grad_x, T* grad_V, const T* u, const T* x,
    const typename sru_acc<T>::type* weight_c, const T* V, const typename sru_acc<T>::type* bias,
    const T* c0, const typename sru_acc<T>::type* mask_h, const unsigned char* mask_pad, const T* c,
    const T* grad_h, const T* grad_c_last, long long length, long long batch, int d, int dirs,
    int flags, long long col, sru_backward_column<T, Lanes>& q)
{
    typedef typename sru_acc<T>::type A;
    // Start at the last processed forward step: time goes down for direction 0, up for 1.
    const long long first = sru_locate_column<T, K, Lanes>(u, x, mask_pad, weight_c, V, bias, mask_h,
                                                           length, batch, d, dirs, flags, col, true,
                                                           q.column, q.in);
    if (first < 0) return false;
    q.initial = c0 ? Lanes::template load<1>(c0 + col) : Lanes::splat(A(0));
    q.gc = grad_c_last ? Lanes::template load<1>(grad_c_last + col) : Lanes::splat(A(0));
    q.grads.v_f = q.grads.v_r = q.grads.b_f = q.grads.b_r = Lanes::splat(A(0));
    q.cp = c + first;
    q.ghp = grad_h + first;
    q.gup = grad_u + first * K;
    q.gxp = grad_x ? grad_x + first : 0;
    q.gvp = V && grad_V ? grad_V + first * 2 : 0;
    return true;
}

// The results of a column (or lanes of columns) at the end of the backward pass.
template <typename T, typename Lanes>
__device__ __forceinline__ void sru_backward_finish(const sru_backward_column<T, Lanes>& q,
                                                    long long col, long long ncols,
                                                    typename sru_acc<T>::type* grad_weight_c,
                                                    typename sru_acc<T>::type* grad_bias, T* grad_c0)
{
    Lanes::template store<1>(grad_weight_c + col, q.grads.v_f);
    Lanes::template store<1>(grad_weight_c + ncols + col, q.grads.v_r);
    Lanes::template store<1>(grad_bias + col, q.grads.b_f);
    Lanes::template store<1>(grad_bias + ncols + col, q.grads.b_r);
    Lanes::template store<1>(grad_c0 + col, q.gc);
}

// Backward kernel, in reverse processing order. Writes grad_u (L, B, D, K), grad_x (L, B, D; null
// unless the skip term reads x, i.e. K = 3 with skip), grad_c0 (B, D), and per-column partial sums
// grad_weight_c, grad_bias (2, B, D) that the caller sums over B, and, in the WITH_V instantiations
// when V and grad_V are given, grad_V (L, B, D, 2). grad_c_last may be null (zero).
// Thread i runs columns i*N .. i*N+N-1, as lanes or as scalar columns as in the forward kernel.
template <typename T, int K, bool WITH_V, int N>
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
    const long long ncols = batch * dirs * d;
    const long long first_col = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (!WITH_V) V = 0;  // a V given to an instantiation without WITH_V is ignored (grad_V too)
#ifndef __CUDA_ARCH__
    if constexpr (N > 1 && sru_is_power_of_two(N)) {
        typedef sru_lanes<A, N> Lanes;
        if (sru_columns_are_lanes(first_col, N, batch, d, dirs)) {
            sru_backward_column<T, Lanes> lanes[1];
            sru_backward_locate<T, K, Lanes>(grad_u, grad_x, grad_V, u, x, weight_c, V, bias, c0,
                                             mask_h, mask_pad, c, grad_h, grad_c_last, length,
                                             batch, d, dirs, flags, first_col, lanes[0]);
            sru_backward_run<T, K, WITH_V, 1>(lanes, 1, scale_x, length);
            sru_backward_finish(lanes[0], first_col, ncols, grad_weight_c, grad_bias, grad_c0);
            return;
        }
    }
#endif
    typedef sru_lanes<A, 1> One;
    sru_backward_column<T, One> cols[N];
    int n = 0;  // columns this thread runs: N, fewer in the last thread, 0 past the end
#pragma unroll
    for (int j = 0; j < N; ++j) {
        if (!sru_backward_locate<T, K, One>(grad_u, grad_x, grad_V, u, x, weight_c, V, bias, c0,
                                            mask_h, mask_pad, c, grad_h, grad_c_last, length, batch,
                                            d, dirs, flags, first_col + j, cols[j]))
            break;
        ++n;
    }
    if (n == 0) return;
    sru_backward_run<T, K, WITH_V, N>(cols, n, scale_x, length);
#pragma unroll
    for (int j = 0; j < N; ++j) {
        if (j >= n) break;
        sru_backward_finish(cols[j], first_col + j, ncols, grad_weight_c, grad_bias, grad_c0);
    }
}
