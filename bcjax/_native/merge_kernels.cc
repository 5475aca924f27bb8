// Task arithmetic's merge (SPEC §3) on concrete host memory, outside XLA: one call over all
// merged leaves of a model, any leaf sizes (no program per leaf shape, nothing to compile on
// a process's first merge), NumPy buffers and CPU jax.Arrays read in place.
//
//   out = θ0 + Σt αt (θt − θ0)        per entry, in the leaf's dtype (float32 or float64)
//
// with exactly the roundings of bcjax.merging._weighted_task_sum's XLA kernel, so results are
// bit-identical. IEEE add/sub/mul/fma are correctly rounded and the build passes
// -ffp-contract=off (no -ffast-math), so the only freedom is where products are fused:
// XLA:CPU's LLVM backend always allows contraction, and on FMA hardware every single-use
// product feeding an add or subtract becomes one fused multiply-add. Those fusions are
// written out here explicitly (MulAdd; see Combine for the exact expression), in a copy of
// the kernel compiled for FMA hardware and chosen at run time, the plain form elsewhere.
// Entries whose result is not finite are recomputed from inputs scaled by s = 2^-32 and
// multiplied by 2^32 (bcjax.merging._finite_or_rescaled, the overflow rescue); non-finite
// inputs propagate as they do in XLA (τ = NaN/Inf makes the sum non-finite); denormals are
// flushed to zero, as XLA:CPU does.
//
// Plain C ABI (ctypes), called with the GIL released; work is split into chunks over threads.
#ifndef BCJAX_MERGE_KERNEL_BODY
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace {

// Denormal inputs read as zero and denormal results flushed to zero while a kernel runs, as
// XLA:CPU's threads compute (tsl::port::ScopedFlushDenormal); the caller's mode is restored.
class ScopedFlushDenormal {
 public:
#if defined(__x86_64__) || defined(__i386__)
  ScopedFlushDenormal() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~ScopedFlushDenormal() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#elif defined(__aarch64__)
  ScopedFlushDenormal() {
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved_));
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_ | (1ull << 24)));  // FZ
  }
  ~ScopedFlushDenormal() { __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_)); }

 private:
  unsigned long long saved_;
#endif
};

constexpr int64_t kBlock = 1024;     // elements per inner block (accumulator in L1)
constexpr int64_t kChunk = 1 << 16;  // elements per unit of work handed to a thread

struct Unit {
  int64_t leaf, begin, end;
};

}  // namespace

#define BCJAX_MERGE_KERNEL_BODY
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace fused {
constexpr bool kFma = true;
#include "merge_kernels.cc"  // this file, second part (BCJAX_MERGE_KERNEL_BODY)
}  // namespace fused
#pragma GCC pop_options
namespace plain {
constexpr bool kFma = false;
#include "merge_kernels.cc"  // this file, second part (BCJAX_MERGE_KERNEL_BODY)
}  // namespace plain
#undef BCJAX_MERGE_KERNEL_BODY

