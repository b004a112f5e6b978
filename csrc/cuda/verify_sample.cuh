// verify_sample: lossless speculative sampling (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023,
// arXiv 2302.01318), docs/ops.md section 4. Names: target_probs (the full model), draft_probs (what the
// draft sampled from).
//
// One block per row walks the positions in order. Per position j:
//   stats   one pass: online (max, sum) of target_logits / temperature   (temperature <= 0: argmax)
//   accept  u_accept * draft_probs[x] < target_probs[x], x = draft[b, j] clamped to [0, V)
//           (draft_probs None: one_hot(x))
//   reject  w = max(0, target_probs - draft_probs) (target_probs if no entry is > 0); sample(w, u_sample)
//   bonus   when every draft passed: sample(target_probs[num_draft[b]], u_sample)
// sample(w, u), the inverse CDF, takes two passes over the vocabulary in chunks of BLOCK * N tokens (each
// thread owns N consecutive ones): the first gives the total and the last token with w > 0; the second finds
// the first token with w > 0 whose prefix sum exceeds u * total. Prefix sums: a block-wide exclusive scan
// of the per-thread sums, a running carry across chunks, then the thread's N tokens added in order. Both
// passes do the same arithmetic, so the total is exactly the scan's last prefix sum (as cdf[-1] in the
// reference): u = 1 picks the last positive token. The sums equal the reference's sequential ones up to
// fp32 rounding; a zero-weight token is never returned; no positive weight at all (NaN logits) gives -1.
// Uniforms: Philox4x32-10 of (seed, offset, row, position); seed and offset are read on the device.
#pragma once

#include "common.cuh"

namespace specee {
namespace cuda {

constexpr int kVerifySampleBlock = 1024;

// Block-wide exclusive scan of one value per thread, in a fixed order; `total` is the block sum.
template <int BLOCK>
__device__ __forceinline__ float BlockExclusiveScan(float v, float& total) {
  constexpr int kWarps = BLOCK / kWarpSize;
  __shared__ float s_warp[kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  float inc = v;
#pragma unroll
  for (int o = 1; o < kWarpSize; o <<= 1) {
    const float y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += y;
  }
  float exc = __shfl_up_sync(0xffffffffu, inc, 1);
  if (lane == 0) exc = 0.f;
  __syncthreads();
  if (lane == kWarpSize - 1) s_warp[warp] = inc;
  __syncthreads();
  float before = 0.f;
  total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w == warp) before = total;
    total += s_warp[w];
  }
  return before + exc;
}

// Softmax statistics of row / temperature: max M and sum S of exp(x - M), so target_probs = exp(x - M) / S.
template <typename T, int BLOCK, int UNROLL = 2>
__device__ __forceinline__ void BlockSoftmaxStats(const T* __restrict__ row, int V, bool vec, float temperature,
                                                  float& M, float& S) {
  constexpr int N = kVecItems<T>;
  float m = -INFINITY, s = 0.f;
  for (int64_t base = int64_t(threadIdx.x) * N; base < V; base += int64_t(BLOCK) * N * UNROLL) {
    float x[UNROLL][N];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) LoadItems<N>(row, base + int64_t(u) * BLOCK * N, V, x[u], -INFINITY, vec);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float cm = -INFINITY;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        x[u][i] = x[u][i] / temperature;  // -inf padding stays -inf (temperature > 0)
        cm = fmaxf(cm, x[u][i]);
      }
      if (cm > m) {
        s = (m == -INFINITY) ? 0.f : s * expf(m - cm);
        m = cm;
      }
      if (m != -INFINITY) {
#pragma unroll
        for (int i = 0; i < N; ++i) s += expf(x[u][i] - m);
      }
    }
  }
  M = BlockMax<BLOCK>(m);
  S = BlockSum<BLOCK>(m == -INFINITY ? 0.f : s * expf(m - M));
}

// One position of one row, as the sampling passes read it.
template <typename T>
struct SampleRowView {
  const T* logits;     // [V]
  FloatView draft;     // [V] draft_probs row (unused without draft_probs)
  int64_t x;           // the draft token (clamped), -1 for the bonus position
  float temperature, M, S;
  int V;
  bool vec;
};

