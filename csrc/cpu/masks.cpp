// KEEP masks from scores on the CPU: exact count per row, or N of every M, with deterministic ties.
//
// Every score becomes an order-preserving 32-bit key (the float's bits with the sign handled, -0
// equal to +0; NaN last), so "lower score, and among equal scores the lower column index, is
// pruned first" is plain unsigned order on (key, column). One row at a time per thread:
//   row-wise (exact k per row): 256 keys sampled straight from the row (16 chunks of 16 columns)
//   rank 32 pivots in two steps; the two around the target rank, with a 3-sigma margin, bracket
//   the k-th key. One pass over the row computes the keys (fused Wanda: |w| * sqrt(norm), the
//   scores never reach memory), counts those below the bracket and compresses those inside it
//   (about a fifth of the row) while prefetching the next row. Rounds of probe-ranked cuts
//   (count, then compress the one value range that holds the target) shrink the candidates about
//   5x a round; the last 32 or fewer are ranked in registers. That gives the k-th key value t
//   and how many keys equal it; ties at t are settled by column: when all copies of t are pruned
//   the mask is one compare a vector, else a scan finds the column of the last pruned copy. A
//   bracket that misses (rare) makes the whole row the candidate set: the result is exact anyway.
//   N:M with M dividing 16: each lane ranks itself against the other M-1 lanes of its group via
//   lane permutes (compares for half the partner shifts, the other half read from the partner),
//   so one zmm handles 16/M groups with no sort at all.
// Masks go out 64 bytes per streaming store.
// Cost on this Zen 4 core, 4096-column bf16 Wanda rows, data in cache: ~0.8K cycles the sample,
// ~2.5K the keys-and-bracket pass (vector-ALU bound: convert, multiply, compress), ~1.5-2K the
// rounds, ~0.7K the mask; the rounds cost ~12 cycles per 16 candidates a round, and a probe
// sample that misses the target costs one more round, hence the average above the best case.
// OpenMP over rows. A CPU without AVX-512 (or an ISA cap) runs the scalar versions: nth_element on
// (key, column) pairs for rows, a rank count per group for N:M.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/cpu_features.h"
#include "ops.h"

namespace lmsqueeze {

namespace {

#define LMSQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq")))

inline uint32_t float_key(float f) {
  if (std::isnan(f)) return 0xFFFFFFFFu;  // every NaN last and equal to the others, as in torch.sort
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if (u == 0x80000000u) u = 0;  // -0 ties with +0, as in torch.sort
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline __mmask16 tail_mask(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}

LMSQ_AVX512 inline __m512i key16(__m512 f) {
  __m512i u = _mm512_castps_si512(f);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  u = _mm512_mask_mov_epi32(u, _mm512_cmpeq_epi32_mask(u, sign), _mm512_setzero_si512());
  u = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), sign));
  return _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(-1));  // NaN last
}

