// Exact order statistics of float32 magnitudes as XLA FFI custom calls (CPU backend).
// bcjax/order_stats.py documents the contract; these kernels return exactly what its
// portable radix-select returns, only faster.
//
// Keys are the int32 bit patterns of |x| (monotone in |x|). Two handlers:
//   bcjax_select_bits(bits, ranks)          keys given (non-negative int32)
//   bcjax_select_diff_bits_multi(ranks[T, K], θ0's L leaves, θ1's L leaves, … θT's)   keys of
//       |θt − θ0| computed on the fly (float32; bfloat16 leaves are upcast exactly in the
//       kernel, so no float32 copy is ever written) with XLA:CPU's denormal semantics (inputs
//       and results flushed to zero), over the union of the L leaves, for all T tasks in
//       one cache-blocked pass: the task vectors τ = θt − θ0 are never written to memory
//       and θ0 is read once. L = 1 is one leaf (Breadcrumbs); L = all merged leaves of a
//       model is TIES's model-wide threshold (SPEC §3).
//
// Algorithm ("sample, bracket, count, select"), for n keys and K ranks:
//   1. a sample of m keys from random contiguous blocks (fixed seed);
//   2. per rank r, a bracket [lo, hi] of sample order statistics around r·m/n, with a
//      margin of ``sigmas`` (default 3.5) binomial standard deviations;
//   3. one streaming pass (AVX-512F or AVX2 where available, else scalar) reading θ0 once and
//      all T tasks in step at every index: below[k] = #{key < lo[k]}, and each task's keys
//      inside any of its brackets are compacted into one buffer (branch-free);
//   4. if below[k] ≤ r < below[k] + |inside[k]|, the answer is the (r − below[k])-th
//      smallest inside key (a histogram pass on a few percent of n, then nth_element on
//      one bin); otherwise (the sample missed) the rank is selected exactly from a full
//      copy of the keys.
// The result never depends on the sample, only the speed does: exact and deterministic.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BCJAX_X86 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kSortBelow = 4096;
constexpr int64_t kBlock = 256;          // contiguous keys per sample block
constexpr int64_t kThreadChunk = 1 << 21;  // keys per thread, at least

inline uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// --- key sources --------------------------------------------------------------------
struct BitsKeys {
  const int32_t* x;
  inline uint32_t operator()(int64_t i) const { return static_cast<uint32_t>(x[i]); }
  void Read(int64_t i, int64_t count, int32_t* out) const { std::memcpy(out, x + i, count * sizeof(int32_t)); }
};

inline uint32_t FlushedBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x7f800000u) == 0 ? (u & 0x80000000u) : u;  // denormal → ±0
}

// float32 bits of an element: float32 itself, or bfloat16 (its 16 bits are the top half of
// the float32 with the same value, exactly XLA's bf16 → f32 convert).
struct BFloat16 {
  uint16_t bits;
};

inline float AsFloat(float x) { return x; }
inline float AsFloat(BFloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Keys |a − b| of float32 (T = float) or bfloat16 (T = BFloat16) inputs, the difference in
// float32 after an exact upcast (SPEC §1), denormals flushed as XLA:CPU does.
template <class T>
struct DiffKeysT {
  const T* a;
  const T* b;
  inline uint32_t operator()(int64_t i) const {
    uint32_t ua = FlushedBits(AsFloat(a[i])), ub = FlushedBits(AsFloat(b[i]));
    float fa, fb;
    std::memcpy(&fa, &ua, 4);
    std::memcpy(&fb, &ub, 4);
    uint32_t d = FlushedBits(fa - fb) & 0x7fffffffu;
    return d;
  }
};

// XLA:CPU runs with denormals-are-zero and flush-to-zero; the kernels set the same mode
// for their own arithmetic (and restore the caller's), so |a − b| matches XLA bit for bit.
class ScopedFlushDenormals {
 public:
  ScopedFlushDenormals() {
#ifdef BCJAX_X86
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040u);  // FTZ | DAZ
#endif
  }
  ~ScopedFlushDenormals() {
#ifdef BCJAX_X86
    _mm_setcsr(saved_);
#endif
  }

 private:
  unsigned saved_ = 0;
};

// --- scan: per task, counts below lo[k] and the keys inside any bracket [lo[k], lo[k] + span[k]] ---
// An append-only key buffer: ``data`` is the storage (uninitialised: grown by copying to a
// doubled capacity, never shrunk), ``len`` the keys in use.
struct KeyBuffer {
  std::unique_ptr<int32_t[]> data;
  int64_t cap = 0, len = 0;
  void Reserve(int64_t want) {
    if (want <= cap) return;
    const int64_t grown = std::max(want, 2 * cap);
    std::unique_ptr<int32_t[]> bigger(new int32_t[grown]);
    if (len) std::memcpy(bigger.get(), data.get(), len * sizeof(int32_t));
    data = std::move(bigger);
    cap = grown;
  }
  void Push(int32_t v) {
    if (len == cap) Reserve(std::max<int64_t>(64, 2 * cap));
    data[len++] = v;
  }
};

// One task's share of a scan: below[k] = #{key < lo[k]}, and in ``inside`` the keys inside at
// least one of the task's brackets (their union: one compaction per key whatever K is; Finish
// picks each rank's bracket out of it).
struct Partial {
  std::vector<int64_t> below;
  KeyBuffer inside;
};

// A task's (at most 4) brackets, flat for the vector loops.
struct ScanBrackets {
  uint32_t lo[4] = {0, 0, 0, 0}, span[4] = {0, 0, 0, 0}, hi[4] = {0, 0, 0, 0};  // hi = lo + span < 2^31
};

// Rows of keys over one index range, read together: at every index the scan reads θ0 once and
// then each task, so all T + 1 inputs stream in step (the prefetchers follow every stream;
// scanning one task at a time over cache-sized chunks was measured 1.7× slower).
struct BitsRows {  // one row: the keys themselves
  const int32_t* x;
  int64_t tasks() const { return 1; }
  uint32_t Key(int64_t, int64_t i) const { return static_cast<uint32_t>(x[i]); }
};

template <class T>
struct DiffRows {  // row t: |ft[t] − p0|, see DiffKeysT
  const T* p0;
  const T* const* ft;
  int64_t num_tasks;
  int64_t tasks() const { return num_tasks; }
  uint32_t Key(int64_t t, int64_t i) const { return DiffKeysT<T>{ft[t], p0}(i); }
};

template <class Rows>
void ScanScalar(const Rows& rows, int64_t begin, int64_t end, int64_t kk, const ScanBrackets* br, Partial* parts) {
  for (int64_t i = begin; i < end; ++i) {
    for (int64_t t = 0; t < rows.tasks(); ++t) {
      const uint32_t v = rows.Key(t, i);
      bool in = false;
      for (int64_t k = 0; k < kk; ++k) {
        parts[t].below[k] += v < br[t].lo[k];
        in |= v - br[t].lo[k] <= br[t].span[k];
      }
      if (in) parts[t].inside.Push(static_cast<int32_t>(v));
    }
  }
}

