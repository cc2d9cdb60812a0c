// Hessian accumulation H <- H * n/(n+m) + (2/(n+m)) * X^T X on the CPU, lower triangle only.
//
// bf16 x on a CPU with AVX-512-BF16 (the usual calibration case) runs our own micro-kernel:
//   1. pack the valid rows once, into a workspace kept until hessian_finalize_cpu, as "pair
//      panels": packed[q][p][l] is one 32-bit word holding (x[2p, 16q + l], x[2p + 1, 16q + l])
//      as two bf16, i.e. 16 columns per panel, token pairs along the panel. That is the operand
//      layout of vdpbf16ps, and because both GEMM operands are the same X, one packed copy serves
//      as the broadcast (row) side and the vector (column) side.
//   2. an 8 x 48 register tile (24 zmm accumulators) runs over a k-block of 128 token pairs with
//      vdpbf16ps: each instruction multiplies bf16 pairs exactly and adds them in fp32. The tile is
//      then folded into H with the scaling (first k-block: a*H + b*acc, later ones: H + b*acc), so
//      fp32 sums never run longer than 256 tokens before they are added into H (max relative error
//      against fp64 stays near 1e-6 at 16K tokens).
//   3. macro tiles of 128 rows x 192 columns in the lower triangle only are spread over OpenMP
//      threads; a macro tile walks its k-blocks with its 48-column B slice (24 KiB) resident in L1,
//      prefetching the next k-block's lines into L2 as it goes.
//   One core runs vdpbf16ps at 233 GFLOP/s here (64 FLOP a cycle at 3.6 GHz); the micro-kernel on
//   L1-resident data reaches 98% of that, the whole update at d = 1536 about 85% on one thread.
// Measured on this 2-core AVX-512-BF16 EPYC (16,384 tokens, d = 1536): fp32 reference x.T @ x
// 1.18 s, torch bf16 x.T @ x (bf16 output, which loses precision) 0.61 s; torch has no CPU
// bf16 x bf16 -> fp32 matmul (aten::mm.dtype is not registered for CPU), hence the micro-kernel.
//
// fp32 and fp16 x (or a CPU without AVX-512-BF16) take the one-triangle blocked path: upcast the
// valid rows to fp32 and call torch's GEMM (MKL) once per block row on H[I, :I_end], which is about
// 55-70% of the full product's FLOPs. fp16 x fp16 products are exact in fp32 too, but bf16 dot
// instructions cannot take fp16, and the fp32 GEMM is already exact per product.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "cpu/cpu_features.h"
#include "ops.h"

