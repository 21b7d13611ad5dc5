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

// 1 / (1 + e^-v): exp overflows to inf for v << 0 and the quotient is 0, never nan.
template <typename A>
__device__ __forceinline__ A sru_sigmoid(A v) { return A(1) / (A(1) + sru_exp(-v)); }
