// elutq bit-serial LUT kernels for HLQ weights: shared declarations and the kernel layout.
//
// Math.  For a row r and a group G of g input columns, HLQ stores codes c with bit-planes
// b_i ∈ {0,1}, one scale s_i per plane and one offset z:   w = z + Σ_i s_i·b_i.   Hence
//
//     y_r = Σ_G [ Σ_i s_i · (b_i · x)_G  +  z · Σx_G ]
//
// and each dot product (b_i · x) over a group is evaluated with tables instead of multiplies:
// split x into runs of 4 activations (run k = columns 4k..4k+3) and build for each run the
// 16-entry table  T[k][m] = Σ_{t<4} bit_t(m)·x[4k+t].  Then (b_i · x) = Σ_k T[k][nib_i(r, k)]
// where nib_i(r, k) is the 4-bit nibble of plane i over columns 4k..4k+3 (bit t = column 4k+t),
// i.e. exactly nibble k of the checkpoint's packed bit-plane row (low nibble first).
//
// int8 tables ("int8-table" path) use the signed (±1) form of the same table,
//     U[k][m] = Σ_t (2·bit_t(m) − 1)·x[4k+t] = 2·T[k][m] − Σx_run,   antisymmetric: U[15−m] = −U[m],
// whose range (±Σ|x_run|) is centred, so int8 quantization loses about half as much as with T.
// Each run k gets its own int8 grid: with M = max_k m_k over the group, m_k = max_m |U[k][m]| = Σ_t |x_t|
// (summed in the table's order, so it is exactly that max), a per-group budget B and per-run integer
// multipliers mult_k ∈ 1..B (group_mults below: mult_k ≈ ceil(B·m_k/M), Σ_k mult_k <= 8 per run),
//     q[k][m] = rint(U[k][m] · 127·B / (M·mult_k)),
// so every run is rounded on a grid close to its own m_k/127 (activation outliers cost only their
// own runs precision), and the lookups are still summed exactly in integers, each multiplied by its
// run's mult (the u8 operand of vpdpbusd / vpmaddubsw, a widening multiply on NEON):
//     (b_i · x)_G = lut_scale · Σ_k mult[k]·q[k][nib] + Σx_G / 2,      lut_scale = M / (254·B)
// (0 for an all-zero group), and per group
//     y_r += lut_scale · Σ_i s_i · acc_i  +  (z + Σ_i s_i / 2) · Σx_G   (Σx_G from the float input).
// Float tables ("float-table" path, accuracy reference, scalar only) use T itself, unquantized.
//
// ------------------------------------------------------------------------------------------
// Activation tables (built per input vector, per call):
//   tq        int8  [in_pad/4][16]  q[k][m], run-major, run k at byte 16k; in_pad = ng·g (x zero-padded)
//   tm        uint8 [in_pad/4]      mult[k] (1..127), run k at byte k
//   lut_scale f32   [ng]
//   xsum      f32   [ng]            Σx over the group's real columns
//
// Weight layout (produced by elutq.kernels.repack from qweight/scales/zeros; ISA-independent):
//   rows are padded to a multiple of 16 (a "row block", rb); columns to in_pad = ng·g.
//   w   uint8 [nrb][ng][bits][g/32][64]
//       One 64-byte "chunk" covers 16 rows × 8 runs (32 columns) of one plane.  Chunk L of group G
//       holds runs k0 = G·g/4 + 8L + (0..7).  Byte p = 4m + j (row m = 0..15, j = 0..3):
//         low  nibble = nib(row 16rb+m, run k0 + j)
//         high nibble = nib(row 16rb+m, run k0 + 4 + j)
//       So, with index = nibble + 16·j, a 64-entry byte permute whose table is the 4 consecutive
//       16-byte tables T[k0..k0+3] (resp. T[k0+4..k0+7]) — i.e. 64 contiguous bytes of tq — does
//       16 rows × 4 runs of lookups at once, and summing each aligned group of 4 result bytes
//       gives the per-row sum (vpermb + vpdpbusd on AVX-512, tbl ×4 + pairwise adds on NEON).
//       AVX2 order (a matrix loaded for the avx2 path, LutWeight::avx2_order): inside every chunk,
//       byte q = 16j + m holds what byte 4m + j holds above, so two plain 32-byte loads give the
//       vpshufb operands [j0 | j1] and [j2 | j3] (rows 0..15 in each lane) with no transposition
//       per chunk.  The order is applied when the matrix is copied into its aligned buffer
//       (LutMatrix); repack() and the kernel cache always hold the order above.  Only the AVX2 and
//       scalar paths read it.
//   sz  fp16  [nrb][ng][bits + 1][16]   planes' scales s_i of the 16 rows, then their zeros z.
//       Padded rows have zero scales and zeros, so they produce 0.
//
// Per-channel quantization (one group per row) is repacked as g = 128 with the row's scales and
// zero replicated into every group (mathematically identical).
// ------------------------------------------------------------------------------------------
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace elutq {

constexpr int kRowBlock = 16;    // rows per tile
constexpr int kChunkBytes = 64;  // bytes per (16 rows × 32 columns × 1 plane) chunk

// A read-only view of one repacked matrix.
struct LutWeight {
  const uint8_t* w = nullptr;    // [nrb][ng][bits][g/32][64]
  const uint16_t* sz = nullptr;  // [nrb][ng][bits+1][16] (fp16 bits)
  int out = 0;                   // real output rows
  int in = 0;                    // real input columns
  int bits = 0;                  // 1..4
  int g = 0;                     // 32, 64 or 128
  int ng = 0;                    // number of groups; in_pad = ng·g
  bool avx2_order = false;       // chunk bytes in the AVX2 order (see above)
  int nrb() const { return (out + kRowBlock - 1) / kRowBlock; }
  int in_pad() const { return ng * g; }
  size_t w_bytes_per_rb() const { return (size_t)ng * bits * (g / 32) * kChunkBytes; }
  size_t sz_elems_per_rb() const { return (size_t)ng * (bits + 1) * kRowBlock; }
};

// Activation tables of one input vector (int8 or float).
struct LutTables {
  const int8_t* tq = nullptr;  // group G's g/4 run tables at tq + G·gstride
  size_t gstride = 0;          // int8 table bytes between groups (g·4 for one vector)
  const uint8_t* tm = nullptr;  // group G's g/4 run multipliers at tm + G·gstride/16
  const float* tf = nullptr;   // [in_pad/4][16] (float-table path only)
  const float* lut_scale = nullptr;  // [ng]
  const float* xsum = nullptr;       // [ng]
  // Residual tables (build_residual_tables_scalar), tq's layout and multipliers on a grid 254x finer:
  // the AVX-512 and AVX2 GEMVs look both up with the same indices in one pass (nullptr: none).
  const int8_t* tr = nullptr;
};

extern int g_prefetch_bytes;  // software prefetch distance of the GEMV weight stream (0: off; env ELUTQ_PF)

// Run multipliers of one group (every path calls this, so all derive the same tables): with
// r_k = m_k / M, the largest budget B in kMultBudgets whose mult_k = max(1, ceil(r_k·B)) sum, over
// the runs that are not all zero, to at most 8 per run — the bound every kernel's integer
// accumulators are sized for (|Σ_k mult_k·q_k| <= 127·8·g/4, int16 on AVX2 and NEON; all-zero runs
// look up only zeros) — then mult_k.  Each run's entries are then rounded on a grid of
// M·mult_k/(127·B), close to its own m_k/127: a group with one outlier run (B large) keeps the
// others fine.  B = 8 always fits (every mult_k <= 8).  B is a power of two (<= 64: NEON multiplies
// by a signed byte), so lut_scale = M/(254·B) is exact whenever M/254 is.  Returns B.  Only IEEE
// multiplies, divisions and ceil, so every path gets the same result.
constexpr int kMultBudgets[4] = {64, 32, 16, 8};
static inline int group_mults(const float* peak, int nruns, float M, uint8_t* mult) {
  if (!(M > 0.0f)) {  // an all-zero group: its tables are 0 whatever the multipliers
    for (int k = 0; k < nruns; ++k) mult[k] = 1;
    return 8;
  }
  for (int bi = 0; bi < 4; ++bi) {
    const float B = (float)kMultBudgets[bi];
    int sum = 0, k = 0;
    for (; k < nruns; ++k) {
      const int mk = (int)__builtin_ceilf(peak[k] / M * B);
      mult[k] = (uint8_t)(mk < 1 ? 1 : mk);
      sum += mk;  // 0 for an all-zero run
      if (sum > 8 * nruns) break;
    }
    if (k == nruns) return kMultBudgets[bi];
  }
  return 8;  // not reached
}

// m_k of one run: ((|x0| + |x1|) + |x2|) + |x3|, the same float operations as the table entry whose
// signs match x (lut_scalar.cpp: run_table_signed), so it equals max_m |U[m]| bit for bit.
static inline float run_peak(const float* x4) {
  const float a0 = x4[0] < 0 ? -x4[0] : x4[0], a1 = x4[1] < 0 ? -x4[1] : x4[1];
  const float a2 = x4[2] < 0 ? -x4[2] : x4[2], a3 = x4[3] < 0 ? -x4[3] : x4[3];
  return ((a0 + a1) + a2) + a3;
}

// Byte of a chunk holding row m's nibbles of runs j and j + 4 (j = 0..3).
static inline int chunk_byte(bool avx2_order, int m, int j) { return avx2_order ? 16 * j + m : 4 * m + j; }

// ---- per-ISA entry points -------------------------------------------------------------------
// build_tables_*: x has `in` floats; writes group G's g·4 table bytes at tq + G·gstride (gstride = g·4:
// the plain [in_pad/4][16] layout), lut_scale [ng], xsum [ng].
// gemv_rows_*: rows of row blocks [rb0, rb1) of y = W·x; writes y[r] for real rows r only.

// Multipliers are written at tm + G·gstride/16 (one byte per 16 table bytes).
void build_tables_scalar(const float* x, int in, int g, int ng, int8_t* tq, uint8_t* tm, size_t gstride,
                         float* lut_scale, float* xsum);
void build_float_tables_scalar(const float* x, int in, int g, int ng, float* tf, float* xsum);
// Residual tables ("int8x2"): the int8 rounding error of tables tq/tm/lut_scale (built by any path:
// they are identical), r = U − 2·lut_scale·mult·q, itself rounded to int8 on a grid 254× finer,
//     q2[k][m] = rint(r · 127 / (lut_scale·mult_k)),   |q2| <= 127 since |r| <= lut_scale·mult_k,
// to be looked up with the same multipliers and lut_scale2 = lut_scale / 254 (and Σx = 0): a second
// GEMV pass that adds Σ r/2, leaving ~1/254 of the int8 tables' error.  tq2 has tq's layout.
void build_residual_tables_scalar(const float* x, int in, int g, int ng, const int8_t* tq, const uint8_t* tm,
                                  size_t gstride, const float* lut_scale, int8_t* tq2);
void gemv_rows_scalar(const LutWeight& W, const LutTables& T, int rb0, int rb1, float* y);
void gemv_rows_float_scalar(const LutWeight& W, const LutTables& T, int rb0, int rb1, float* y);

#if defined(__x86_64__) || defined(_M_X64)
void build_tables_avx2(const float* x, int in, int g, int ng, int8_t* tq, uint8_t* tm, size_t gstride,
                       float* lut_scale, float* xsum);
void gemv_rows_avx2(const LutWeight& W, const LutTables& T, int rb0, int rb1, float* y);
void gemm_rows_avx2(const LutWeight& W, const int8_t* tq, const uint8_t* tm, size_t gstride, const float* lut_scale,
                    const float* xsum, int n, int rb0, int rb1, float* y, size_t ldy,
                    const int8_t* tr = nullptr);  // as gemm_rows_avx512
void build_tables_avx512(const float* x, int in, int g, int ng, int8_t* tq, uint8_t* tm, size_t gstride,
                         float* lut_scale, float* xsum);
void gemv_rows_avx512(const LutWeight& W, const LutTables& T, int rb0, int rb1, float* y);
// Row blocks [a0, a0 + count) of Wa (into ya) and [b0, b0 + count) of Wb (into yb), walked side by
// side (a0 + i beside b0 + i): two continuous weight streams per core.  Wa and Wb share in/g (the
// same tables) and bits; each row equals gemv_rows_avx512's bit for bit.
void gemv_pair_avx512(const LutWeight& Wa, int a0, float* ya, const LutWeight& Wb, int b0, float* yb, int count,
                      const LutTables& T);
// GEMM on AVX-512 for n columns: column c's group-G tables at tq + G·gstride + c·g·4 (group-major, so
// a group's tables for all columns are contiguous), its multipliers at tm + (G·gstride + c·g·4)/16;
// lut_scale/xsum [n][ng]; column c's y at y + c·ldy.  tr: residual tables in tq's layout, looked up
// in the same pass (as LutTables::tr), or nullptr.
void gemm_rows_avx512(const LutWeight& W, const int8_t* tq, const uint8_t* tm, size_t gstride,
                      const float* lut_scale, const float* xsum, int n, int rb0, int rb1, float* y, size_t ldy,
                      const int8_t* tr = nullptr);
#endif

#if defined(__aarch64__)
void gemv_rows_neon(const LutWeight& W, const LutTables& T, int rb0, int rb1, float* y);
#endif

}  // namespace elutq