// Weights of tokens [start, start + N): target_probs, or the residual max(0, target_probs - draft_probs)
// (draft_probs = one_hot(x) when HAS_DRAFT is false); 0 past V. The same expression as the accept test.
template <bool RESIDUAL, bool HAS_DRAFT, int N, typename T>
__device__ __forceinline__ void ChunkWeights(const SampleRowView<T>& r, int64_t start, float (&w)[N]) {
  float l[N], dp[N];
  LoadItems<N>(r.logits, start, r.V, l, 0.f, r.vec);
  if constexpr (RESIDUAL && HAS_DRAFT) LoadItemsAny<N>(r.draft, start, r.V, dp, 0.f, r.vec);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int64_t idx = start + i;
    float p = expf(l[i] / r.temperature - r.M) / r.S;
    if constexpr (RESIDUAL) p = fmaxf(p - (HAS_DRAFT ? dp[i] : (idx == r.x ? 1.f : 0.f)), 0.f);
    w[i] = idx < r.V ? p : 0.f;
  }
}

// The chunk loop shared by both sampling passes. Pass 1 (threshold < 0): returns the block's running
// total in `carry` and the last token with weight > 0. Pass 2: returns the first token with weight > 0
// whose prefix sum exceeds `threshold`, or kEmptyIndex.
template <bool RESIDUAL, bool HAS_DRAFT, int BLOCK, typename T>
__device__ __forceinline__ int BlockCdfPass(const SampleRowView<T>& r, float threshold, float& carry) {
  constexpr int N = kVecItems<T>;
  const bool find = threshold >= 0.f;
  __shared__ int s_found;
  if (threadIdx.x == 0) s_found = kEmptyIndex;
  __syncthreads();
  carry = 0.f;
  int last = -1;
  for (int64_t chunk = 0; chunk < r.V; chunk += int64_t(BLOCK) * N) {
    const int64_t start = chunk + int64_t(threadIdx.x) * N;
    float w[N];
    ChunkWeights<RESIDUAL, HAS_DRAFT>(r, start, w);
    float mine = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) mine += w[i];
    float chunk_total;
    float c = carry + BlockExclusiveScan<BLOCK>(mine, chunk_total);
    carry += chunk_total;
    if (find) {
      int found = kEmptyIndex;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        c += w[i];
        if (found == kEmptyIndex && w[i] > 0.f && c > threshold) found = int(start + i);
      }
      if (found != kEmptyIndex) atomicMin(&s_found, found);
      __syncthreads();
      if (s_found != kEmptyIndex) break;  // uniform across the block
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i)
        if (w[i] > 0.f) last = int(start + i);
    }
  }
  return find ? s_found : BlockMaxInt<BLOCK>(last);
}

// sample(w, u) of docs/ops.md, w = the residual (falling back to target_probs) or target_probs.
template <bool HAS_DRAFT, int BLOCK, typename T>
__device__ __forceinline__ int64_t SampleRow(bool residual, const SampleRowView<T>& r, float u) {
  float total;
  int last = -1;
  if (residual) {
    last = BlockCdfPass<true, HAS_DRAFT, BLOCK>(r, -1.f, total);
    residual = last >= 0;  // no entry > 0: sample target_probs instead
  }
  if (!residual) last = BlockCdfPass<false, HAS_DRAFT, BLOCK>(r, -1.f, total);
  if (last < 0) return kPlaceholderTokenId;  // no positive weight at all
  const float threshold = u * total;
  if (!(threshold < total)) return last;  // u = 1: no prefix sum exceeds the total
  float unused;
  const int found = residual ? BlockCdfPass<true, HAS_DRAFT, BLOCK>(r, threshold, unused)
                             : BlockCdfPass<false, HAS_DRAFT, BLOCK>(r, threshold, unused);
  return found != kEmptyIndex ? found : last;  // rounding left none: the last positive token
}

