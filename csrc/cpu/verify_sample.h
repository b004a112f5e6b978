// verify_sample on the CPU: lossless speculative sampling (docs/ops.md §4; Leviathan et al. 2023,
// arXiv 2211.17192). Rows run in parallel; within a row, positions are visited in order until a reject.
// The caller passes target_probs computed by at::_softmax (the reference's kernel), and everything here is
// exact fp32 arithmetic in the contract's order, so the tokens equal specee.reference.verify_sample's.
#pragma once
#include "cpu/common.h"

namespace specee::cpu {

// Philox4x32-10 (Salmon et al. 2011): counter (c0..c3), key (k0, k1); the output replaces c.
inline void Philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
  }
}

// U(x) = ((x >> 8) + 0.5) * 2^-24 in fp32: in (0, 1], 1.0 only for x >> 8 == 2^24 - 1 (round to even).
inline float UniformFromBits(uint32_t x) { return (static_cast<float>(x >> 8) + 0.5f) * 0x1p-24f; }

// (uniform_accept, uniform_sample) for row b, position j.
inline std::pair<float, float> PhiloxUniforms(uint64_t seed, uint64_t offset, int64_t b, int64_t j) {
  uint32_t c[4] = {static_cast<uint32_t>(j), static_cast<uint32_t>(b), static_cast<uint32_t>(offset),
                   static_cast<uint32_t>(offset >> 32)};
  Philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return {UniformFromBits(c[0]), UniformFromBits(c[1])};
}

// sample(w, u): first i with sequential-fp32 cdf_i > u * cdf_{V-1}, else the last i with w_i > 0 (-1 if none).
inline int64_t SampleInverseCdf(const float* w, int64_t V, float u) {
  float total = 0.f;
  int64_t last_positive = kPlaceholderTokenId;
  for (int64_t i = 0; i < V; ++i) {
    total += w[i];
    if (w[i] > 0.f) last_positive = i;
  }
  const float threshold = u * total;
  float cdf = 0.f;
  for (int64_t i = 0; i < V; ++i) {
    cdf += w[i];
    if (cdf > threshold) return i;
  }
  return last_positive;
}

template <typename TD>
void VerifySample(const int64_t* draft,         // [B, K], drafts at j < num_draft[b] are in [0, V)
                  const int64_t* num_draft,     // [B]
                  const TD* draft_probs,        // [B, K, V] or nullptr (one-hot drafts)
                  const float* target_logits,   // [B, K+1, V] fp32, read for greedy rows only (argmax)
                  const float* target_probs,    // [B, K+1, V] softmax(logits / temperature), fp32
                  const float* temperature,     // [B]
                  uint64_t seed, uint64_t offset,
                  int64_t B, int64_t K, int64_t V,
                  int64_t* out,                 // [B, K+1]
                  int64_t* num_emitted) {       // [B]
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(V);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t nd = std::clamp<int64_t>(num_draft[b], 0, K);
      const bool greedy = temperature[b] <= 0.f;
      int64_t* o = out + b * (K + 1);
      // Target probability of token i at position j; greedy rows are one_hot(argmax).
      int64_t argmax_pos = -1, argmax_tok = -1;
      auto target_at = [&](int64_t j, int64_t i) -> float {
        if (!greedy) return target_probs[(b * (K + 1) + j) * V + i];
        if (argmax_pos != j) {
          argmax_tok = argmax_row(target_logits + (b * (K + 1) + j) * V, V).second;
          argmax_pos = j;
        }
        return i == argmax_tok ? 1.f : 0.f;
      };
      auto draft_at = [&](int64_t j, int64_t i) -> float {
        if (draft_probs == nullptr) return i == draft[b * K + j] ? 1.f : 0.f;
        return static_cast<float>(draft_probs[(b * K + j) * V + i]);
      };
      int64_t n = 0;
      for (; n < nd; ++n) {
        const int64_t x = draft[b * K + n];
        const float u = PhiloxUniforms(seed, offset, b, n).first;
        if (!(u * draft_at(n, x) < target_at(n, x))) break;
        o[n] = x;
      }
      // Weights of the emitted token in `w`: target_probs[n] (bonus), or the residual, or target_probs[n]
      // again when the residual has no mass. Same fp32 operations as the reference, so the same bits.
      auto load_target = [&] {
        if (greedy) {
          std::fill(w.begin(), w.end(), 0.f);
          w[argmax_row(target_logits + (b * (K + 1) + n) * V, V).second] = 1.f;
        } else {
          const float* tp = target_probs + (b * (K + 1) + n) * V;
          std::copy(tp, tp + V, w.begin());
        }
      };
      load_target();
      if (n < nd) {
        if (draft_probs != nullptr) {
          const TD* dp = draft_probs + (b * K + n) * V;
          for (int64_t i = 0; i < V; ++i) w[i] = std::max(0.f, w[i] - static_cast<float>(dp[i]));
        } else {
          const int64_t x = draft[b * K + n];  // one-hot draft: only token x loses mass
          w[x] = std::max(0.f, w[x] - 1.f);
        }
        if (std::none_of(w.begin(), w.end(), [](float v) { return v > 0.f; })) load_target();
      }
      const int64_t token = SampleInverseCdf(w.data(), V, PhiloxUniforms(seed, offset, b, n).second);
      o[n] = token;
      for (int64_t i = n + 1; i <= K; ++i) o[i] = kPlaceholderTokenId;
      num_emitted[b] = n + 1;
    }
  });
}

}  // namespace specee::cpu