namespace lmsqueeze {

namespace {

constexpr int64_t kPanel = 16;      // columns per packed panel: one zmm of fp32 lanes
constexpr int64_t kKc = 128;        // token pairs per k-block (256 tokens); 32/64/256 measured 10-25% slower
constexpr int64_t kMr = 8;          // rows of a micro-tile
constexpr int64_t kNr = 3;          // panels (16 columns each) of a micro-tile
constexpr int64_t kRowBlock = 128;  // macro tile rows (multiple of 16, so a micro-tile's rows share a panel)
constexpr int64_t kColBlock = 192;  // macro tile columns (multiple of kNr * kPanel)

#define LMSQ_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// packed[q][p][l] = x[row(2p), 16q+l] | x[row(2p+1), 16q+l] << 16; zero past m rows or d columns.
LMSQ_BF16_TARGET void pack_pairs(const uint16_t* __restrict__ x,     // [rows, d] bf16 bits, row stride `stride`
                                 const int64_t* __restrict__ rowsel,  // [m] valid row indices or nullptr
                                 int64_t m, int64_t d, int64_t stride, int64_t pairs, int64_t npan,
                                 uint32_t* __restrict__ packed) {     // [npan, pairs, 16]
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t t0 = 2 * p, t1 = 2 * p + 1;
    const uint16_t* r0 = x + (rowsel ? rowsel[t0] : t0) * stride;
    const uint16_t* r1 = t1 < m ? x + (rowsel ? rowsel[t1] : t1) * stride : nullptr;
    for (int64_t q = 0; q < npan; ++q) {
      const int64_t j = q * kPanel;
      const int64_t w = std::min<int64_t>(kPanel, d - j);
      const __mmask16 k = w == kPanel ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << w) - 1);
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, r0 + j));
      const __m512i hi = r1 ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, r1 + j)) : _mm512_setzero_si512();
      _mm512_storeu_si512(packed + (q * pairs + p) * kPanel, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

// The packed copy of x lives in a per-thread workspace that is kept between calls of one Hessian
// (the calibration loop feeds batches of the same size) and released by hessian_finalize_cpu.
// Allocating it fresh on every call cost 26 ms of a 130 ms update at d = 1536 (zeroing plus a
// page fault per 4 KiB). Transparent huge pages did not help here (with defrag=madvise a fresh 43 MB
// region took 4x longer to fault in), so plain pages it is.
struct PackWorkspace {
  uint32_t* data = nullptr;
  size_t words = 0;
  ~PackWorkspace() { release(); }
  void release() {
    std::free(data);
    data = nullptr;
    words = 0;
  }
};
thread_local PackWorkspace pack_ws;

uint32_t* pack_workspace(size_t words) {
  if (pack_ws.words >= words) return pack_ws.data;
  pack_ws.release();
  const size_t bytes = (words * sizeof(uint32_t) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  TORCH_CHECK(p != nullptr, "hessian_update_cpu: cannot allocate ", bytes, " bytes for the packed input");
  pack_ws.data = static_cast<uint32_t*>(p);
  pack_ws.words = words;
  return pack_ws.data;
}

inline __mmask16 lane_mask(int64_t count) {
  if (count <= 0) return 0;
  if (count >= 16) return static_cast<__mmask16>(0xFFFF);
  return static_cast<__mmask16>((1u << count) - 1);
}

// H[i0:i0+8, j0:j0+16*NR] (lower part only) <- first ? a*H + b*acc : H + b*acc,
// acc = sum over pairs [p0, p0+kc) of X[:, i]^T X[:, j].
template <int NR>
LMSQ_BF16_TARGET void micro_tile(const uint32_t* __restrict__ packed,  // [npan, pairs, 16]
                                 float* __restrict__ H,                // [d, d] row-major
                                 int64_t d, int64_t pairs, int64_t p0, int64_t kc, int64_t i0, int64_t j0,
                                 bool first, float a, float b) {
  const uint32_t* ap = packed + ((i0 / kPanel) * pairs + p0) * kPanel + (i0 % kPanel);
  const uint32_t* bp[NR];
  for (int v = 0; v < NR; ++v) bp[v] = packed + ((j0 / kPanel + v) * pairs + p0) * kPanel;
  __m512 acc[kMr][NR];
  for (int r = 0; r < kMr; ++r)
    for (int v = 0; v < NR; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kc; ++p) {
    __m512i bv[NR];
    for (int v = 0; v < NR; ++v) bv[v] = _mm512_loadu_si512(bp[v] + p * kPanel);
    // the same lines of the next k-block into L2: they come from memory and the hardware
    // prefetchers do not cross the 4 KiB pages of each panel on their own (+4% at d = 1536)
    _mm_prefetch(reinterpret_cast<const char*>(ap + (p + kKc) * kPanel), _MM_HINT_T1);
    for (int v = 0; v < NR; ++v) _mm_prefetch(reinterpret_cast<const char*>(bp[v] + (p + kKc) * kPanel), _MM_HINT_T1);
    for (int r = 0; r < kMr; ++r) {
      const __m512i av = _mm512_set1_epi32(static_cast<int>(ap[p * kPanel + r]));
      for (int v = 0; v < NR; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)av, (__m512bh)bv[v]);
    }
  }
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
  for (int r = 0; r < kMr; ++r) {
    const int64_t i = i0 + r;
    if (i >= d) break;
    const int64_t jmax = std::min(i, d - 1);  // lower triangle, inside H
    for (int v = 0; v < NR; ++v) {
      const int64_t j = j0 + v * kPanel;
      const __mmask16 k = lane_mask(jmax - j + 1);
      if (!k) break;
      float* h = H + i * d + j;
      const __m512 c = _mm512_maskz_loadu_ps(k, h);
      const __m512 out = first ? _mm512_fmadd_ps(acc[r][v], vb, _mm512_mul_ps(c, va)) : _mm512_fmadd_ps(acc[r][v], vb, c);
      _mm512_mask_storeu_ps(h, k, out);
    }
  }
}

void hessian_bf16_avx512(float* H, const uint16_t* x, const int64_t* rowsel, int64_t m, int64_t d, int64_t stride,
                         float a, float b) {
  const int64_t pairs = (m + 1) / 2;
  const int64_t npan = (d + kPanel - 1) / kPanel;
  uint32_t* packed = pack_workspace(static_cast<size_t>(npan * pairs * kPanel));
  pack_pairs(x, rowsel, m, d, stride, pairs, npan, packed);

  struct Tile { int64_t i0, j0, work; };
  std::vector<Tile> tiles;  // macro tiles touching the lower triangle
  for (int64_t i0 = 0; i0 < d; i0 += kRowBlock) {
    const int64_t i1 = std::min(d, i0 + kRowBlock);
    for (int64_t j0 = 0; j0 < i1; j0 += kColBlock) {
      const int64_t j1 = std::min(i1, j0 + kColBlock);
      int64_t work = 0;  // H entries of the lower triangle inside the tile
      for (int64_t i = i0; i < i1; ++i) work += std::max<int64_t>(0, std::min(j1, i + 1) - j0);
      tiles.push_back({i0, j0, work});
    }
  }
  // biggest first, so the small diagonal tiles fill in at the end (d = 576: 20.6 -> 17.4 ms)
  std::stable_sort(tiles.begin(), tiles.end(), [](const Tile& l, const Tile& r) { return l.work > r.work; });
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t I0 = tiles[t].i0, I1 = std::min(d, I0 + kRowBlock);
    const int64_t J0 = tiles[t].j0, J1 = std::min({d, J0 + kColBlock, I1});
    for (int64_t p0 = 0; p0 < pairs; p0 += kKc) {
      const int64_t kc = std::min(kKc, pairs - p0);
      const bool first = p0 == 0;
      for (int64_t j0 = J0; j0 < J1; j0 += kNr * kPanel) {
        const int64_t np = std::min<int64_t>(kNr, (J1 - j0 + kPanel - 1) / kPanel);
        for (int64_t i0 = std::max(I0, j0 - j0 % kMr); i0 < I1; i0 += kMr) {
          if (np == 3) micro_tile<3>(packed, H, d, pairs, p0, kc, i0, j0, first, a, b);
          else if (np == 2) micro_tile<2>(packed, H, d, pairs, p0, kc, i0, j0, first, a, b);
          else micro_tile<1>(packed, H, d, pairs, p0, kc, i0, j0, first, a, b);
        }
      }
    }
  }
}