LMSQ_AVX512 inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
LMSQ_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
LMSQ_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
LMSQ_AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
LMSQ_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}
LMSQ_AVX512 inline __m512 load16(const c10::Half* p, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

// ---- keys -----------------------------------------------------------------------------------------
// sq == nullptr: keys of the scores themselves (key16: any sign). Else Wanda scores |w| * sq[j]:
// those are >= 0 or NaN, so the float bits with the sign cleared already order as unsigned
// integers (-0 becomes +0), and a min makes every NaN one key above +inf (torch.sort puts NaN last,
// in column order): two cheap operations instead of key16's five. |w * sq| equals |w| * sq bit for
// bit: rounding does not depend on the sign.
template <typename T>
LMSQ_AVX512 inline __m512i keys16(const T* row, const float* sq, int64_t j, __mmask16 km) {
  const bool full = km == 0xFFFF;  // full vectors take plain loads: masked ones cost more on Zen 4
  const __m512 f = full ? load16(row + j) : load16(row + j, km);
  if (!sq) return key16(f);
  const __m512 norm = full ? _mm512_loadu_ps(sq + j) : _mm512_maskz_loadu_ps(km, sq + j);
  const __m512i bits = _mm512_castps_si512(_mm512_abs_ps(_mm512_mul_ps(f, norm)));
  return _mm512_min_epu32(bits, _mm512_set1_epi32(0x7F800001));
}

// Keys of a whole row (rows too short to sample, and N:M groups that do not divide 16).
template <typename T>
LMSQ_AVX512 void row_keys_avx512(const T* __restrict__ row, const float* __restrict__ sq, int64_t c,
                                 uint32_t* __restrict__ keys) {
  int64_t j = 0;
  for (; j + 16 <= c; j += 16) _mm512_storeu_si512(keys + j, keys16(row, sq, j, 0xFFFF));
  if (j < c) {
    const __mmask16 k = tail_mask(c - j);
    _mm512_mask_storeu_epi32(keys + j, k, keys16(row, sq, j, k));
  }
}

template <typename T>
void row_keys_generic(const T* __restrict__ row, const float* __restrict__ sq, int64_t c, uint32_t* __restrict__ keys) {
  for (int64_t j = 0; j < c; ++j) {
    const float v = static_cast<float>(row[j]);
    keys[j] = float_key(sq ? std::fabs(v * sq[j]) : v);  // NaN last, as in keys16
  }
}

// ---- row-wise exact-k selection -----------------------------------------------------------------
struct Scratch {
  // allocated on the thread's first row, uninitialised: nothing reads a key before writing it, and
  // a thread that gets no row (a whole-layer mask is one long row) allocates nothing
  std::unique_ptr<uint32_t[]> buf[4];
  uint32_t* keys = nullptr;                        // the row's keys
  uint32_t* cand[3] = {nullptr, nullptr, nullptr};  // candidate keys, rotated by the rounds
  std::vector<uint64_t> pairs;                     // (key, column) pairs of the scalar path
  void reserve(int64_t c) {
    if (keys) return;
    for (auto& b : buf) b.reset(new uint32_t[c + 16]);
    keys = buf[0].get();
    for (int i = 0; i < 3; ++i) cand[i] = buf[i + 1].get();
  }
};

// The r-th smallest (1-based) of the n candidate keys in s.cand[0]: quickselect with a three-way
// vector partition around a pivot picked near the target's quantile, nth_element once 48 or fewer
// remain. *less and *equal get how many of the n keys are smaller than / equal to the answer.
// select_probe below hands over to it when its cuts cannot shrink the set (long runs of equal keys).
LMSQ_AVX512 uint32_t select_key(Scratch& s, int64_t n, int64_t r, int64_t* less, int64_t* equal) {
  int cur = 0;
  int64_t passed = 0;  // keys known to be smaller, from partitions that went right
  while (n > 48) {
    const uint32_t* ck = s.cand[cur];
    // pivot: of 7 spread keys, the one at the target's quantile, so the side that holds the
    // target is small (a median pivot only halves the candidates each pass)
    uint32_t probe[7];
    for (int i = 0; i < 7; ++i) probe[i] = ck[((2 * i + 1) * n) / 14];
    std::sort(probe, probe + 7);
    const uint32_t p = probe[std::min<int64_t>(6, (7 * (r - 1)) / n)];
    const int lt_buf = (cur + 1) % 3, gt_buf = (cur + 2) % 3;
    uint32_t* lk = s.cand[lt_buf];
    uint32_t* gk = s.cand[gt_buf];
    const __m512i vp = _mm512_set1_epi32(static_cast<int>(p));
    int64_t nl = 0, ng = 0;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 km = tail_mask(n - j);
      const __m512i v = j + 16 <= n ? _mm512_loadu_si512(ck + j) : _mm512_maskz_loadu_epi32(km, ck + j);
      const __mmask16 lt = _mm512_mask_cmplt_epu32_mask(km, v, vp);
      const __mmask16 gt = _mm512_mask_cmpgt_epu32_mask(km, v, vp);
      _mm512_storeu_si512(lk + nl, _mm512_maskz_compress_epi32(lt, v));
      _mm512_storeu_si512(gk + ng, _mm512_maskz_compress_epi32(gt, v));
      nl += _mm_popcnt_u32(lt);
      ng += _mm_popcnt_u32(gt);
    }
    const int64_t ne = n - nl - ng;
    if (r <= nl) {
      cur = lt_buf;
      n = nl;
    } else if (r <= nl + ne) {
      *less = passed + nl;
      *equal = ne;
      return p;
    } else {
      r -= nl + ne;
      passed += nl + ne;
      cur = gt_buf;
      n = ng;
    }
  }
  uint32_t* ck = s.cand[cur];
  std::nth_element(ck, ck + (r - 1), ck + n);
  const uint32_t t = ck[r - 1];
  int64_t lt = 0, eq = 0;
  for (int64_t j = 0; j < n; ++j) {
    lt += ck[j] < t;
    eq += ck[j] == t;
  }
  *less = passed + lt;
  *equal = eq;
  return t;
}

// Column of the need-th (1-based) key equal to t, in column order.
LMSQ_AVX512 int64_t nth_equal(const uint32_t* keys, int64_t c, uint32_t t, int64_t need) {
  const __m512i vt = _mm512_set1_epi32(static_cast<int>(t));
  for (int64_t j = 0; j < c; j += 16) {
    const __mmask16 km = tail_mask(c - j);
    uint32_t eq = _mm512_mask_cmpeq_epi32_mask(km, _mm512_maskz_loadu_epi32(km, keys + j), vt);
    const int count = _mm_popcnt_u32(eq);
    if (count >= need) {
      for (int64_t q = 1; q < need; ++q) eq &= eq - 1;
      return j + __builtin_ctz(eq);
    }
    need -= count;
  }
  return c - 1;  // not reached: need never exceeds the number of copies of t
}

// Mask bytes 64 columns at a time, pruned(j, lanes) giving the pruned bits of the 16 columns at j.
// Where keep is 64-byte aligned the 64 bytes go out in one streaming store: the mask is not read
// back here, so its lines need no read-for-ownership (the caller fences once after all rows).
template <typename Pruned>
LMSQ_AVX512 inline void write_mask(int64_t c, bool* __restrict__ keep, Pruned pruned) {
  int64_t j = 0;
  const bool aligned = (reinterpret_cast<uintptr_t>(keep) & 63) == 0;
  for (; j + 64 <= c; j += 64) {
    const __mmask64 p = static_cast<__mmask64>(pruned(j, 0xFFFF)) |
                        (static_cast<__mmask64>(pruned(j + 16, 0xFFFF)) << 16) |
                        (static_cast<__mmask64>(pruned(j + 32, 0xFFFF)) << 32) |
                        (static_cast<__mmask64>(pruned(j + 48, 0xFFFF)) << 48);
    const __m512i bytes = _mm512_maskz_set1_epi8(~p, 1);
    if (aligned) _mm512_stream_si512(reinterpret_cast<__m512i*>(keep + j), bytes);
    else _mm512_storeu_si512(keep + j, bytes);
  }
  for (; j < c; j += 16) {
    const __mmask16 k = tail_mask(c - j);
    _mm_mask_storeu_epi8(keep + j, k, _mm_maskz_set1_epi8(static_cast<__mmask16>(~pruned(j, k)), 1));
  }
}

LMSQ_AVX512 inline __m512i load_keys(const uint32_t* keys, int64_t j, __mmask16 k) {
  return k == 0xFFFF ? _mm512_loadu_si512(keys + j) : _mm512_maskz_loadu_epi32(k, keys + j);
}

