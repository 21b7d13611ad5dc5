// Host emulation of the CUDA execution model used by the SRU kernels, so that the same .cu sources
// compile with a C++ compiler and run on the CPU.
//
// What is emulated: __global__/__device__ qualifiers, dim3, threadIdx/blockIdx/blockDim/gridDim, and a
// launch that walks the grid. Threads of a block run one after another; blocks run in parallel, with
// OpenMP when it is enabled, else on std::thread workers (compilers without OpenMP, such as the
// ziglang wheel's clang). Both take blocks one at a time from a shared counter. This is faithful only
// for kernels without shared memory, barriers or warp intrinsics, which the SRU kernels do not use
// (each thread owns one column, so which worker runs a block never changes a result).
//
// Launches take kernel parameters the way cuLaunchKernel does: an array of pointers to the values.
#pragma once

#include <cmath>
#include <cstring>
#include <cstddef>
#include <type_traits>
#include <utility>
#ifdef _OPENMP
#include <omp.h>
#else
#include <atomic>
#include <cstdlib>
#include <thread>
#include <vector>
#ifdef __linux__
#include <sched.h>
#endif
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)

struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Per OS thread, as each worker runs its own emulated CUDA threads.
static thread_local uint3 threadIdx;
static thread_local uint3 blockIdx;
static thread_local dim3 blockDim;
static thread_local dim3 gridDim;

using std::exp;
using std::tanh;
using std::nearbyint;

// Vector variants of exp and tanh: glibc's libmvec has them (within 4 ulp, inf, nan and subnormal
// results as the scalar functions) but declares them only under -ffast-math, which would also give
// up IEEE semantics. Declared here, GCC calls them from the lane loops (sru_lanes, compiled with
// -fopenmp-simd) for the instruction set being compiled for. Other compilers call the scalar ones.
// (exp since glibc 2.22, tanh since 2.35.) SRU_HOST_SCALAR_MATH keeps the scalar functions: every
// lane then gives bit for bit what one column per thread gives.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && \
    !defined(SRU_HOST_SCALAR_MATH)
#if __GLIBC_PREREQ(2, 22)
extern "C" __attribute__((simd("notinbranch"))) float expf(float) noexcept;
extern "C" __attribute__((simd("notinbranch"))) double exp(double) noexcept;
#endif
#if __GLIBC_PREREQ(2, 35)
extern "C" __attribute__((simd("notinbranch"))) float tanhf(float) noexcept;
extern "C" __attribute__((simd("notinbranch"))) double tanh(double) noexcept;
#endif
#endif

template <typename... Args, std::size_t... I>
static inline void sru_host_call(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<typename std::remove_reference<Args>::type*>(args[I])...);
}

// Runs block `linear` (x fastest) of kernel<<<grid, block>>>(args...): its threads one after another.
template <typename... Args>
static inline void sru_host_run_block(void (*kernel)(Args...), dim3 grid, dim3 block, void** args,
                                      long long linear) {
    gridDim = grid;
    blockDim = block;
    blockIdx.x = (unsigned int)(linear % grid.x);
    blockIdx.y = (unsigned int)((linear / grid.x) % grid.y);
    blockIdx.z = (unsigned int)(linear / ((long long)grid.x * grid.y));
    for (unsigned int tz = 0; tz < block.z; ++tz)
        for (unsigned int ty = 0; ty < block.y; ++ty)
            for (unsigned int tx = 0; tx < block.x; ++tx) {
                threadIdx.x = tx;
                threadIdx.y = ty;
                threadIdx.z = tz;
                sru_host_call(kernel, args, std::index_sequence_for<Args...>{});
            }
}

// The number of workers a launch may use by default, as OpenMP chooses it: omp_get_max_threads();
// without OpenMP the first value of $OMP_NUM_THREADS, else the cores this process may run on.
static int sru_host_default_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    static const int count = [] {
        if (const char* env = std::getenv("OMP_NUM_THREADS")) {
            const long n = std::strtol(env, nullptr, 10);
            if (n > 0) return (int)(n < 4096 ? n : 4096);
        }
#if defined(__linux__) && defined(CPU_COUNT)
        cpu_set_t set;
        if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
        const unsigned int n = std::thread::hardware_concurrency();
        return n > 0 ? (int)n : 1;
    }();
    return count;
#endif
}

// Runs kernel<<<grid, block>>>(args...) on the calling process, on up to `threads` workers
// (0: sru_host_default_threads()), each taking the next block from a shared counter (OpenMP's
// schedule(dynamic, 1)). Small launches pass 1: waking threads costs more than they save.
template <typename... Args>
static void sru_host_run_grid(void (*kernel)(Args...), dim3 grid, dim3 block, void** args,
                              int threads) {
    const long long blocks = (long long)grid.x * grid.y * grid.z;
    if (threads <= 0) threads = sru_host_default_threads();
    if (threads > blocks) threads = (int)blocks;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
    for (long long linear = 0; linear < blocks; ++linear)
        sru_host_run_block(kernel, grid, block, args, linear);
#else
    std::atomic<long long> next{0};
    auto worker = [&]() {
        for (long long linear; (linear = next.fetch_add(1, std::memory_order_relaxed)) < blocks;)
            sru_host_run_block(kernel, grid, block, args, linear);
    };
    std::vector<std::thread> helpers;
    if (threads > 1) helpers.reserve(threads - 1);
    for (int i = 1; i < threads; ++i) {
        try {
            helpers.emplace_back(worker);
        } catch (...) {  // no more threads to be had: the ones running (and this one) share the rest
            break;
        }
    }
    worker();  // the calling thread is a worker too
    for (std::thread& helper : helpers) helper.join();
#endif
}

// A launchable kernel instantiation, by the name expression NVRTC would be given.
struct sru_host_kernel {
    const char* name;
    void (*launch)(dim3 grid, dim3 block, void** args, int threads);
};

// Defines the C entry point over a table of sru_host_kernel:
//   int sru_host_launch(name, gx, gy, gz, bx, by, bz, args, threads) -> 0, or -1 for an unknown
//   name; threads as for sru_host_run_grid.
#define SRU_HOST_DEFINE_LAUNCH(table)                                                              \
    extern "C" int sru_host_launch(const char* name, unsigned int gx, unsigned int gy,            \
                                   unsigned int gz, unsigned int bx, unsigned int by,             \
                                   unsigned int bz, void** args, int threads) {                   \
        for (std::size_t i = 0; i < sizeof(table) / sizeof(table[0]); ++i)                       \
            if (std::strcmp(table[i].name, name) == 0) {                                          \
                table[i].launch(dim3(gx, gy, gz), dim3(bx, by, bz), args, threads);               \
                return 0;                                                                        \
            }                                                                                    \
        return -1;                                                                               \
    }                                                                                            \
    extern "C" int sru_host_kernel_count() { return (int)(sizeof(table) / sizeof(table[0])); }   \
    extern "C" const char* sru_host_kernel_name(int i) { return table[i].name; }