// ---- AMX tiles (Sapphire Rapids and later) -------------------------------------------------------
// TDPBF16PS (Intel SDM): C[16 x 16 fp32] += A[16 rows x 32 bf16] . B[16 pair rows x 16 bf16 pairs], i.e.
// C[i][j] += sum_k A[i][2k] * B[k][j].lo + A[i][2k+1] * B[k][j].hi, each product exact, sums in fp32.
// For H = X^T X the K dimension is tokens: A's rows are features (X^T, "arow" below: one 64-byte row =
// 16 token pairs of one feature), B's rows are token pairs over 16 features ("bpan": the same pair
// panels as the AVX-512 path). Eight tile registers: four C tiles make a 32 x 32 block of H, two A
// tiles and two B tiles feed them, so each loaded tile is used twice. Blocks on the diagonal compute
// their upper C tile too (1/8 of the work at d = 4096) but only the lower triangle is written. The
// fp32 tile sums are folded into H every kAmxKc pairs (256 tokens), as in the AVX-512 path.
// One TDPBF16PS is 16 x 16 x 32 multiply-adds (16K FLOP); Intel gives 16 cycles for it, 1024 FLOP a
// cycle a core, ~8x vdpbf16ps. NOT RUN on any machine this was written on (none had AMX): the tile
// instructions are the only part the CPU tests cannot reach; EmulatedTiles runs the rest (packing,
// blocking, fold) through the same template.
constexpr int64_t kTile = 16;     // rows and fp32 columns of a C tile
constexpr int64_t kTileK = 16;    // token pairs per tile step: one 64-byte A row (32 bf16 tokens)
constexpr int64_t kAmxKc = 128;   // token pairs per fold into H (multiple of kTileK)
constexpr int64_t kBlock = 2 * kTile;