struct PrunedAtOrBelow {  // key <= t: every copy of t is pruned
  const uint32_t* keys;
  __m512i vt;
  LMSQ_AVX512 __mmask16 operator()(int64_t j, __mmask16 k) const {
    return _mm512_mask_cmple_epu32_mask(k, load_keys(keys, j, k), vt);
  }
};

struct PrunedWithTies {  // key < t, or key == t at a column <= t_idx
  const uint32_t* keys;
  __m512i vt, vti;
  LMSQ_AVX512 __mmask16 operator()(int64_t j, __mmask16 k) const {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i v = load_keys(keys, j, k);
    const __m512i idx = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(j)));
    return static_cast<__mmask16>(
        k & (_mm512_cmplt_epu32_mask(v, vt) | (_mm512_cmpeq_epi32_mask(v, vt) & _mm512_cmple_epi32_mask(idx, vti))));
  }
};

// The highest of the keys in `key` whose rank is at most `most` (none: `none`), and the lowest
// whose rank is at least `least`.
LMSQ_AVX512 inline uint32_t highest_ranked(__m512i key, __m512i rank, int most, uint32_t none) {
  const __mmask16 ok = _mm512_cmple_epi32_mask(rank, _mm512_set1_epi32(most));
  return ok ? _mm512_mask_reduce_max_epu32(ok, key) : none;
}

LMSQ_AVX512 inline uint32_t lowest_ranked(__m512i key, __m512i rank, int least, uint32_t none) {
  const __mmask16 ok = _mm512_cmpge_epi32_mask(rank, _mm512_set1_epi32(least));
  return ok ? _mm512_mask_reduce_min_epu32(ok, key) : none;
}

// [lo, hi] around the k-th smallest of a row's c keys, from 256 of them: 16 pivots (one from each
// 16-key chunk, each from a different lane) are ranked against the whole sample, then 16 more from
// between the two chosen; lo is the highest pivot with at most q * 256 - 3 sigma - 2 sample keys
// below it, hi the lowest with at least q * 256 + 3 sigma + 2 (q = k / c). Without such a pivot
// the side stays open (0 / max). The pass that follows counts exactly, so a bracket that misses
// costs time, never the answer.
LMSQ_AVX512 void pick_bracket(const uint32_t* sample, int64_t k, int64_t c, uint32_t* lo, uint32_t* hi) {
  constexpr int kSample = 256;
  const double q = static_cast<double>(k) / static_cast<double>(c);
  const double delta = 3.0 * std::sqrt(kSample * q * (1.0 - q)) + 2.0;
  const int want_lo = static_cast<int>(std::floor(q * kSample - delta));
  const int want_hi = static_cast<int>(std::ceil(q * kSample + delta));
  const __m512i diag = _mm512_setr_epi32(0, 17, 34, 51, 68, 85, 102, 119, 136, 153, 170, 187, 204, 221, 238, 255);
  const __m512i pivot = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), 0xFFFF, diag, sample, 4);
  const __m512i one = _mm512_set1_epi32(1);
  __m512i rank = _mm512_setzero_si512();  // sample keys below each pivot
  for (int j = 0; j < kSample; ++j)
    rank = _mm512_mask_add_epi32(rank, _mm512_cmpgt_epu32_mask(pivot, _mm512_set1_epi32(static_cast<int>(sample[j]))),
                                 rank, one);
  const __mmask16 high = _mm512_cmpge_epi32_mask(rank, _mm512_set1_epi32(want_hi));
  const uint32_t a = highest_ranked(pivot, rank, want_lo, 0u);
  const uint32_t b = lowest_ranked(pivot, rank, want_hi, 0xFFFFFFFFu);
  *lo = a;
  *hi = b;
  // the pivots sit about 16 sample ranks apart: 16 more, spread over the sample keys strictly
  // inside (a, b) and ranked among those, move each side to within a few ranks of its target
  alignas(64) uint32_t inside[kSample + 16];
  int m = 0;
  const __m512i va = _mm512_set1_epi32(static_cast<int>(a)), vb = _mm512_set1_epi32(static_cast<int>(b));
  for (int j = 0; j < kSample; j += 16) {
    const __m512i v = _mm512_load_si512(sample + j);
    const __mmask16 in = _mm512_cmpgt_epu32_mask(v, va) & _mm512_cmplt_epu32_mask(v, vb);
    _mm512_storeu_si512(inside + m, _mm512_maskz_compress_epi32(in, v));
    m += _mm_popcnt_u32(in);
  }
  if (m < 16) return;
  // sample keys <= a: those below b (b's rank; all of them when b is open) less those inside
  const int below_b =
      high ? _mm512_mask_reduce_min_epi32(_mm512_mask_cmpeq_epi32_mask(high, pivot, vb), rank) : kSample;
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512i at = _mm512_srli_epi32(_mm512_mullo_epi32(odd, _mm512_set1_epi32(m)), 5);
  const __m512i pivot2 = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), 0xFFFF, at, inside, 4);
  __m512i rank2 = _mm512_set1_epi32(below_b - m);
  for (int j = 0; j < m; ++j)
    rank2 = _mm512_mask_add_epi32(
        rank2, _mm512_cmpgt_epu32_mask(pivot2, _mm512_set1_epi32(static_cast<int>(inside[j]))), rank2, one);
  *lo = std::max(a, highest_ranked(pivot2, rank2, want_lo, 0u));
  *hi = std::min(b, lowest_ranked(pivot2, rank2, want_hi, 0xFFFFFFFFu));
}

