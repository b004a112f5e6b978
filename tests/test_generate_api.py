"""The transformers-facing surface: custom_generate, streamers, stopping criteria, output types, bad input."""
import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import specee
from conftest import PAD, left_padded_batch, make_tiny


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


class StopAfter(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


@pytest.mark.parametrize("mode", ["full", "skipdecode", "confidence"])
def test_custom_generate_with_streamer_and_stopping_criterion(mode):
    model = make_tiny("llama")
    ids, mask = left_padded_batch([6])
    streamer = Collect()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, streamer=streamer,
                         stopping_criteria=StoppingCriteriaList([StopAfter(6 + 5)]),
                         custom_generate=specee.custom_generate(mode=mode))
    assert out.shape == (1, 11)
    assert streamer.ended
    assert torch.equal(streamer.chunks[0], ids), "transformers streams the prompt first"
    assert torch.equal(torch.cat(streamer.chunks[1:]), out[0, 6:])
    if mode == "full":
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        assert torch.equal(out, ref)


def test_custom_generate_dict_output_has_exit_layers_and_scores():
    model = make_tiny("llama")
    ids, mask = left_padded_batch([5, 8])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                         output_scores=True, output_logits=True, custom_generate=specee.custom_generate())
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                         output_scores=True, output_logits=True)
    assert isinstance(out, specee.SpeceeGenerateOutput)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == 6 and len(out.logits) == 6
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert out.exit_layers.shape == (2, 6) and out.exit_layers.eq(4).all()


def test_generation_config_and_min_new_tokens_are_honoured():
    from transformers import GenerationConfig

    model = make_tiny("llama")
    ids, mask = left_padded_batch([5])
    gc = GenerationConfig(max_new_tokens=7, min_new_tokens=7, do_sample=False, eos_token_id=1, pad_token_id=PAD)
    out = specee.generate(model, ids, mask, generation_config=gc)
    ref = model.generate(ids, attention_mask=mask, generation_config=gc)
    assert torch.equal(out, ref) and out.shape[1] == 12


def test_unsupported_model_class():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        specee.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "empty"),
    (dict(input_ids=torch.zeros(1, 3)), TypeError, "integer token ids"),
    (dict(attention_mask=torch.ones(1, 4, dtype=torch.long)), ValueError, "attention_mask has shape"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be >= 0"),
    (dict(mode="turbo"), ValueError, "unknown mode"),
    (dict(mode="confidence", exit_config=dict(kv_policy="lazy")), ValueError, "unknown kv_policy"),
    (dict(mode="skipdecode", exit_config=dict(min_layers=4, max_layers=2)), ValueError, "min_layers"),
    (dict(mode="skipdecode", exit_config=dict(min_layers=1, max_layers=9)), ValueError, "max_layers"),
    (dict(mode="confidence", exit_config=dict(thresholds=1.5)), ValueError, r"outside \[0, 1\]"),
    (dict(mode="confidence", exit_config=dict(layers=[7])), ValueError, "out of range"),
    (dict(mode="early_exit"), ValueError, "predictor"),
    (dict(exit_config=dict(speed=2)), ValueError, "unknown exit_config keys"),
])
def test_bad_input_names_the_problem(tiny_llama, kwargs, exc, match):
    args = dict(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        specee.generate(tiny_llama, **args)


def test_right_padding_is_rejected(tiny_llama):
    ids = torch.tensor([[5, 6, 7], [5, 6, PAD]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        specee.generate(tiny_llama, ids, mask, max_new_tokens=2)


def test_inputs_on_another_device_than_the_model(tiny_llama):
    ids = torch.tensor([[5, 6, 7]], device="meta")
    with pytest.raises(ValueError, match="model is on cpu"):
        specee.generate(tiny_llama, ids, max_new_tokens=2)