// Instruction sets of the scan; ``isa`` arguments ask for one (tests exercise each), the
// CPU's best one is used when it asks for more than the CPU has.
enum Isa : int64_t { kIsaAuto = 0, kIsaScalar = 1, kIsaAvx2 = 2, kIsaAvx512 = 3 };

#ifdef BCJAX_X86
// A vector loop's per-task state, in one flat record (counts below each bracket, the write
// position in the task's reserved ``inside`` storage).
struct Lane {
  int64_t below[4];
  int32_t* out;
  int64_t len;
};

#define BCJAX_AVX2 __attribute__((target("avx2,popcnt")))
#define BCJAX_AVX512 __attribute__((target("avx512f,avx2,popcnt")))

// perm[m] moves the lanes whose bit is CLEAR in m (the keys inside a bracket, m being the
// "outside" mask) to the front.
struct CompactTable {
  alignas(32) int32_t perm[256][8];
  CompactTable() {
    for (int m = 0; m < 256; ++m) {
      int j = 0;
      for (int b = 0; b < 8; ++b)
        if (!(m & (1 << b))) perm[m][j++] = b;
      for (; j < 8; ++j) perm[m][j] = 0;
    }
  }
};
const CompactTable kCompact;

struct NoBase {};

// 8 keys at index i (AVX2). Requires DAZ/FTZ set (ScopedFlushDenormals): then the vector
// subtraction is XLA:CPU's θt − θ0 bit for bit.
BCJAX_AVX2 inline NoBase Base8(const BitsRows&, int64_t) { return {}; }
BCJAX_AVX2 inline __m256i Key8(const BitsRows& r, int64_t, int64_t i, NoBase) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.x + i));
}
BCJAX_AVX2 inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
BCJAX_AVX2 inline __m256 Load8(const BFloat16* p) {  // 8 bf16 → 8 f32 (exact)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// 8 keys |a − b| of one pair of inputs at index i (the diff-histogram kernel's loads).
template <class T>
BCJAX_AVX2 inline __m256i Load8(const DiffKeysT<T>& keys, int64_t i) {
  const __m256 d = _mm256_sub_ps(Load8(keys.a + i), Load8(keys.b + i));
  return _mm256_and_si256(_mm256_castps_si256(d), _mm256_set1_epi32(0x7fffffff));
}
template <class T>
BCJAX_AVX2 inline __m256 Base8(const DiffRows<T>& r, int64_t i) { return Load8(r.p0 + i); }
template <class T>
BCJAX_AVX2 inline __m256i Key8(const DiffRows<T>& r, int64_t t, int64_t i, __m256 p) {
  const __m256 d = _mm256_sub_ps(Load8(r.ft[t] + i), p);
  return _mm256_and_si256(_mm256_castps_si256(d), _mm256_set1_epi32(0x7fffffff));
}

// 8 indices × all tasks per step: counting is a compare and a popcount; the keys inside any
// bracket are compacted with a permutation looked up from the 8-bit mask (no data-dependent
// branch). Keys and bracket ends are < 2^31, so signed compares order them. Returns the
// first index not scanned (the < 8 tail is the caller's).
template <int K, class Rows>
BCJAX_AVX2 int64_t ScanAvx2(const Rows& rows, int64_t begin, int64_t end, const ScanBrackets* br, Lane* lanes) {
  const int64_t nt = rows.tasks();
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const auto base = Base8(rows, i);
    for (int64_t t = 0; t < nt; ++t) {
      const __m256i v = Key8(rows, t, i, base);
      __m256i outside = _mm256_set1_epi32(-1);
      for (int k = 0; k < K; ++k) {
        const __m256i lt = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(br[t].lo[k])), v);
        lanes[t].below[k] += _mm_popcnt_u32(static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(lt))));
        const __m256i hi = _mm256_set1_epi32(static_cast<int32_t>(br[t].hi[k]));
        outside = _mm256_and_si256(outside, _mm256_or_si256(lt, _mm256_cmpgt_epi32(v, hi)));
      }
      const unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(outside)));
      const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompact.perm[mask]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes[t].out + lanes[t].len), _mm256_permutevar8x32_epi32(v, perm));
      lanes[t].len += 8 - _mm_popcnt_u32(mask);
    }
  }
  return i;
}

// The same with 16 keys per step (AVX-512F): unsigned mask compares and a register compress.
BCJAX_AVX512 inline NoBase Base16(const BitsRows&, int64_t) { return {}; }
BCJAX_AVX512 inline __m512i Key16(const BitsRows& r, int64_t, int64_t i, NoBase) { return _mm512_loadu_si512(r.x + i); }
BCJAX_AVX512 inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
BCJAX_AVX512 inline __m512 Load16(const BFloat16* p) {  // 16 bf16 → 16 f32 (exact)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <class T>
BCJAX_AVX512 inline __m512 Base16(const DiffRows<T>& r, int64_t i) { return Load16(r.p0 + i); }
template <class T>
BCJAX_AVX512 inline __m512i Key16(const DiffRows<T>& r, int64_t t, int64_t i, __m512 p) {
  const __m512 d = _mm512_sub_ps(Load16(r.ft[t] + i), p);
  return _mm512_and_si512(_mm512_castps_si512(d), _mm512_set1_epi32(0x7fffffff));
}

template <int K, class Rows>
BCJAX_AVX512 int64_t ScanAvx512(const Rows& rows, int64_t begin, int64_t end, const ScanBrackets* br, Lane* lanes) {
  const int64_t nt = rows.tasks();
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const auto base = Base16(rows, i);
    for (int64_t t = 0; t < nt; ++t) {
      const __m512i v = Key16(rows, t, i, base);
      __mmask16 in = 0;
      for (int k = 0; k < K; ++k) {
        const __m512i lo = _mm512_set1_epi32(static_cast<int32_t>(br[t].lo[k]));
        lanes[t].below[k] += _mm_popcnt_u32(_mm512_cmplt_epu32_mask(v, lo));
        in |= _mm512_cmple_epu32_mask(_mm512_sub_epi32(v, lo), _mm512_set1_epi32(static_cast<int32_t>(br[t].span[k])));
      }
      // compress in a register, then a plain store (a compressing store to memory is slow on some CPUs)
      _mm512_storeu_si512(lanes[t].out + lanes[t].len, _mm512_maskz_compress_epi32(in, v));
      lanes[t].len += _mm_popcnt_u32(in);
    }
  }
  return i;
}

Isa BestIsa(int64_t want) {
  static const Isa best = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("popcnt") ? kIsaAvx512
                          : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt") ? kIsaAvx2
                                                                                                 : kIsaScalar;
  return want == kIsaAuto ? best : static_cast<Isa>(std::min<int64_t>(want, best));
}

bool HasAvx2() { return BestIsa(kIsaAuto) >= kIsaAvx2; }

template <int K, class Rows>
int64_t ScanVector(Isa isa, const Rows& rows, int64_t begin, int64_t end, const ScanBrackets* br, Lane* lanes) {
  return isa == kIsaAvx512 ? ScanAvx512<K>(rows, begin, end, br, lanes) : ScanAvx2<K>(rows, begin, end, br, lanes);
}
#else
Isa BestIsa(int64_t) { return kIsaScalar; }
#endif

