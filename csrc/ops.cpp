// The one op registry of specee._C: schemas for every op in the `specee` namespace and their C++ CPU
// implementations. CUDA implementations register from csrc/cuda/ops_cuda.cu (TORCH_LIBRARY_IMPL).
// Only torch/library.h and ATen headers: torch/extension.h would add ~45 s of compile per file.
#include <Python.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>

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
