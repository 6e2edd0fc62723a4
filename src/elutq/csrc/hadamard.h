// The online Hadamard transform of `--rotate full` (rotation.py): down_proj's input u is rotated per column
// by an orthogonal T whose counterpart is fused into down_proj's weights offline — in row-vector terms
// y = u·Wᵀ = (u·T)·(W·T)ᵀ, the checkpoint storing W·T — with T = diag(s)·(A ⊗ S_b)/√b:
//   s   f32 [n]     random signs (±1)
//   A   f32 [m][m]  orthonormal: a small Hadamard matrix / √m (Paley; [1] where n is a power of two), or I
//   S_b             the Sylvester Hadamard matrix of order b (a power of two), n = m·b, applied as a
//                   fast Walsh–Hadamard transform: log2(b) butterfly passes, no matrix stored
// so out[i·b + k] = Σ_j A[j][i]·FWHT(s ⊙ u)_j[k] / √b, where v_j = elements j·b .. j·b + b − 1.
// Cost per column: n·log2(b) adds and n·m multiply-adds (1536 = 12·128: 12 per element), against
// down_proj's n·H; where the Paley factor would be large (8960 = 140·64) Python passes A = I (blocks of
// 256, rotation.fast_factors) and the mixing is skipped.
#pragma once

#include "common.h"

namespace elutq {

struct HadamardSpec {
  int n = 0, m = 0, b = 0;
  const float* s = nullptr;  // [n]
  const float* a = nullptr;  // [m][m]
  bool identity = false;     // A = I (block-diagonal): the mixing is skipped
};

// x f32 [n] in place; tmp f32 [n] scratch.  Plain loops (the butterflies and the A-mixing run over
// contiguous runs of b floats), compiled for each ISA by ELUTQ_CLONES; with `path` AVX-512 or AVX2 and b a
// multiple of 16, the four narrowest passes in registers (hadamard.cpp).
void hadamard_transform(const HadamardSpec& h, float* x, float* tmp, Path path);

}  // namespace elutq