// Scans indices [begin, end) of every row (kk ≤ 4 brackets per task) into ``parts[t]``.
template <class Rows>
void Scan(const Rows& rows, int64_t begin, int64_t end, int64_t kk, const ScanBrackets* br, Partial* parts,
          int64_t isa_request) {
  ScopedFlushDenormals flush;
#ifdef BCJAX_X86
  const Isa isa = BestIsa(isa_request);
  if (isa != kIsaScalar) {
    // room for a whole chunk is reserved up front, so the loops keep their state in Lanes;
    // lanes count at most kScanChunk keys per chunk, so nothing overflows
    constexpr int64_t kScanChunk = 1 << 16;
    const int64_t nt = rows.tasks();
    std::vector<Lane> lanes(nt);
    for (int64_t c = begin; c < end; c += kScanChunk) {
      const int64_t c_end = std::min(c + kScanChunk, end);
      for (int64_t t = 0; t < nt; ++t) {
        parts[t].inside.Reserve(parts[t].inside.len + (c_end - c) + 16);
        lanes[t] = Lane{{0, 0, 0, 0}, parts[t].inside.data.get(), parts[t].inside.len};
      }
      int64_t done = c;
      switch (kk) {
        case 1: done = ScanVector<1>(isa, rows, c, c_end, br, lanes.data()); break;
        case 2: done = ScanVector<2>(isa, rows, c, c_end, br, lanes.data()); break;
        case 3: done = ScanVector<3>(isa, rows, c, c_end, br, lanes.data()); break;
        default: done = ScanVector<4>(isa, rows, c, c_end, br, lanes.data()); break;
      }
      for (int64_t t = 0; t < nt; ++t) {
        for (int64_t k = 0; k < kk; ++k) parts[t].below[k] += lanes[t].below[k];
        parts[t].inside.len = lanes[t].len;
      }
      ScanScalar(rows, done, c_end, kk, br, parts);  // the tail shorter than a vector
    }
    return;
  }
#endif
  ScanScalar(rows, begin, end, kk, br, parts);
}

// --- selection ----------------------------------------------------------------------
template <class Keys>
std::vector<int32_t> Materialize(const Keys& keys, int64_t n) {
  std::vector<int32_t> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<int32_t>(keys(i));
  return v;
}

struct Brackets {
  std::vector<uint32_t> lo, span;
  std::vector<int64_t> expected;
  ScanBrackets flat() const {
    ScanBrackets b;
    for (size_t k = 0; k < lo.size(); ++k) b.lo[k] = lo[k], b.span[k] = span[k], b.hi[k] = lo[k] + span[k];
    return b;
  }
};

// Steps 1-2: a sample of m keys from random contiguous blocks, and one bracket per rank.
template <class Keys>
Brackets MakeBrackets(const Keys& keys, int64_t n, const int32_t* ranks, int64_t kk, double sigmas) {
  const int64_t m = std::min<int64_t>(8192, std::max<int64_t>(1024, n / 128)) / kBlock * kBlock;
  std::vector<int32_t> sample(m);
  uint64_t state = 0x5eedb1c5ULL ^ static_cast<uint64_t>(n);
  for (int64_t blk = 0; blk < m / kBlock; ++blk) {
    const int64_t start = static_cast<int64_t>(SplitMix64(state) % static_cast<uint64_t>(n - kBlock + 1));
    keys.Read(start, kBlock, sample.data() + blk * kBlock);
  }
  // Only the sample order statistics at the bracket ends are needed: partial selection,
  // ascending, each nth_element on what is left to the right of the previous one.
  std::vector<int64_t> lo_pos(kk), hi_pos(kk), wanted;
  for (int64_t k = 0; k < kk; ++k) {
    const double q = (static_cast<double>(ranks[k]) + 0.5) / static_cast<double>(n);
    const double pos = q * static_cast<double>(m);
    const double margin = sigmas * (std::sqrt(static_cast<double>(m) * q * (1.0 - q)) + 2.0);
    lo_pos[k] = static_cast<int64_t>(std::floor(pos - margin));
    hi_pos[k] = static_cast<int64_t>(std::ceil(pos + margin));
    if (lo_pos[k] >= 0) wanted.push_back(lo_pos[k]);
    if (hi_pos[k] < m) wanted.push_back(hi_pos[k]);
  }
  std::sort(wanted.begin(), wanted.end());
  wanted.erase(std::unique(wanted.begin(), wanted.end()), wanted.end());
  int64_t done = 0;
  for (int64_t w : wanted) {
    std::nth_element(sample.begin() + done, sample.begin() + w, sample.end());
    done = w + 1;
  }
  Brackets br{std::vector<uint32_t>(kk), std::vector<uint32_t>(kk), std::vector<int64_t>(kk)};
  for (int64_t k = 0; k < kk; ++k) {
    const int64_t a = lo_pos[k], b = hi_pos[k];
    const uint32_t l = a < 0 ? 0u : static_cast<uint32_t>(sample[a]);
    const uint32_t h = b >= m ? 0x7fffffffu : static_cast<uint32_t>(sample[b]);
    br.lo[k] = l;
    br.span[k] = h - l;
    br.expected[k] = (std::min<int64_t>(b, m - 1) - std::max<int64_t>(a, 0) + 1) * (n / m + 1);
  }
  return br;
}

Partial EmptyPartial(const Brackets& br, int64_t kk, int nt) {
  Partial p;
  p.below.assign(kk, 0);
  int64_t expected = 0;
  for (int64_t k = 0; k < kk; ++k) expected += br.expected[k];
  p.inside.Reserve(expected * 5 / 4 / nt + 64);
  return p;
}

// The keys of v[0, size) inside [lo, lo + span], in order, into ``out`` (room for ``size`` + 16);
// returns how many. Branch-free (which keys of a task's union fall in which bracket is random):
// 16 keys per step with AVX-512F, else one.
#ifdef BCJAX_X86
BCJAX_AVX512 int64_t KeysInBracketAvx512(const int32_t* v, int64_t size, uint32_t lo, uint32_t span, int32_t* out) {
  const __m512i vlo = _mm512_set1_epi32(static_cast<int32_t>(lo)), vspan = _mm512_set1_epi32(static_cast<int32_t>(span));
  int64_t i = 0, j = 0;
  for (; i + 16 <= size; i += 16) {
    const __m512i x = _mm512_loadu_si512(v + i);
    const __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(x, vlo), vspan);
    _mm512_storeu_si512(out + j, _mm512_maskz_compress_epi32(in, x));
    j += _mm_popcnt_u32(in);
  }
  for (; i < size; ++i) {
    out[j] = v[i];
    j += static_cast<uint32_t>(v[i]) - lo <= span;
  }
  return j;
}
#endif

int64_t KeysInBracket(const int32_t* v, int64_t size, uint32_t lo, uint32_t span, int32_t* out, int64_t isa) {
#ifdef BCJAX_X86
  if (BestIsa(isa) == kIsaAvx512) return KeysInBracketAvx512(v, size, lo, span, out);
#endif
  int64_t j = 0;
  for (int64_t i = 0; i < size; ++i) {
    out[j] = v[i];
    j += static_cast<uint32_t>(v[i]) - lo <= span;
  }
  return j;
}

