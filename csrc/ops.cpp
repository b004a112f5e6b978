// The one op registry of specee._C: schemas for every op in the `specee` namespace and their C++ CPU
// implementations. CUDA implementations register from csrc/cuda/ops_cuda.cu (TORCH_LIBRARY_IMPL).
// Only torch/library.h and ATen headers: torch/extension.h would add ~45 s of compile per file.
#include <Python.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/_softmax.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/where.h>

#include "cpu/exit_predict.h"
#include "cpu/lm_head_argmax.h"
#include "cpu/verify_greedy.h"
#include "cpu/verify_sample.h"

// Python imports this file as `specee._C`; the ops themselves are reached through torch.ops.specee.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(specee, m) {
  m.def("exit_predict(Tensor hidden, Tensor norm_weight, float eps, Tensor lm_head, Tensor cand_ids, "
        "Tensor prev_probs, Tensor w1, Tensor b1, Tensor w2, Tensor b2, float threshold) "
        "-> (Tensor score, Tensor probs, Tensor exit)");
  m.def("lm_head_argmax(Tensor hidden, Tensor lm_head, Tensor? cand_ids) -> (Tensor token, Tensor in_candidates)");
  m.def("verify_greedy(Tensor draft, Tensor num_draft, Tensor target_logits) -> (Tensor out, Tensor num_emitted)");
  m.def("verify_sample(Tensor draft, Tensor num_draft, Tensor? draft_probs, Tensor target_logits, "
        "Tensor temperature, Tensor seed, Tensor offset) -> (Tensor out, Tensor num_emitted)");
}

// ------------------------------------------------------------------------------------------ CPU kernels
// Each binding checks every input (naming the argument at fault), makes inputs contiguous, allocates the
// outputs and runs the header kernel of csrc/cpu/<op>.h.
namespace {

using at::Tensor;

// fp32, bf16 and fp16 (AT_DISPATCH_FLOATING_TYPES_AND2 would also instantiate double, which no op accepts).
#define SPECEE_DISPATCH_FLOATS(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "specee CPU op: ", name, " must be a CPU tensor, got ", t.device());
}

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

void check_dims(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got shape ", t.sizes());
}

void check_size(const Tensor& t, const char* name, int64_t dim, int64_t expected) {
  TORCH_CHECK(t.size(dim) == expected, name, ".size(", dim, ") must be ", expected, ", got shape ", t.sizes());
}

Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

std::tuple<Tensor, Tensor, Tensor> exit_predict_cpu(const Tensor& hidden, const Tensor& norm_weight, double eps,
                                                    const Tensor& lm_head, const Tensor& cand_ids,
                                                    const Tensor& prev_probs, const Tensor& w1, const Tensor& b1,
                                                    const Tensor& w2, const Tensor& b2, double threshold) {
  const std::pair<const Tensor*, const char*> all[] = {
      {&hidden, "hidden"}, {&norm_weight, "norm_weight"}, {&lm_head, "lm_head"}, {&cand_ids, "cand_ids"},
      {&prev_probs, "prev_probs"}, {&w1, "w1"}, {&b1, "b1"}, {&w2, "w2"}, {&b2, "b2"}};
  for (const auto& [t, name] : all) {
    check_cpu(*t, name);
    if (t != &cand_ids) check_float(*t, name);
  }
  check_dims(hidden, "hidden", 2);
  const int64_t B = hidden.size(0), d = hidden.size(1);
  check_dims(lm_head, "lm_head", 2);
  check_size(lm_head, "lm_head", 1, d);
  const int64_t V = lm_head.size(0);
  TORCH_CHECK(cand_ids.scalar_type() == at::kLong, "cand_ids must be int64, got ", cand_ids.scalar_type());
  check_dims(cand_ids, "cand_ids", 2);
  check_size(cand_ids, "cand_ids", 0, B);
  const int64_t k = cand_ids.size(1);
  check_dims(norm_weight, "norm_weight", 1);
  check_size(norm_weight, "norm_weight", 0, d);
  check_dims(prev_probs, "prev_probs", 2);
  check_size(prev_probs, "prev_probs", 0, B);
  check_size(prev_probs, "prev_probs", 1, k);
  check_dims(w1, "w1", 2);
  check_size(w1, "w1", 1, 3 * k);
  const int64_t H = w1.size(0);
  check_dims(b1, "b1", 1);
  check_size(b1, "b1", 0, H);
  check_dims(w2, "w2", 1);
  check_size(w2, "w2", 0, H);
  TORCH_CHECK(b2.numel() == 1, "b2 must have shape (1,), got ", b2.sizes());
  const Tensor ids = cand_ids.contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B * k; ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < V, "cand_ids[", i / k, ", ", i % k, "] = ", id[i],
                " is not a row of lm_head (vocab ", V, ")");
  const Tensor x = f32(hidden), nw = f32(norm_weight), pp = f32(prev_probs), B1 = f32(b1), W2 = f32(w2),
               W1t = f32(w1).t().contiguous(), head = lm_head.contiguous();
  const float bias2 = f32(b2).const_data_ptr<float>()[0];
  Tensor score = at::empty({B}, hidden.options().dtype(at::kFloat));
  Tensor probs = at::empty({B, k}, hidden.options().dtype(at::kFloat));
  Tensor exit = at::empty({B}, hidden.options().dtype(at::kBool));
  SPECEE_DISPATCH_FLOATS(head.scalar_type(), "specee::exit_predict", [&] {
    specee::cpu::ExitPredict<scalar_t>(
        x.const_data_ptr<float>(), nw.const_data_ptr<float>(), static_cast<float>(eps),
        head.const_data_ptr<scalar_t>(), id, pp.const_data_ptr<float>(), W1t.const_data_ptr<float>(),
        B1.const_data_ptr<float>(), W2.const_data_ptr<float>(), bias2, static_cast<float>(threshold), B, d, k, H,
        score.mutable_data_ptr<float>(), probs.mutable_data_ptr<float>(), exit.mutable_data_ptr<bool>());
  });
  return {score, probs, exit};
}

