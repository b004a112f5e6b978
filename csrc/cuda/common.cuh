// Shared pieces of the specee CUDA kernels: dtype loads, warp/block reductions, Philox4x32-10 and the
// DISPATCH macros. Plain CUDA, no torch headers (see docs/ops.md for the contract of every op).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace specee {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int64_t kPlaceholderTokenId = -1;  // pads rejected positions of `out`
constexpr int kEmptyIndex = INT_MAX;         // index of "no element yet" in (value, index) reductions

// Turns a runtime flag into a constexpr bool NAME visible in the body (which may `return`).
#define SPECEE_DISPATCH_BOOL(expr, NAME, ...) \
  if (expr) {                                 \
    constexpr bool NAME = true;               \
    __VA_ARGS__                               \
  } else {                                    \
    constexpr bool NAME = false;              \
    __VA_ARGS__                               \
  }

// ---------------------------------------------------------------------------------------------------
// dtypes: every kernel reads float, __half or __nv_bfloat16 through its raw bits and computes in fp32.

template <typename T>
struct DTypeTraits;
template <>
struct DTypeTraits<float> {
  using Raw = float;
  static __device__ __forceinline__ float ToFloat(Raw r) { return r; }
};
template <>
struct DTypeTraits<__half> {
  using Raw = unsigned short;
  static __device__ __forceinline__ float ToFloat(Raw r) { return __half2float(__ushort_as_half(r)); }
};
template <>
struct DTypeTraits<__nv_bfloat16> {
  using Raw = unsigned short;
  static __device__ __forceinline__ float ToFloat(Raw r) { return __uint_as_float(uint32_t(r) << 16); }
};

// Elements of T in one 16-byte load: 4 fp32 or 8 fp16/bf16.
template <typename T>
constexpr int kVecItems = 16 / int(sizeof(T));

template <typename T>
__device__ __forceinline__ float LoadFloat(const T* __restrict__ p, int64_t i) {
  using Raw = typename DTypeTraits<T>::Raw;
  return DTypeTraits<T>::ToFloat(reinterpret_cast<const Raw*>(p)[i]);
}

// Loads p[start, start + N) as fp32 into out; elements at or past n read as `fill`. vec: one 16-byte
// (or 8/32-byte) load, valid when p is 16-byte aligned and start is a multiple of N (the launchers check
// this; a compile-time constant folds the branch away). STREAM: the data is read once (the LM head), so
// load with the evict-first hint.
template <int N, bool STREAM = false, typename T>
__device__ __forceinline__ void LoadItems(const T* __restrict__ p, int64_t start, int64_t n, float (&out)[N],
                                          float fill, bool vec) {
  using Raw = typename DTypeTraits<T>::Raw;
  constexpr int kBytes = N * int(sizeof(Raw));
  static_assert(kBytes % 8 == 0, "vector loads need 8, 16 or 32 bytes");
  if (vec && start + N <= n) {
    union {
      uint4 u4[kBytes >= 16 ? kBytes / 16 : 1];
      uint2 u2[kBytes / 8];
      Raw r[N];
    } pk;
    if constexpr (kBytes % 16 == 0) {
      const uint4* q = reinterpret_cast<const uint4*>(p + start);
#pragma unroll
      for (int i = 0; i < kBytes / 16; ++i) pk.u4[i] = STREAM ? __ldcs(q + i) : q[i];
    } else {
      const uint2* q = reinterpret_cast<const uint2*>(p + start);
#pragma unroll
      for (int i = 0; i < kBytes / 8; ++i) pk.u2[i] = STREAM ? __ldcs(q + i) : q[i];
    }
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = DTypeTraits<T>::ToFloat(pk.r[i]);
  } else {
    const Raw* q = reinterpret_cast<const Raw*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = (start + i < n) ? DTypeTraits<T>::ToFloat(q[start + i]) : fill;
  }
}