// The r-th smallest of v[0, size), all keys in [lo, lo + span], into ``answer``; false when
// r is out of range (the sample missed). One histogram pass on the top 10 bits of (key − lo)
// narrows to one bin, then nth_element on that bin's few keys (gathered branch-free).
bool SelectInBracket(const int32_t* v, int64_t size, int64_t r, uint32_t lo, uint32_t span, int32_t* answer,
                     int64_t isa) {
  if (r < 0 || r >= size) return false;
  const int bits = span == 0 ? 0 : 32 - __builtin_clz(span);  // (key − lo) ≤ span < 2^bits
  const int shift = std::max(0, bits - 10);
  const int64_t nbins = (span >> shift) + 1;  // ≤ 2^10
  // four interleaved histograms (16 KiB, in L1): keys in one bin don't wait on each other's
  // increments; counts < 2^32 (size < 2^31 per task and thread, summed in int64 below)
  std::vector<uint32_t> hist4(4 * nbins, 0);
  for (int64_t i = 0; i < size; ++i) ++hist4[(i & 3) * nbins + ((static_cast<uint32_t>(v[i]) - lo) >> shift)];
  int64_t bin = 0, before = 0, in_bin_count = 0;
  for (;; ++bin) {
    in_bin_count = int64_t{hist4[bin]} + hist4[nbins + bin] + hist4[2 * nbins + bin] + hist4[3 * nbins + bin];
    if (before + in_bin_count > r) break;
    before += in_bin_count;
  }
  // the bin's keys: the bracket [lo + bin·2^shift, lo + (bin + 1)·2^shift − 1]
  std::unique_ptr<int32_t[]> in_bin(new int32_t[size + 16]);
  const uint32_t bin_lo = lo + (static_cast<uint32_t>(bin) << shift);
  const int64_t m = KeysInBracket(v, size, bin_lo, (uint32_t{1} << shift) - 1, in_bin.get(), isa);
  std::nth_element(in_bin.get(), in_bin.get() + (r - before), in_bin.get() + m);
  *answer = in_bin[r - before];
  return true;
}

// Step 4: select inside the bracket, or exactly from a full copy if the sample missed.
// ``parts`` are the task's per-thread partial scans (their buffers hold the keys inside any of
// the K brackets; with K > 1 each rank's bracket is first filtered out of them).
template <class Keys>
void Finish(const Keys& keys, int64_t n, const int32_t* ranks, int64_t kk, const Brackets& br,
            const std::vector<Partial*>& parts, int32_t* out, int64_t isa) {
  KeyBuffer joined;  // the threads' buffers end to end (the only one's, when one thread scanned)
  if (parts.size() > 1) {
    int64_t total = 0;
    for (const Partial* p : parts) total += p->inside.len;
    joined.Reserve(total);
    for (const Partial* p : parts) {
      std::memcpy(joined.data.get() + joined.len, p->inside.data.get(), p->inside.len * sizeof(int32_t));
      joined.len += p->inside.len;
    }
  }
  const KeyBuffer& inside = parts.size() > 1 ? joined : parts[0]->inside;
  KeyBuffer in_bracket;
  if (kk > 1) in_bracket.Reserve(inside.len + 16);
  std::vector<int32_t> all;  // the exact fallback's copy of the keys, made at most once
  for (int64_t k = 0; k < kk; ++k) {
    int64_t below = 0;
    for (const Partial* p : parts) below += p->below[k];
    const int32_t* v = inside.data.get();
    int64_t size = inside.len;
    if (kk > 1) {
      size = KeysInBracket(v, size, br.lo[k], br.span[k], in_bracket.data.get(), isa);
      v = in_bracket.data.get();
    }
    if (!SelectInBracket(v, size, static_cast<int64_t>(ranks[k]) - below, br.lo[k], br.span[k], out + k, isa)) {
      if (all.empty()) all = Materialize(keys, n);
      std::nth_element(all.begin(), all.begin() + ranks[k], all.end());
      out[k] = all[ranks[k]];
    }
  }
}

template <class Fn>
void ParallelFor(int nt, Fn fn) {
  if (nt == 1) return fn(0);
  std::vector<std::thread> pool;
  for (int t = 0; t < nt; ++t) pool.emplace_back(fn, t);
  for (auto& th : pool) th.join();
}

void Select(const int32_t* x, int64_t n, const int32_t* ranks, int64_t kk, int32_t* out, int threads,
            double sigmas, int64_t isa) {
  const BitsKeys keys{x};
  if (kk > 4 && n > kSortBelow) {  // the vectorised scan takes up to 4 brackets per pass
    for (int64_t k0 = 0; k0 < kk; k0 += 4) {
      Select(x, n, ranks + k0, std::min<int64_t>(4, kk - k0), out + k0, threads, sigmas, isa);
    }
    return;
  }
  if (n <= kSortBelow) {
    std::vector<int32_t> v = Materialize(keys, n);
    std::sort(v.begin(), v.end());
    for (int64_t k = 0; k < kk; ++k) out[k] = v[ranks[k]];
    return;
  }
  const Brackets br = MakeBrackets(keys, n, ranks, kk, sigmas);
  const ScanBrackets flat = br.flat();
  // Step 3: one pass, split over threads for large inputs (partial results are additive).
  const int nt = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, n / kThreadChunk)));
  std::vector<Partial> parts;
  for (int t = 0; t < nt; ++t) parts.push_back(EmptyPartial(br, kk, nt));
  ParallelFor(nt, [&](int t) { Scan(BitsRows{x}, n * t / nt, n * (t + 1) / nt, kk, &flat, &parts[t], isa); });
  std::vector<Partial*> mine;
  for (Partial& p : parts) mine.push_back(&p);
  Finish(keys, n, ranks, kk, br, mine, out, isa);
}

// Keys |ft[seg][t] − p0[seg]| of a leaf list concatenated in order: segment ``s`` holds
// global indices [start[s], start[s + 1]). Random access (sampling, the exact fallback)
// finds the segment by binary search; the streaming pass walks segments directly.
template <class T>
struct SegDiffKeys {
  const std::vector<const T*>* a;  // θt's leaves
  const std::vector<const T*>* b;  // θ0's leaves
  const std::vector<int64_t>* start;   // L + 1 prefix offsets
  inline uint32_t operator()(int64_t i) const {
    const auto it = std::upper_bound(start->begin(), start->end(), i);
    const size_t s = static_cast<size_t>(it - start->begin()) - 1;
    return DiffKeysT<T>{(*a)[s], (*b)[s]}(i - (*start)[s]);
  }
  // keys i … i + count − 1 (the sample's blocks): one segment search, then straight reads
  void Read(int64_t i, int64_t count, int32_t* out) const {
    size_t s = static_cast<size_t>(std::upper_bound(start->begin(), start->end(), i) - start->begin()) - 1;
    for (int64_t j = 0; j < count; ++s) {
      const DiffKeysT<T> keys{(*a)[s], (*b)[s]};
      const int64_t off = i + j - (*start)[s], stop = std::min(count - j, (*start)[s + 1] - (i + j));
      for (int64_t q = 0; q < stop; ++q) out[j + q] = static_cast<int32_t>(keys(off + q));
      j += std::max<int64_t>(stop, 0);
    }
  }
};

