// KEEP masks from scores on the CPU: exact count per row, or N of every M, with deterministic ties.
//
// Every score becomes an order-preserving 32-bit key (the float's bits with the sign handled, -0
// equal to +0), so "lower score, and among equal scores the lower column index, is pruned first" is
// plain unsigned order on (key, column). One row at a time per thread:
//   1. keys of the row into a buffer that stays in L1/L2 (fused Wanda: |W| * sqrt(norm) computed in
//      the same pass, so the scores never reach memory);
//   2. row-wise: the k-th smallest key without sorting. A strided sample of 256 keys gives 32
//      pivots and their ranks in the sample; the two pivots around the target rank (with a 3-sigma
//      margin) bracket it. One pass counts the keys below the bracket and compresses the keys inside
//      it (about a quarter of the row), then a vector quickselect (three-way partition with
//      compress, pivots near the target's quantile) finds the k-th key value t and how many keys
//      equal it. Ties at t are settled by column: when all copies of t are pruned the mask is one
//      compare a vector, else a scan finds the column of the last pruned copy. A bracket that
//      misses (rare) makes the whole row the candidate set, so the result is exact either way.
//      N:M with M dividing 16: each lane ranks itself against the other M-1 lanes of its group via
//      lane permutes (compares for half the partner shifts, the other half read from the partner),
//      so one zmm handles 16/M groups with no sort at all.
//   3. one pass writes the mask bytes, 64 per streaming store.
// Cost on this Zen 4 core, 4096-column bf16 Wanda rows: ~2.2K cycles the keys (mostly waiting on
// memory), ~2K the sample, ~1.7K the bracket pass, 2-3K the quickselect, ~0.6K the mask.
// OpenMP over rows. A CPU without AVX-512 (or an ISA cap) runs the scalar versions: nth_element on
// (key, column) pairs for rows, a rank count per group for N:M.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/cpu_features.h"
#include "ops.h"

namespace lmsqueeze {

namespace {

#define LMSQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq")))

inline uint32_t float_key(float f) {
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
  return _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), sign));
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

// ---- keys of one row ------------------------------------------------------------------------
// sq == nullptr: keys of the scores themselves; else Wanda scores |w| * sq[j].
// `next` (the row this thread does next, or nullptr) is prefetched into L2 on the way: the select
// that follows is all L1 work, so without it the next row's loads wait on memory (4096 x 4096
// bf16 Wanda: 9.1 -> 7.4 ms).
template <typename T>
LMSQ_AVX512 void row_keys_avx512(const T* __restrict__ row,      // [c]
                                 const float* __restrict__ sq,   // [c] or nullptr
                                 int64_t c, uint32_t* __restrict__ keys,  // [c]
                                 const T* __restrict__ next) {
  // full vectors take plain loads/stores: masked ones cost more on some cores (Zen 4 among them)
  int64_t j = 0;
  for (; j + 16 <= c; j += 16) {
    if (next && (j * static_cast<int64_t>(sizeof(T))) % 64 == 0)
      _mm_prefetch(reinterpret_cast<const char*>(next + j), _MM_HINT_T1);
    __m512 v = load16(row + j);
    if (sq) v = _mm512_mul_ps(_mm512_abs_ps(v), _mm512_loadu_ps(sq + j));
    _mm512_storeu_si512(keys + j, key16(v));
  }
  if (j < c) {
    const __mmask16 k = tail_mask(c - j);
    __m512 v = load16(row + j, k);
    if (sq) v = _mm512_mul_ps(_mm512_abs_ps(v), _mm512_maskz_loadu_ps(k, sq + j));
    _mm512_mask_storeu_epi32(keys + j, k, key16(v));
  }
}

template <typename T>
void row_keys_generic(const T* __restrict__ row, const float* __restrict__ sq, int64_t c, uint32_t* __restrict__ keys) {
  for (int64_t j = 0; j < c; ++j) {
    const float v = static_cast<float>(row[j]);
    keys[j] = float_key(sq ? std::fabs(v) * sq[j] : v);
  }
}