std::tuple<Tensor, Tensor> lm_head_argmax_cpu(const Tensor& hidden, const Tensor& lm_head,
                                              const std::optional<Tensor>& cand_ids) {
  check_cpu(hidden, "hidden");
  check_cpu(lm_head, "lm_head");
  check_float(hidden, "hidden");
  check_float(lm_head, "lm_head");
  check_dims(hidden, "hidden", 2);
  check_dims(lm_head, "lm_head", 2);
  const int64_t B = hidden.size(0), d = hidden.size(1), V = lm_head.size(0);
  check_size(lm_head, "lm_head", 1, d);
  TORCH_CHECK(V > 0, "lm_head must have at least one row");
  Tensor ids;
  int64_t k = 0;
  if (cand_ids.has_value()) {
    check_cpu(*cand_ids, "cand_ids");
    TORCH_CHECK(cand_ids->scalar_type() == at::kLong, "cand_ids must be int64, got ", cand_ids->scalar_type());
    check_dims(*cand_ids, "cand_ids", 2);
    check_size(*cand_ids, "cand_ids", 0, B);
    ids = cand_ids->contiguous();
    k = ids.size(1);
  }
  const Tensor x = f32(hidden), head = lm_head.contiguous();
  Tensor token = at::empty({B}, hidden.options().dtype(at::kLong));
  Tensor in_candidates = at::empty({B}, hidden.options().dtype(at::kBool));
  if (B == 0) return {token, in_candidates};
  SPECEE_DISPATCH_FLOATS(head.scalar_type(), "specee::lm_head_argmax", [&] {
    specee::cpu::LmHeadArgmax<scalar_t>(x.const_data_ptr<float>(), head.const_data_ptr<scalar_t>(),
                                        ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr, B, d, V, k,
                                        token.mutable_data_ptr<int64_t>(), in_candidates.mutable_data_ptr<bool>());
  });
  return {token, in_candidates};
}

// Shared checks of verify_greedy / verify_sample; returns (B, K, V).
std::tuple<int64_t, int64_t, int64_t> check_verify(const Tensor& draft, const Tensor& num_draft,
                                                   const Tensor& target_logits) {
  check_cpu(draft, "draft");
  check_cpu(num_draft, "num_draft");
  check_cpu(target_logits, "target_logits");
  TORCH_CHECK(draft.scalar_type() == at::kLong, "draft must be int64, got ", draft.scalar_type());
  TORCH_CHECK(num_draft.scalar_type() == at::kLong, "num_draft must be int64, got ", num_draft.scalar_type());
  check_float(target_logits, "target_logits");
  check_dims(draft, "draft", 2);
  const int64_t B = draft.size(0), K = draft.size(1);
  check_dims(num_draft, "num_draft", 1);
  check_size(num_draft, "num_draft", 0, B);
  check_dims(target_logits, "target_logits", 3);
  check_size(target_logits, "target_logits", 0, B);
  check_size(target_logits, "target_logits", 1, K + 1);
  TORCH_CHECK(target_logits.size(2) > 0, "target_logits must have a non-empty vocabulary dim");
  return {B, K, target_logits.size(2)};
}