// A tensor of any of the three float dtypes, read as fp32 with a runtime switch: for the small inputs
// (hidden, norm weights, predictor weights, draft_probs, temperature), so that mixed dtypes are read exactly
// (as the reference's .float()) without one kernel per combination. The switch is uniform across the block.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct FloatView {
  const void* data;
  DType dtype;
  __host__ __device__ __forceinline__ int ElementSize() const { return dtype == DType::kFloat32 ? 4 : 2; }
  // The view advanced by i elements.
  __host__ __device__ __forceinline__ FloatView At(int64_t i) const {
    return {static_cast<const char*>(data) + i * ElementSize(), dtype};
  }
};

__device__ __forceinline__ float LoadFloat(FloatView v, int64_t i) {
  switch (v.dtype) {
    case DType::kFloat16: return LoadFloat(static_cast<const __half*>(v.data), i);
    case DType::kBFloat16: return LoadFloat(static_cast<const __nv_bfloat16*>(v.data), i);
    default: return LoadFloat(static_cast<const float*>(v.data), i);
  }
}

// LoadItems of a FloatView; vec needs v.data 16-byte aligned and start a multiple of N.
template <int N>
__device__ __forceinline__ void LoadItemsAny(FloatView v, int64_t start, int64_t n, float (&out)[N], float fill,
                                             bool vec) {
  switch (v.dtype) {
    case DType::kFloat16: LoadItems<N>(static_cast<const __half*>(v.data), start, n, out, fill, vec); break;
    case DType::kBFloat16: LoadItems<N>(static_cast<const __nv_bfloat16*>(v.data), start, n, out, fill, vec); break;
    default: LoadItems<N>(static_cast<const float*>(v.data), start, n, out, fill, vec); break;
  }
}

// num_draft[b] clamped to [0, K].
__device__ __forceinline__ int ClampNumDraft(int64_t nd, int K) {
  return nd < 0 ? 0 : (nd > K ? K : int(nd));
}

inline bool IsAligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ---------------------------------------------------------------------------------------------------
// (value, index) order of argmax, as torch.argmax: larger value wins, NaN beats everything, and among
// equal values (or NaNs) the lowest index wins. A total order, so every reduction tree gives the same pair.
__device__ __forceinline__ bool ArgBetter(float a, int ia, float b, int ib) {
  const bool a_nan = isnan(a), b_nan = isnan(b);
  if (a_nan || b_nan) return a_nan && (!b_nan || ia < ib);
  return a > b || (a == b && ia < ib);
}

// xor-butterfly reductions: every lane ends with the same bits (fp addition is commutative).
__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ void WarpArgMax(float& v, int& idx) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ArgBetter(ov, oi, v, idx)) v = ov, idx = oi;
  }
}

// Block reductions over BLOCK threads (a multiple of 32). Every thread combines the per-warp partials
// in the same order, so every thread returns the same bits; safe to call repeatedly (leading barrier).
template <int BLOCK>
__device__ __forceinline__ float BlockSum(float v) {
  static_assert(BLOCK % kWarpSize == 0, "BLOCK must be a multiple of 32");
  constexpr int kWarps = BLOCK / kWarpSize;
  __shared__ float s_part[kWarps];
  v = WarpSum(v);
  __syncthreads();
  if ((threadIdx.x & (kWarpSize - 1)) == 0) s_part[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  float r = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) r += s_part[w];
  return r;
}

