// CUDA implementations of the specee ops (schemas: csrc/ops.cpp; contract: docs/ops.md). Each binding checks
// every input, naming the argument at fault, sets the device guard, allocates the outputs and launches the
// header kernel of csrc/cuda/<op>.cuh on the current stream. No binding reads device memory on the host.
//
// Inputs: the big operand (lm_head, target_logits, draft_probs) must be contiguous: copying it silently would
// cost more than the op. The small ones are made contiguous (a no-op when they are). Float inputs may be
// fp32, fp16 or bf16, each independently (the kernels read them as fp32, as the reference's .float()).
// NOTE: the stream comes from c10/cuda/CUDAStream.h (what at::cuda::getCurrentCUDAStream forwards to);
// ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers this file does not need.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <tuple>
#include <utility>

#include "exit_predict.cuh"
#include "lm_head_argmax.cuh"
#include "verify_greedy.cuh"
#include "verify_sample.cuh"

namespace {

using at::Tensor;
namespace sc = specee::cuda;

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with T the CUDA type of a float ScalarType.
template <typename Fn>
void DispatchFloat(at::ScalarType st, const char* op, const char* name, Fn&& fn) {
  switch (st) {
    case at::kFloat: fn(TypeTag<float>{}); break;
    case at::kHalf: fn(TypeTag<__half>{}); break;
    case at::kBFloat16: fn(TypeTag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", st);
  }
}

void CheckDevice(const Tensor& t, const at::Device& device, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the other inputs are on ", device);
}

void CheckFloat(const Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", st);
}

void CheckLong(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
}

void CheckDims(const Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dims, got shape ", t.sizes());
}

void CheckSize(const Tensor& t, int64_t dim, int64_t expected, const char* op, const char* name) {
  TORCH_CHECK(t.size(dim) == expected, op, ": ", name, ".size(", dim, ") must be ", expected, ", got shape ",
              t.sizes());
}

void CheckContiguous(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous() once, outside the "
              "decode loop), got strides ", t.strides(), " for shape ", t.sizes());
}

void CheckFitsInt(int64_t v, const char* op, const char* what) {
  TORCH_CHECK(v <= INT_MAX, op, ": ", what, " = ", v, " exceeds the kernels' int32 range");
}

void CheckLaunch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

sc::FloatView View(const Tensor& t) {
  const auto st = t.scalar_type();
  const sc::DType dt = st == at::kHalf ? sc::DType::kFloat16
                       : st == at::kBFloat16 ? sc::DType::kBFloat16 : sc::DType::kFloat32;
  return {t.const_data_ptr(), dt};
}

template <typename T>
const T* Ptr(const Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}

// ------------------------------------------------------------------------------------------------ exit_predict
std::tuple<Tensor, Tensor, Tensor> exit_predict_cuda(const Tensor& hidden, const Tensor& norm_weight, double eps,
                                                     const Tensor& lm_head, const Tensor& cand_ids,
                                                     const Tensor& prev_probs, const Tensor& w1, const Tensor& b1,
                                                     const Tensor& w2, const Tensor& b2, double threshold) {
  constexpr const char* op = "specee::exit_predict";
  const at::Device device = hidden.device();
  const std::pair<const Tensor*, const char*> all[] = {
      {&hidden, "hidden"}, {&norm_weight, "norm_weight"}, {&lm_head, "lm_head"}, {&cand_ids, "cand_ids"},
      {&prev_probs, "prev_probs"}, {&w1, "w1"}, {&b1, "b1"}, {&w2, "w2"}, {&b2, "b2"}};
  for (const auto& [t, name] : all) {
    CheckDevice(*t, device, op, name);
    if (t != &cand_ids) CheckFloat(*t, op, name);
  }
  CheckLong(cand_ids, op, "cand_ids");
  CheckDims(hidden, 2, op, "hidden");
  const int64_t B = hidden.size(0), d = hidden.size(1);
  TORCH_CHECK(d > 0, op, ": hidden must have a non-empty last dim, got shape ", hidden.sizes());
  CheckDims(lm_head, 2, op, "lm_head");
  CheckSize(lm_head, 1, d, op, "lm_head");
  const int64_t V = lm_head.size(0);
  TORCH_CHECK(V > 0, op, ": lm_head must have at least one row");
  CheckContiguous(lm_head, op, "lm_head");
  CheckDims(norm_weight, 1, op, "norm_weight");
  CheckSize(norm_weight, 0, d, op, "norm_weight");
  CheckDims(cand_ids, 2, op, "cand_ids");
  CheckSize(cand_ids, 0, B, op, "cand_ids");
  const int64_t k = cand_ids.size(1);
  TORCH_CHECK(k <= sc::kExitPredictMaxCandidates, op, ": at most ", sc::kExitPredictMaxCandidates,
              " candidates per row, got cand_ids of shape ", cand_ids.sizes());
  CheckDims(prev_probs, 2, op, "prev_probs");
  CheckSize(prev_probs, 0, B, op, "prev_probs");
  CheckSize(prev_probs, 1, k, op, "prev_probs");
  CheckDims(w1, 2, op, "w1");
  CheckSize(w1, 1, 3 * k, op, "w1");
  const int64_t H = w1.size(0);
  CheckDims(b1, 1, op, "b1");
  CheckSize(b1, 0, H, op, "b1");
  CheckDims(w2, 1, op, "w2");
  CheckSize(w2, 0, H, op, "w2");
  TORCH_CHECK(b2.numel() == 1, op, ": b2 must have shape (1,), got ", b2.sizes());
  CheckFitsInt(B, op, "batch");
  CheckFitsInt(d, op, "d");
  CheckFitsInt(V, op, "vocab");
  CheckFitsInt(H, op, "H");

  const c10::cuda::CUDAGuard guard(device);
  const Tensor x = hidden.contiguous(), nw = norm_weight.contiguous(), ids = cand_ids.contiguous(),
               pp = prev_probs.contiguous(), W1 = w1.contiguous(), B1 = b1.contiguous(), W2 = w2.contiguous(),
               B2 = b2.contiguous();
  Tensor score = at::empty({B}, hidden.options().dtype(at::kFloat));
  Tensor probs = at::empty({B, k}, hidden.options().dtype(at::kFloat));
  Tensor exit_flag = at::empty({B}, hidden.options().dtype(at::kBool));
  if (B == 0) return {score, probs, exit_flag};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  DispatchFloat(lm_head.scalar_type(), op, "lm_head", [&](auto tag) {
    using T = typename decltype(tag)::type;
    CheckLaunch(sc::ExitPredict<T>(View(x), View(nw), static_cast<float>(eps), Ptr<T>(lm_head),
                                   ids.const_data_ptr<int64_t>(), View(pp), View(W1), View(B1), View(W2), View(B2),
                                   static_cast<float>(threshold), int(B), int(d), int(V), int(k), int(H),
                                   score.mutable_data_ptr<float>(), probs.mutable_data_ptr<float>(),
                                   exit_flag.mutable_data_ptr<bool>(), stream),
                op);
  });
  return {score, probs, exit_flag};
}

// ---------------------------------------------------------------------------------------------- lm_head_argmax
std::tuple<Tensor, Tensor> lm_head_argmax_cuda(const Tensor& hidden, const Tensor& lm_head,
                                               const std::optional<Tensor>& cand_ids) {
  constexpr const char* op = "specee::lm_head_argmax";
  const at::Device device = hidden.device();
  CheckDevice(hidden, device, op, "hidden");
  CheckDevice(lm_head, device, op, "lm_head");
  CheckFloat(hidden, op, "hidden");
  CheckFloat(lm_head, op, "lm_head");
  CheckDims(hidden, 2, op, "hidden");
  CheckDims(lm_head, 2, op, "lm_head");
  const int64_t B = hidden.size(0), d = hidden.size(1), V = lm_head.size(0);
  CheckSize(lm_head, 1, d, op, "lm_head");
  TORCH_CHECK(V > 0, op, ": lm_head must have at least one row");
  CheckContiguous(lm_head, op, "lm_head");
  CheckFitsInt(B, op, "batch");
  CheckFitsInt(d, op, "d");
  CheckFitsInt(V, op, "vocab");
  Tensor ids;
  int64_t k = 0;
  if (cand_ids.has_value()) {
    CheckDevice(*cand_ids, device, op, "cand_ids");
    CheckLong(*cand_ids, op, "cand_ids");
    CheckDims(*cand_ids, 2, op, "cand_ids");
    CheckSize(*cand_ids, 0, B, op, "cand_ids");
    k = cand_ids->size(1);
    CheckFitsInt(k, op, "k");
  }

  const c10::cuda::CUDAGuard guard(device);
  if (cand_ids.has_value()) ids = cand_ids->contiguous();
  const Tensor x = hidden.contiguous();
  Tensor token = at::empty({B}, hidden.options().dtype(at::kLong));
  Tensor in_candidates = at::empty({B}, hidden.options().dtype(at::kBool));
  if (B == 0) return {token, in_candidates};
  Tensor workspace = at::empty({int64_t(sc::LmHeadArgmaxWorkspaceBytes(int(B), int(V)))},
                               hidden.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  DispatchFloat(lm_head.scalar_type(), op, "lm_head", [&](auto tag) {
    using T = typename decltype(tag)::type;
    CheckLaunch(sc::LmHeadArgmax<T>(View(x), Ptr<T>(lm_head), ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr,
                                    int(B), int(d), int(V), int(k), workspace.mutable_data_ptr(),
                                    token.mutable_data_ptr<int64_t>(), in_candidates.mutable_data_ptr<bool>(),
                                    stream),
                op);
  });
  return {token, in_candidates};
}

// ------------------------------------------------------------------------------------------------- verify_*
// Shared checks of verify_greedy / verify_sample; returns (B, K, V).
std::tuple<int64_t, int64_t, int64_t> CheckVerify(const Tensor& draft, const Tensor& num_draft,
                                                  const Tensor& target_logits, const char* op) {
  const at::Device device = target_logits.device();
  CheckDevice(target_logits, device, op, "target_logits");
  CheckDevice(draft, device, op, "draft");
  CheckDevice(num_draft, device, op, "num_draft");
  CheckLong(draft, op, "draft");
  CheckLong(num_draft, op, "num_draft");
  CheckFloat(target_logits, op, "target_logits");
  CheckDims(draft, 2, op, "draft");
  const int64_t B = draft.size(0), K = draft.size(1);
  CheckDims(num_draft, 1, op, "num_draft");
  CheckSize(num_draft, 0, B, op, "num_draft");
  CheckDims(target_logits, 3, op, "target_logits");
  CheckSize(target_logits, 0, B, op, "target_logits");
  CheckSize(target_logits, 1, K + 1, op, "target_logits");
  const int64_t V = target_logits.size(2);
  TORCH_CHECK(V > 0, op, ": target_logits must have a non-empty vocabulary dim, got shape ", target_logits.sizes());
  CheckContiguous(target_logits, op, "target_logits");
  CheckFitsInt(B, op, "batch");
  CheckFitsInt(K + 1, op, "K + 1");
  CheckFitsInt(V, op, "vocab");
  return {B, K, V};
}

std::tuple<Tensor, Tensor> verify_greedy_cuda(const Tensor& draft, const Tensor& num_draft,
                                              const Tensor& target_logits) {
  constexpr const char* op = "specee::verify_greedy";
  int64_t B, K, V;  // not a structured binding: the lambdas below capture them (C++17)
  std::tie(B, K, V) = CheckVerify(draft, num_draft, target_logits, op);
  const at::Device device = target_logits.device();
  const c10::cuda::CUDAGuard guard(device);
  const Tensor dr = draft.contiguous(), nd = num_draft.contiguous();
  Tensor out = at::empty({B, K + 1}, draft.options());
  Tensor num_emitted = at::empty({B}, draft.options());
  if (B == 0) return {out, num_emitted};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  DispatchFloat(target_logits.scalar_type(), op, "target_logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    CheckLaunch(sc::VerifyGreedy<T>(dr.const_data_ptr<int64_t>(), nd.const_data_ptr<int64_t>(),
                                    Ptr<T>(target_logits), int(B), int(K), int(V), out.mutable_data_ptr<int64_t>(),
                                    num_emitted.mutable_data_ptr<int64_t>(), stream),
                op);
  });
  return {out, num_emitted};
}

