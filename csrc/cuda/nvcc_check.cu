// Compile check of the CUDA kernels without torch (run by .ci/nvcc_check.sh, also where there is no GPU):
// includes every header and explicitly instantiates every launcher for each dtype the bindings use, so
// nvcc compiles every kernel. Never linked into specee._C.
#include "exit_predict.cuh"
#include "lm_head_argmax.cuh"
#include "verify_greedy.cuh"
#include "verify_sample.cuh"

namespace specee {
namespace cuda {

// T is the dtype of the big operand (lm_head, target_logits); the small inputs are FloatViews of any dtype.
#define SPECEE_INSTANTIATE_FOR_T(T)                                                                            \
  template cudaError_t ExitPredict<T>(FloatView, FloatView, float, const T*, const int64_t*, FloatView,        \
                                      FloatView, FloatView, FloatView, FloatView, float, int, int, int, int, int, \
                                      float*, float*, bool*, cudaStream_t);                                     \
  template cudaError_t LmHeadArgmax<T>(FloatView, const T*, const int64_t*, int, int, int, int, void*, int64_t*, \
                                       bool*, cudaStream_t);                                                    \
  template cudaError_t VerifyGreedy<T>(const int64_t*, const int64_t*, const T*, int, int, int, int64_t*,      \
                                       int64_t*, cudaStream_t);                                                 \
  template cudaError_t VerifySample<T>(const int64_t*, const int64_t*, FloatView, const T*, FloatView,         \
                                       const int64_t*, int64_t, const int64_t*, int64_t, int, int, int, int64_t*, \
                                       int64_t*, cudaStream_t);

SPECEE_INSTANTIATE_FOR_T(float)
SPECEE_INSTANTIATE_FOR_T(__half)
SPECEE_INSTANTIATE_FOR_T(__nv_bfloat16)

}  // namespace cuda
}  // namespace specee
