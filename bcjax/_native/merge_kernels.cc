// Merge kernels (SPEC §3) on concrete host memory, outside XLA: one call over all merged
// leaves of a model, any leaf sizes (no program per leaf shape, nothing to compile on a
// process's first merge), NumPy buffers and CPU jax.Arrays read in place.
//
//   task arithmetic:  out = θ0 + Σt αt (θt − θ0)   per entry, float32 or float64
//   TIES (merge pass, thresholds given): trim, elect, disjoint mean (TiesEntry), float32
//   Breadcrumbs (masks given as magnitude-bit bounds): out = θ0 + Σt [lo_t ≤ |τt| < hi_t] αt τt, float32
//
// with exactly the roundings of the XLA kernels they replace (bcjax.merging._weighted_task_sum,
// _ties_leaf, _masked_task_sum), so results are bit-identical. IEEE add/sub/mul/fma are correctly rounded and the build passes
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
#include <limits>
#include <thread>
#include <utility>
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
constexpr int64_t kMaxTasks = 1024;  // TIES's per-entry scratch (more tasks: the XLA kernel)

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

// TIES's merge given each task's trim threshold bits (bcjax.merging.ties_merge_with_thresholds)
// for L float32 leaves, laid out as for bcjax_task_sum; ``alphas`` holds λ (per_task == 0) or
// the T values λt (per_task == 1) as doubles of their float32 values. Returns 0 on success.
int bcjax_ties_merge(int64_t num_leaves, const int64_t* sizes, const void* const* p0, const void* const* fts,
                     void* const* out, int64_t num_tasks, const int32_t* thresholds, const double* alphas,
                     int64_t per_task, int64_t threads) {
  const int th = static_cast<int>(threads);
  return HostHasFma() ? fused::TiesMerge(num_leaves, sizes, p0, fts, out, num_tasks, thresholds, alphas, per_task, th)
                      : plain::TiesMerge(num_leaves, sizes, p0, fts, out, num_tasks, thresholds, alphas, per_task, th);
}