// ---- row-wise exact-k selection -----------------------------------------------------------------
struct Scratch {
  std::vector<uint32_t> keys, cand[3];  // the row's keys; candidate keys, ping-ponged by the partition
  std::vector<uint64_t> pairs;          // (key, column) pairs of the scalar path
  void reserve(int64_t c) {
    keys.resize(c + 16);
    for (auto& v : cand) v.resize(c + 16);
  }
};

// Keys in [lo, hi] compressed into out (column order, which nothing later needs); returns how many,
// and the number of keys below lo in *below.
LMSQ_AVX512 int64_t gather_bracket(const uint32_t* __restrict__ keys, int64_t c, uint32_t lo, uint32_t hi,
                                   uint32_t* __restrict__ out, int64_t* below) {
  const __m512i vlo = _mm512_set1_epi32(static_cast<int>(lo)), vhi = _mm512_set1_epi32(static_cast<int>(hi));
  int64_t n = 0, nb = 0;
  for (int64_t j = 0; j < c; j += 16) {
    const __mmask16 km = tail_mask(c - j);
    const __m512i v = j + 16 <= c ? _mm512_loadu_si512(keys + j) : _mm512_maskz_loadu_epi32(km, keys + j);
    const __mmask16 lt = _mm512_mask_cmplt_epu32_mask(km, v, vlo);
    const __mmask16 in = _mm512_mask_cmple_epu32_mask(km & ~lt, v, vhi);
    nb += _mm_popcnt_u32(lt);
    _mm512_storeu_si512(out + n, _mm512_maskz_compress_epi32(in, v));
    n += _mm_popcnt_u32(in);
  }
  *below = nb;
  return n;
}