// One pass over the row: its keys into `keys`, how many are below lo into *below, and those in
// [lo, hi] compressed into `cand` in column order; returns how many. The next row is prefetched
// into L2 on the way: the selection that follows is all L1 work, so without it the next row's
// loads would wait on memory.
template <typename T>
LMSQ_AVX512 int64_t keys_and_bracket(const T* __restrict__ row, const float* __restrict__ sq, int64_t c,
                                     uint32_t lo, uint32_t hi, uint32_t* __restrict__ keys,
                                     uint32_t* __restrict__ cand, int64_t* below, const T* __restrict__ next) {
  const __m512i vlo = _mm512_set1_epi32(static_cast<int>(lo)), vhi = _mm512_set1_epi32(static_cast<int>(hi));
  const __m512i one = _mm512_set1_epi32(1);
  __m512i vbelow = _mm512_setzero_si512();  // counted in a vector: no mask-to-GPR trip per vector
  int64_t n = 0, j = 0;
  for (; j + 16 <= c; j += 16) {
    if (next && (j * static_cast<int64_t>(sizeof(T))) % 64 == 0)
      _mm_prefetch(reinterpret_cast<const char*>(next + j), _MM_HINT_T1);
    const __m512i v = keys16(row, sq, j, 0xFFFF);
    _mm512_storeu_si512(keys + j, v);
    const __mmask16 lt = _mm512_cmplt_epu32_mask(v, vlo);
    vbelow = _mm512_mask_add_epi32(vbelow, lt, vbelow, one);
    const __mmask16 in = _mm512_mask_cmple_epu32_mask(static_cast<__mmask16>(~lt), v, vhi);
    _mm512_storeu_si512(cand + n, _mm512_maskz_compress_epi32(in, v));
    n += _mm_popcnt_u32(in);
  }
  int64_t nb = _mm512_reduce_add_epi32(vbelow);
  if (j < c) {
    const __mmask16 km = tail_mask(c - j);
    const __m512i v = keys16(row, sq, j, km);
    _mm512_mask_storeu_epi32(keys + j, km, v);
    const __mmask16 lt = _mm512_mask_cmplt_epu32_mask(km, v, vlo);
    const __mmask16 in = _mm512_mask_cmple_epu32_mask(km & ~lt, v, vhi);
    nb += _mm_popcnt_u32(lt);
    _mm512_storeu_si512(cand + n, _mm512_maskz_compress_epi32(in, v));
    n += _mm_popcnt_u32(in);
  }
  *below = nb;
  return n;
}