// All T tasks over a list of L leaves at once: keys |ft[t][l] − p0[l]| over the union of the
// leaves (one leaf: L = 1; TIES's model-wide threshold: all merged leaves). The pass walks
// the leaves in chunks and scans every task's chunk while θ0's chunk is in cache, so θ0 is
// read from memory once instead of T times (memory traffic (T + 1)·N floats instead of
// 2T·N), and the task vectors are never written. ``fts[t]`` holds task t's L leaves.
template <class T>
void SelectDiffSegments(const std::vector<const T*>& p0, const std::vector<std::vector<const T*>>& fts,
                        const std::vector<int64_t>& start, const int32_t* ranks, int64_t kk, int32_t* out,
                        int threads, double sigmas, int64_t isa) {
  const int64_t num_tasks = static_cast<int64_t>(fts.size());
  const int64_t n = start.back();
  if (kk > 4) {  // the vectorised scan takes up to 4 brackets per pass
    for (int64_t k0 = 0; k0 < kk; k0 += 4) {
      const int64_t k1 = std::min<int64_t>(4, kk - k0);
      std::vector<int32_t> r(num_tasks * k1), o(num_tasks * k1);
      for (int64_t t = 0; t < num_tasks; ++t)
        for (int64_t k = 0; k < k1; ++k) r[t * k1 + k] = ranks[t * kk + k0 + k];
      SelectDiffSegments(p0, fts, start, r.data(), k1, o.data(), threads, sigmas, isa);
      for (int64_t t = 0; t < num_tasks; ++t)
        for (int64_t k = 0; k < k1; ++k) out[t * kk + k0 + k] = o[t * k1 + k];
    }
    return;
  }
  std::vector<SegDiffKeys<T>> keys;
  for (int64_t t = 0; t < num_tasks; ++t) keys.push_back(SegDiffKeys<T>{&fts[t], &p0, &start});
  if (n <= kSortBelow) {
    ScopedFlushDenormals flush;
    for (int64_t t = 0; t < num_tasks; ++t) {
      std::vector<int32_t> v = Materialize(keys[t], n);
      std::sort(v.begin(), v.end());
      for (int64_t k = 0; k < kk; ++k) out[t * kk + k] = v[ranks[t * kk + k]];
    }
    return;
  }
  std::vector<Brackets> br;
  std::vector<ScanBrackets> flat;
  {
    ScopedFlushDenormals flush;
    for (int64_t t = 0; t < num_tasks; ++t) {
      br.push_back(MakeBrackets(keys[t], n, ranks + t * kk, kk, sigmas));
      flat.push_back(br.back().flat());
    }
  }
  const int nt = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, n / kThreadChunk)));
  std::vector<std::vector<Partial>> parts(nt);  // [thread][task]
  for (int w = 0; w < nt; ++w)
    for (int64_t t = 0; t < num_tasks; ++t) parts[w].push_back(EmptyPartial(br[t], kk, nt));
  std::vector<std::vector<const T*>> seg_ft(start.size() - 1, std::vector<const T*>(num_tasks));  // [leaf][task]
  for (size_t s = 0; s + 1 < start.size(); ++s)
    for (int64_t t = 0; t < num_tasks; ++t) seg_ft[s][t] = fts[t][s];
  ParallelFor(nt, [&](int w) {
    const int64_t begin = n * w / nt, end = n * (w + 1) / nt;
    size_t s = static_cast<size_t>(std::upper_bound(start.begin(), start.end(), begin) - start.begin()) - 1;
    for (int64_t g = begin; g < end; ++s) {  // segment s covers [start[s], start[s + 1])
      const int64_t seg_end = std::min(end, start[s + 1]);
      if (seg_end > g) {
        Scan(DiffRows<T>{p0[s], seg_ft[s].data(), num_tasks}, g - start[s], seg_end - start[s], kk, flat.data(),
             parts[w].data(), isa);
      }
      g = std::max(g, seg_end);
    }
  });
  ScopedFlushDenormals flush;
  for (int64_t t = 0; t < num_tasks; ++t) {
    std::vector<Partial*> mine;
    for (int w = 0; w < nt; ++w) mine.push_back(&parts[w][t]);
    Finish(keys[t], n, ranks + t * kk, kk, br[t], mine, out + t * kk, isa);
  }
}

// --- additive histograms of |θt − θ0| (TIES's model-wide threshold when streaming) ------
// order_stats' two passes: coarse counts of key >> 15 (2^16 bins), or for K coarse bins per
// task the fine counts of key & 0x7fff of the keys in that bin (an element lands in the first
// row whose bin matches), followed by one more count: the keys whose coarse part exceeds
// every bin of the task ("above"; with contiguous bins b, b + 1, …, b + K − 1 the keys below
// the bracket follow as n − above − Σ fine counts). The same counts XLA's scatter-add
// histograms give, from one pass that reads θ0 once for all T tasks: elements in chunks of
// kHistChunk (θ0's chunk stays in L1 while the tasks stream), keys computed 8 at a time with
// AVX2 (the selection's Load8, same denormal semantics), per-thread int32 counts (n < 2^31)
// summed at the end. For contiguous bins (the bracketed fine pass) the vector loop counts
// "above" in registers and only the few keys inside the bracket leave them.
constexpr int kFineBits = 15;
constexpr int64_t kCoarseBins = int64_t{1} << 16, kFineBins = int64_t{1} << kFineBits;
constexpr int64_t kHistChunk = 4096;

#ifdef BCJAX_X86
// keys[begin, end) into buf, 8 at a time; returns the first index not done (the < 8 tail).
template <class T>
BCJAX_AVX2 int64_t DiffKeysAvx2(const DiffKeysT<T> keys, int64_t begin, int64_t end, uint32_t* buf) {
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(buf + (i - begin)), Load8(keys, i));
  }
  return i;
}

// Fine counts for the contiguous bins [b0, b0 + kk): keys inside go to h, keys above are
// counted in ``above``; returns the first index not done.
template <class T>
BCJAX_AVX2 int64_t FineContiguousAvx2(const DiffKeysT<T> keys, int64_t begin, int64_t end, int32_t b0, int32_t kk,
                                      int32_t* h, int64_t& above) {
  const __m256i vb0 = _mm256_set1_epi32(b0), vlast = _mm256_set1_epi32(b0 + kk - 1);
  __m256i vabove = _mm256_setzero_si256();
  alignas(32) uint32_t lanes[8];
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256i v = Load8(keys, i);  // non-negative: signed compares are exact
    const __m256i c = _mm256_srli_epi32(v, kFineBits);
    const __m256i gt = _mm256_cmpgt_epi32(c, vlast);
    vabove = _mm256_sub_epi32(vabove, gt);
    const __m256i outside = _mm256_or_si256(gt, _mm256_cmpgt_epi32(vb0, c));
    unsigned in = ~static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(outside))) & 0xffu;
    if (in) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
      do {
        const uint32_t key = lanes[__builtin_ctz(in)];
        in &= in - 1;
        ++h[(static_cast<int64_t>(key >> kFineBits) - b0) * kFineBins + (key & (kFineBins - 1))];
      } while (in);
    }
  }
  alignas(32) int32_t acc[8];  // each lane counts at most (end − begin) / 8 < 2^28 keys
  _mm256_store_si256(reinterpret_cast<__m256i*>(acc), vabove);
  for (int j = 0; j < 8; ++j) above += acc[j];
  return i;
}
#endif

