// lm_head_argmax on the CPU: argmax over V of hidden @ lm_head.T in fp32 without writing [B, V] logits
// (docs/ops.md §2). The vocabulary is split over threads; each keeps a (max, index) per row and the
// partial results are merged in vocabulary order, so ties go to the lowest index as in torch.argmax.
#pragma once
#include "cpu/common.h"

namespace specee::cpu {

// out[r] = sum_i a[i] * rows[r][i] in fp32. NOTE: the arithmetic of each row does not depend on R or on
// its slot, so duplicated head rows give bitwise-equal logits (planted ties stay ties).
template <int R, typename T>
inline void DotRows(const float* a, const T* const* rows, int64_t n, float* out) {
  fVec acc[R];
  for (int r = 0; r < R; ++r) acc[r] = fVec(0.f);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) {
    const fVec x = fVec::loadu(a + i);
    for (int r = 0; r < R; ++r) acc[r] = at::vec::fmadd(x, load_f32(rows[r] + i), acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum(acc[r]);
    for (int64_t t = i; t < n; ++t) s += a[t] * static_cast<float>(rows[r][t]);
    out[r] = s;
  }
}

struct Best {
  float value = -std::numeric_limits<float>::infinity();
  int64_t index = -1;
};

// Streams the head once; each group of 4 head rows is dotted with every hidden row (hidden stays in cache).
template <typename T>
void LmHeadArgmaxStream(const float* hidden, const T* lm_head, int64_t B, int64_t d, int64_t v0, int64_t v1,
                        Best* best) {
  constexpr int R = 4;
  float logit[R];
  int64_t v = v0;
  for (; v + R <= v1; v += R) {
    const T* rows[R] = {lm_head + v * d, lm_head + (v + 1) * d, lm_head + (v + 2) * d, lm_head + (v + 3) * d};
    for (int64_t b = 0; b < B; ++b) {
      DotRows<R>(hidden + b * d, rows, d, logit);
      for (int r = 0; r < R; ++r)
        if (logit[r] > best[b].value || best[b].index < 0) best[b] = {logit[r], v + r};
    }
  }
  for (; v < v1; ++v) {
    const T* rows[1] = {lm_head + v * d};
    for (int64_t b = 0; b < B; ++b) {
      DotRows<1>(hidden + b * d, rows, d, logit);
      if (logit[0] > best[b].value || best[b].index < 0) best[b] = {logit[0], v};
    }
  }
}

template <typename T>
void LmHeadArgmax(const float* hidden,     // [B, d] fp32
                  const T* lm_head,        // [V, d]
                  const int64_t* cand_ids, // [B, k] or nullptr
                  int64_t B, int64_t d, int64_t V, int64_t k,
                  int64_t* token,          // [B]
                  bool* in_candidates) {   // [B]
  constexpr int64_t kRowsPerChunk = 256;
  const int64_t chunks = std::max<int64_t>(1, (V + kRowsPerChunk - 1) / kRowsPerChunk);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  // Partial results per thread slice of the vocabulary: slice t covers [t*len, (t+1)*len).
  const int64_t len = (V + threads - 1) / threads;
  std::vector<Best> part(threads * B);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t lo = t * len, hi = std::min(V, lo + len);
      if (lo < hi) LmHeadArgmaxStream(hidden, lm_head, B, d, lo, hi, part.data() + t * B);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    Best best = part[b];
    for (int64_t t = 1; t < threads; ++t) {
      const Best& p = part[t * B + b];
      if (p.index >= 0 && (p.value > best.value || best.index < 0)) best = p;
    }
    token[b] = best.index < 0 ? 0 : best.index;
    bool found = false;
    if (cand_ids != nullptr)
      for (int64_t i = 0; i < k; ++i) found |= cand_ids[b * k + i] == token[b];
    in_candidates[b] = found;
  }
}

}  // namespace specee::cpu