// The r-th smallest (1-based) of the n keys at src, as select_key, in rounds that keep one
// range of values each: 16 probes spread over the candidates are ranked among themselves, four
// of them around the target's expected place cut the values into five ranges, one counting pass
// says which holds the target, one compress pass keeps it (about 5x fewer keys a round on random
// data, 3 rounds for 3500 candidates). 32 or fewer left: every one ranked in registers.
// A round that cannot shrink the set (a and b the extremes, or all equal) hands over to the
// three-way partition of select_key.
LMSQ_AVX512 uint32_t select_probe(Scratch& s, const uint32_t* src, int64_t n, int64_t r, int64_t* less,
                                  int64_t* equal) {
  int cur = src == s.cand[0] ? 0 : -1;  // the s.cand buffer ck lives in (-1: elsewhere)
  int64_t passed = 0;  // keys known to be smaller, from ranges left below
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i odd_lo = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
  const __m512i odd_hi = _mm512_setr_epi64(17, 19, 21, 23, 25, 27, 29, 31);
  const uint32_t* ck = src;
  while (n > 32) {
    // probe i at (2i + 1) n / 32, in 64-bit arithmetic: 31 n passes 32 bits from n = 138M on
    const __m512i n64 = _mm512_set1_epi64(n);
    const __m256i at_lo = _mm512_cvtepi64_epi32(_mm512_srli_epi64(_mm512_mullo_epi64(odd_lo, n64), 5));
    const __m256i at_hi = _mm512_cvtepi64_epi32(_mm512_srli_epi64(_mm512_mullo_epi64(odd_hi, n64), 5));
    const __m512i at = _mm512_inserti64x4(_mm512_castsi256_si512(at_lo), at_hi, 1);
    const __m512i probe = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), 0xFFFF, at, ck, 4);
    __m512i rank = _mm512_setzero_si512();                     // probes below each probe
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i)
      rank = _mm512_mask_add_epi32(
          rank, _mm512_cmplt_epu32_mask(_mm512_permutexvar_epi32(_mm512_set1_epi32(i), probe), probe), rank, one);
    const double expect = static_cast<double>(r) * 17.0 / static_cast<double>(n + 1) - 1.0;  // probes below target
    // four cuts around the target's expected place among the probes: t2 <= t3 half a probe rank
    // below / above it, t1 <= t4 two and a half ranks; one counting pass says which of the five
    // value ranges holds the target, so a probe sample that misses costs a range of about 2/17 of
    // the keys instead of a whole side
    const uint32_t t1 = highest_ranked(probe, rank, static_cast<int>(std::floor(expect - 2.5)), 0u);
    const uint32_t t2 = highest_ranked(probe, rank, static_cast<int>(std::floor(expect - 0.5)), 0u);
    const uint32_t t3 = lowest_ranked(probe, rank, static_cast<int>(std::ceil(expect + 0.5)), 0xFFFFFFFFu);
    const uint32_t t4 = lowest_ranked(probe, rank, static_cast<int>(std::ceil(expect + 2.5)), 0xFFFFFFFFu);
    const __m512i v1 = _mm512_set1_epi32(static_cast<int>(t1)), v2 = _mm512_set1_epi32(static_cast<int>(t2));
    const __m512i v3 = _mm512_set1_epi32(static_cast<int>(t3)), v4 = _mm512_set1_epi32(static_cast<int>(t4));
    __m512i c1 = _mm512_setzero_si512(), c2 = c1, c3 = c1, c4 = c1;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      const __m512i v = _mm512_loadu_si512(ck + j);
      c1 = _mm512_mask_add_epi32(c1, _mm512_cmplt_epu32_mask(v, v1), c1, one);
      c2 = _mm512_mask_add_epi32(c2, _mm512_cmplt_epu32_mask(v, v2), c2, one);
      c3 = _mm512_mask_add_epi32(c3, _mm512_cmple_epu32_mask(v, v3), c3, one);
      c4 = _mm512_mask_add_epi32(c4, _mm512_cmple_epu32_mask(v, v4), c4, one);
    }
    int64_t below1 = _mm512_reduce_add_epi32(c1), below2 = _mm512_reduce_add_epi32(c2);
    int64_t upto3 = _mm512_reduce_add_epi32(c3), upto4 = _mm512_reduce_add_epi32(c4);
    if (j < n) {
      const __mmask16 km = tail_mask(n - j);
      const __m512i v = _mm512_maskz_loadu_epi32(km, ck + j);
      below1 += _mm_popcnt_u32(_mm512_mask_cmplt_epu32_mask(km, v, v1));
      below2 += _mm_popcnt_u32(_mm512_mask_cmplt_epu32_mask(km, v, v2));
      upto3 += _mm_popcnt_u32(_mm512_mask_cmple_epu32_mask(km, v, v3));
      upto4 += _mm_popcnt_u32(_mm512_mask_cmple_epu32_mask(km, v, v4));
    }
    // the values kept, and how many keys lie below them; a range is only chosen when it holds the
    // target, so a key lies beyond each bound moved by one and the +-1 cannot wrap
    uint32_t lo, hi;
    int64_t skip;
    if (r <= below1) {
      lo = 0, hi = t1 - 1, skip = 0;
    } else if (r <= below2) {
      lo = t1, hi = t2 - 1, skip = below1;
    } else if (r <= upto3) {
      if (upto3 - below2 == n) break;  // no progress: t2 and t3 span every key
      lo = t2, hi = t3, skip = below2;
    } else if (r <= upto4) {
      lo = t3 + 1, hi = t4, skip = upto3;
    } else {
      lo = t4 + 1, hi = 0xFFFFFFFFu, skip = upto4;
    }
    r -= skip;
    passed += skip;
    const int nxt = (cur + 1) % 3;
    uint32_t* out = s.cand[nxt];
    const __m512i vlo = _mm512_set1_epi32(static_cast<int>(lo)), vhi = _mm512_set1_epi32(static_cast<int>(hi));
    int64_t m = 0;
    for (j = 0; j < n; j += 16) {
      const __mmask16 km = tail_mask(n - j);
      const __m512i v = j + 16 <= n ? _mm512_loadu_si512(ck + j) : _mm512_maskz_loadu_epi32(km, ck + j);
      const __mmask16 in = _mm512_mask_cmple_epu32_mask(_mm512_mask_cmpge_epu32_mask(km, v, vlo), v, vhi);
      _mm512_storeu_si512(out + m, _mm512_maskz_compress_epi32(in, v));
      m += _mm_popcnt_u32(in);
    }
    n = m;
    cur = nxt;
    ck = out;
  }
  if (n > 32) {
    if (cur != 0) std::copy(ck, ck + n, s.cand[0]);  // select_key partitions from cand[0]
    const uint32_t t = select_key(s, n, r, less, equal);
    *less += passed;
    return t;
  }
  // the r-th key is the one with fewer than r keys below it and at least r at or below it
  const __mmask16 k0 = tail_mask(n), k1 = tail_mask(n > 16 ? n - 16 : 0);
  const __m512i v0 = _mm512_maskz_loadu_epi32(k0, ck), v1 = _mm512_maskz_loadu_epi32(k1, ck + 16);
  __m512i lt0 = _mm512_setzero_si512(), le0 = lt0, lt1 = lt0, le1 = lt0;
  for (int64_t i = 0; i < n; ++i) {
    const __m512i x = _mm512_set1_epi32(static_cast<int>(ck[i]));
    lt0 = _mm512_mask_add_epi32(lt0, _mm512_cmplt_epu32_mask(x, v0), lt0, one);
    le0 = _mm512_mask_add_epi32(le0, _mm512_cmple_epu32_mask(x, v0), le0, one);
    lt1 = _mm512_mask_add_epi32(lt1, _mm512_cmplt_epu32_mask(x, v1), lt1, one);
    le1 = _mm512_mask_add_epi32(le1, _mm512_cmple_epu32_mask(x, v1), le1, one);
  }
  const __m512i vr = _mm512_set1_epi32(static_cast<int>(r));
  const __mmask16 h0 = _mm512_mask_cmplt_epi32_mask(k0, lt0, vr) & _mm512_cmpge_epi32_mask(le0, vr);
  const __mmask16 h1 = _mm512_mask_cmplt_epi32_mask(k1, lt1, vr) & _mm512_cmpge_epi32_mask(le1, vr);
  alignas(64) int32_t lt[32], le[32];
  _mm512_store_si512(lt, lt0);
  _mm512_store_si512(lt + 16, lt1);
  _mm512_store_si512(le, le0);
  _mm512_store_si512(le + 16, le1);
  const int hit = h0 ? __builtin_ctz(h0) : 16 + __builtin_ctz(h1);
  *less = passed + lt[hit];
  *equal = le[hit] - lt[hit];
  return ck[hit];
}