std::tuple<Tensor, Tensor> verify_greedy_cpu(const Tensor& draft, const Tensor& num_draft,
                                             const Tensor& target_logits) {
  const auto [B, K, V] = check_verify(draft, num_draft, target_logits);
  const Tensor dr = draft.contiguous(), nd = num_draft.contiguous(), logits = target_logits.contiguous();
  Tensor out = at::empty({B, K + 1}, draft.options());
  Tensor num_emitted = at::empty({B}, draft.options());
  SPECEE_DISPATCH_FLOATS(logits.scalar_type(), "specee::verify_greedy", [&] {
    specee::cpu::VerifyGreedy<scalar_t>(dr.const_data_ptr<int64_t>(), nd.const_data_ptr<int64_t>(),
                                        logits.const_data_ptr<scalar_t>(), B, K, V, out.mutable_data_ptr<int64_t>(),
                                        num_emitted.mutable_data_ptr<int64_t>());
  });
  return {out, num_emitted};
}

uint64_t scalar_u64(const Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kLong && t.numel() == 1 && t.dim() <= 1, name,
              " must be an int64 tensor of shape () or (1,), got ", t.scalar_type(), " of shape ", t.sizes());
  return static_cast<uint64_t>(t.const_data_ptr<int64_t>()[0]);
}

std::tuple<Tensor, Tensor> verify_sample_cpu(const Tensor& draft, const Tensor& num_draft,
                                             const std::optional<Tensor>& draft_probs, const Tensor& target_logits,
                                             const Tensor& temperature, const Tensor& seed, const Tensor& offset) {
  const auto [B, K, V] = check_verify(draft, num_draft, target_logits);
  check_cpu(temperature, "temperature");
  check_float(temperature, "temperature");
  TORCH_CHECK(temperature.dim() == 1 && temperature.size(0) == B, "temperature must have shape (", B,
              ",), got ", temperature.sizes());
  const uint64_t seed_v = scalar_u64(seed, "seed"), offset_v = scalar_u64(offset, "offset");
  Tensor dp;
  if (draft_probs.has_value()) {
    check_cpu(*draft_probs, "draft_probs");
    check_float(*draft_probs, "draft_probs");
    TORCH_CHECK(draft_probs->dim() == 3 && draft_probs->size(0) == B && draft_probs->size(1) == K &&
                    draft_probs->size(2) == V,
                "draft_probs must have shape (", B, ", ", K, ", ", V, "), got ", draft_probs->sizes());
    dp = draft_probs->contiguous();
  }
  const Tensor dr = draft.contiguous(), nd = num_draft.contiguous(), temp = f32(temperature);
  const int64_t* d = dr.const_data_ptr<int64_t>();
  const int64_t* n = nd.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < std::clamp<int64_t>(n[b], 0, K); ++j)
      TORCH_CHECK(d[b * K + j] >= 0 && d[b * K + j] < V, "draft[", b, ", ", j, "] = ", d[b * K + j],
                  " is not a token id in [0, ", V, ") (num_draft[", b, "] = ", n[b], ")");
  // NOTE: target_probs come from at::_softmax, the kernel the reference runs, on the same fp32 input
  // (logits / temperature, a correctly rounded division), so both see bitwise-equal probabilities.
  // Greedy rows divide by 1, so `scaled` also holds their fp32 logits for the argmax. bf16/fp16 logits are
  // widened inside the division (type promotion), exactly as the reference's .float() does.
  const Tensor safe_temp = at::where(temp.le(0), at::ones_like(temp), temp);
  const Tensor scaled = at::div(target_logits.contiguous(), safe_temp.view({B, 1, 1})).contiguous();
  TORCH_CHECK(scaled.scalar_type() == at::kFloat, "internal: scaled logits must be fp32");
  const Tensor target_probs = at::_softmax(scaled, -1, false).contiguous();
  Tensor out = at::empty({B, K + 1}, draft.options());
  Tensor num_emitted = at::empty({B}, draft.options());
  auto run = [&](auto* dp_ptr) {
    specee::cpu::VerifySample(d, n, dp_ptr, scaled.const_data_ptr<float>(), target_probs.const_data_ptr<float>(),
                              temp.const_data_ptr<float>(), seed_v, offset_v, B, K, V,
                              out.mutable_data_ptr<int64_t>(), num_emitted.mutable_data_ptr<int64_t>());
  };
  if (!dp.defined()) {
    run(static_cast<const float*>(nullptr));
  } else {
    SPECEE_DISPATCH_FLOATS(dp.scalar_type(), "specee::verify_sample",
                                    [&] { run(dp.const_data_ptr<scalar_t>()); });
  }
  return {out, num_emitted};
}

}  // namespace

TORCH_LIBRARY_IMPL(specee, CPU, m) {
  m.impl("exit_predict", &exit_predict_cpu);
  m.impl("lm_head_argmax", &lm_head_argmax_cpu);
  m.impl("verify_greedy", &verify_greedy_cpu);
  m.impl("verify_sample", &verify_sample_cpu);
}
