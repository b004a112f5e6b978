// lm_head_argmax: argmax over the vocabulary of hidden @ lm_head.T without writing the [B, V] logits
// (docs/ops.md section 2), plus whether the token is one of the row's candidates.
//
// Split-V, two launches:
//  1. LmHeadArgmaxKernel, grid (ceil(V / kLmHeadRowsPerBlock), ceil(B / BT)). A block stages BT rows of
//     hidden in shared memory as fp32, then each warp takes head rows of its vocabulary slice, streams a
//     row with 16-byte evict-first loads (kLmHeadUnroll per lane in flight), dots it with the BT hidden rows
//     in fp32 and keeps its best (value, index). The block reduces its warps and writes one partial per row.
//  2. LmHeadArgmaxReduceKernel, one block per row: reduces the partials, writes the token and checks it
//     against cand_ids.
// Ties go to the lowest index at every level (ArgBetter is a total order), as torch.argmax; NaN wins.
// A head row's dot is computed the same way whatever its index, so duplicated rows tie exactly.
//
// Bytes model for B = 1: the head, V * d * sizeof(T) (1.05 GB for Llama-3-8B in bf16); hidden rows are
// re-read from L2 by every block (V / 64 * d * 4 bytes, ~1.5% of the head at d = 4096).
#pragma once

#include "common.cuh"

