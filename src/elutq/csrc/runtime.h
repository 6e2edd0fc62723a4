// elutq native decode loop for llama-family decoders (LLaMA 2/3, Mistral, Qwen2/2.5/3, SmolLM).
//
// One call runs every layer of a forward step over a "ragged batch": several sequences, each with
// its own KV cache, start position and number of new tokens (a prompt prefill is one sequence with
// n > 1 tokens; a decode step of B concurrent requests is B sequences with one token each).  All
// columns of the batch go through each matrix together, so prefill and batched decode use the GEMM
// kernels and one set of activation tables per column serves q/k/v and gate/up.
//
// Shapes (H = hidden, I = intermediate, D = head_dim, nh/nkv = query/key-value heads, N = Σ n_s):
//   x, h        f32 [N][H]      residual stream and normed input of a sublayer
//   q           f32 [N][nh·D]   k, v f32 [N][nkv·D]
//   KV cache    fp16 [layers][nkv][max_ctx][D] for k and for v, per sequence (k after RoPE).  fp16
//               halves the bytes a decode step's attention reads (llama.cpp's default cache type is
//               f16 too); head-major, so one head's keys are one contiguous stream the hardware
//               prefetchers follow (position-major rows would be D halves every nkv·D: a new page
//               per key for 7B's 32 heads)
//   logits      f32 [R][vocab]  R = Σ_s (all_logits_s ? n_s : 1), sequences in order
// RoPE is HF's rotate-half form: pairs (i, i + D/2) rotate by angle pos·inv_freq[i] (inv_freq and
// the attention scaling come from Python, so every rope_scaling type transformers knows works).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "hadamard.h"
#include "lut_driver.h"

namespace elutq {

struct RtConfig {
  int n_layers = 0, hidden = 0, inter = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, vocab = 0;
  float rms_eps = 1e-6f;
  std::vector<float> inv_freq;  // [head_dim / 2]
  float rope_scale = 1.0f;      // multiplies cos and sin (yarn's attention scaling)
};

// A linear layer: HLQ weights for the LUT kernels, or dense fp16 rows (w16, owned or borrowed).
struct RtLinear {
  std::unique_ptr<LutMatrix> lut;
  AlignedBuf own;
  const uint16_t* w16 = nullptr;  // fp16 [out][in]
  int out = 0, in = 0;
  std::vector<float> bias;  // empty: none
  bool set() const { return out > 0; }
  size_t nbytes() const { return lut ? lut->nbytes() : (size_t)out * in * 2; }
};

// HLQ embeddings, the checkpoint's tensors as they are (checkpoint.py): a token's row is decoded
// when it is looked up, x[i] = z + Σ_b s_b·bit_b(i) of its group.
//   qw  uint8 [bits][vocab][ceil(H/8)]  bit-planes, element i at bit i%8 of byte i/8
//   sc  fp16  [vocab][ng][bits]          zr fp16 [vocab][ng]
struct HlqEmbedding {
  AlignedBuf qw, sc, zr;
  int bits = 0, g = 0, ng = 0, row_bytes = 0, vocab = 0;
  bool set() const { return bits > 0; }
  void row(int token, float* x, int H) const;
};

enum LinearId : int { kQ = 0, kK, kV, kO, kGate, kUp, kDown, kNumLinears };

struct RtLayer {
  RtLinear lin[kNumLinears];
  std::vector<float> attn_norm, mlp_norm, q_norm, k_norm;  // q/k norms: [D] (Qwen3) or empty
};

struct KVCache {
  int n_layers, max_ctx, n_kv_heads, head_dim;
  AlignedBuf k, v;
  KVCache(int n_layers, int max_ctx, int n_kv_heads, int head_dim);
  // position t of KV head h in layer l (positions of one head are head_dim halves apart)
  size_t at(int l, int h, int t) const { return (((size_t)l * n_kv_heads + h) * max_ctx + t) * head_dim; }
  uint16_t* kp(int l, int h, int t) { return (uint16_t*)k.p + at(l, h, t); }
  uint16_t* vp(int l, int h, int t) { return (uint16_t*)v.p + at(l, h, t); }
  size_t nbytes() const { return 2 * (size_t)n_layers * n_kv_heads * max_ctx * head_dim * sizeof(uint16_t); }
};

struct SeqSpan {
  KVCache* cache;
  int pos;          // tokens already in the cache (the new ones go to pos .. pos + n - 1)
  int n;            // new tokens
  bool all_logits;  // logits for every new token, or only the last
};

class Runtime {
 public:
  explicit Runtime(RtConfig cfg);
  RtConfig cfg;
  std::vector<RtLayer> layers;
  AlignedBuf embed;  // fp16 [vocab][H], or (embed_q set, or embed_from_head) none
  HlqEmbedding embed_q;
  bool embed_from_head = false;  // a token's row is decoded from lm_head's LUT matrix (one tied table; first)
  std::vector<float> final_norm;
  std::vector<float> down_rot_s, down_rot_a;  // --rotate full: down_proj's input u ↦ u·T (hadamard.h)
  HadamardSpec down_rot;
  RtLinear final_rot;  // optional [H][H] after the final norm: a rotated tied model's M = Qᵀ·diag(w)·Q (rotation.py)
  RtLinear lm_head;
  Path path = Path::Scalar;
  bool float_tables = false;
  bool residual_tables = false;  // int8 tables + residual tables (lut_driver.h), 2 lookup passes

  // tokens: Σ n_s ids, sequence after sequence; logits: see the header comment.  Throws on bad input.
  void forward(const std::vector<SeqSpan>& seqs, const int32_t* tokens, float* logits);
  size_t weight_bytes() const;  // bytes of weights a decode step streams (all linears + lm_head)
  void check_complete() const;  // throws if a tensor was never set

 private:
  void matmul(std::initializer_list<const RtLinear*> ws, const float* x, int n, std::initializer_list<float*> ys);
  AlignedBuf x_, h_, q_, k_, v_, att_, g_, u_, tmp_, rope_;
};

// Sampling of R rows of logits [R][V] at once, rows split over the threads (the server's batch would
// otherwise cost one Python pass per row).  Row r: greedy (first largest) if inv_t[r] == 0; else
// weights p = e^(x·inv_t − max) over the top_k[r] largest scaled logits (0: all), then only the
// smallest set of largest weights whose mass reaches top_p[r] of the total (1: all), and out[r] is
// the first index, in vocabulary order, whose cumulative weight exceeds u[r]·Σp (u in [0, 1)).
void sample_rows(const float* logits, int R, int V, const float* inv_t, const int32_t* top_k, const float* top_p,
                 const double* u, int32_t* out);

}  // namespace elutq
