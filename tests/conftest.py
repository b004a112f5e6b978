"""Shared fixtures: tiny random Llama-family models (2-4 layers) that decode in milliseconds on a CPU."""
import os

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)


def _fix_triton_interpreter_index():
    """Triton 3.6's interpreter turns a scalar kernel argument into a shape-[1] numpy array and gives tensors
    `__index__ = int(data)`, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python
    scalars"), so `range(0, d, BLOCK)` in a kernel fails (triton-lang/triton#9171, fixed by #9172 with `.squeeze()`;
    Triton 3.9 has it, torch 2.11 pins 3.6). Tests only: the interpreter is how CI runs the Triton kernels."""
    import inspect

    try:
        from triton.runtime import interpreter
        original = interpreter._patch_lang_tensor
        if "squeeze()" in inspect.getsource(original):
            return  # this Triton has the fix
    except (ImportError, AttributeError, OSError, TypeError):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_triton_interpreter_index()

PAD, EOS, BOS = 0, 1, 2
_COMMON = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(num_hidden_layers=4, tie_word_embeddings=False)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_hidden_layers=3, sliding_window=None)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_hidden_layers=4, tie_word_embeddings=True)),
}


def make_tiny(family="llama", seed=0, attn="sdpa", **overrides):
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**_COMMON, **extra, **overrides})
    cfg._attn_implementation = attn
    model = model_cls(cfg).eval()
    # Random init gives near-uniform logits; sharper weights make argmax gaps (and exits) realistic.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny("llama")


def left_padded_batch(lengths, vocab=211, seed=1):
    """input_ids, attention_mask [B, max(lengths)] with left padding, no special tokens inside."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), P), generator=g)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, P - n:] = 1
    return ids.masked_fill(mask == 0, PAD), mask


class ScriptedPredictor:
    """An early_exit predictor that exits each step where a script says: exercises the engine deterministically.

    ``script[i]`` is the exit layer (layers run) of decode step i, per row ([B] list) or for all rows (int).
    """

    def __init__(self, script, layers):
        self.script, self.layers, self.step = script, list(layers), 0

    def reset(self, batch_size):
        self.step, self.batch = 0, batch_size

    def decide(self, layer, hidden, adapter):
        target = self.script[min(self.step, len(self.script) - 1)]
        target = torch.as_tensor(target).expand(hidden.shape[0])
        return target == layer + 1, None

    def observe(self, exit_layers):
        self.step += 1


class ScheduledScript(ScriptedPredictor):
    """A scripted predictor that tests only the layers where this step's rows exit (as a bank's schedule does), so
    the layers before them run as one span that may cross the holes earlier steps left."""

    def step_layers(self):
        target = self.script[min(self.step, len(self.script) - 1)]
        return frozenset(t - 1 for t in (target if isinstance(target, list) else [target]))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a real tokenizer, saved like a checkpoint the user would pass to --model."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(300)}
    vocab.update({"<unk>": 300, "<eos>": 301})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=302, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=301, pad_token_id=301)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def read_log(monkeypatch):
    """Events of exit decisions' read-backs and of the adapter's layer calls, in order: "copy" (a ReadBack queued),
    "wait" (its result awaited), "layer" (DecoderAdapter.segment called; eager adapters only)."""
    from specee import engine, readback
    from specee.models import DecoderAdapter

    events = []

    class Logged(readback.ReadBack):
        def __init__(self, values):
            events.append("copy")
            super().__init__(values)

        def result(self):
            events.append("wait")
            return super().result()

    segment = DecoderAdapter.segment

    def logged_segment(self, *args):
        events.append("layer")
        return segment(self, *args)

    monkeypatch.setattr(readback, "ReadBack", Logged)
    monkeypatch.setattr(engine, "ReadBack", Logged)
    monkeypatch.setattr(DecoderAdapter, "segment", logged_segment)
    return events
