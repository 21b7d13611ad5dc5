// Storage types and float conversions shared by the SRU kernels.
//
// The kernels store values as float, double, IEEE half or bfloat16 and compute in float (double for
// double). The 16-bit types are plain 2-byte structs converted here, so the sources need neither
// cuda_fp16.h nor cuda_bf16.h (NVRTC ships neither) and compile unchanged with a host C++ compiler.
#pragma once

struct sru_half { unsigned short bits; };      // IEEE 754 binary16
struct sru_bfloat16 { unsigned short bits; };  // upper half of a binary32

// Arithmetic type for a storage type: float for every type but double.
template <typename T> struct sru_acc { typedef float type; };
template <> struct sru_acc<double> { typedef double type; };

__device__ __forceinline__ unsigned int sru_float_bits(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    unsigned int u;
    memcpy(&u, &f, sizeof(u));
    return u;
#endif
}

__device__ __forceinline__ float sru_bits_float(unsigned int u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
#endif
}

// binary16 -> binary32 (exact).
__device__ __forceinline__ float sru_half_to_float(unsigned short h) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    const unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    const unsigned int exponent = (h >> 10) & 0x1fu;
    const unsigned int mantissa = h & 0x3ffu;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in binary32
        const float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 31) return sru_bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / nan
    return sru_bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#endif
}

