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
#include __FILE__
}  // namespace fused
#pragma GCC pop_options
namespace plain {
constexpr bool kFma = false;
#include __FILE__
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

// Entries [0, n) of one leaf: Combine, vectorised task by task over a block.
template <class C>
void TaskSumBlock(const C* p, const C* const* fs, int64_t t_count, const C* alphas, C* out, int64_t n) {
  if (t_count == 1) {
    const C a = alphas[0];
    const C* f = fs[0];
    for (int64_t j = 0; j < n; ++j) out[j] = MulAdd(a, f[j] - p[j], p[j]);
  } else {
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
  bool finite = true;
  for (int64_t j = 0; j < n; ++j) finite &= std::isfinite(out[j]);
  if (finite) return;
  for (int64_t j = 0; j < n; ++j) {  // rare: the overflow rescue, entry by entry
    if (!std::isfinite(out[j])) out[j] = Combine(p[j], fs, j, t_count, alphas, true) * RescueInverse<C>();
  }
}

template <class C>
int TaskSum(int64_t num_leaves, const int64_t* sizes, const void* const* p0, const void* const* fts,
            void* const* out, int64_t num_tasks, const double* alphas_in, int threads) {
  if (num_tasks < 1 || num_leaves < 0) return 1;
  std::vector<C> alphas(num_tasks);
  for (int64_t t = 0; t < num_tasks; ++t) alphas[t] = static_cast<C>(alphas_in[t]);
  std::vector<Unit> units;
  for (int64_t l = 0; l < num_leaves; ++l) {
    for (int64_t b = 0; b < sizes[l]; b += kChunk) units.push_back({l, b, std::min(sizes[l], b + kChunk)});
  }
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    ScopedFlushDenormal flush;
    std::vector<const C*> fs(num_tasks);
    for (int64_t u; (u = next.fetch_add(1)) < static_cast<int64_t>(units.size());) {
      const Unit& w = units[u];
      const C* p = static_cast<const C*>(p0[w.leaf]);
      C* o = static_cast<C*>(out[w.leaf]);
      for (int64_t b = w.begin; b < w.end; b += kBlock) {
        for (int64_t t = 0; t < num_tasks; ++t) fs[t] = static_cast<const C*>(fts[t * num_leaves + w.leaf]) + b;
        TaskSumBlock<C>(p + b, fs.data(), num_tasks, alphas.data(), o + b, std::min(kBlock, w.end - b));
      }
    }
  };
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, units.size())));
  if (nt == 1) {
    work();
    return 0;
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < nt; ++t) pool.emplace_back(work);
  for (auto& th : pool) th.join();
  return 0;
}

#endif  // BCJAX_MERGE_KERNEL_BODY