// The r-th smallest (1-based) of the n candidate keys in s.cand[0]: quickselect with a three-way
// vector partition around a pivot picked near the target's quantile, nth_element once 48 or fewer
// remain. *less and *equal get how many of the n keys are smaller than / equal to the answer.
LMSQ_AVX512 uint32_t select_key(Scratch& s, int64_t n, int64_t r, int64_t* less, int64_t* equal) {
  int cur = 0;
  int64_t passed = 0;  // keys known to be smaller, from partitions that went right
  while (n > 48) {
    const uint32_t* ck = s.cand[cur].data();
    // pivot: of 7 spread keys, the one at the target's quantile, so the side that holds the
    // target is small (a median pivot only halves the candidates each pass)
    uint32_t probe[7];
    for (int i = 0; i < 7; ++i) probe[i] = ck[((2 * i + 1) * n) / 14];
    std::sort(probe, probe + 7);
    const uint32_t p = probe[std::min<int64_t>(6, (7 * (r - 1)) / n)];
    const int lt_buf = (cur + 1) % 3, gt_buf = (cur + 2) % 3;
    uint32_t* lk = s.cand[lt_buf].data();
    uint32_t* gk = s.cand[gt_buf].data();
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
  uint32_t* ck = s.cand[cur].data();
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

LMSQ_AVX512 void rowwise_avx512(const uint32_t* __restrict__ keys, int64_t c, int64_t k, Scratch& s,
                                bool* __restrict__ keep) {
  constexpr int64_t kSample = 256, kPivots = 32;
  int64_t n = 0, below = 0;
  bool bracketed = false;
  if (c >= 4 * kSample) {
    // 32 of a strided sample of 256 keys are pivots; their ranks in the sample pick the bracket
    alignas(64) uint32_t sample[kSample];
    for (int64_t i = 0; i < kSample; ++i) sample[i] = keys[(i * c) / kSample + (c / kSample) / 2];
    alignas(64) uint32_t pivot[kPivots];
    alignas(64) int32_t rank[kPivots];  // sample keys below each pivot
    for (int64_t i = 0; i < kPivots; ++i) pivot[i] = sample[i * (kSample / kPivots) + kSample / kPivots / 2];
    for (int64_t i = 0; i < kPivots; ++i) {
      const __m512i vp = _mm512_set1_epi32(static_cast<int>(pivot[i]));
      int32_t below_pivot = 0;
      for (int64_t j = 0; j < kSample; j += 16)
        below_pivot += _mm_popcnt_u32(_mm512_cmplt_epu32_mask(_mm512_load_si512(sample + j), vp));
      rank[i] = below_pivot;
    }
    const double q = static_cast<double>(k) / static_cast<double>(c);
    const double delta = 3.0 * std::sqrt(kSample * q * (1.0 - q)) + 2.0;
    const double want_lo = q * kSample - delta, want_hi = q * kSample + delta;
    uint32_t lo = 0, hi = 0xFFFFFFFFu;
    int32_t rank_lo = -1, rank_hi = kSample + 1;
    for (int64_t i = 0; i < kPivots; ++i) {
      if (rank[i] <= want_lo && rank[i] > rank_lo) {
        rank_lo = rank[i];
        lo = pivot[i];
      }
      if (rank[i] >= want_hi && rank[i] < rank_hi) {
        rank_hi = rank[i];
        hi = pivot[i];
      }
    }
    n = gather_bracket(keys, c, lo, hi, s.cand[0].data(), &below);
    bracketed = below < k && k <= below + n;
  }
  // small row, or the bracket missed (rare): the whole row is the candidate set
  if (!bracketed) n = gather_bracket(keys, c, 0u, 0xFFFFFFFFu, s.cand[0].data(), &below);
  int64_t less = 0, equal = 0;
  const uint32_t t = select_key(s, n, k - below, &less, &equal);
  // every key equal to t lies in the bracket, so `equal` counts all copies of t in the row; the
  // first `need` of them in column order are pruned (lower column first on ties)
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

template <typename T>
LMSQ_AVX512 inline __m512i nm_keys16(const T* row, const float* sq, int64_t j, __mmask16 km) {
  __m512 f = km == 0xFFFF ? load16(row + j) : load16(row + j, km);
  if (sq) {
    const __m512 norm = km == 0xFFFF ? _mm512_loadu_ps(sq + j) : _mm512_maskz_loadu_ps(km, sq + j);
    f = _mm512_mul_ps(_mm512_abs_ps(f), norm);
  }
  return key16(f);
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
                  nm_keep16<M>(nm_keys16(row, sq, j + 16 * q, 0xFFFF), perm, first, prune_below, p.n))
              << (16 * q);
    const __m512i bytes = _mm512_maskz_set1_epi8(kept, 1);
    if (aligned) _mm512_stream_si512(reinterpret_cast<__m512i*>(keep + j), bytes);
    else _mm512_storeu_si512(keep + j, bytes);
  }
  for (; j < c; j += 16) {
    const __mmask16 km = tail_mask(c - j);  // c is a multiple of M, so a tail holds whole groups
    const __mmask16 kept = nm_keep16<M>(nm_keys16(row, sq, j, km), perm, first, prune_below, p.n);
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
  NmPlan plan;
  if (nm_vec) plan = make_nm_plan(static_cast<int>(n), static_cast<int>(m));
  constexpr int64_t kChunk = 16;  // rows per scheduling unit; a thread prefetches the next row of its chunk
#pragma omp parallel
  {
    Scratch s;
    s.reserve(c);
#pragma omp for schedule(dynamic, kChunk)
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = data + r * stride;
      bool* keep_row = out + r * c;
      if (nm_vec) {  // keys computed in registers, no buffer
        nm_avx512_any<T>(row, sq, c, plan, keep_row);
        continue;
      }
      const T* next = (r + 1) % kChunk != 0 && r + 1 < rows ? row + stride : nullptr;
      if (avx512) row_keys_avx512<T>(row, sq, c, s.keys.data(), next);
      else row_keys_generic<T>(row, sq, c, s.keys.data());
      if (k > 0) {
        if (avx512) rowwise_avx512(s.keys.data(), c, k, s, keep_row);
        else rowwise_generic(s.keys.data(), c, k, s, keep_row);
      } else {
        nm_generic(s.keys.data(), c, n, m, keep_row);
      }
    }
    if (avx512) _mm_sfence();  // the streaming stores of write_rowwise are visible before we return
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
