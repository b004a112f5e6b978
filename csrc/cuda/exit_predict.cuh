// exit_predict: the SpecEE exit predictor of one layer, fused into one launch (docs/ops.md section 1).
//
//   normed = x * rsqrt(mean(x^2) + eps) * norm_weight        x = hidden[b] in fp32
//   logits = normed @ lm_head[cand_ids[b]].T                 [k], only k rows of the head
//   probs  = softmax(logits)
//   feats  = cat(logits, probs, probs - prev_probs)          [3k]
//   score  = sigmoid(relu(feats @ w1.T + b1) @ w2 + b2);  exit = score > threshold
//
// One block per row. One pass over d reads hidden, norm_weight and (up to 4 of) the k head rows with
// 16-byte loads and accumulates sum(x^2) and the dots of x * norm_weight at once; rsqrt(...) is applied
// after the reduction (the same value up to fp32 rounding). Then one thread does the k-softmax, and the
// block runs the 3k -> H MLP (one hidden unit per thread and step) and reduces the H products with w2.
// The head is a template parameter T; the other inputs may each be any float dtype (FloatView).
#pragma once

#include "common.cuh"

namespace specee {
namespace cuda {

constexpr int kExitPredictMaxCandidates = 16;
constexpr int kExitPredictBlock = 256;
constexpr int kExitPredictGroup = 4;  // candidates per pass over d

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK) ExitPredictKernel(
    FloatView hidden,                      // [B, d]
    FloatView norm_weight,                 // [d]
    float eps,
    const T* __restrict__ lm_head,         // [V, d]
    const int64_t* __restrict__ cand_ids,  // [B, k]
    FloatView prev_probs,                  // [B, k]
    FloatView w1,                          // [H, 3k]
    FloatView b1,                          // [H]
    FloatView w2,                          // [H]
    FloatView b2,                          // [1]
    float threshold, int d, int V, int k, int H, bool vec,
    float* __restrict__ score,       // [B]
    float* __restrict__ probs,       // [B, k]
    bool* __restrict__ exit_flag) {  // [B]
  constexpr int N = kVecItems<T>;
  constexpr int KMAX = kExitPredictMaxCandidates;
  constexpr int G = kExitPredictGroup;
  __shared__ int64_t s_rows[KMAX];
  __shared__ float s_dots[KMAX];
  __shared__ float s_feats[3 * KMAX];
  const int b = blockIdx.x;
  const int tid = threadIdx.x;

  // NOTE: an id outside [0, V) would read out of bounds; its logit is NaN instead (no host check: sync).
  if (tid < k) {
    const int64_t id = cand_ids[int64_t(b) * k + tid];
    s_rows[tid] = (id >= 0 && id < V) ? id : -1;
  }
  __syncthreads();

  const FloatView x_row = hidden.At(int64_t(b) * d);
  float sum_sq = 0.f;
  for (int c0 = 0; c0 < k; c0 += G) {
    float red[G + 1];  // red[g] = sum(x * norm_weight * head[cand c0 + g]), red[G] = sum(x^2)
#pragma unroll
    for (int g = 0; g <= G; ++g) red[g] = 0.f;
    for (int64_t start = int64_t(tid) * N; start < d; start += int64_t(BLOCK) * N) {
      float x[N], w[N], h[G][N];
      LoadItemsAny<N>(x_row, start, d, x, 0.f, vec);
      LoadItemsAny<N>(norm_weight, start, d, w, 0.f, vec);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (c0 + g < k && s_rows[c0 + g] >= 0) LoadItems<N>(lm_head + s_rows[c0 + g] * d, start, d, h[g], 0.f, vec);
      }
#pragma unroll
      for (int i = 0; i < N; ++i) {
        red[G] += x[i] * x[i];
        x[i] *= w[i];
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (c0 + g < k && s_rows[c0 + g] >= 0) {
#pragma unroll
          for (int i = 0; i < N; ++i) red[g] += x[i] * h[g][i];
        }
      }
    }
    BlockSumArray<BLOCK>(red);  // every thread gets the sums
    if (c0 == 0) sum_sq = red[G];
    if (tid == 0) {
#pragma unroll
      for (int g = 0; g < G; ++g)
        if (c0 + g < k) s_dots[c0 + g] = red[g];
    }
  }

  if (tid == 0) {
    const float rstd = 1.f / sqrtf(sum_sq / float(d) + eps);
    float logits[KMAX];
    float m = -INFINITY;
#pragma unroll
    for (int c = 0; c < KMAX; ++c) {
      if (c < k) {
        logits[c] = s_rows[c] >= 0 ? s_dots[c] * rstd : NAN;
        m = fmaxf(m, logits[c]);
      }
    }
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < KMAX; ++c) {
      if (c < k) sum += expf(logits[c] - m);
    }
#pragma unroll
    for (int c = 0; c < KMAX; ++c) {
      if (c < k) {
        const float p = expf(logits[c] - m) / sum;
        probs[int64_t(b) * k + c] = p;
        s_feats[c] = logits[c];
        s_feats[k + c] = p;
        s_feats[2 * k + c] = p - LoadFloat(prev_probs, int64_t(b) * k + c);
      }
    }
  }
  __syncthreads();

  const int F = 3 * k;
  float part = 0.f;
  for (int j = tid; j < H; j += BLOCK) {
    float h = 0.f;
    for (int f = 0; f < F; ++f) h += LoadFloat(w1, int64_t(j) * F + f) * s_feats[f];
    h += LoadFloat(b1, j);
    h = h < 0.f ? 0.f : h;  // relu that keeps NaN, as torch.relu
    part += h * LoadFloat(w2, j);
  }
  part = BlockSum<BLOCK>(part);
  if (tid == 0) {
    const float z = part + LoadFloat(b2, 0);
    const float s = 1.f / (1.f + expf(-z));
    score[b] = s;
    exit_flag[b] = s > threshold;
  }
}

// Launcher. T: the dtype of lm_head (float, __half, __nv_bfloat16); the FloatViews may each have any of the
// three. Requires 0 <= k <= kExitPredictMaxCandidates, d >= 1, V >= 1, H >= 0; tensors contiguous.
template <typename T>
cudaError_t ExitPredict(FloatView hidden, FloatView norm_weight, float eps, const T* lm_head,
                        const int64_t* cand_ids, FloatView prev_probs, FloatView w1, FloatView b1, FloatView w2,
                        FloatView b2, float threshold, int B, int d, int V, int k, int H, float* score,
                        float* probs, bool* exit_flag, cudaStream_t stream) {
  if (k < 0 || k > kExitPredictMaxCandidates || d < 1 || V < 1 || H < 0 || B < 0) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  constexpr int N = kVecItems<T>;
  const bool vec = d % N == 0 && IsAligned16(hidden.data) && IsAligned16(norm_weight.data) && IsAligned16(lm_head);
  ExitPredictKernel<T, kExitPredictBlock><<<B, kExitPredictBlock, 0, stream>>>(
      hidden, norm_weight, eps, lm_head, cand_ids, prev_probs, w1, b1, w2, b2, threshold, d, V, k, H, vec, score,
      probs, exit_flag);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace specee