// binary32 -> binary16, round to nearest even, overflow to inf, nan kept quiet.
__device__ __forceinline__ unsigned short sru_float_to_half(float f) {
#ifdef __CUDA_ARCH__
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    const unsigned int u = sru_float_bits(f);
    const unsigned int sign = (u >> 16) & 0x8000u;
    const unsigned int magnitude = u & 0x7fffffffu;
    if (magnitude >= 0x7f800000u)  // inf or nan
        return (unsigned short)(sign | (magnitude > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (magnitude >= 0x477ff000u)  // >= 65520 rounds past the largest half (65504)
        return (unsigned short)(sign | 0x7c00u);
    if (magnitude < 0x38800000u) {  // below 2^-14: subnormal half, units of 2^-24
        const float scaled = sru_bits_float(magnitude) * 16777216.0f;  // exact
        return (unsigned short)(sign | (unsigned int)nearbyintf(scaled));  // ties to even
    }
    unsigned int h = ((magnitude >> 23) - 112u) << 10 | ((magnitude >> 13) & 0x3ffu);
    const unsigned int rest = magnitude & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent
    return (unsigned short)(sign | h);
#endif
}

// binary32 -> bfloat16, round to nearest even; nan stays nan.
__device__ __forceinline__ unsigned short sru_float_to_bfloat16(float f) {
    const unsigned int u = sru_float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Load a stored value as its arithmetic type, and store one back.
__device__ __forceinline__ float sru_load(const float* p) { return *p; }
__device__ __forceinline__ double sru_load(const double* p) { return *p; }
__device__ __forceinline__ float sru_load(const sru_half* p) { return sru_half_to_float(p->bits); }
__device__ __forceinline__ float sru_load(const sru_bfloat16* p) {
    return sru_bits_float((unsigned int)p->bits << 16);
}

__device__ __forceinline__ void sru_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void sru_store(double* p, double v) { *p = v; }
__device__ __forceinline__ void sru_store(sru_half* p, float v) { p->bits = sru_float_to_half(v); }
__device__ __forceinline__ void sru_store(sru_bfloat16* p, float v) { p->bits = sru_float_to_bfloat16(v); }

__device__ __forceinline__ float sru_exp(float v) { return expf(v); }
__device__ __forceinline__ double sru_exp(double v) { return exp(v); }
__device__ __forceinline__ float sru_tanh(float v) { return tanhf(v); }
__device__ __forceinline__ double sru_tanh(double v) { return tanh(v); }

// Lanes: W consecutive columns held as one value, so that a CPU core computes them with SIMD
// instructions (W a power of two). sru_lanes<A, W> gives the lane type and the operations the
// kernels need; with W = 1 (the GPU, and scalar columns on the host) they are plain scalars and the
// operations are the scalar ones.
__host__ __device__ constexpr bool sru_is_power_of_two(int n) { return n > 0 && (n & (n - 1)) == 0; }

template <typename A, int W> struct sru_lanes;

template <typename A> struct sru_lanes<A, 1> {
    enum { width = 1 };
    typedef A scalar;
    typedef A type;
    static __device__ __forceinline__ A splat(A a) { return a; }
    // The value at p (one lane: stride unused); store_slots: the K values at p.
    template <int STRIDE, typename T> static __device__ __forceinline__ A load(const T* p) { return sru_load(p); }
    template <int STRIDE, typename T> static __device__ __forceinline__ void store(T* p, A v) { sru_store(p, v); }
    template <int K, typename T> static __device__ __forceinline__ void store_slots(T* p, const A (&in)[K]) {
        for (int s = 0; s < K; ++s) sru_store(p + s, in[s]);
    }
    static __device__ __forceinline__ A exp(A v) { return sru_exp(v); }
    static __device__ __forceinline__ A tanh(A v) { return sru_tanh(v); }
};

#ifndef __CUDA_ARCH__
template <typename A> struct sru_lane_int;
template <> struct sru_lane_int<float> { typedef int type; };
template <> struct sru_lane_int<double> { typedef long long type; };

// Host lanes: a GCC/Clang vector of W values of A. Every operation is lane by lane in IEEE
// arithmetic; exp and tanh go through the loops below, which the compiler turns into calls of the C
// library's vector variants where it knows them (see sru_host_emulation.h), else into one scalar
// call per lane.
template <typename A, int W> struct sru_lanes {
    enum { width = W };
    typedef A scalar;
    typedef A type __attribute__((vector_size(W * sizeof(A))));
    typedef typename sru_lane_int<A>::type mask __attribute__((vector_size(W * sizeof(A))));  // shuffles
    static __forceinline__ type splat(A a) {
        type v;
        for (int j = 0; j < W; ++j) v[j] = a;
        return v;
    }
    // Lane j is the value at p + j * STRIDE.
    template <int STRIDE, typename T> static __forceinline__ type load(const T* p) {
        type v;
        if constexpr (STRIDE == 1 && std::is_same<T, A>::value) {
            memcpy(&v, p, sizeof(v));  // T is A: one vector load
        } else {
            for (int j = 0; j < W; ++j) v[j] = sru_load(p + j * STRIDE);
        }
        return v;
    }
    template <int STRIDE, typename T> static __forceinline__ void store(T* p, const type& v) {
        if constexpr (STRIDE == 1 && std::is_same<T, A>::value) {
            memcpy(p, &v, sizeof(v));
        } else {
            for (int j = 0; j < W; ++j) sru_store(p + j * STRIDE, (A)v[j]);
        }
    }
    // The K values of each of the W columns at p (column j's at p[j * K .. j * K + K)), slot by
    // slot: out[s] lane j = p[j * K + s]. With T = A and GCC, K vector loads and lane shuffles
    // (vpermt2ps and the like) instead of K * W single loads.
    template <int K, typename T> static __forceinline__ void load_slots(const T* p, type (&out)[K]) {
#if defined(__GNUC__) && !defined(__clang__)
        if constexpr (std::is_same<T, A>::value) {
            type block[K];
            memcpy(block, p, sizeof(block));
            deinterleave<K>(block, out, std::make_index_sequence<K>());
            return;
        }
#endif
        for (int s = 0; s < K; ++s)
            for (int j = 0; j < W; ++j) out[s][j] = sru_load(p + j * K + s);
    }
    // The inverse of load_slots: p[j * K + s] = in[s] lane j.
    template <int K, typename T> static __forceinline__ void store_slots(T* p, const type (&in)[K]) {
#if defined(__GNUC__) && !defined(__clang__)
        if constexpr (std::is_same<T, A>::value) {
            type block[K];
            interleave<K>(in, block, std::make_index_sequence<K>());
            memcpy(p, block, sizeof(block));
            return;
        }
#endif
        for (int s = 0; s < K; ++s)
            for (int j = 0; j < W; ++j) sru_store(p + j * K + s, (A)in[s][j]);
    }
#if defined(__GNUC__) && !defined(__clang__)
    // Lane shuffles. A sequence of K * W values is held in src[0 .. K): element e is src[e / W]
    // lane e % W, or, INTERLEAVED, src[e % K] lane e / K (e = j * K + s is lane j of slot s).
    // gather<K, INTERLEAVED, FIRST, STEP> returns the vector whose lane j is element
    // FIRST + j * STEP, by one two-vector shuffle (constant mask) per source vector past the first.
    static constexpr int source_of(int e, int K, bool interleaved) { return interleaved ? e % K : e / W; }
    static constexpr int lane_of(int e, int K, bool interleaved) { return interleaved ? e / K : e % W; }
    // Mask lane j of the shuffle that brings in src[v]: with v = 1 it shuffles src[0] and src[1],
    // after that the result so far (lane j kept) and src[v].
    static constexpr int mask_lane(int e, int v, int j, int K, bool interleaved) {
        return source_of(e, K, interleaved) == v ? W + lane_of(e, K, interleaved)
               : v == 1 ? (source_of(e, K, interleaved) == 0 ? lane_of(e, K, interleaved) : 0)
                        : j;
    }
    template <int K, bool INTERLEAVED, int FIRST, int STEP, int V, std::size_t... J>
    static __forceinline__ mask shuffle_mask(std::index_sequence<J...>) {
        return mask{(typename sru_lane_int<A>::type)mask_lane(FIRST + (int)J * STEP, V, (int)J, K,
                                                              INTERLEAVED)...};
    }
    template <int K, bool INTERLEAVED, int FIRST, int STEP, int V = 1>
    static __forceinline__ type gather(const type (&src)[K], type so_far = type{}) {
        const mask m = shuffle_mask<K, INTERLEAVED, FIRST, STEP, V>(std::make_index_sequence<W>());
        const type out = __builtin_shuffle(V == 1 ? src[0] : so_far, src[V], m);
        if constexpr (V + 1 < K) return gather<K, INTERLEAVED, FIRST, STEP, V + 1>(src, out);
        else return out;
    }
    template <int K, std::size_t... S>
    static __forceinline__ void deinterleave(const type (&block)[K], type (&out)[K], std::index_sequence<S...>) {
        ((out[S] = gather<K, false, (int)S, K>(block)), ...);
    }
    template <int K, std::size_t... V>
    static __forceinline__ void interleave(const type (&in)[K], type (&block)[K], std::index_sequence<V...>) {
        ((block[V] = gather<K, true, (int)V * W, 1>(in)), ...);
    }
#endif
    // f of every lane, as a loop the compiler vectorizes (with the vector variant of f, if known).
    template <typename F> static __forceinline__ type each(const type& v, F f) {
        A in[W], out[W];
        memcpy(in, &v, sizeof(in));
#pragma omp simd
        for (int j = 0; j < W; ++j) out[j] = f(in[j]);
        type r;
        memcpy(&r, out, sizeof(r));
        return r;
    }
    static __forceinline__ type exp(const type& v) { return each(v, [](A a) { return sru_exp(a); }); }
    static __forceinline__ type tanh(const type& v) { return each(v, [](A a) { return sru_tanh(a); }); }
};
#endif

// 1 / (1 + e^-v): exp overflows to inf for v << 0 and the quotient is 0, never nan.
template <typename Lanes>
__device__ __forceinline__ typename Lanes::type sru_sigmoid(typename Lanes::type v)
{
    typedef typename Lanes::scalar A;
    return A(1) / (A(1) + Lanes::exp(-v));
}