// One row's KEEP mask with exactly k pruned. Rows of 1024+ columns: a 256-key sample (16 chunks of
// 16 columns spread over the row, computed from W directly) picks the bracket, and one pass makes
// the keys and gathers the bracket; shorter rows (and a bracket that misses) search the whole row.
template <typename T>
LMSQ_AVX512 void rowwise_avx512(const T* __restrict__ row, const float* __restrict__ sq, int64_t c, int64_t k,
                                Scratch& s, bool* __restrict__ keep, const T* __restrict__ next) {
  uint32_t* keys = s.keys;
  int64_t n = 0, below = 0;
  bool bracketed = false;
  if (c >= 1024) {
    alignas(64) uint32_t sample[256];
    for (int64_t i = 0; i < 16; ++i) _mm512_store_si512(sample + 16 * i, keys16(row, sq, (i * (c - 16)) / 15, 0xFFFF));
    uint32_t lo, hi;
    pick_bracket(sample, k, c, &lo, &hi);
    n = keys_and_bracket<T>(row, sq, c, lo, hi, keys, s.cand[0], &below, next);
    bracketed = below < k && k <= below + n;
  } else {
    row_keys_avx512<T>(row, sq, c, keys);
    if (next)  // the rounds that follow are L1 work: the next row's lines can come in meanwhile
      for (int64_t j = 0; j < c * static_cast<int64_t>(sizeof(T)); j += 64)
        _mm_prefetch(reinterpret_cast<const char*>(next) + j, _MM_HINT_T0);
  }
  if (!bracketed) {  // the whole row is the candidate set
    n = c;
    below = 0;
  }
  int64_t less = 0, equal = 0;
  const uint32_t t = select_probe(s, bracketed ? s.cand[0] : keys, n, k - below, &less, &equal);
  // the next row's sample is its first read: its lines go to L1 now, while the mask goes out
  if (next && c >= 1024)
    for (int64_t i = 0; i < 16; ++i)
      _mm_prefetch(reinterpret_cast<const char*>(next + (i * (c - 16)) / 15), _MM_HINT_T0);
  // every key equal to t lies in the bracket (and in the range select_probe kept), so `equal`
  // counts all copies of t in the row; the first `need` of them in column order are pruned
  const int64_t need = k - below - less;
  const __m512i vt = _mm512_set1_epi32(static_cast<int>(t));
  if (need == equal) {  // the usual case: one compare a vector
    write_mask(c, keep, PrunedAtOrBelow{keys, vt});
  } else {
    const int64_t t_idx = nth_equal(keys, c, t, need);
    write_mask(c, keep, PrunedWithTies{keys, vt, _mm512_set1_epi32(static_cast<int>(t_idx))});
  }
}

void rowwise_generic(const uint32_t* keys, int64_t c, int64_t k, Scratch& s, bool* keep) {
  s.pairs.resize(c);
  for (int64_t j = 0; j < c; ++j) s.pairs[j] = (static_cast<uint64_t>(keys[j]) << 32) | static_cast<uint64_t>(j);
  std::nth_element(s.pairs.begin(), s.pairs.begin() + (k - 1), s.pairs.end());
  const uint64_t t = s.pairs[k - 1];
  for (int64_t j = 0; j < c; ++j)
    keep[j] = ((static_cast<uint64_t>(keys[j]) << 32) | static_cast<uint64_t>(j)) > t;
}

// ---- N:M ------------------------------------------------------------------------------------------
// Lane l of a group of m ranks itself against the m-1 others: partner s of lane l is lane
// (l - l%m) + (l%m + s) % m; it counts as "lower" if its key is smaller, or equal with a lower lane.
struct NmPlan {
  int m = 0, n = 0;
  alignas(64) int32_t perm[15][16];  // partner lane of every lane, per shift s = 1 .. m-1
  uint16_t partner_first[15];        // lanes whose partner sits earlier in the group
};

NmPlan make_nm_plan(int n, int m) {
  NmPlan p;
  p.m = m;
  p.n = n;
  for (int s = 1; s < m; ++s) {
    unsigned first = 0;
    for (int l = 0; l < 16; ++l) {
      const int pos = l % m, other = (pos + s) % m;
      p.perm[s - 1][l] = l - pos + other;
      if (other < pos) first |= 1u << l;
    }
    p.partner_first[s - 1] = static_cast<uint16_t>(first);
  }
  return p;
}

// KEEP bits of 16 lanes (16/M whole groups): lanes whose rank (partners below them) is >= M - n;
// ties go to the earlier lane through the compare's mask.
// M = 4 (2:4 above all) with a third of the vector work: "partner +3 is below me" is the negation
// of "I am below my partner +1" (a strict order: ties go to the earlier lane), so that relation is
// the +1 compare's bits moved one lane within each group of four, and the rank test is bit logic
// on the three 16-bit masks.
LMSQ_AVX512 inline __mmask16 nm_keep16_m4(__m512i v, const __m512i* perm, const __mmask16* first, int n) {
  const __m512i w1 = _mm512_permutexvar_epi32(perm[0], v), w2 = _mm512_permutexvar_epi32(perm[1], v);
  const uint32_t l1 = _mm512_cmplt_epu32_mask(w1, v) | _mm512_mask_cmpeq_epi32_mask(first[0], w1, v);
  const uint32_t l2 = _mm512_cmplt_epu32_mask(w2, v) | _mm512_mask_cmpeq_epi32_mask(first[1], w2, v);
  const uint32_t l3 = ~(((l1 << 1) & 0xEEEEu) | ((l1 >> 3) & 0x1111u)) & 0xFFFFu;
  switch (n) {  // keep when at least 4 - n partners are below
    case 1: return static_cast<__mmask16>(l1 & l2 & l3);
    case 2: return static_cast<__mmask16>((l1 & l2) | (l1 & l3) | (l2 & l3));
    default: return static_cast<__mmask16>(l1 | l2 | l3);
  }
}