// One task's counts over keys[begin, end) into h (coarse: 2^16 bins; fine: K rows of 2^15,
// then the "above" count at h[K · 2^15]).
template <class T>
void HistogramRange(const DiffKeysT<T>& keys, int64_t begin, int64_t end, const int32_t* b, int64_t kk, bool fine,
                    bool contiguous, int32_t* h, uint32_t* buf) {
  if (fine && contiguous) {
    const int32_t b0 = b[0];
    int64_t above = 0, i = begin;
#ifdef BCJAX_X86
    if (HasAvx2()) i = FineContiguousAvx2(keys, begin, end, b0, static_cast<int32_t>(kk), h, above);
#endif
    for (; i < end; ++i) {
      const uint32_t key = keys(i);
      const int64_t d = static_cast<int64_t>(key >> kFineBits) - b0;
      if (d >= kk) {
        ++above;
      } else if (d >= 0) {
        ++h[d * kFineBins + (key & (kFineBins - 1))];
      }
    }
    h[kk * kFineBins] += static_cast<int32_t>(above);
    return;
  }
  int64_t i = begin;
#ifdef BCJAX_X86
  if (HasAvx2()) i = DiffKeysAvx2(keys, begin, end, buf);
#endif
  for (; i < end; ++i) buf[i - begin] = keys(i);
  const int64_t m = end - begin;
  if (!fine) {
    for (int64_t j = 0; j < m; ++j) ++h[buf[j] >> kFineBits];
    return;
  }
  const int32_t top = *std::max_element(b, b + kk);
  int32_t above = 0;
  for (int64_t j = 0; j < m; ++j) {
    const uint32_t key = buf[j];
    const int32_t coarse = static_cast<int32_t>(key >> kFineBits);
    above += coarse > top;
    for (int64_t k = 0; k < kk; ++k) {
      if (coarse == b[k]) {
        ++h[k * kFineBins + (key & (kFineBins - 1))];
        break;
      }
    }
  }
  h[kk * kFineBins] += above;
}

template <class T>
void DiffHistograms(const T* p0, const std::vector<const T*>& fts, int64_t n, const int32_t* bins, int64_t kk,
                    bool fine, int32_t* out, int threads) {
  const int64_t num_tasks = static_cast<int64_t>(fts.size());
  const int64_t row = fine ? kk * kFineBins + 1 : kCoarseBins;  // counts per task
  std::vector<char> contiguous(num_tasks, 0);
  for (int64_t t = 0; t < num_tasks && fine; ++t) {
    const int32_t* b = bins + t * kk;
    bool c = b[0] >= 0 && b[0] + kk <= kCoarseBins;
    for (int64_t k = 1; k < kk && c; ++k) c = b[k] == b[0] + k;
    contiguous[t] = c;
  }
  const int nt = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, n / kThreadChunk)));
  std::memset(out, 0, sizeof(int32_t) * num_tasks * row);
  std::vector<std::vector<int32_t>> part(nt > 1 ? nt : 0);  // thread w > 0 counts privately
  ParallelFor(nt, [&](int w) {
    ScopedFlushDenormals flush;  // the vector keys rely on DAZ/FTZ (XLA:CPU's |a − b|)
    int32_t* h = out;
    if (w > 0) {
      part[w].assign(num_tasks * row, 0);
      h = part[w].data();
    }
    std::vector<uint32_t> buf(kHistChunk);
    const int64_t begin = n * w / nt, end = n * (w + 1) / nt;
    for (int64_t c = begin; c < end; c += kHistChunk) {
      const int64_t c_end = std::min(c + kHistChunk, end);
      for (int64_t t = 0; t < num_tasks; ++t) {
        HistogramRange(DiffKeysT<T>{fts[t], p0}, c, c_end, bins + t * kk, kk, fine, contiguous[t] != 0, h + t * row,
                       buf.data());
      }
    }
  });
  for (int w = 1; w < nt; ++w) {  // totals ≤ n < 2^31: int32 sums cannot overflow
    const int32_t* p = part[w].data();
    for (int64_t j = 0; j < num_tasks * row; ++j) out[j] += p[j];
  }
}

// Arguments: bins[T, K] (read only when ``fine``), offsets[T + 1] (int32), θ0's buffer, then
// the T tasks' buffers (all float32 or all bfloat16). Leaf j is ``size`` elements of buffer
// j from element offsets[j] (size < 0: whole buffers, offsets 0): host views
// (bcjax.merging.HostView) hand over NumPy memory, even memory-mapped files, without a copy.
// Result int32[T, 2^16] (coarse) or [T, K · 2^15 + 1] (fine: K rows of 2^15, then the count
// above every bin); size < 2^31.
ffi::Error DiffHistogramsImpl(ffi::Buffer<ffi::S32> bins, ffi::Buffer<ffi::S32> offsets, ffi::RemainingArgs leaves,
                              ffi::ResultBuffer<ffi::S32> out, int64_t fine, int64_t threads, int64_t size) {
  const int64_t nargs = static_cast<int64_t>(leaves.size());
  const auto bdims = bins.dimensions();
  if (nargs < 2 || bdims.size() != 2 || bdims[0] != nargs - 1 ||
      static_cast<int64_t>(offsets.element_count()) != nargs) {
    return ffi::Error::InvalidArgument("bcjax_diff_histograms: expected bins[T, K], offsets[T + 1], θ0 and T "
                                       "fine-tuned leaves");
  }
  const int64_t num_tasks = nargs - 1, kk = bdims[1];
  std::vector<const char*> data(nargs);
  ffi::DataType dtype = ffi::DataType::F32;
  int64_t n = size;
  const int32_t* off = offsets.typed_data();
  for (int64_t j = 0; j < nargs; ++j) {
    auto buf = leaves.get<ffi::AnyBuffer>(j);
    if (buf.has_error()) return buf.error();
    if (j == 0) {
      dtype = buf->element_type();
      if (size < 0) n = static_cast<int64_t>(buf->element_count());
    }
    if (buf->element_type() != dtype || (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16)) {
      return ffi::Error::InvalidArgument("bcjax_diff_histograms: leaves must all be float32 or all bfloat16");
    }
    const int64_t start = size < 0 ? 0 : off[j];
    if (size < 0 ? static_cast<int64_t>(buf->element_count()) != n
                 : start < 0 || start + n > static_cast<int64_t>(buf->element_count())) {
      return ffi::Error::InvalidArgument(size < 0 ? "bcjax_diff_histograms: fine-tuned and pretrained sizes differ"
                                                  : "bcjax_diff_histograms: a view runs past its buffer");
    }
    const int64_t itemsize = dtype == ffi::DataType::BF16 ? 2 : 4;
    data[j] = static_cast<const char*>(buf->untyped_data()) + start * itemsize;
  }
  if (n > 0x7fffffffLL) return ffi::Error::InvalidArgument("bcjax_diff_histograms: more than 2^31 - 1 elements");
  const int64_t want = num_tasks * (fine ? kk * kFineBins + 1 : kCoarseBins);
  if (static_cast<int64_t>(out->element_count()) != want) {
    return ffi::Error::InvalidArgument("bcjax_diff_histograms: wrong output size");
  }
  const int nthreads = static_cast<int>(std::max<int64_t>(1, threads));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    std::vector<const T*> fts(num_tasks);
    for (int64_t t = 0; t < num_tasks; ++t) fts[t] = reinterpret_cast<const T*>(data[t + 1]);
    DiffHistograms<T>(reinterpret_cast<const T*>(data[0]), fts, n, bins.typed_data(), kk, fine != 0,
                      out->typed_data(), nthreads);
  };
  if (dtype == ffi::DataType::BF16) run(BFloat16{}); else run(float{});
  return ffi::Error::Success();
}

