// verify_greedy on the CPU: accept the longest draft prefix matching the target argmax (docs/ops.md §3).
// Lazy: position j's argmax is computed only if drafts 0..j-1 were accepted, so a row reads
// (accepted + 1) * V logits instead of (K + 1) * V.
#pragma once
#include "cpu/common.h"

namespace specee::cpu {

template <typename T>
void VerifyGreedy(const int64_t* draft,          // [B, K]
                  const int64_t* num_draft,      // [B]
                  const T* target_logits,        // [B, K+1, V]
                  int64_t B, int64_t K, int64_t V,
                  int64_t* out,                  // [B, K+1]
                  int64_t* num_emitted) {        // [B]
  auto row = [&](int64_t b) {
    const int64_t nd = std::clamp<int64_t>(num_draft[b], 0, K);
    int64_t* o = out + b * (K + 1);
    int64_t j = 0;
    for (;; ++j) {
      const int64_t t = argmax_row_parallel(target_logits + (b * (K + 1) + j) * V, V);
      o[j] = t;
      if (j >= nd || draft[b * K + j] != t) break;
    }
    for (int64_t i = j + 1; i <= K; ++i) o[i] = kPlaceholderTokenId;
    num_emitted[b] = j + 1;
  };
  // NOTE: rows in parallel when there are enough of them; otherwise each argmax splits V over threads.
  if (B >= at::get_num_threads()) {
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) row(b);
    });
  } else {
    for (int64_t b = 0; b < B; ++b) row(b);
  }
}

}  // namespace specee::cpu