// Lanes (of 16) whose position in their group of M is >= s.
constexpr uint32_t lanes_from(int M, int s) {
  uint32_t bits = 0;
  for (int l = 0; l < 16; ++l)
    if (l % M >= s) bits |= 1u << l;
  return bits;
}

// Any M dividing 16: compares for the shifts 1 .. M/2 only; for s < M/2, "partner +(M-s) is below
// me" is the negation of "I am below my partner +s", read one partner over (bits moved s lanes
// within each group). The M - 1 relations are then summed per lane.
template <int M>
LMSQ_AVX512 inline __mmask16 nm_keep16(__m512i v, const __m512i* perm, const __mmask16* first, __m512i prune_below,
                                       int n) {
  if constexpr (M == 4) {
    return nm_keep16_m4(v, perm, first, n);
  } else {
    const __m512i one = _mm512_set1_epi32(1);
    uint32_t lower[M];
#pragma GCC unroll 16
    for (int s = 1; s <= M / 2; ++s) {
      const __m512i w = _mm512_permutexvar_epi32(perm[s - 1], v);
      lower[s] = _mm512_cmplt_epu32_mask(w, v) | _mm512_mask_cmpeq_epi32_mask(first[s - 1], w, v);
    }
#pragma GCC unroll 16
    for (int s = 1; s < M / 2; ++s)
      lower[M - s] = ~(((lower[s] << s) & lanes_from(M, s)) | ((lower[s] >> (M - s)) & ~lanes_from(M, s))) & 0xFFFFu;
    __m512i rank = _mm512_setzero_si512();
#pragma GCC unroll 16
    for (int s = 1; s < M; ++s) rank = _mm512_mask_add_epi32(rank, static_cast<__mmask16>(lower[s]), rank, one);
    return _mm512_cmpge_epi32_mask(rank, prune_below);
  }
}

// M a compile-time constant, so the permutes unroll with their index vectors in registers
// (a run-time loop over them, with the tie mask going through a general register, cost 24 cycles
// a vector on Zen 4); 64 columns per mask store, streaming where the mask is 64-byte aligned.
template <int M, typename T>
LMSQ_AVX512 void nm_avx512(const T* __restrict__ row,     // [c]
                           const float* __restrict__ sq,  // [c] or nullptr
                           int64_t c, const NmPlan& p, bool* __restrict__ keep) {
  __m512i perm[M - 1];
  __mmask16 first[M - 1];
  for (int s = 0; s < M - 1; ++s) {
    perm[s] = _mm512_load_si512(p.perm[s]);
    first[s] = static_cast<__mmask16>(p.partner_first[s]);
  }
  const __m512i prune_below = _mm512_set1_epi32(M - p.n);
  const bool aligned = (reinterpret_cast<uintptr_t>(keep) & 63) == 0;
  int64_t j = 0;
  for (; j + 64 <= c; j += 64) {
    __mmask64 kept = 0;
    for (int q = 0; q < 4; ++q)
      kept |= static_cast<__mmask64>(
                  nm_keep16<M>(keys16(row, sq, j + 16 * q, 0xFFFF), perm, first, prune_below, p.n))
              << (16 * q);
    const __m512i bytes = _mm512_maskz_set1_epi8(kept, 1);
    if (aligned) _mm512_stream_si512(reinterpret_cast<__m512i*>(keep + j), bytes);
    else _mm512_storeu_si512(keep + j, bytes);
  }
  for (; j < c; j += 16) {
    const __mmask16 km = tail_mask(c - j);  // c is a multiple of M, so a tail holds whole groups
    const __mmask16 kept = nm_keep16<M>(keys16(row, sq, j, km), perm, first, prune_below, p.n);
    _mm_mask_storeu_epi8(keep + j, km, _mm_maskz_set1_epi8(kept, 1));
  }
}

template <typename T>
LMSQ_AVX512 void nm_avx512_any(const T* row, const float* sq, int64_t c, const NmPlan& p, bool* keep) {
  switch (p.m) {
    case 2: return nm_avx512<2, T>(row, sq, c, p, keep);
    case 4: return nm_avx512<4, T>(row, sq, c, p, keep);
    case 8: return nm_avx512<8, T>(row, sq, c, p, keep);
    default: return nm_avx512<16, T>(row, sq, c, p, keep);  // m divides 16
  }
}

void nm_generic(const uint32_t* keys, int64_t c, int64_t n, int64_t m, bool* keep) {
  for (int64_t g = 0; g < c; g += m) {
    for (int64_t i = 0; i < m; ++i) {
      int64_t rank = 0;
      for (int64_t j = 0; j < m; ++j)
        rank += keys[g + j] < keys[g + i] || (keys[g + j] == keys[g + i] && j < i);
      keep[g + i] = rank >= m - n;
    }
  }
}