ffi::Error CheckRanks(const int32_t* r, int64_t kk, int64_t n, int64_t out_count) {
  if (out_count != kk) return ffi::Error::InvalidArgument("bcjax select: output size must equal the number of ranks");
  if (n == 0) return ffi::Error::InvalidArgument("bcjax select: no elements to select from");
  for (int64_t k = 0; k < kk; ++k) {
    if (r[k] < 0 || r[k] >= n) return ffi::Error::InvalidArgument("bcjax select: rank out of range");
  }
  return ffi::Error::Success();
}

ffi::Error SelectBitsImpl(ffi::Buffer<ffi::S32> bits, ffi::Buffer<ffi::S32> ranks, ffi::ResultBuffer<ffi::S32> out,
                          int64_t threads, float sigmas, int64_t isa) {
  const int64_t n = static_cast<int64_t>(bits.element_count());
  const int64_t kk = static_cast<int64_t>(ranks.element_count());
  ffi::Error err = CheckRanks(ranks.typed_data(), kk, n, static_cast<int64_t>(out->element_count()));
  if (err.failure()) return err;
  const int32_t* x = bits.typed_data();
  for (int64_t i = 0; i < n; i += 4096) {  // spot check: magnitude bits are never negative
    if (x[i] < 0) return ffi::Error::InvalidArgument("bcjax_select_bits: keys must be non-negative");
  }
  Select(x, n, ranks.typed_data(), kk, out->typed_data(), static_cast<int>(std::max<int64_t>(1, threads)), sigmas,
         isa);
  return ffi::Error::Success();
}

// Checks the output shape and every task's ranks, then runs SelectDiffSegments.
template <typename T>
ffi::Error CheckedSelectDiffSegments(const std::vector<const T*>& p0,
                                     const std::vector<std::vector<const T*>>& fts,
                                     const std::vector<int64_t>& start, ffi::Buffer<ffi::S32>& ranks,
                                     ffi::ResultBuffer<ffi::S32>& out, int64_t threads, float sigmas,
                                     int64_t isa) {
  const int64_t num_tasks = static_cast<int64_t>(fts.size());
  const int64_t kk = ranks.dimensions()[1];
  if (static_cast<int64_t>(out->element_count()) != num_tasks * kk) {
    return ffi::Error::InvalidArgument("bcjax_select_diff_bits: output must have shape (tasks, K)");
  }
  for (int64_t t = 0; t < num_tasks; ++t) {
    ffi::Error err = CheckRanks(ranks.typed_data() + t * kk, kk, start.back(), kk);
    if (err.failure()) return err;
  }
  SelectDiffSegments<T>(p0, fts, start, ranks.typed_data(), kk, out->typed_data(),
                     static_cast<int>(std::max<int64_t>(1, threads)), sigmas, isa);
  return ffi::Error::Success();
}

// Arguments: ranks[T, K], then θ0's L leaves, then task 0's L leaves, …, task T−1's; the
// number of tasks is (args − L) / L. One leaf (L = 1) is the per-leaf Breadcrumbs selection.
ffi::Error SelectDiffBitsSegmentsImpl(ffi::Buffer<ffi::S32> ranks, ffi::RemainingArgs leaves,
                                      ffi::ResultBuffer<ffi::S32> out, int64_t num_leaves, int64_t threads,
                                      float sigmas, int64_t isa) {
  const int64_t nl = num_leaves;
  const int64_t nargs = static_cast<int64_t>(leaves.size());
  if (nl <= 0 || nargs % nl != 0 || nargs / nl < 2) {
    return ffi::Error::InvalidArgument("bcjax_select_diff_bits: expected θ0's leaves and at least one task's");
  }
  const int64_t num_tasks = nargs / nl - 1;
  const auto rdims = ranks.dimensions();
  if (rdims.size() != 2 || rdims[0] != num_tasks) {
    return ffi::Error::InvalidArgument("bcjax_select_diff_bits: ranks must have shape (tasks, K)");
  }
  // every leaf float32, or every leaf bfloat16 (keys: the float32 difference after an upcast)
  ffi::DataType dtype = ffi::DataType::F32;
  std::vector<const void*> data(nargs);
  std::vector<int64_t> start(nl + 1, 0);
  for (int64_t j = 0; j < nargs; ++j) {
    auto buf = leaves.get<ffi::AnyBuffer>(j);
    if (buf.has_error()) return buf.error();
    if (j == 0) dtype = buf->element_type();
    if (buf->element_type() != dtype || (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16)) {
      return ffi::Error::InvalidArgument("bcjax_select_diff_bits: leaves must all be float32 or all bfloat16");
    }
    data[j] = buf->untyped_data();
    const int64_t l = j % nl, m = j / nl;
    const int64_t size = static_cast<int64_t>(buf->element_count());
    if (m == 0) {
      start[l + 1] = start[l] + size;
    } else if (size != start[l + 1] - start[l]) {
      return ffi::Error::InvalidArgument("bcjax_select_diff_bits: fine-tuned and pretrained sizes differ");
    }
  }
  auto run = [&](auto tag) -> ffi::Error {
    using T = decltype(tag);
    std::vector<const T*> p0(nl);
    std::vector<std::vector<const T*>> fts(num_tasks, std::vector<const T*>(nl));
    for (int64_t j = 0; j < nargs; ++j) {
      const T* x = static_cast<const T*>(data[j]);
      if (j < nl) p0[j] = x; else fts[j / nl - 1][j % nl] = x;
    }
    return CheckedSelectDiffSegments<T>(p0, fts, start, ranks, out, threads, sigmas, isa);
  };
  return dtype == ffi::DataType::BF16 ? run(BFloat16{}) : run(float{});
}


