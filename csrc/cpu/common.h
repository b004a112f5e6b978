// Helpers shared by the C++ CPU kernels (csrc/cpu/<op>.h): fp32 loads from fp32/bf16/fp16, a vectorized
// row argmax with torch.argmax's tie rule, and dot products with fp32 accumulation.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace specee::cpu {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kVec = fVec::size();
constexpr int64_t kPlaceholderTokenId = -1;  // PLACEHOLDER_TOKEN_ID of specee/reference.py

// kVec consecutive elements as fp32 (exact for bf16/fp16).
template <typename T>
inline fVec load_f32(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else {
    fVec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

// Horizontal max / sum of one vector.
inline float hmax(const fVec& v) {
  alignas(64) float buf[kVec];
  v.store(buf);
  float m = buf[0];
  for (int64_t i = 1; i < kVec; ++i) m = std::max(m, buf[i]);
  return m;
}

inline float hsum(const fVec& v) {
  alignas(64) float buf[kVec];
  v.store(buf);
  float s = 0.f;
  for (int64_t i = 0; i < kVec; ++i) s += buf[i];
  return s;
}

// (max, index) of x[0:n] as fp32, lowest index among ties (torch.argmax). Rows of only -inf give index 0.
// NOTE: block maxima are compared with a strict >, so the first block holding the maximum wins, and the
// block is rescanned for its first element equal to the maximum: one pass over memory plus <= 256 loads.
template <typename T>
inline std::pair<float, int64_t> argmax_row(const T* x, int64_t n) {
  constexpr int64_t kBlock = 32 * kVec;
  float best = -std::numeric_limits<float>::infinity();
  int64_t best_block = -1, i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    fVec m0 = load_f32(x + i), m1 = load_f32(x + i + kVec);
    fVec m2 = load_f32(x + i + 2 * kVec), m3 = load_f32(x + i + 3 * kVec);
    for (int64_t j = i + 4 * kVec; j < i + kBlock; j += 4 * kVec) {
      m0 = at::vec::maximum(m0, load_f32(x + j));
      m1 = at::vec::maximum(m1, load_f32(x + j + kVec));
      m2 = at::vec::maximum(m2, load_f32(x + j + 2 * kVec));
      m3 = at::vec::maximum(m3, load_f32(x + j + 3 * kVec));
    }
    const float bm = hmax(at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)));
    if (bm > best) {
      best = bm;
      best_block = i;
    }
  }
  int64_t idx = 0;
  if (best_block >= 0) {
    idx = best_block;
    while (static_cast<float>(x[idx]) != best) ++idx;
  }
  for (; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    if (v > best) {
      best = v;
      idx = i;
    }
  }
  return {best, idx};
}

// argmax_row split over threads when called outside a parallel region and the row is long.
template <typename T>
inline int64_t argmax_row_parallel(const T* x, int64_t n) {
  constexpr int64_t kMinChunk = 16384;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t chunks = std::min<int64_t>(threads, n / kMinChunk);
  if (chunks <= 1) return argmax_row(x, n).second;
  const int64_t len = (n + chunks - 1) / chunks;
  std::vector<std::pair<float, int64_t>> part(chunks, {-std::numeric_limits<float>::infinity(), n});
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t lo = c * len, hi = std::min(n, lo + len);
      if (lo >= hi) continue;
      auto r = argmax_row(x + lo, hi - lo);
      part[c] = {r.first, r.second + lo};
    }
  });
  std::pair<float, int64_t> best = part[0];
  for (int64_t c = 1; c < chunks; ++c)
    if (part[c].first > best.first) best = part[c];  // chunks ascend, so > keeps the lowest index
  return best.second < n ? best.second : 0;
}

// sum_i a[i] * b[i] in fp32 (a already fp32), 4 vector accumulators.
template <typename T>
inline float dot_f32(const float* a, const T* b, int64_t n) {
  fVec acc0(0.f), acc1(0.f), acc2(0.f), acc3(0.f);
  int64_t i = 0;
  for (; i + 4 * kVec <= n; i += 4 * kVec) {
    acc0 = at::vec::fmadd(fVec::loadu(a + i), load_f32(b + i), acc0);
    acc1 = at::vec::fmadd(fVec::loadu(a + i + kVec), load_f32(b + i + kVec), acc1);
    acc2 = at::vec::fmadd(fVec::loadu(a + i + 2 * kVec), load_f32(b + i + 2 * kVec), acc2);
    acc3 = at::vec::fmadd(fVec::loadu(a + i + 3 * kVec), load_f32(b + i + 3 * kVec), acc3);
  }
  for (; i + kVec <= n; i += kVec) acc0 = at::vec::fmadd(fVec::loadu(a + i), load_f32(b + i), acc0);
  float s = hsum((acc0 + acc1) + (acc2 + acc3));
  for (; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

// Row b of a [rows, n] tensor converted to fp32 into dst.
template <typename T>
inline void to_f32(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) load_f32(src + i).store(dst + i);
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

}  // namespace specee::cpu
