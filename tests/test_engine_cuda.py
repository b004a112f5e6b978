"""The engine on a GPU: the CPU tests' exactness claims, repeated on CUDA in fp32 and bf16 (skip without CUDA)."""
import pytest
import torch

import specee
from conftest import left_padded_batch, make_tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode, cfg", [("full", None), ("self_speculative", dict(exit_layer=2, num_draft=4)),
                                       ("self_speculative", None)])
def test_exact_modes_equal_model_generate_on_cuda(dtype, mode, cfg):
    model = make_tiny("llama").to("cuda", dtype)
    ids, mask = left_padded_batch([7, 3, 11])
    ids, mask = ids.cuda(), mask.cuda()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    out = specee.generate(model, ids, mask, mode=mode, exit_config=cfg, max_new_tokens=20, do_sample=False)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("mode", ["skipdecode", "confidence"])
def test_exit_modes_run_on_cuda(mode):
    model = make_tiny("llama").cuda()
    ids, mask = left_padded_batch([5, 9])
    out = specee.generate(model, ids.cuda(), mask.cuda(), mode=mode, max_new_tokens=10,
                          return_dict_in_generate=True)
    assert out.sequences.is_cuda and out.exit_layers.shape == (2, 10)
