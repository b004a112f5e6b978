// lm_head_argmax on the CPU: argmax over V of hidden @ lm_head.T in fp32 without writing [B, V] logits
// (docs/ops.md §2). The vocabulary is split over threads; each keeps a (max, index) per row and the
// partial results are merged in vocabulary order, so ties go to the lowest index as in torch.argmax.
#pragma once
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

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

#if SPECEE_X86
namespace avx2 {
// out[m * NR + r] = dot(a[m], w[r]) over d, for an MB x NR tile. NOTE: one accumulator per (m, r) and the same
// tail for every tile shape, so a logit does not depend on its tile: duplicated head rows stay exact ties.
template <int MB, int NR, typename T>
SPECEE_AVX2 inline void DotTile(const float* const* a, const T* const* w, int64_t d, float* out) {
  __m256 acc[MB][NR];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = Load8(w[r] + i);
    for (int m = 0; m < MB; ++m) {
      const __m256 av = _mm256_loadu_ps(a[m] + i);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(av, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) {
      float s = Hsum8(acc[m][r]);
      for (int64_t t = i; t < d; ++t) s = std::fma(a[m][t], static_cast<float>(w[r][t]), s);
      out[m * NR + r] = s;
    }
}

template <typename T>
SPECEE_AVX2 void LmHeadArgmaxStream(const float* hidden, const T* lm_head, int64_t B, int64_t d, int64_t v0,
                                    int64_t v1, Best* best) {
  constexpr int NR = 4, MB = 2;
  // NOTE: with several hidden rows a bf16/fp16 tile is widened to fp32 once and reused B times.
  const bool widen = !std::is_same_v<T, float> && B >= 4;
  std::vector<float> buf(widen ? NR * d : 0);
  float logit[MB * NR];
  auto update = [&](int64_t b, float value, int64_t v) {
    if (value > best[b].value || best[b].index < 0) best[b] = {value, v};
  };
  int64_t v = v0;
  for (; v + NR <= v1; v += NR) {
    const T* rows[NR];
    for (int r = 0; r < NR; ++r) rows[r] = lm_head + (v + r) * d;
    const float* frows[NR];
    if (widen) {
      for (int r = 0; r < NR; ++r) {
        float* dst = buf.data() + r * d;
        int64_t i = 0;
        for (; i + 8 <= d; i += 8) _mm256_storeu_ps(dst + i, Load8(rows[r] + i));
        for (; i < d; ++i) dst[i] = static_cast<float>(rows[r][i]);
        frows[r] = dst;
      }
    }
    int64_t b = 0;
    for (; b + MB <= B; b += MB) {
      const float* a[MB] = {hidden + b * d, hidden + (b + 1) * d};
      if (widen) DotTile<MB, NR>(a, frows, d, logit); else DotTile<MB, NR>(a, rows, d, logit);
      for (int m = 0; m < MB; ++m)
        for (int r = 0; r < NR; ++r) update(b + m, logit[m * NR + r], v + r);
    }
    for (; b < B; ++b) {
      const float* a[1] = {hidden + b * d};
      if (widen) DotTile<1, NR>(a, frows, d, logit); else DotTile<1, NR>(a, rows, d, logit);
      for (int r = 0; r < NR; ++r) update(b, logit[r], v + r);
    }
  }
  for (; v < v1; ++v) {
    const T* rows[1] = {lm_head + v * d};
    for (int64_t b = 0; b < B; ++b) {
      const float* a[1] = {hidden + b * d};
      DotTile<1, 1>(a, rows, d, logit);
      update(b, logit[0], v);
    }
  }
}
}  // namespace avx2
#endif

// Large batches are GEMM-bound: blocks of the head go through ATen's BLAS (one thread each) and the argmax
// runs on each [B, block] tile while it is in cache, so the [B, V] logits are still never written.
template <typename T>
void LmHeadArgmaxGemm(const float* hidden, const T* lm_head, int64_t B, int64_t d, int64_t v0, int64_t v1,
                      Best* best) {
  constexpr int64_t kBlockRows = 512;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor x = at::from_blob(const_cast<float*>(hidden), {B, d}, opts);
  std::vector<float> buf(std::is_same_v<T, float> ? 0 : kBlockRows * d);
  for (int64_t v = v0; v < v1; v += kBlockRows) {
    const int64_t n = std::min(kBlockRows, v1 - v);
    const float* w;
    if constexpr (std::is_same_v<T, float>) {
      w = lm_head + v * d;
    } else {
      for (int64_t r = 0; r < n; ++r) to_f32(lm_head + (v + r) * d, buf.data() + r * d, d);
      w = buf.data();
    }
    const at::Tensor logits = at::mm(x, at::from_blob(const_cast<float*>(w), {n, d}, opts).t()).contiguous();
    const float* l = logits.const_data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      const auto [value, index] = argmax_row(l + b * n, n);
      if (value > best[b].value || best[b].index < 0) best[b] = {value, v + index};
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
  constexpr int64_t kGemmMinBatch = 16;  // measured crossover of the streaming kernel and MKL on AVX2
  const int64_t chunks = std::max<int64_t>(1, (V + kRowsPerChunk - 1) / kRowsPerChunk);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  // Partial results per thread slice of the vocabulary: slice t covers [t*len, (t+1)*len).
  const int64_t len = (V + threads - 1) / threads;
  std::vector<Best> part(threads * B);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t lo = t * len, hi = std::min(V, lo + len);
      if (lo >= hi) continue;
      if (B >= kGemmMinBatch) {
        LmHeadArgmaxGemm(hidden, lm_head, B, d, lo, hi, part.data() + t * B);
        continue;
      }
#if SPECEE_X86
      if (HasAvx2()) {
        avx2::LmHeadArgmaxStream(hidden, lm_head, B, d, lo, hi, part.data() + t * B);
        continue;
      }
#endif
      LmHeadArgmaxStream(hidden, lm_head, B, d, lo, hi, part.data() + t * B);
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