namespace specee {
namespace cuda {

constexpr int kLmHeadWarps = 8;
constexpr int kLmHeadRowsPerBlock = 64;  // ~2000 blocks for V = 128256: enough waves to balance 132 SMs
constexpr int kLmHeadUnroll = 4;         // 16-byte loads per lane in flight per head row
constexpr int kLmHeadReduceBlock = 256;

inline int LmHeadArgmaxNumSlices(int V) { return (V + kLmHeadRowsPerBlock - 1) / kLmHeadRowsPerBlock; }

// Scratch the caller allocates: per (row, slice) one fp32 value and one int32 index.
inline size_t LmHeadArgmaxWorkspaceBytes(int B, int V) {
  return size_t(B) * size_t(LmHeadArgmaxNumSlices(V)) * (sizeof(float) + sizeof(int));
}

template <typename T, bool VEC, int BT>
__global__ void __launch_bounds__(kLmHeadWarps * kWarpSize) LmHeadArgmaxKernel(
    FloatView hidden,               // [B, d], any float dtype (staged once per block)
    const T* __restrict__ lm_head,  // [V, d]
    int B, int d, int V,
    float* __restrict__ part_val,  // [B, num_slices]
    int* __restrict__ part_idx) {  // [B, num_slices]
  constexpr int N = kVecItems<T>;
  constexpr int kThreads = kLmHeadWarps * kWarpSize;
  extern __shared__ __align__(16) float s_hidden[];  // [BT, d]
  const int num_slices = gridDim.x;
  const int slice = blockIdx.x;
  const int b0 = blockIdx.y * BT;
  const int nb = min(BT, B - b0);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;

#pragma unroll
  for (int r = 0; r < BT; ++r) {
    for (int i = threadIdx.x; i < d; i += kThreads)
      s_hidden[r * d + i] = r < nb ? LoadFloat(hidden, int64_t(b0 + r) * d + i) : 0.f;
  }
  __syncthreads();

  float best[BT];
  int best_i[BT];
#pragma unroll
  for (int r = 0; r < BT; ++r) best[r] = -INFINITY, best_i[r] = kEmptyIndex;

  const int nchunks = (d + N - 1) / N;
  const int row_end = min(V, (slice + 1) * kLmHeadRowsPerBlock);
  for (int row = slice * kLmHeadRowsPerBlock + warp; row < row_end; row += kLmHeadWarps) {
    const T* head_row = lm_head + int64_t(row) * d;
    float acc[BT];
#pragma unroll
    for (int r = 0; r < BT; ++r) acc[r] = 0.f;
    for (int base = lane; base < nchunks; base += kWarpSize * kLmHeadUnroll) {
      float h[kLmHeadUnroll][N];
#pragma unroll
      for (int u = 0; u < kLmHeadUnroll; ++u) {
        const int ch = base + u * kWarpSize;
        if (ch < nchunks) LoadItems<N, /*STREAM=*/true>(head_row, int64_t(ch) * N, d, h[u], 0.f, VEC);
      }
#pragma unroll
      for (int u = 0; u < kLmHeadUnroll; ++u) {
        const int ch = base + u * kWarpSize;
        if (ch >= nchunks) break;
#pragma unroll
        for (int r = 0; r < BT; ++r) {
          const float* x = s_hidden + r * d + ch * N;
          if constexpr (VEC) {  // d % N == 0 and N % 4 == 0: 16-byte aligned shared loads
#pragma unroll
            for (int i = 0; i < N; i += 4) {
              const float4 x4 = *reinterpret_cast<const float4*>(x + i);
              acc[r] += h[u][i] * x4.x + h[u][i + 1] * x4.y + h[u][i + 2] * x4.z + h[u][i + 3] * x4.w;
            }
          } else {
#pragma unroll
            for (int i = 0; i < N; ++i)
              if (ch * N + i < d) acc[r] += h[u][i] * x[i];
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < BT; ++r) {
      const float v = WarpSum(acc[r]);  // identical in every lane
      if (ArgBetter(v, row, best[r], best_i[r])) best[r] = v, best_i[r] = row;
    }
  }

  __shared__ float s_val[BT][kLmHeadWarps];
  __shared__ int s_idx[BT][kLmHeadWarps];
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < BT; ++r) s_val[r][warp] = best[r], s_idx[r][warp] = best_i[r];
  }
  __syncthreads();
  if (threadIdx.x < nb) {
    const int r = threadIdx.x;
    float v = s_val[r][0];
    int vi = s_idx[r][0];
    for (int w = 1; w < kLmHeadWarps; ++w)
      if (ArgBetter(s_val[r][w], s_idx[r][w], v, vi)) v = s_val[r][w], vi = s_idx[r][w];
    part_val[int64_t(b0 + r) * num_slices + slice] = v;
    part_idx[int64_t(b0 + r) * num_slices + slice] = vi;
  }
}

template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) LmHeadArgmaxReduceKernel(
    const float* __restrict__ part_val,    // [B, num_slices]
    const int* __restrict__ part_idx,      // [B, num_slices]
    int num_slices,
    const int64_t* __restrict__ cand_ids,  // [B, k] or nullptr
    int k,
    int64_t* __restrict__ token,           // [B]
    bool* __restrict__ in_candidates) {    // [B]
  const int b = blockIdx.x;
  float v = -INFINITY;
  int vi = kEmptyIndex;
  for (int s = threadIdx.x; s < num_slices; s += BLOCK) {
    const float sv = part_val[int64_t(b) * num_slices + s];
    const int si = part_idx[int64_t(b) * num_slices + s];
    if (ArgBetter(sv, si, v, vi)) v = sv, vi = si;
  }
  BlockArgMax<BLOCK>(v, vi);
  if (threadIdx.x == 0) {
    token[b] = vi;
    bool hit = false;
    for (int c = 0; c < k; ++c) hit |= cand_ids[int64_t(b) * k + c] == int64_t(vi);
    in_candidates[b] = hit;
  }
}

// Launcher. T: the dtype of lm_head; hidden may have any float dtype. cand_ids may be nullptr (then k is
// ignored and in_candidates is all false). workspace: LmHeadArgmaxWorkspaceBytes(B, V) bytes, 4-byte
// aligned. Requires V >= 1 (d = 0 gives token 0, as the reference's zero logits); tensors contiguous.
template <typename T>
cudaError_t LmHeadArgmax(FloatView hidden, const T* lm_head, const int64_t* cand_ids, int B, int d, int V, int k,
                         void* workspace, int64_t* token, bool* in_candidates, cudaStream_t stream) {
  if (d < 0 || V < 1 || B < 0 || (cand_ids != nullptr && k < 0)) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  if (cand_ids == nullptr) k = 0;
  constexpr int N = kVecItems<T>;
  const int num_slices = LmHeadArgmaxNumSlices(V);
  float* part_val = static_cast<float*>(workspace);
  int* part_idx = reinterpret_cast<int*>(part_val + size_t(B) * num_slices);
  const bool vec = d % N == 0 && IsAligned16(lm_head);

  // BT rows of hidden per block: the head is read ceil(B / BT) times. Shrink BT when BT * d fp32 rows do
  // not fit the opt-in shared memory (only asked for when over the default 48 KiB).
  int bt = B >= 4 ? 4 : (B >= 2 ? 2 : 1);
  size_t smem = size_t(bt) * d * sizeof(float);
  if (smem > 48 * 1024) {
    int dev = 0, max_smem = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (err != cudaSuccess) return err;
    // static shared: s_val/s_idx of the kernel, at most 4 * 8 * 8 bytes
    while (bt > 1 && smem + 256 > size_t(max_smem)) smem = size_t(bt /= 2) * d * sizeof(float);
    if (smem + 256 > size_t(max_smem)) return cudaErrorInvalidValue;  // d too large for one fp32 row
  }

  if ((B + bt - 1) / bt > 65535) return cudaErrorInvalidValue;  // grid.y limit

  auto launch = [&](auto bt_const) -> cudaError_t {
    constexpr int BT = decltype(bt_const)::value;
    SPECEE_DISPATCH_BOOL(vec, VEC, {
      auto kernel = LmHeadArgmaxKernel<T, VEC, BT>;
      if (smem > 48 * 1024) {
        cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
        if (err != cudaSuccess) return err;
      }
      const dim3 grid(num_slices, (B + BT - 1) / BT);
      kernel<<<grid, kLmHeadWarps * kWarpSize, smem, stream>>>(hidden, lm_head, B, d, V, part_val, part_idx);
      return cudaGetLastError();
    });
  };
  cudaError_t err = bt == 4   ? launch(std::integral_constant<int, 4>{})
                    : bt == 2 ? launch(std::integral_constant<int, 2>{})
                              : launch(std::integral_constant<int, 1>{});
  if (err != cudaSuccess) return err;
  LmHeadArgmaxReduceKernel<kLmHeadReduceBlock><<<B, kLmHeadReduceBlock, 0, stream>>>(
      part_val, part_idx, num_slices, cand_ids, k, token, in_candidates);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace specee