#define LMSQ_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-bf16")))

struct alignas(64) TileConfig {  // the 64-byte LDTILECFG operand, palette 1
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];  // bytes per row of tile t
  uint8_t rows[16];
};

// Tile numbers are immediates inside the instructions (GCC's _tile_* macros paste them into inline
// asm), so the kernel's tile use is spelled out once: C tiles 0-3, A tiles 4-5, B tiles 6-7.
struct AmxTiles {
  LMSQ_AMX_TARGET static void configure() {
    TileConfig cfg;
    std::memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
      cfg.rows[t] = kTile;
      cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
  }
  LMSQ_AMX_TARGET static void release() { _tile_release(); }
  static void zero_acc() {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  // C[r][c] += A_r . B_c for r, c in {0, 1}: rows of A at a0/a1 (a_stride bytes apart), B tiles at b0/b1
  static void step(const uint32_t* a0, const uint32_t* a1, const uint32_t* b0, const uint32_t* b1, int64_t a_stride) {
    _tile_loadd(4, a0, a_stride);
    _tile_loadd(5, a1, a_stride);
    _tile_loadd(6, b0, 64);
    _tile_loadd(7, b1, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  static void store_acc(float* acc) {  // [4][16][16]
    _tile_stored(0, acc, 64);
    _tile_stored(1, acc + 256, 64);
    _tile_stored(2, acc + 512, 64);
    _tile_stored(3, acc + 768, 64);
  }
};

// The same instructions in scalar C++, one 1 KiB buffer per tile register: how the CPU tests check the
// AMX path's packing, blocking and fold on machines without AMX (hessian_update_tiles_emulated_cpu).
struct EmulatedTiles {
  static inline thread_local uint32_t reg[8][kTile][kTile];  // 16 rows x 64 bytes each
  static void configure() {}
  static void release() {}
  static void zero_acc() { std::memset(reg, 0, 4 * sizeof(reg[0])); }
  static void load(int t, const uint32_t* p, int64_t stride_bytes) {
    for (int64_t r = 0; r < kTile; ++r) std::memcpy(reg[t][r], reinterpret_cast<const char*>(p) + r * stride_bytes, 64);
  }
  static float bf16_lo(uint32_t w) { const uint32_t u = w << 16; float f; std::memcpy(&f, &u, 4); return f; }
  static float bf16_hi(uint32_t w) { const uint32_t u = w & 0xFFFF0000u; float f; std::memcpy(&f, &u, 4); return f; }
  static void dot(int c, int a, int b) {  // TDPBF16PS
    for (int64_t i = 0; i < kTile; ++i)
      for (int64_t j = 0; j < kTile; ++j) {
        float acc;
        std::memcpy(&acc, &reg[c][i][j], 4);
        for (int64_t k = 0; k < kTileK; ++k)
          acc += bf16_lo(reg[a][i][k]) * bf16_lo(reg[b][k][j]) + bf16_hi(reg[a][i][k]) * bf16_hi(reg[b][k][j]);
        std::memcpy(&reg[c][i][j], &acc, 4);
      }
  }
  static void step(const uint32_t* a0, const uint32_t* a1, const uint32_t* b0, const uint32_t* b1, int64_t a_stride) {
    load(4, a0, a_stride);
    load(5, a1, a_stride);
    load(6, b0, 64);
    load(7, b1, 64);
    dot(0, 4, 6);
    dot(1, 4, 7);
    dot(2, 5, 6);
    dot(3, 5, 7);
  }
  static void store_acc(float* acc) { std::memcpy(acc, reg, 4 * sizeof(reg[0])); }
};

// bpan[q][p][l] and arow[i][p]: the word (x[2p, i], x[2p+1, i]) as two bf16 (low half: the even token),
// with i = 16q + l; zero past m rows, past d columns (up to dpad) and past the pairs (up to pairs_pad).
void pack_tiles(const uint16_t* __restrict__ x,     // [rows, d] bf16 bits, row stride `stride`
                const int64_t* __restrict__ rowsel,  // [m] valid row indices or nullptr
                int64_t m, int64_t d, int64_t stride, int64_t pairs_pad, int64_t dpad,
                uint32_t* __restrict__ bpan,         // [dpad / 16, pairs_pad, 16]
                uint32_t* __restrict__ arow) {       // [dpad, pairs_pad]
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < pairs_pad; ++p) {
    const int64_t t0 = 2 * p, t1 = 2 * p + 1;
    const uint16_t* r0 = t0 < m ? x + (rowsel ? rowsel[t0] : t0) * stride : nullptr;
    const uint16_t* r1 = t1 < m ? x + (rowsel ? rowsel[t1] : t1) * stride : nullptr;
    for (int64_t i = 0; i < dpad; ++i) {
      const uint32_t lo = r0 && i < d ? r0[i] : 0u, hi = r1 && i < d ? r1[i] : 0u;
      const uint32_t w = lo | (hi << 16);
      bpan[((i / kTile) * pairs_pad + p) * kTile + i % kTile] = w;
      arow[i * pairs_pad + p] = w;
    }
  }
}

template <class Tiles>
void hessian_bf16_tiles(float* __restrict__ H,         // [d, d] row-major, lower triangle written
                        const uint16_t* x, const int64_t* rowsel, int64_t m, int64_t d, int64_t stride,
                        float a, float b) {
  const int64_t pairs = (m + 1) / 2;
  const int64_t pairs_pad = (pairs + kTileK - 1) / kTileK * kTileK;
  const int64_t dpad = (d + kBlock - 1) / kBlock * kBlock;
  const size_t words = static_cast<size_t>(dpad * pairs_pad);
  uint32_t* bpan = pack_workspace(2 * words);
  uint32_t* arow = bpan + words;
  pack_tiles(x, rowsel, m, d, stride, pairs_pad, dpad, bpan, arow);

  const int64_t nb = dpad / kBlock;
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (row block, column block), lower triangle
  for (int64_t bi = 0; bi < nb; ++bi)
    for (int64_t bj = 0; bj <= bi; ++bj) blocks.emplace_back(bi, bj);
  const int64_t nblocks = static_cast<int64_t>(blocks.size());
  const int64_t a_stride = pairs_pad * 4;  // bytes between A rows (features)
#pragma omp parallel
  {
    Tiles::configure();  // per thread: the tile configuration is thread state
    alignas(64) float acc[4][kTile][kTile];
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < nblocks; ++t) {
      const int64_t I0 = blocks[t].first * kBlock, J0 = blocks[t].second * kBlock;
      const uint32_t* a0 = arow + I0 * pairs_pad;
      const uint32_t* a1 = arow + (I0 + kTile) * pairs_pad;
      const uint32_t* b0 = bpan + (J0 / kTile) * pairs_pad * kTile;
      const uint32_t* b1 = bpan + (J0 / kTile + 1) * pairs_pad * kTile;
      for (int64_t p0 = 0; p0 < pairs_pad; p0 += kAmxKc) {
        const int64_t p1 = std::min(pairs_pad, p0 + kAmxKc);
        Tiles::zero_acc();
        for (int64_t p = p0; p < p1; p += kTileK) Tiles::step(a0 + p, a1 + p, b0 + p * kTile, b1 + p * kTile, a_stride);
        Tiles::store_acc(&acc[0][0][0]);
        const bool first = p0 == 0;
        for (int c = 0; c < 4; ++c) {  // tile c: rows I0 + 16 (c / 2), columns J0 + 16 (c % 2)
          for (int64_t r = 0; r < kTile; ++r) {
            const int64_t i = I0 + kTile * (c / 2) + r;
            if (i >= d) break;
            const int64_t j0 = J0 + kTile * (c % 2);
            const int64_t j1 = std::min({j0 + kTile, i + 1, d});  // lower triangle, inside H
            float* h = H + i * d;
            for (int64_t j = j0; j < j1; ++j) h[j] = first ? a * h[j] + b * acc[c][r][j - j0] : h[j] + b * acc[c][r][j - j0];
          }
        }
      }
    }
    Tiles::release();
  }
}

// One-triangle blocked update through torch's fp32 GEMM: block row I gets H[I, :I_end].
void hessian_fp32_blocked(torch::Tensor H, const torch::Tensor& xv, double a, double b) {
  const int64_t d = H.size(0);
  const int64_t block = std::max<int64_t>(128, ((d + 7) / 8 + 63) / 64 * 64);
  for (int64_t i0 = 0; i0 < d; i0 += block) {
    const int64_t bi = std::min(block, d - i0);
    const int64_t i1 = i0 + bi;
    H.narrow(0, i0, bi).narrow(1, 0, i1).addmm_(xv.narrow(1, i0, bi).t(), xv.narrow(1, 0, i1), a, b);
  }
}

}  // namespace