template <int BLOCK>
__device__ __forceinline__ float BlockMax(float v) {
  constexpr int kWarps = BLOCK / kWarpSize;
  __shared__ float s_part[kWarps];
  v = WarpMax(v);
  __syncthreads();
  if ((threadIdx.x & (kWarpSize - 1)) == 0) s_part[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  float r = s_part[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = fmaxf(r, s_part[w]);
  return r;
}

template <int BLOCK>
__device__ __forceinline__ void BlockArgMax(float& v, int& idx) {
  constexpr int kWarps = BLOCK / kWarpSize;
  __shared__ float s_val[kWarps];
  __shared__ int s_idx[kWarps];
  WarpArgMax(v, idx);
  __syncthreads();
  if ((threadIdx.x & (kWarpSize - 1)) == 0) {
    s_val[threadIdx.x / kWarpSize] = v;
    s_idx[threadIdx.x / kWarpSize] = idx;
  }
  __syncthreads();
  v = s_val[0];
  idx = s_idx[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w)
    if (ArgBetter(s_val[w], s_idx[w], v, idx)) v = s_val[w], idx = s_idx[w];
}

template <int BLOCK>
__device__ __forceinline__ int BlockMaxInt(int v) {
  constexpr int kWarps = BLOCK / kWarpSize;
  __shared__ int s_part[kWarps];
  v = __reduce_max_sync(0xffffffffu, v);
  __syncthreads();
  if ((threadIdx.x & (kWarpSize - 1)) == 0) s_part[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  int r = s_part[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = max(r, s_part[w]);
  return r;
}

// Sums NV values at once (one barrier pair instead of NV).
template <int BLOCK, int NV>
__device__ __forceinline__ void BlockSumArray(float (&v)[NV]) {
  constexpr int kWarps = BLOCK / kWarpSize;
  __shared__ float s_part[NV][kWarps];
#pragma unroll
  for (int i = 0; i < NV; ++i) v[i] = WarpSum(v[i]);
  __syncthreads();
  if ((threadIdx.x & (kWarpSize - 1)) == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) s_part[i][threadIdx.x / kWarpSize] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    float r = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) r += s_part[i][w];
    v[i] = r;
  }
}

// argmax of row[0, n) over the whole block (lowest index on ties); every thread gets the index.
// UNROLL 16-byte loads per thread are in flight before any is used: the row is usually cold in HBM.
template <typename T, int BLOCK, int UNROLL = 2>
__device__ __forceinline__ int BlockRowArgMax(const T* __restrict__ row, int n, bool vec) {
  constexpr int N = kVecItems<T>;
  float best = -INFINITY;
  int best_i = kEmptyIndex;
  for (int64_t base = int64_t(threadIdx.x) * N; base < n; base += int64_t(BLOCK) * N * UNROLL) {
    float x[UNROLL][N];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) LoadItems<N>(row, base + int64_t(u) * BLOCK * N, n, x[u], -INFINITY, vec);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int64_t idx = base + int64_t(u) * BLOCK * N + i;
        if (idx < n && ArgBetter(x[u][i], int(idx), best, best_i)) best = x[u][i], best_i = int(idx);
      }
    }
  }
  BlockArgMax<BLOCK>(best, best_i);
  return best_i;
}

// ---------------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al. 2011, Random123), exactly as docs/ops.md: counter (c0, c1, c2, c3),
// key (k0, k1); 10 rounds with the key bumped between rounds. Host and device (host: for tests).
__host__ __device__ __forceinline__ uint32_t MulHi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * uint64_t(b)) >> 32);
#endif
}

__host__ __device__ __forceinline__ uint4 Philox4x32_10(uint4 c, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint32_t hi0 = MulHi32(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    const uint32_t hi1 = MulHi32(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
  }
  return c;
}

// U(x) = ((x >> 8) + 0.5) * 2^-24 in fp32. NOTE: for x >> 8 >= 2^23 the + 0.5 rounds half to even, so
// U takes the value 1.0 when x >> 8 == 2^24 - 1 (torch fp32, float64-then-round and this agree bit for bit:
// the power-of-two scale is exact). _rn intrinsics keep the compiler from contracting or reordering.
__host__ __device__ __forceinline__ float PhiloxUniform(uint32_t x) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(__fadd_rn(__uint2float_rn(x >> 8), 0.5f), 5.9604644775390625e-08f);
#else
  return (float(x >> 8) + 0.5f) * 5.9604644775390625e-08f;
#endif
}

// The two uniforms of (row, position): x0 -> accept coin, x1 -> resample (docs/ops.md).
__host__ __device__ __forceinline__ void PhiloxUniforms(uint64_t seed, uint64_t offset, uint32_t row,
                                                        uint32_t position, float& u_accept, float& u_sample) {
  const uint4 r = Philox4x32_10(make_uint4(position, row, uint32_t(offset), uint32_t(offset >> 32)),
                                uint32_t(seed), uint32_t(seed >> 32));
  u_accept = PhiloxUniform(r.x);
  u_sample = PhiloxUniform(r.y);
}

}  // namespace cuda
}  // namespace specee
