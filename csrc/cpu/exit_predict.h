// exit_predict on the CPU: RMSNorm, logits of the k candidate rows of the head, softmax over them, and
// the 2-layer MLP on cat([logits, probs, probs - prev_probs]) (docs/ops.md §1; SpecEE, arXiv 2504.08850).
// One row of the batch per task; only k rows of the [V, d] head are read.
#pragma once
#include <cmath>

#include "cpu/common.h"

namespace specee::cpu {

template <typename T>
void ExitPredict(const float* hidden,       // [B, d] fp32
                 const float* norm_weight,  // [d]
                 float eps,
                 const T* lm_head,          // [V, d]
                 const int64_t* cand_ids,   // [B, k], in [0, V)
                 const float* prev_probs,   // [B, k]
                 const float* w1t,          // [3k, H]: w1 transposed, so the MLP is 3k contiguous axpys
                 const float* b1,           // [H]
                 const float* w2,           // [H]
                 float b2, float threshold,
                 int64_t B, int64_t d, int64_t k, int64_t H,
                 float* score,              // [B]
                 float* probs,              // [B, k]
                 bool* exit) {              // [B]
  // NOTE: a row costs ~k*d + 3k*H flops; the grain keeps small batches on one thread (no fork/join).
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, k * d + 3 * k * H));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> normed(d), feats(3 * k), h(H);
    for (int64_t b = begin; b < end; ++b) {
      const float* x = hidden + b * d;
      const float inv_rms = 1.f / std::sqrt(dot_f32(x, x, d) / static_cast<float>(d) + eps);
      for (int64_t i = 0; i < d; ++i) normed[i] = x[i] * inv_rms * norm_weight[i];  // vectorized by -O3

      float* logits = feats.data();
      float* p = feats.data() + k;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < k; ++c) {
        logits[c] = dot_f32(normed.data(), lm_head + cand_ids[b * k + c] * d, d);
        m = std::max(m, logits[c]);
      }
      float sum = 0.f;
      for (int64_t c = 0; c < k; ++c) sum += (p[c] = std::exp(logits[c] - m));
      for (int64_t c = 0; c < k; ++c) {
        p[c] /= sum;
        probs[b * k + c] = p[c];
        feats[2 * k + c] = p[c] - prev_probs[b * k + c];
      }
      std::copy(b1, b1 + H, h.begin());
      for (int64_t c = 0; c < 3 * k; ++c) axpy(feats[c], w1t + c * H, h.data(), H);
      for (int64_t j = 0; j < H; ++j) h[j] = std::max(0.f, h[j]);
      const float z = dot_f32(h.data(), w2, H) + b2;
      const float s = 1.f / (1.f + std::exp(-z));
      score[b] = s;
      exit[b] = s > threshold;
    }
  });
}

}  // namespace specee::cpu