// Breadcrumbs' masked sum (bcjax.merging._masked_task_sum, then NaN where an input is not
// finite) for L float32 leaves laid out as for bcjax_task_sum, given each leaf's and task's
// magnitude-bit bounds lo[l * T + t], hi[l * T + t] (keep ⇔ lo ≤ bits(|θt − θ0|) < hi, the
// selection of bcjax_select_diff_bits_per_leaf); alphas[t] as for bcjax_task_sum. Returns 0 on success.
int bcjax_masked_task_sum(int64_t num_leaves, const int64_t* sizes, const void* const* p0, const void* const* fts,
                          void* const* out, int64_t num_tasks, const int32_t* lo, const int32_t* hi,
                          const double* alphas, int64_t threads) {
  const int th = static_cast<int>(threads);
  return HostHasFma() ? fused::MaskedTaskSum(num_leaves, sizes, p0, fts, out, num_tasks, lo, hi, alphas, th)
                      : plain::MaskedTaskSum(num_leaves, sizes, p0, fts, out, num_tasks, lo, hi, alphas, th);
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

// TIES's trim, elect and disjoint mean (bcjax.merging._ties_leaf) on float32, as XLA computes
// it (sums start from their first term, zeros + x folded):
//   keep_t = bits(|τt|) >= thr_t (from the unscaled τ),  tr_t = keep_t ? τt : 0
//   sign = Σ tr >= 0 ? 1 : −1,  e_t = (sign(tr_t) == sign && tr_t != 0) ? tr_t : 0,  cnt = Σ [e_t != 0]
//   scalar λ:   out = fma(λ, cnt > 0 ? Σ e / max(cnt, 1) : 0, θ0)
//   per-task λ: out = θ0 + (cnt > 0 ? num / max(cnt, 1) : 0),  num = fma(λ0, e0, λ1 e1), fma(λt, et, num)
// then the overflow rescue (inputs · s, τt = fma(θt, s, −θ0 s), result · 2^32) and NaN where an
// input is NaN/Inf (bcjax.merging._nan_where_nonfinite).
inline bool TiesKeep(float tau, int32_t threshold) {
  return static_cast<int32_t>(__builtin_bit_cast(uint32_t, tau) & 0x7fffffffu) >= threshold;
}

// max(cnt, 1) for a count (never NaN), as a select the vectoriser takes (std::max's reference is not).
inline float AtLeastOne(float cnt) { return cnt > 1.0f ? cnt : 1.0f; }

// jnp.sign(tr) == sign for the elected sign ±1: false for ±0 and NaN (whose sign is ±0/NaN);
// written without branches so that the entry loops vectorise.
inline bool Agrees(float tr, float sign) { return tr * sign > 0.0f; }  // sign = ±1: exact; ±0, NaN: false

// The combine for one entry (the rescue's path; the block below is the same, vectorised).
inline float TiesEntry(float p, const float* const* fs, int64_t j, int64_t t_count, const int32_t* thr,
                       const float* alphas, bool per_task, bool scaled) {
  const float s = RescueScale<float>();
  const float ps = scaled ? p * s : p;
  float tr[kMaxTasks];
  float sum = 0.0f;
  for (int64_t t = 0; t < t_count; ++t) {
    const float tau = scaled ? MulAdd(fs[t][j], s, -ps) : fs[t][j] - ps;
    tr[t] = TiesKeep(fs[t][j] - p, thr[t]) ? tau : 0.0f;
    sum = t == 0 ? tr[0] : sum + tr[t];
  }
  const float sign = sum >= 0.0f ? 1.0f : -1.0f;
  float cnt = 0.0f, total = 0.0f, num = 0.0f;
  for (int64_t t = 0; t < t_count; ++t) {
    const float e = Agrees(tr[t], sign) ? tr[t] : 0.0f;
    const float c = e != 0.0f ? 1.0f : 0.0f;
    cnt = t == 0 ? c : cnt + c;
    total = t == 0 ? e : total + e;
    if (per_task) num = t == 0 ? e : t == 1 ? MulAdd(alphas[0], num, alphas[1] * e) : MulAdd(alphas[t], e, num);
  }
  if (per_task && t_count == 1) num = alphas[0] * num;
  const float denom = AtLeastOne(cnt);
  if (per_task) return ps + (cnt > 0.0f ? num / denom : 0.0f);
  return MulAdd(alphas[0], cnt > 0.0f ? total / denom : 0.0f, ps);
}

// The block's rare cases: the overflow rescue where the result is not finite, then NaN where
// an input is NaN/Inf (``emax``: the inputs' largest exponent field).
void TiesFinish(const float* p, const float* const* fs, int64_t t_count, const int32_t* thr, const float* alphas,
                bool per_task, float* out, int64_t n, uint32_t emax) {
  if (emax != 0x7f800000u && AllFinite(out, n)) return;
  for (int64_t j = 0; j < n; ++j) {
    if (!std::isfinite(out[j])) {
      out[j] = TiesEntry(p[j], fs, j, t_count, thr, alphas, per_task, true) * RescueInverse<float>();
    }
    bool ok = std::isfinite(p[j]);
    for (int64_t t = 0; t < t_count; ++t) ok &= std::isfinite(fs[t][j]);
    if (!ok) out[j] = std::numeric_limits<float>::quiet_NaN();
  }
}

// TiesEntry (unscaled) for a fixed task count, entry by entry with the task loops unrolled,
// so that the entry loop vectorises reading all T + 1 streams side by side. Returns the
// inputs' largest exponent field (NaN/Inf: all ones).
template <int T, bool kPerTask, size_t... I>
uint32_t TiesUnrolledImpl(std::index_sequence<I...>, const float* p, const float* const* fs, const int32_t* thr,
                          const float* alphas, float* out, int64_t n) {
  const float* f[T] = {fs[I]...};
  const int32_t th[T] = {thr[I]...};
  const float a[T] = {alphas[kPerTask ? I : 0]...};
  uint32_t emax = ExponentMax(p, n);
  for (int64_t j = 0; j < n; ++j) {  // straight-line code per entry (fold expressions over the tasks)
    const float pj = p[j];
    const float fj[T] = {f[I][j]...};
    ((emax = std::max(emax, __builtin_bit_cast(uint32_t, fj[I]) & 0x7f800000u)), ...);
    const float tau[T] = {(fj[I] - pj)...};
    const float tr[T] = {(TiesKeep(tau[I], th[I]) ? tau[I] : 0.0f)...};
    float sum = tr[0];
    ((sum = I == 0 ? sum : sum + tr[I]), ...);
    const float sign = sum >= 0.0f ? 1.0f : -1.0f;
    const float e[T] = {(Agrees(tr[I], sign) ? tr[I] : 0.0f)...};
    float cnt = e[0] != 0.0f ? 1.0f : 0.0f, total = e[0];
    ((cnt = I == 0 ? cnt : cnt + (e[I] != 0.0f ? 1.0f : 0.0f)), ...);
    ((total = I == 0 ? total : total + e[I]), ...);
    if constexpr (kPerTask) {
      float num = T == 1 ? a[0] * e[0] : MulAdd(a[0], e[0], a[T > 1 ? 1 : 0] * e[T > 1 ? 1 : 0]);
      ((num = I < 2 ? num : MulAdd(a[I], e[I], num)), ...);
      const float q = num / AtLeastOne(cnt);
      out[j] = pj + (cnt > 0.0f ? q : 0.0f);
    } else {
      const float q = total / AtLeastOne(cnt);
      out[j] = MulAdd(a[0], cnt > 0.0f ? q : 0.0f, pj);
    }
  }
  return emax;
}

template <int T, bool kPerTask>
uint32_t TiesUnrolled(const float* p, const float* const* fs, const int32_t* thr, const float* alphas, float* out,
                      int64_t n) {
  return TiesUnrolledImpl<T, kPerTask>(std::make_index_sequence<T>(), p, fs, thr, alphas, out, n);
}

template <int T = 1>
uint32_t FixedTies(int64_t t_count, bool per_task, const float* p, const float* const* fs, const int32_t* thr,
                   const float* alphas, float* out, int64_t n) {
  if constexpr (T <= kUnrolledTasks) {
    if (t_count == T) {
      return per_task ? TiesUnrolled<T, true>(p, fs, thr, alphas, out, n)
                      : TiesUnrolled<T, false>(p, fs, thr, alphas, out, n);
    }
    return FixedTies<T + 1>(t_count, per_task, p, fs, thr, alphas, out, n);
  }
  return 0;
}

void TiesBlock(const float* p, const float* const* fs, int64_t t_count, const int32_t* thr, const float* alphas,
               bool per_task, float* out, int64_t n, float* scratch /* t_count * kBlock */) {
  if (t_count <= kUnrolledTasks) {
    const uint32_t emax = FixedTies(t_count, per_task, p, fs, thr, alphas, out, n);
    return TiesFinish(p, fs, t_count, thr, alphas, per_task, out, n, emax);
  }
  float sum[kBlock], cnt[kBlock], total[kBlock], num[kBlock];
  uint32_t emax = ExponentMax(p, n);  // NaN/Inf among the inputs: the all-ones exponent
  for (int64_t t = 0; t < t_count; ++t) {
    float* tr = scratch + t * kBlock;
    const float* f = fs[t];
    const int32_t th = thr[t];
    for (int64_t j = 0; j < n; j += 16) __builtin_prefetch(f + kBlock + j);  // the next block: the next page
    for (int64_t j = 0; j < n; ++j) {
      const float tau = f[j] - p[j];
      uint32_t u;
      __builtin_memcpy(&u, f + j, 4);
      emax = std::max(emax, u & 0x7f800000u);
      tr[j] = TiesKeep(tau, th) ? tau : 0.0f;
    }
    if (t == 0) {
      for (int64_t j = 0; j < n; ++j) sum[j] = tr[j];
    } else {
      for (int64_t j = 0; j < n; ++j) sum[j] = sum[j] + tr[j];
    }
  }
  for (int64_t j = 0; j < n; ++j) sum[j] = sum[j] >= 0.0f ? 1.0f : -1.0f;  // the elected sign
  for (int64_t t = 0; t < t_count; ++t) {
    const float* tr = scratch + t * kBlock;
    const float a = alphas[per_task ? t : 0], a0 = alphas[0];
    for (int64_t j = 0; j < n; ++j) {  // e_t, elected: the sign's agreement, in place of τ's trimmed value
      const float e = Agrees(tr[j], sum[j]) ? tr[j] : 0.0f;
      const float c = e != 0.0f ? 1.0f : 0.0f;
      if (t == 0) {
        cnt[j] = c;
        total[j] = e;
      } else {
        cnt[j] = cnt[j] + c;
        total[j] = total[j] + e;
      }
      if (per_task) num[j] = t == 0 ? e : t == 1 ? MulAdd(a0, num[j], a * e) : MulAdd(a, e, num[j]);
    }
  }
  if (per_task) {
    const float a0 = t_count == 1 ? alphas[0] : 1.0f;
    for (int64_t j = 0; j < n; ++j) {
      const float q = (t_count == 1 ? a0 * num[j] : num[j]) / AtLeastOne(cnt[j]);  // unconditional: vectorises
      out[j] = p[j] + (cnt[j] > 0.0f ? q : 0.0f);
    }
  } else {
    const float a = alphas[0];
    for (int64_t j = 0; j < n; ++j) {
      const float q = total[j] / AtLeastOne(cnt[j]);
      out[j] = MulAdd(a, cnt[j] > 0.0f ? q : 0.0f, p[j]);
    }
  }
  TiesFinish(p, fs, t_count, thr, alphas, per_task, out, n, emax);
}

int TiesMerge(int64_t num_leaves, const int64_t* sizes, const void* const* p0, const void* const* fts,
              void* const* out, int64_t num_tasks, const int32_t* thresholds, const double* alphas_in,
              bool per_task, int threads) {
  if (num_tasks < 1 || num_tasks > kMaxTasks || num_leaves < 0) return 1;
  std::vector<float> alphas(per_task ? num_tasks : 1);
  for (size_t t = 0; t < alphas.size(); ++t) alphas[t] = static_cast<float>(alphas_in[t]);
  ForEachUnit(num_leaves, sizes, threads, [&](int64_t l, int64_t begin, int64_t end) {
    std::vector<const float*> fs(num_tasks);
    std::vector<float> scratch(num_tasks * kBlock);
    for (int64_t b = begin; b < end; b += kBlock) {
      for (int64_t t = 0; t < num_tasks; ++t) fs[t] = static_cast<const float*>(fts[t * num_leaves + l]) + b;
      TiesBlock(static_cast<const float*>(p0[l]) + b, fs.data(), num_tasks, thresholds, alphas.data(), per_task,
                static_cast<float*>(out[l]) + b, std::min(kBlock, end - b), scratch.data());
    }
  });
  return 0;
}

// Breadcrumbs' masked sum (bcjax.merging._masked_task_sum) on float32, as XLA computes it: no
// product is fused (each αt τt passes through the mask's select before the add, and
// x + select(m, y, +0) → select(m, x + y, x) is not an IEEE identity for x = −0, so LLVM keeps
// it), sums start from their first term (zeros + x folded):
//   keep_t = lo_t ≤ bits(|τt|) < hi_t,  e_t = keep_t ? αt τt : +0,  acc = e_0 + e_1 + … ,  out = θ0 + acc
// then, where out is not finite, the overflow rescue with the same masks (inputs · s,
// τt = fma(θt, s, −θ0 s) as in Combine, result · 2^32), and NaN where an input is NaN/Inf.
inline bool MaskKeep(float tau, int32_t lo, int32_t hi) {
  const int32_t bits = static_cast<int32_t>(__builtin_bit_cast(uint32_t, tau) & 0x7fffffffu);
  return bits >= lo && bits < hi;
}

inline float MaskedEntry(float p, const float* const* fs, int64_t j, int64_t t_count, const int32_t* lo,
                         const int32_t* hi, const float* alphas, bool scaled) {
  const float s = RescueScale<float>();
  const float ps = scaled ? p * s : p;
  float acc = 0.0f;
  for (int64_t t = 0; t < t_count; ++t) {
    const float tau = scaled ? MulAdd(fs[t][j], s, -ps) : fs[t][j] - ps;
    const float e = MaskKeep(fs[t][j] - p, lo[t], hi[t]) ? alphas[t] * tau : 0.0f;
    acc = t == 0 ? e : acc + e;
  }
  return ps + acc;
}

// MaskedEntry (unscaled) for a fixed task count, the task loop unrolled so that the entry
// loop vectorises reading all T + 1 streams side by side. Returns the inputs' largest exponent field.
template <int T, size_t... I>
uint32_t MaskedUnrolledImpl(std::index_sequence<I...>, const float* p, const float* const* fs, const int32_t* lo,
                            const int32_t* hi, const float* alphas, float* out, int64_t n) {
  const float* f[T] = {fs[I]...};
  const int32_t l[T] = {lo[I]...}, h[T] = {hi[I]...};
  const float a[T] = {alphas[I]...};
  uint32_t emax = ExponentMax(p, n);
  for (int64_t j = 0; j < n; ++j) {
    const float pj = p[j];
    const float fj[T] = {f[I][j]...};
    ((emax = std::max(emax, __builtin_bit_cast(uint32_t, fj[I]) & 0x7f800000u)), ...);
    const float tau[T] = {(fj[I] - pj)...};
    const float e[T] = {(MaskKeep(tau[I], l[I], h[I]) ? a[I] * tau[I] : 0.0f)...};
    float acc = e[0];
    ((acc = I == 0 ? acc : acc + e[I]), ...);
    out[j] = pj + acc;
  }
  return emax;
}

template <int T = 1>
bool FixedMasked(int64_t t_count, const float* p, const float* const* fs, const int32_t* lo, const int32_t* hi,
                 const float* alphas, float* out, int64_t n, uint32_t* emax) {
  if constexpr (T <= kUnrolledTasks) {
    if (t_count == T) {
      *emax = MaskedUnrolledImpl<T>(std::make_index_sequence<T>(), p, fs, lo, hi, alphas, out, n);
      return true;
    }
    return FixedMasked<T + 1>(t_count, p, fs, lo, hi, alphas, out, n, emax);
  }
  return false;
}

// MaskedEntry (unscaled) task by task over the block (more tasks than unrolled); returns the
// inputs' largest exponent field.
uint32_t MaskedByTask(const float* p, const float* const* fs, int64_t t_count, const int32_t* lo, const int32_t* hi,
                      const float* alphas, float* out, int64_t n) {
  float acc[kBlock];
  uint32_t emax = ExponentMax(p, n);  // NaN/Inf among the inputs: the all-ones exponent
  for (int64_t t = 0; t < t_count; ++t) {
    const float* f = fs[t];
    const float a = alphas[t];
    const int32_t l = lo[t], h = hi[t];
    emax = ExponentMax(f, n, emax);
    for (int64_t j = 0; j < n; ++j) {
      const float tau = f[j] - p[j];
      const float e = MaskKeep(tau, l, h) ? a * tau : 0.0f;
      acc[j] = t == 0 ? e : acc[j] + e;
    }
  }
  for (int64_t j = 0; j < n; ++j) out[j] = p[j] + acc[j];
  return emax;
}

void MaskedBlock(const float* p, const float* const* fs, int64_t t_count, const int32_t* lo, const int32_t* hi,
                 const float* alphas, float* out, int64_t n) {
  uint32_t emax = 0;
  if (!FixedMasked(t_count, p, fs, lo, hi, alphas, out, n, &emax)) {
    emax = MaskedByTask(p, fs, t_count, lo, hi, alphas, out, n);
  }
  if (emax != 0x7f800000u && AllFinite(out, n)) return;
  for (int64_t j = 0; j < n; ++j) {  // rare: the rescue, then NaN where an input is not finite
    if (!std::isfinite(out[j])) out[j] = MaskedEntry(p[j], fs, j, t_count, lo, hi, alphas, true) * RescueInverse<float>();
    bool ok = std::isfinite(p[j]);
    for (int64_t t = 0; t < t_count; ++t) ok &= std::isfinite(fs[t][j]);
    if (!ok) out[j] = std::numeric_limits<float>::quiet_NaN();
  }
}

int MaskedTaskSum(int64_t num_leaves, const int64_t* sizes, const void* const* p0, const void* const* fts,
                  void* const* out, int64_t num_tasks, const int32_t* lo, const int32_t* hi, const double* alphas_in,
                  int threads) {
  if (num_tasks < 1 || num_leaves < 0) return 1;
  std::vector<float> alphas(num_tasks);
  for (int64_t t = 0; t < num_tasks; ++t) alphas[t] = static_cast<float>(alphas_in[t]);
  ForEachUnit(num_leaves, sizes, threads, [&](int64_t l, int64_t begin, int64_t end) {
    std::vector<const float*> fs(num_tasks);
    for (int64_t b = begin; b < end; b += kBlock) {
      for (int64_t t = 0; t < num_tasks; ++t) fs[t] = static_cast<const float*>(fts[t * num_leaves + l]) + b;
      MaskedBlock(static_cast<const float*>(p0[l]) + b, fs.data(), num_tasks, lo + l * num_tasks, hi + l * num_tasks,
                  alphas.data(), static_cast<float*>(out[l]) + b, std::min(kBlock, end - b));
    }
  });
  return 0;
}

#endif  // BCJAX_MERGE_KERNEL_BODY