namespace {

// The checked 2-D view of x ([rows, d], unit column stride) and the valid row indices (undefined: all).
struct Prepared {
  torch::Tensor x, rowsel;
  int64_t m = 0;
  double a = 1.0, b = 0.0;
};

Prepared prepare(const char* op, const torch::Tensor& H, const torch::Tensor& x_in, int64_t nsamples,
                 const std::optional<torch::Tensor>& mask_in) {
  TORCH_CHECK(H.device().is_cpu() && x_in.device().is_cpu(), op, ": H and x must be CPU tensors");
  TORCH_CHECK(H.scalar_type() == torch::kFloat32, op, ": H must be float32, got ", H.scalar_type());
  TORCH_CHECK(H.dim() == 2 && H.size(0) == H.size(1) && H.is_contiguous(), op, ": H must be a contiguous square matrix");
  TORCH_CHECK(x_in.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK(nsamples >= 0, op, ": nsamples must be >= 0, got ", nsamples);
  const int64_t d = x_in.size(-1);
  TORCH_CHECK(H.size(0) == d, op, ": H is ", H.size(0), " x ", H.size(0), " but x has ", d, " columns");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16 || dtype == torch::kHalf,
              op, ": x must be float32, bfloat16 or float16, got ", dtype);
  Prepared p;
  p.x = x_in.reshape({-1, d});
  if (p.x.stride(1) != 1) p.x = p.x.contiguous();
  const int64_t rows = p.x.size(0);
  p.m = rows;
  if (mask_in.has_value() && mask_in->defined()) {
    TORCH_CHECK(mask_in->numel() == rows, op, ": mask has ", mask_in->numel(), " entries but x has ", rows, " rows");
    // indices, not a gathered copy: the bf16 kernels read the valid rows in place while packing
    p.rowsel = mask_in->reshape({-1}).to(torch::kBool).nonzero().reshape({-1}).contiguous();
    p.m = p.rowsel.size(0);
  }
  if (p.m > 0) {
    p.a = static_cast<double>(nsamples) / static_cast<double>(nsamples + p.m);
    p.b = 2.0 / static_cast<double>(nsamples + p.m);
  }
  return p;
}

template <class Tiles>
void run_tiles(torch::Tensor& H, const Prepared& p) {
  hessian_bf16_tiles<Tiles>(H.data_ptr<float>(), reinterpret_cast<const uint16_t*>(p.x.data_ptr<c10::BFloat16>()),
                            p.rowsel.defined() ? p.rowsel.data_ptr<int64_t>() : nullptr, p.m, H.size(0),
                            p.x.stride(0), static_cast<float>(p.a), static_cast<float>(p.b));
}

}  // namespace

