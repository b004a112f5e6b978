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


@pytest.mark.parametrize("compile", [None, dict(graphs=True)], ids=["eager", "graphs"])
def test_lookahead_read_back_on_cuda(compile):
    """The exit decisions' pinned, event-ordered copy (engine.ReadBack) reads what a plain read does: lookahead
    changes no token or exit layer on a GPU either."""
    model = make_tiny("llama", num_hidden_layers=6).cuda()
    ids, mask = left_padded_batch([6])
    outs = [specee.generate(model, ids.cuda(), mask.cuda(), mode="confidence", compile=compile, max_new_tokens=14,
                            do_sample=False, return_dict_in_generate=True,
                            exit_config=dict(thresholds=0.1, lookahead=lookahead)) for lookahead in (False, True)]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert torch.equal(outs[0].exit_layers, outs[1].exit_layers)
    assert outs[1].stats["lookahead_layers"] > 0
