// C entry points of the emulated CUDA kernels, for tests/cuda_emu/__init__.py (ctypes). Each launches the
// header kernel the way its torch binding in csrc/cuda/ops_cuda.cu does; the argument checks and the output
// allocation are the Python side's. Dtype codes: 0 float32, 1 float16, 2 bfloat16 (specee::cuda::DType).
// Last, small kernels that check the emulator itself (tests/test_cuda_emu.py).
#include "exit_predict.cuh"
#include "lm_head_argmax.cuh"
#include "verify_greedy.cuh"
#include "verify_sample.cuh"

namespace sc = specee::cuda;

namespace {

sc::FloatView View(const void* p, int dtype) { return {p, sc::DType(dtype)}; }

// fn(T{}) with T the CUDA type of dtype code `dtype`.
template <typename Fn>
int DispatchFloat(int dtype, Fn&& fn) {
  switch (dtype) {
    case 0: return int(fn(float{}));
    case 1: return int(fn(__half{}));
    case 2: return int(fn(__nv_bfloat16{}));
    default: return int(cudaErrorInvalidValue);
  }
}

}  // namespace

extern "C" {

const char* emu_message() { return specee_emu::S().message.c_str(); }

// order: 0 forward, 1 reverse, 2 shuffled with `seed` (the order fibers run in between barriers).
void emu_set_order(int order, uint64_t seed) {
  specee_emu::S().order = specee_emu::Order(order);
  specee_emu::S().seed = seed;
}

int emu_exit_predict(const void* hidden, int hidden_dt, const void* norm_weight, int norm_dt, float eps,
                     const void* lm_head, int head_dt, const int64_t* cand_ids, const void* prev_probs, int prev_dt,
                     const void* w1, int w1_dt, const void* b1, int b1_dt, const void* w2, int w2_dt, const void* b2,
                     int b2_dt, float threshold, int B, int d, int V, int k, int H, float* score, float* probs,
                     bool* exit_flag) {
  return DispatchFloat(head_dt, [&](auto tag) {
    using T = decltype(tag);
    return sc::ExitPredict<T>(View(hidden, hidden_dt), View(norm_weight, norm_dt), eps,
                              static_cast<const T*>(lm_head), cand_ids, View(prev_probs, prev_dt), View(w1, w1_dt),
                              View(b1, b1_dt), View(w2, w2_dt), View(b2, b2_dt), threshold, B, d, V, k, H, score,
                              probs, exit_flag, nullptr);
  });
}

size_t emu_lm_head_argmax_workspace_bytes(int B, int V) { return sc::LmHeadArgmaxWorkspaceBytes(B, V); }

int emu_lm_head_argmax(const void* hidden, int hidden_dt, const void* lm_head, int head_dt, const int64_t* cand_ids,
                       int B, int d, int V, int k, void* workspace, int64_t* token, bool* in_candidates) {
  return DispatchFloat(head_dt, [&](auto tag) {
    using T = decltype(tag);
    return sc::LmHeadArgmax<T>(View(hidden, hidden_dt), static_cast<const T*>(lm_head), cand_ids, B, d, V, k,
                               workspace, token, in_candidates, nullptr);
  });
}

int emu_verify_greedy(const int64_t* draft, const int64_t* num_draft, const void* target_logits, int logits_dt,
                      int B, int K, int V, int64_t* out, int64_t* num_emitted) {
  return DispatchFloat(logits_dt, [&](auto tag) {
    using T = decltype(tag);
    return sc::VerifyGreedy<T>(draft, num_draft, static_cast<const T*>(target_logits), B, K, V, out, num_emitted,
                               nullptr);
  });
}

int emu_verify_sample(const int64_t* draft, const int64_t* num_draft, const void* draft_probs, int draft_dt,
                      const void* target_logits, int logits_dt, const void* temperature, int temperature_dt,
                      const int64_t* seed_ptr, int64_t seed_val, const int64_t* offset_ptr, int64_t offset_val,
                      int B, int K, int V, int64_t* out, int64_t* num_emitted) {
  return DispatchFloat(logits_dt, [&](auto tag) {
    using T = decltype(tag);
    return sc::VerifySample<T>(draft, num_draft, View(draft_probs, draft_dt), static_cast<const T*>(target_logits),
                               View(temperature, temperature_dt), seed_ptr, seed_val, offset_ptr, offset_val, B, K,
                               V, out, num_emitted, nullptr);
  });
}

}  // extern "C"

// ------------------------------------------------------------------------------------ the emulator's self-test
namespace {

// A barrier only half the block reaches: CUDA hangs or is undefined; the emulator must report a deadlock.
__global__ void DivergentBarrierKernel(int* out) {
  if (threadIdx.x < blockDim.x / 2) __syncthreads();
  out[threadIdx.x] = 1;
}

// A full-mask shuffle the warp's last lane skips.
__global__ void PartialShuffleKernel(int* out) {
  if (threadIdx.x % 32 != 31) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

// Thread 0 publishes a value the others read; with SYNC = false there is no barrier between (a race).
template <bool SYNC>
__global__ void BroadcastKernel(int* out) {
  __shared__ int s_value;
  if (threadIdx.x == 0) s_value = int(blockIdx.x) + 1;
  if (SYNC) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s_value;
}

// The warp intrinsics and a block reduction of common.cuh, on v = (7919 * thread) % 1000.
__global__ void WarpOpsKernel(int* out) {
  const int t = threadIdx.x, n = blockDim.x, v = (7919 * t) % 1000;
  out[t] = __shfl_xor_sync(0xffffffffu, v, 5);
  out[n + t] = __shfl_up_sync(0xffffffffu, v, 3);
  out[2 * n + t] = __reduce_max_sync(0xffffffffu, v);
  out[3 * n + t] = int(sc::BlockSum<256>(float(v)));
}

}  // namespace

extern "C" int emu_selftest(int which, int grid, int block, int* out) {
  // Each launch on a line of its own: the rewriter takes the statement up to the launch chevrons as the kernel.
  if (which == 0) {
    DivergentBarrierKernel<<<grid, block, 0, nullptr>>>(out);
  } else if (which == 1) {
    PartialShuffleKernel<<<grid, block, 0, nullptr>>>(out);
  } else if (which == 2) {
    BroadcastKernel<false><<<grid, block, 0, nullptr>>>(out);
  } else if (which == 3) {
    BroadcastKernel<true><<<grid, block, 0, nullptr>>>(out);
  } else if (which == 4) {
    WarpOpsKernel<<<grid, block, 0, nullptr>>>(out);
  } else {
    return int(cudaErrorInvalidValue);
  }
  return int(cudaGetLastError());
}
