// verify_greedy: greedy verification of K drafted tokens against the target's logits (docs/ops.md
// section 3). t_j = argmax(target_logits[b, j]) (lowest index on ties); n = the longest prefix of the
// drafts (at most num_draft[b]) equal to t; out[b] = draft[:n], t_n, then -1; num_emitted[b] = n + 1.
//
// One block per row walks the positions in order and stops at the first mismatch, so a row reads only
// the n + 1 logit rows it needs; each position is a block-wide argmax with 16-byte loads.
#pragma once

#include "common.cuh"

namespace specee {
namespace cuda {

constexpr int kVerifyGreedyBlock = 1024;

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK) VerifyGreedyKernel(
    const int64_t* __restrict__ draft,          // [B, K]
    const int64_t* __restrict__ num_draft,      // [B]
    const T* __restrict__ target_logits,        // [B, K + 1, V]
    int K, int V, bool vec,
    int64_t* __restrict__ out,                  // [B, K + 1]
    int64_t* __restrict__ num_emitted) {        // [B]
  const int b = blockIdx.x;
  // NOTE: num_draft outside [0, K] is clamped (reading it on the host would be a sync).
  const int nd = ClampNumDraft(num_draft[b], K);
  int64_t* out_row = out + int64_t(b) * (K + 1);
  int n = nd;
  for (int j = 0; j <= nd; ++j) {
    const int t = BlockRowArgMax<T, BLOCK>(target_logits + (int64_t(b) * (K + 1) + j) * V, V, vec);
    if (threadIdx.x == 0) out_row[j] = t;
    if (j < nd && draft[int64_t(b) * K + j] == int64_t(t)) continue;  // uniform: every thread has t
    n = j;
    break;
  }
  for (int j = n + 1 + threadIdx.x; j <= K; j += BLOCK) out_row[j] = kPlaceholderTokenId;
  if (threadIdx.x == 0) num_emitted[b] = n + 1;
}

template <typename T>
cudaError_t VerifyGreedy(const int64_t* draft, const int64_t* num_draft, const T* target_logits, int B, int K,
                         int V, int64_t* out, int64_t* num_emitted, cudaStream_t stream) {
  if (B < 0 || K < 0 || V < 1) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  const bool vec = V % kVecItems<T> == 0 && IsAligned16(target_logits);
  VerifyGreedyKernel<T, kVerifyGreedyBlock><<<B, kVerifyGreedyBlock, 0, stream>>>(draft, num_draft, target_logits,
                                                                                 K, V, vec, out, num_emitted);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace specee