namespace {

#if defined(__x86_64__) || defined(__i386__)
bool HostHasFma() { return __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2"); }
#elif defined(__aarch64__)
bool HostHasFma() { return true; }
#else
bool HostHasFma() { return false; }
#endif

}  // namespace

extern "C" {

// 1 when this host takes the fused (FMA) form, as XLA:CPU's code for it does.
int64_t bcjax_task_sum_uses_fma() { return HostHasFma() ? 1 : 0; }

// θ0 + Σt αt (θt − θ0) for L leaves: p0[l], fts[t * L + l] and out[l] point to sizes[l]
// contiguous elements (float32 when double_precision == 0, float64 otherwise); alphas[t] is
// the float32 value of αt, passed as a double (exact). Returns 0 on success.
int bcjax_task_sum(int64_t num_leaves, const int64_t* sizes, const void* const* p0, const void* const* fts,
                   void* const* out, int64_t num_tasks, const double* alphas, int64_t double_precision,
                   int64_t threads) {
  const int th = static_cast<int>(threads);
  if (HostHasFma()) {
    return double_precision ? fused::TaskSum<double>(num_leaves, sizes, p0, fts, out, num_tasks, alphas, th)
                            : fused::TaskSum<float>(num_leaves, sizes, p0, fts, out, num_tasks, alphas, th);
  }
  return double_precision ? plain::TaskSum<double>(num_leaves, sizes, p0, fts, out, num_tasks, alphas, th)
                          : plain::TaskSum<float>(num_leaves, sizes, p0, fts, out, num_tasks, alphas, th);
}

}  // extern "C"

#else  // BCJAX_MERGE_KERNEL_BODY: the kernel, included twice (kFma true / false)

inline float MulAdd(float a, float b, float c) { return kFma ? __builtin_fmaf(a, b, c) : a * b + c; }
inline double MulAdd(double a, double b, double c) { return kFma ? __builtin_fma(a, b, c) : a * b + c; }

// The largest exponent field among x[0, n): equal to the all-ones field iff some entry is
// NaN or ±Inf (an integer max reduction, which vectorises where a float test would not).
inline uint32_t ExponentMax(const float* x, int64_t n, uint32_t m = 0) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t u;
    __builtin_memcpy(&u, x + j, 4);
    m = std::max(m, u & 0x7f800000u);
  }
  return m;
}
inline uint64_t ExponentMax(const double* x, int64_t n, uint64_t m = 0) {
  for (int64_t j = 0; j < n; ++j) {
    uint64_t u;
    __builtin_memcpy(&u, x + j, 8);
    m = std::max<uint64_t>(m, u & 0x7ff0000000000000ull);
  }
  return m;
}
inline bool AllFinite(const float* x, int64_t n) { return ExponentMax(x, n) != 0x7f800000u; }
inline bool AllFinite(const double* x, int64_t n) { return ExponentMax(x, n) != 0x7ff0000000000000ull; }

template <class C>
constexpr C RescueScale() { return static_cast<C>(1.0 / 4294967296.0); }  // 2^-32, exact
template <class C>
constexpr C RescueInverse() { return static_cast<C>(4294967296.0); }

// One entry of _weighted_task_sum's combine as XLA computes it (zeros + x folded to x), each
// MulAdd a fused multiply-add on FMA hardware:
//   T = 1:  out = fma(α0, τ0, θ0)
//   T ≥ 2:  acc = fma(α0, τ0, α1·τ1),  acc = fma(αt, τt, acc) for t ≥ 2,  out = θ0 + acc
// and, for the overflow rescue (scaled), τt = fma(θt, s, −θ0·s) with θ0·s in place of θ0.
template <class C>
inline C Combine(C p, const C* const* fs, int64_t j, int64_t t_count, const C* alphas, bool scaled) {
  const C s = RescueScale<C>();
  const C ps = scaled ? p * s : p;
  auto tau = [&](int64_t t) { return scaled ? MulAdd(fs[t][j], s, -ps) : fs[t][j] - ps; };
  if (t_count == 1) return MulAdd(alphas[0], tau(0), ps);
  C acc = MulAdd(alphas[0], tau(0), alphas[1] * tau(1));
  for (int64_t t = 2; t < t_count; ++t) acc = MulAdd(alphas[t], tau(t), acc);
  return ps + acc;
}

// Combine for a fixed task count T ≥ 2, the task loop unrolled so that the entry loop
// vectorises with all T + 1 input streams read side by side (as XLA's fused loop does).
template <class C, int T>
void TaskSumUnrolled(const C* p, const C* const* fs, const C* alphas, C* out, int64_t n) {
  const C* f[T];
  C a[T];
  for (int t = 0; t < T; ++t) f[t] = fs[t], a[t] = alphas[t];
  for (int64_t j = 0; j < n; ++j) {
    const C pj = p[j];
    C acc = MulAdd(a[0], f[0][j] - pj, a[1] * (f[1][j] - pj));
#pragma GCC unroll 16
    for (int t = 2; t < T; ++t) acc = MulAdd(a[t], f[t][j] - pj, acc);
    out[j] = pj + acc;
  }
}

constexpr int64_t kUnrolledTasks = 16;

