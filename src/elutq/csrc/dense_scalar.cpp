// Portable scalar reference for the dense fp16 rows (shapes: dense.h).
#include "dense.h"

namespace elutq {

// Each row is decoded once into a float buffer, then dotted with every column; 8 partial sums keep
// the loop free of a serial dependency chain.
void dense_rows_scalar(const uint16_t* W, int in, const float* X, int n, int r0, int r1, float* Y, size_t ldy) {
  float* row = new float[in];
  for (int r = r0; r < r1; ++r) {
    const uint16_t* wr = W + (size_t)r * in;
    for (int k = 0; k < in; ++k) row[k] = fp16_to_float(wr[k]);
    for (int c = 0; c < n; ++c) {
      const float* x = X + (size_t)c * in;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int k = 0;
      for (; k + 8 <= in; k += 8)
        for (int j = 0; j < 8; ++j) acc[j] += row[k + j] * x[k + j];
      float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (; k < in; ++k) s += row[k] * x[k];
      Y[(size_t)c * ldy + r] = s;
    }
  }
  delete[] row;
}

}  // namespace elutq
