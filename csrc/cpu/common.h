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
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// NOTE: setup.py compiles for baseline x86-64 (SSE2), where at::vec::Vectorized falls back to scalar loops.
// The hot loops therefore also exist as AVX2+FMA+F16C functions (GCC/Clang target attribute), chosen at run
// time by HasAvx2(); other CPUs use the generic at::vec code.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPECEE_X86 1
#include <immintrin.h>
#define SPECEE_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define SPECEE_X86 0
#endif

namespace specee::cpu {

inline bool HasAvx2() {
#if SPECEE_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

#if SPECEE_X86
namespace avx2 {
SPECEE_AVX2 inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
SPECEE_AVX2 inline __m256 Load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
SPECEE_AVX2 inline __m256 Load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
SPECEE_AVX2 inline float Hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
SPECEE_AVX2 inline float Hmax8(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

// Index of the block of 256 holding the first maximum (strict > across blocks), and that maximum.
template <typename T>
SPECEE_AVX2 inline std::pair<float, int64_t> ArgmaxBlocks(const T* x, int64_t n, int64_t* end) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t best_block = -1, i = 0;
  for (; i + 256 <= n; i += 256) {
    __m256 m0 = Load8(x + i), m1 = Load8(x + i + 8), m2 = Load8(x + i + 16), m3 = Load8(x + i + 24);
    for (int64_t j = i + 32; j < i + 256; j += 32) {
      m0 = _mm256_max_ps(m0, Load8(x + j));
      m1 = _mm256_max_ps(m1, Load8(x + j + 8));
      m2 = _mm256_max_ps(m2, Load8(x + j + 16));
      m3 = _mm256_max_ps(m3, Load8(x + j + 24));
    }
    const float bm = Hmax8(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
    if (bm > best) {
      best = bm;
      best_block = i;
    }
  }
  *end = i;
  return {best, best_block};
}

template <typename T>
SPECEE_AVX2 inline float Dot(const float* a, const T* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
         acc3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), Load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), Load8(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), Load8(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), Load8(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), Load8(b + i), acc0);
  float s = Hsum8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; i < n; ++i) s = std::fma(a[i], static_cast<float>(b[i]), s);
  return s;
}

SPECEE_AVX2 inline void Axpy(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] = std::fma(a, x[i], y[i]);
}

template <typename T>
SPECEE_AVX2 inline void ToF32(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, Load8(src + i));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
}  // namespace avx2
#endif

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
#if SPECEE_X86
  if (HasAvx2()) {
    std::tie(best, best_block) = avx2::ArgmaxBlocks(x, n, &i);  // leaves i past the last full block
  }
#endif
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
#if SPECEE_X86
  if (HasAvx2()) return avx2::Dot(a, b, n);
#endif
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

// y += a * x over n floats.
inline void axpy(float a, const float* x, float* y, int64_t n) {
#if SPECEE_X86
  if (HasAvx2()) return avx2::Axpy(a, x, y, n);
#endif
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Row b of a [rows, n] tensor converted to fp32 into dst.
template <typename T>
inline void to_f32(const T* src, float* dst, int64_t n) {
#if SPECEE_X86
  if (HasAvx2()) return avx2::ToF32(src, dst, n);
#endif
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) load_f32(src + i).store(dst + i);
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

}  // namespace specee::cpu