// The same selection on host views (bcjax.merging.HostView): each leaf argument is a padded
// buffer holding the leaf's ``sizes[l]`` elements from element ``offsets[j]`` (argument j: θ0's
// L leaves, then each task's), so XLA hands over NumPy memory without a copy.
ffi::Error SelectDiffBitsViewsImpl(ffi::Buffer<ffi::S32> ranks, ffi::Buffer<ffi::S32> offsets,
                                   ffi::RemainingArgs leaves, ffi::ResultBuffer<ffi::S32> out,
                                   ffi::Span<const int64_t> sizes, int64_t threads, float sigmas, int64_t isa) {
  const int64_t nl = static_cast<int64_t>(sizes.size());
  const int64_t nargs = static_cast<int64_t>(leaves.size());
  if (nl <= 0 || nargs % nl != 0 || nargs / nl < 2 || static_cast<int64_t>(offsets.element_count()) != nargs) {
    return ffi::Error::InvalidArgument("bcjax_select_diff_bits_views: expected θ0's views, at least one task's, "
                                       "and one offset per view");
  }
  const int64_t num_tasks = nargs / nl - 1;
  const auto rdims = ranks.dimensions();
  if (rdims.size() != 2 || rdims[0] != num_tasks) {
    return ffi::Error::InvalidArgument("bcjax_select_diff_bits_views: ranks must have shape (tasks, K)");
  }
  std::vector<const float*> p0(nl);
  std::vector<std::vector<const float*>> fts(num_tasks, std::vector<const float*>(nl));
  std::vector<int64_t> start(nl + 1, 0);
  for (int64_t l = 0; l < nl; ++l) start[l + 1] = start[l] + sizes[l];
  const int32_t* off = offsets.typed_data();
  for (int64_t j = 0; j < nargs; ++j) {
    auto buf = leaves.get<ffi::Buffer<ffi::F32>>(j);
    if (buf.has_error()) return buf.error();
    const int64_t l = j % nl, m = j / nl;
    if (off[j] < 0 || off[j] + sizes[l] > static_cast<int64_t>(buf->element_count())) {
      return ffi::Error::InvalidArgument("bcjax_select_diff_bits_views: a view runs past its buffer");
    }
    const float* data = buf->typed_data() + off[j];
    if (m == 0) p0[l] = data; else fts[m - 1][l] = data;
  }
  return CheckedSelectDiffSegments<float>(p0, fts, start, ranks, out, threads, sigmas, isa);
}

}  // namespace

// The per-leaf selection of SelectDiffBitsSegmentsImpl (L = 1) for many float32 leaves in one
// plain C call on host memory (ctypes, GIL released; bcjax.merging's native Breadcrumbs merge,
// which compiles no XLA program per leaf shape): for every leaf l, the SAME SelectDiffSegments
// the FFI handler runs, on p0[l] and fts[t * L + l] (sizes[l] floats each), ranks[l][t][k] →
// out[l][t][k] (K = kk per task). Leaves are handed to up to ``threads`` threads, each with
// the denormal mode XLA:CPU's threads run the FFI handler under. Returns 0, or 1 for bad
// arguments (a rank outside [0, n), an empty leaf or one of 2^31 entries or more).
extern "C" int bcjax_select_diff_bits_per_leaf(int64_t num_leaves, const int64_t* sizes, const void* const* p0,
                                               const void* const* fts, int64_t num_tasks, const int32_t* ranks,
                                               int64_t kk, int32_t* out, int64_t threads, double sigmas,
                                               int64_t isa) {
  if (num_leaves < 0 || num_tasks < 1 || kk < 1) return 1;
  for (int64_t l = 0; l < num_leaves; ++l) {
    if (sizes[l] < 1 || sizes[l] > INT32_MAX) return 1;
    for (int64_t k = 0; k < num_tasks * kk; ++k) {
      const int32_t r = ranks[l * num_tasks * kk + k];
      if (r < 0 || r >= sizes[l]) return 1;
    }
  }
  std::atomic<int64_t> next{0};
  auto work = [&](int) {
    ScopedFlushDenormals flush;
    for (int64_t l; (l = next.fetch_add(1)) < num_leaves;) {
      const std::vector<const float*> p{static_cast<const float*>(p0[l])};
      std::vector<std::vector<const float*>> f(num_tasks);
      for (int64_t t = 0; t < num_tasks; ++t) f[t] = {static_cast<const float*>(fts[t * num_leaves + l])};
      SelectDiffSegments<float>(p, f, {0, sizes[l]}, ranks + l * num_tasks * kk, kk, out + l * num_tasks * kk, 1,
                                sigmas, isa);
    }
  };
  ParallelFor(static_cast<int>(std::max<int64_t>(1, std::min(threads, num_leaves))), work);
  return 0;
}

// TIES's model-wide selection of SelectDiffBitsSegmentsImpl in one plain C call on host
// memory (ctypes, GIL released; bcjax.merging's TIES thresholds for concrete float32 CPU
// leaves, which compiles no XLA program): the SAME SelectDiffSegments over the union of the L
// leaves p0[l] / fts[t * L + l] (sizes[l] floats each), ranks[t][k] → out[t][k] (K = kk), under
// the denormal mode XLA:CPU's threads run the FFI handler with. Returns 0, or 1 for bad
// arguments (an empty leaf, a union of 2^31 entries or more, a rank outside [0, n)).
extern "C" int bcjax_select_diff_bits_model(int64_t num_leaves, const int64_t* sizes, const void* const* p0,
                                            const void* const* fts, int64_t num_tasks, const int32_t* ranks,
                                            int64_t kk, int32_t* out, int64_t threads, double sigmas,
                                            int64_t isa) {
  if (num_leaves < 1 || num_tasks < 1 || kk < 1) return 1;
  std::vector<int64_t> start(num_leaves + 1, 0);
  for (int64_t l = 0; l < num_leaves; ++l) {
    if (sizes[l] < 1) return 1;
    start[l + 1] = start[l] + sizes[l];
  }
  if (start.back() > INT32_MAX) return 1;
  for (int64_t k = 0; k < num_tasks * kk; ++k) {
    if (ranks[k] < 0 || ranks[k] >= start.back()) return 1;
  }
  std::vector<const float*> p(num_leaves);
  std::vector<std::vector<const float*>> f(num_tasks, std::vector<const float*>(num_leaves));
  for (int64_t l = 0; l < num_leaves; ++l) {
    p[l] = static_cast<const float*>(p0[l]);
    for (int64_t t = 0; t < num_tasks; ++t) f[t][l] = static_cast<const float*>(fts[t * num_leaves + l]);
  }
  ScopedFlushDenormals flush;
  SelectDiffSegments<float>(p, f, start, ranks, kk, out, static_cast<int>(std::max<int64_t>(1, threads)), sigmas,
                            isa);
  return 0;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(BcjaxSelectDiffBitsMulti, SelectDiffBitsSegmentsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("num_leaves")
                                  .Attr<int64_t>("threads")
                                  .Attr<float>("sigmas")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BcjaxSelectBits, SelectBitsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<float>("sigmas")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BcjaxDiffHistograms, DiffHistogramsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("fine")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("size"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BcjaxSelectDiffBitsViews, SelectDiffBitsViewsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<ffi::Span<const int64_t>>("sizes")
                                  .Attr<int64_t>("threads")
                                  .Attr<float>("sigmas")
                                  .Attr<int64_t>("isa"));