int64_t hessian_update_cpu(torch::Tensor H, const torch::Tensor& x_in, int64_t nsamples,
                           const std::optional<torch::Tensor>& mask_in) {
  const Prepared p = prepare("hessian_update_cpu", H, x_in, nsamples, mask_in);
  if (p.m == 0) return nsamples;
  const auto& f = cpu_features();
  const bool bf16 = p.x.scalar_type() == torch::kBFloat16;
  if (bf16 && active_isa() == kAvx512 && amx_usable()) {
    run_tiles<AmxTiles>(H, p);
  } else if (bf16 && active_isa() == kAvx512 && f.avx512_bf16) {
    hessian_bf16_avx512(H.data_ptr<float>(), reinterpret_cast<const uint16_t*>(p.x.data_ptr<c10::BFloat16>()),
                        p.rowsel.defined() ? p.rowsel.data_ptr<int64_t>() : nullptr, p.m, H.size(0), p.x.stride(0),
                        static_cast<float>(p.a), static_cast<float>(p.b));
  } else {
    torch::Tensor xv = p.rowsel.defined() ? p.x.index_select(0, p.rowsel) : p.x;
    hessian_fp32_blocked(H, xv.to(torch::kFloat32), p.a, p.b);
  }
  return nsamples + p.m;
}