template <typename T, bool HAS_DRAFT, int BLOCK>
__global__ void __launch_bounds__(BLOCK) VerifySampleKernel(
    const int64_t* __restrict__ draft,       // [B, K]
    const int64_t* __restrict__ num_draft,   // [B]
    FloatView draft_probs,                   // [B, K, V], unused unless HAS_DRAFT
    const T* __restrict__ target_logits,     // [B, K + 1, V]
    FloatView temperature,                   // [B]
    const int64_t* __restrict__ seed_ptr,    // [1] on the device, or nullptr: use seed_val
    int64_t seed_val,
    const int64_t* __restrict__ offset_ptr,  // [1] on the device, or nullptr: use offset_val
    int64_t offset_val, int K, int V, bool vec,
    int64_t* __restrict__ out,               // [B, K + 1]
    int64_t* __restrict__ num_emitted) {     // [B]
  const int b = blockIdx.x;
  const uint64_t seed = uint64_t(seed_ptr != nullptr ? *seed_ptr : seed_val);
  const uint64_t offset = uint64_t(offset_ptr != nullptr ? *offset_ptr : offset_val);
  // NOTE: num_draft outside [0, K] is clamped (reading it on the host would be a sync).
  const int nd = ClampNumDraft(num_draft[b], K);
  const float temp = LoadFloat(temperature, b);
  const bool greedy = temp <= 0.f;  // target_probs = one_hot(argmax)
  int64_t* out_row = out + int64_t(b) * (K + 1);
  int n = nd;
  for (int j = 0; j <= nd; ++j) {
    SampleRowView<T> r{target_logits + (int64_t(b) * (K + 1) + j) * V, {nullptr, draft_probs.dtype}, -1, temp,
                       0.f, 1.f, V, vec};
    if (HAS_DRAFT && j < nd) r.draft = draft_probs.At((int64_t(b) * K + j) * V);
    int t = 0;
    if (greedy) {
      t = BlockRowArgMax<T, BLOCK>(r.logits, V, vec);
    } else {
      BlockSoftmaxStats<T, BLOCK>(r.logits, V, vec, temp, r.M, r.S);
    }
    float u_accept, u_sample;
    PhiloxUniforms(seed, offset, uint32_t(b), uint32_t(j), u_accept, u_sample);
    int64_t token;
    if (j < nd) {
      const int64_t x = draft[int64_t(b) * K + j];
      // NOTE: as the reference, the test and residual use x clamped to [0, V) (only garbage ids are
      // affected); an accepted draft is emitted as given.
      r.x = x < 0 ? 0 : (x >= V ? V - 1 : x);
      const float draft_x = HAS_DRAFT ? LoadFloat(r.draft, r.x) : 1.f;
      const float target_x = greedy ? (r.x == t ? 1.f : 0.f) : expf(LoadFloat(r.logits, r.x) / temp - r.M) / r.S;
      if (u_accept * draft_x < target_x) {
        if (threadIdx.x == 0) out_row[j] = x;
        continue;  // uniform: every thread computed the same test
      }
      // Greedy rows: the residual is c * one_hot(t), or falls back to one_hot(t): the sample is t.
      token = greedy ? t : SampleRow<HAS_DRAFT, BLOCK>(true, r, u_sample);
    } else {  // bonus token after num_draft accepted drafts
      token = greedy ? t : SampleRow<HAS_DRAFT, BLOCK>(false, r, u_sample);
    }
    if (threadIdx.x == 0) out_row[j] = token;
    n = j;
    break;
  }
  for (int j = n + 1 + threadIdx.x; j <= K; j += BLOCK) out_row[j] = kPlaceholderTokenId;
  if (threadIdx.x == 0) num_emitted[b] = n + 1;
}

// Launcher. T: the dtype of target_logits. draft_probs.data == nullptr: the drafts were chosen
// deterministically (one-hot); otherwise any float dtype, like temperature. seed/offset: device pointers
// to one int64 each (CUDA-graph friendly), or nullptr to use seed_val/offset_val. Tensors contiguous.
template <typename T>
cudaError_t VerifySample(const int64_t* draft, const int64_t* num_draft, FloatView draft_probs,
                         const T* target_logits, FloatView temperature, const int64_t* seed_ptr, int64_t seed_val,
                         const int64_t* offset_ptr, int64_t offset_val, int B, int K, int V, int64_t* out,
                         int64_t* num_emitted, cudaStream_t stream) {
  if (B < 0 || K < 0 || V < 1) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  const bool has_draft = draft_probs.data != nullptr;
  // Vector loads of N logits (and N draft probabilities) need 16-byte aligned rows starting on N.
  const bool vec =
      V % kVecItems<T> == 0 && IsAligned16(target_logits) && (!has_draft || IsAligned16(draft_probs.data));
  SPECEE_DISPATCH_BOOL(has_draft, HAS_DRAFT, {
    VerifySampleKernel<T, HAS_DRAFT, kVerifySampleBlock><<<B, kVerifySampleBlock, 0, stream>>>(
        draft, num_draft, draft_probs, target_logits, temperature, seed_ptr, seed_val, offset_ptr, offset_val, K,
        V, vec, out, num_emitted);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace specee