// seed / offset: an int64 tensor of shape () or (1,), on the op's device (read by the kernel: CUDA-graph
// friendly) or on the CPU (read here, no sync). Returns (device pointer or nullptr, host value).
std::pair<const int64_t*, int64_t> ScalarArg(const Tensor& t, const at::Device& device, const char* op,
                                             const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.numel() == 1 && t.dim() <= 1, op, ": ", name,
              " must be an int64 tensor of shape () or (1,), got ", t.scalar_type(), " of shape ", t.sizes());
  if (t.is_cpu()) return {nullptr, t.const_data_ptr<int64_t>()[0]};
  CheckDevice(t, device, op, name);
  return {t.const_data_ptr<int64_t>(), 0};
}

std::tuple<Tensor, Tensor> verify_sample_cuda(const Tensor& draft, const Tensor& num_draft,
                                              const std::optional<Tensor>& draft_probs, const Tensor& target_logits,
                                              const Tensor& temperature, const Tensor& seed, const Tensor& offset) {
  constexpr const char* op = "specee::verify_sample";
  int64_t B, K, V;  // not a structured binding: the lambdas below capture them (C++17)
  std::tie(B, K, V) = CheckVerify(draft, num_draft, target_logits, op);
  const at::Device device = target_logits.device();
  CheckDevice(temperature, device, op, "temperature");
  CheckFloat(temperature, op, "temperature");
  TORCH_CHECK(temperature.dim() == 1 && temperature.size(0) == B, op, ": temperature must have shape (", B,
              ",), got ", temperature.sizes());
  const std::pair<const int64_t*, int64_t> seed_arg = ScalarArg(seed, device, op, "seed");
  const std::pair<const int64_t*, int64_t> offset_arg = ScalarArg(offset, device, op, "offset");
  sc::FloatView dp{nullptr, sc::DType::kFloat32};
  if (draft_probs.has_value()) {
    CheckDevice(*draft_probs, device, op, "draft_probs");
    CheckFloat(*draft_probs, op, "draft_probs");
    TORCH_CHECK(draft_probs->dim() == 3 && draft_probs->size(0) == B && draft_probs->size(1) == K &&
                    draft_probs->size(2) == V,
                op, ": draft_probs must have shape (", B, ", ", K, ", ", V, "), got ", draft_probs->sizes());
    CheckContiguous(*draft_probs, op, "draft_probs");
    dp = View(*draft_probs);
  }

  const c10::cuda::CUDAGuard guard(device);
  const Tensor dr = draft.contiguous(), nd = num_draft.contiguous(), temp = temperature.contiguous();
  Tensor out = at::empty({B, K + 1}, draft.options());
  Tensor num_emitted = at::empty({B}, draft.options());
  if (B == 0) return {out, num_emitted};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  DispatchFloat(target_logits.scalar_type(), op, "target_logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    CheckLaunch(sc::VerifySample<T>(dr.const_data_ptr<int64_t>(), nd.const_data_ptr<int64_t>(), dp,
                                    Ptr<T>(target_logits), View(temp), seed_arg.first, seed_arg.second,
                                    offset_arg.first, offset_arg.second,
                                    int(B), int(K), int(V), out.mutable_data_ptr<int64_t>(),
                                    num_emitted.mutable_data_ptr<int64_t>(), stream),
                op);
  });
  return {out, num_emitted};
}

}  // namespace

TORCH_LIBRARY_IMPL(specee, CUDA, m) {
  m.impl("exit_predict", &exit_predict_cuda);
  m.impl("lm_head_argmax", &lm_head_argmax_cuda);
  m.impl("verify_greedy", &verify_greedy_cuda);
  m.impl("verify_sample", &verify_sample_cuda);
}