int64_t hessian_update_tiles_emulated_cpu(torch::Tensor H, const torch::Tensor& x, int64_t nsamples,
                                          const std::optional<torch::Tensor>& mask) {
  const Prepared p = prepare("hessian_update_tiles_emulated_cpu", H, x, nsamples, mask);
  TORCH_CHECK(p.x.scalar_type() == torch::kBFloat16, "hessian_update_tiles_emulated_cpu: the AMX path takes bf16 x, got ",
              p.x.scalar_type());
  if (p.m == 0) return nsamples;
  run_tiles<EmulatedTiles>(H, p);
  return nsamples + p.m;
}

std::string hessian_update_cpu_path(const std::string& dtype) {
  if (dtype == "bfloat16" && active_isa() == kAvx512 && amx_usable()) return "amx";
  if (dtype == "bfloat16" && active_isa() == kAvx512 && cpu_features().avx512_bf16) return "avx512-bf16";
  return "fp32-gemm";
}

void hessian_finalize_cpu(torch::Tensor H) {
  pack_ws.release();
  TORCH_CHECK(H.device().is_cpu() && H.scalar_type() == torch::kFloat32 && H.dim() == 2 &&
                  H.size(0) == H.size(1) && H.is_contiguous(),
              "hessian_finalize_cpu: H must be a contiguous square float32 CPU matrix");
  const int64_t d = H.size(0);
  float* h = H.data_ptr<float>();
  constexpr int64_t kB = 64;  // 64 x 64 fp32 blocks: the lower block read column-wise stays in L1
  const int64_t nb = (d + kB - 1) / kB;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t bi = 0; bi < nb; ++bi) {
    for (int64_t bj = bi; bj < nb; ++bj) {
      const int64_t i_end = std::min(d, (bi + 1) * kB), j_end = std::min(d, (bj + 1) * kB);
      for (int64_t i = bi * kB; i < i_end; ++i)
        for (int64_t j = std::max(i + 1, bj * kB); j < j_end; ++j) h[i * d + j] = h[j * d + i];
    }
  }
}

}  // namespace lmsqueeze