template <class C, int T = 2>
void FixedTaskSum(int64_t t_count, const C* p, const C* const* fs, const C* alphas, C* out, int64_t n) {
  if constexpr (T <= kUnrolledTasks) {
    if (t_count == T) return TaskSumUnrolled<C, T>(p, fs, alphas, out, n);
    return FixedTaskSum<C, T + 1>(t_count, p, fs, alphas, out, n);
  }
}

// Entries [0, n) of one leaf: Combine, vectorised.
template <class C>
void TaskSumBlock(const C* p, const C* const* fs, int64_t t_count, const C* alphas, C* out, int64_t n) {
  if (t_count == 1) {
    const C a = alphas[0];
    const C* f = fs[0];
    for (int64_t j = 0; j < n; ++j) out[j] = MulAdd(a, f[j] - p[j], p[j]);
  } else if (t_count <= kUnrolledTasks) {  // entry by entry, all T + 1 streams read together
    FixedTaskSum<C>(t_count, p, fs, alphas, out, n);
  } else {  // task by task over the block
    C acc[kBlock];
    const C a0 = alphas[0], a1 = alphas[1];
    const C *f0 = fs[0], *f1 = fs[1];
    for (int64_t j = 0; j < n; ++j) acc[j] = MulAdd(a0, f0[j] - p[j], a1 * (f1[j] - p[j]));
    for (int64_t t = 2; t < t_count; ++t) {
      const C a = alphas[t];
      const C* f = fs[t];
      for (int64_t j = 0; j < n; ++j) acc[j] = MulAdd(a, f[j] - p[j], acc[j]);
    }
    for (int64_t j = 0; j < n; ++j) out[j] = p[j] + acc[j];
  }
  if (AllFinite(out, n)) return;
  for (int64_t j = 0; j < n; ++j) {  // rare: the overflow rescue, entry by entry
    if (!std::isfinite(out[j])) out[j] = Combine(p[j], fs, j, t_count, alphas, true) * RescueInverse<C>();
  }
}

// Runs unit(leaf, begin, end) over every leaf's entries in chunks of at most kChunk, handed
// to up to ``threads`` threads, denormals flushed in each.
template <class Unit_fn>
void ForEachUnit(int64_t num_leaves, const int64_t* sizes, int threads, Unit_fn unit) {
  std::vector<Unit> units;
  for (int64_t l = 0; l < num_leaves; ++l) {
    for (int64_t b = 0; b < sizes[l]; b += kChunk) units.push_back({l, b, std::min(sizes[l], b + kChunk)});
  }
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    ScopedFlushDenormal flush;
    for (int64_t u; (u = next.fetch_add(1)) < static_cast<int64_t>(units.size());) {
      unit(units[u].leaf, units[u].begin, units[u].end);
    }
  };
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, units.size())));
  if (nt == 1) return work();
  std::vector<std::thread> pool;
  for (int t = 0; t < nt; ++t) pool.emplace_back(work);
  for (auto& th : pool) th.join();
}

template <class C>
int TaskSum(int64_t num_leaves, const int64_t* sizes, const void* const* p0, const void* const* fts,
            void* const* out, int64_t num_tasks, const double* alphas_in, int threads) {
  if (num_tasks < 1 || num_leaves < 0) return 1;
  std::vector<C> alphas(num_tasks);
  for (int64_t t = 0; t < num_tasks; ++t) alphas[t] = static_cast<C>(alphas_in[t]);
  ForEachUnit(num_leaves, sizes, threads, [&](int64_t l, int64_t begin, int64_t end) {
    std::vector<const C*> fs(num_tasks);
    for (int64_t b = begin; b < end; b += kBlock) {
      for (int64_t t = 0; t < num_tasks; ++t) fs[t] = static_cast<const C*>(fts[t * num_leaves + l]) + b;
      TaskSumBlock<C>(static_cast<const C*>(p0[l]) + b, fs.data(), num_tasks, alphas.data(),
                      static_cast<C*>(out[l]) + b, std::min(kBlock, end - b));
    }
  });
  return 0;
}

#endif  // BCJAX_MERGE_KERNEL_BODY