// ---- driver -----------------------------------------------------------------------------------------
// k >= 0: row-wise with k pruned per row; else N:M.
template <typename T>
torch::Tensor mask_impl(const T* data,        // [rows, c], row stride `stride`
                        const float* sq,      // [c] sqrt(col_sq_norm), or nullptr for plain scores
                        int64_t rows, int64_t c, int64_t stride, int64_t k, int64_t n, int64_t m,
                        const std::optional<torch::Tensor>& out_in) {
  // a fresh 45 MB bool tensor costs more to fault in (13 ms at 4096 x 11008) than the mask itself,
  // so callers that make many masks can hand one in
  torch::Tensor keep;
  if (out_in.has_value() && out_in->defined()) {
    keep = *out_in;
    TORCH_CHECK(keep.device().is_cpu() && keep.scalar_type() == torch::kBool && keep.is_contiguous() &&
                    keep.numel() == rows * c,
                "mask out= must be a contiguous bool CPU tensor with ", rows * c, " elements, got ",
                keep.scalar_type(), " with ", keep.numel());
  } else {
    keep = torch::empty({rows, c}, torch::kBool);
  }
  bool* out = keep.data_ptr<bool>();
  if (rows == 0 || c == 0) return keep;
  if (k == 0 || k >= c) {  // round(sparsity * cols) can reach cols on a very short row
    keep.fill_(k == 0);
    return keep;
  }
  const bool avx512 = active_isa() == kAvx512;
  const bool nm_vec = avx512 && k < 0 && 16 % m == 0;
  // the vector row-wise path indexes a row with 32-bit lanes: longer rows take the scalar one
  const bool rows_vec = avx512 && c < (int64_t{1} << 31) - 64;
  NmPlan plan;
  if (nm_vec) plan = make_nm_plan(static_cast<int>(n), static_cast<int>(m));
  constexpr int64_t kChunk = 16;  // rows per scheduling unit; a thread prefetches the next row of its chunk
#pragma omp parallel
  {
    Scratch s;
#pragma omp for schedule(dynamic, kChunk)
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = data + r * stride;
      bool* keep_row = out + r * c;
      if (nm_vec) {  // keys computed in registers, no buffer
        nm_avx512_any<T>(row, sq, c, plan, keep_row);
        continue;
      }
      s.reserve(c);
      const T* next = (r + 1) % kChunk != 0 && r + 1 < rows ? row + stride : nullptr;
      if (k > 0 && rows_vec) {
        rowwise_avx512<T>(row, sq, c, k, s, keep_row, next);
        continue;
      }
      if (avx512) row_keys_avx512<T>(row, sq, c, s.keys);
      else row_keys_generic<T>(row, sq, c, s.keys);
      if (k > 0) rowwise_generic(s.keys, c, k, s, keep_row);
      else nm_generic(s.keys, c, n, m, keep_row);
    }
    if (avx512) _mm_sfence();  // the streaming mask stores are visible before we return
  }
  return keep;
}

torch::Tensor as_rows(const torch::Tensor& t) {
  torch::Tensor x = t.reshape({-1, t.size(-1)});
  return x.stride(1) == 1 ? x : x.contiguous();
}

}  // namespace

torch::Tensor rowwise_mask_cpu(const torch::Tensor& scores_in, int64_t k, const std::optional<torch::Tensor>& out) {
  TORCH_CHECK(scores_in.device().is_cpu() && scores_in.scalar_type() == torch::kFloat32 && scores_in.dim() == 2,
              "rowwise_mask_cpu: scores must be a 2-D float32 CPU tensor");
  TORCH_CHECK(k >= 0 && k <= scores_in.size(1), "rowwise_mask_cpu: k = ", k, " must be in [0, cols]");
  const torch::Tensor s = as_rows(scores_in);
  return mask_impl<float>(s.data_ptr<float>(), nullptr, s.size(0), s.size(1), s.stride(0), k, 0, 0, out);
}

torch::Tensor nm_mask_cpu(const torch::Tensor& scores_in, int64_t n, int64_t m,
                          const std::optional<torch::Tensor>& out) {
  TORCH_CHECK(scores_in.device().is_cpu() && scores_in.scalar_type() == torch::kFloat32 && scores_in.dim() >= 1,
              "nm_mask_cpu: scores must be a float32 CPU tensor");
  TORCH_CHECK(0 < n && n < m && scores_in.size(-1) % m == 0, "nm_mask_cpu: need 0 < n < m and m dividing the width");
  const torch::Tensor s = as_rows(scores_in);
  return mask_impl<float>(s.data_ptr<float>(), nullptr, s.size(0), s.size(1), s.stride(0), -1, n, m, out)
      .view(scores_in.sizes());
}

torch::Tensor wanda_mask_cpu(const torch::Tensor& W_in, const torch::Tensor& col_sq_norm, int64_t k, int64_t n,
                             int64_t m, const std::optional<torch::Tensor>& out) {
  TORCH_CHECK(W_in.device().is_cpu() && W_in.dim() == 2, "wanda_mask_cpu: W must be a 2-D CPU tensor");
  const auto dtype = W_in.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16 || dtype == torch::kHalf,
              "wanda_mask_cpu: W must be float32, bfloat16 or float16, got ", dtype);
  const int64_t c = W_in.size(1);
  TORCH_CHECK(col_sq_norm.numel() == c, "wanda_mask_cpu: col_sq_norm has ", col_sq_norm.numel(),
              " entries but W has ", c, " columns");
  if (k < 0) {
    TORCH_CHECK(0 < n && n < m && c % m == 0, "wanda_mask_cpu: need 0 < n < m and m dividing the width");
  } else {
    TORCH_CHECK(k <= c, "wanda_mask_cpu: k = ", k, " must be in [0, cols]");
  }
  // the same fp32 sqrt the reference takes, once per column
  const torch::Tensor sq = col_sq_norm.to(torch::kFloat32).sqrt().contiguous();
  const torch::Tensor W = as_rows(W_in);
  const float* sqp = sq.data_ptr<float>();
  switch (dtype) {
    case torch::kFloat32:
      return mask_impl<float>(W.data_ptr<float>(), sqp, W.size(0), c, W.stride(0), k, n, m, out);
    case torch::kBFloat16:
      return mask_impl<c10::BFloat16>(W.data_ptr<c10::BFloat16>(), sqp, W.size(0), c, W.stride(0), k, n, m, out);
    default:
      return mask_impl<c10::Half>(W.data_ptr<c10::Half>(), sqp, W.size(0), c, W.stride(0), k, n, m, out);
  }
}

}  // namespace lmsqueeze
