"""generate() and custom_generate(): the transformers-facing surface.

Both go through ``model.generate``: transformers prepares the generation config, the logits
processors (temperature, top-k, top-p, ...), the stopping criteria (max length, EOS, user
criteria), special tokens and the streamer; specee only replaces the decoding loop. So every
``generate`` feature keeps working, and ``mode="full"`` is token-identical to ``model.generate``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .compiled import parse_compile
from .engine import Engine
from .models import DecoderAdapter
from .policies import ExitConfig, make_policy
from .speculative import SelfSpeculativeDecoder, SpecConfig


@dataclass
class SpeceeGenerateOutput(GenerateDecoderOnlyOutput):
    """transformers' ``GenerateDecoderOnlyOutput`` plus, per row and generated token, the layers it ran.

    exit_layers : LongTensor [batch, new_tokens]
        Number of decoder layers run for each generated token (``num_layers`` = no exit; 0 for the
        padding emitted after a row finished).
    stats : dict
        Host syncs, steps and layer count of the run.
    """

    exit_layers: torch.Tensor | None = None
    stats: dict | None = None


def validate_inputs(model, input_ids, attention_mask=None, max_new_tokens=None):
    """Raise a clear error for inputs specee cannot decode; see README "Bad input"."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}; "
                        "use tokenizer(..., return_tensors='pt').")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold integer token ids (torch.long), got {input_ids.dtype}; "
                        "pass the tokenizer's output, or cast with .long().")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [batch, seq_len], got shape {tuple(input_ids.shape)}; "
                         "add a batch dimension with input_ids[None].")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); give at least one prompt token "
                         "(e.g. the BOS token).")
    model_device = next(model.parameters()).device
    if input_ids.device != model_device:
        raise ValueError(f"input_ids are on {input_ids.device} but the model is on {model_device}; "
                         f"move them with input_ids.to('{model_device}').")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                             f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with these ids.")
        if attention_mask.device != input_ids.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids on {input_ids.device}; "
                             "put both on the model's device.")
        m = attention_mask.bool()
        # Left padding only: once a row has a real token, every later slot must be real.
        if bool((m[:, :-1] & ~m[:, 1:]).any()):
            raise ValueError("attention_mask shows right padding; decoder-only generation needs left padding: "
                             "set tokenizer.padding_side = 'left' before tokenizing the batch.")
        if bool((~m.any(dim=1)).any()):
            raise ValueError("a row of attention_mask is all zeros (an empty prompt); give each row at least one token.")
    if max_new_tokens is not None and max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")


def _callers_streamer():
    # NOTE: transformers 5 drops `streamer` when custom_generate is a callable (it rebuilds the mode
    # kwargs from the callable's extra parameters only), yet it has already streamed the prompt.
    # Take the streamer from the generate() frame that called us, so tokens keep streaming.
    frame = inspect.currentframe()
    try:
        for _ in range(4):
            frame = frame.f_back
            if frame is None:
                return None
            if frame.f_code.co_name == "generate" and "streamer" in frame.f_locals:
                return frame.f_locals["streamer"]
    finally:
        del frame
    return None


def custom_generate(mode: str = "full", exit_config=None, compile=None):
    """A decoding method for ``model.generate(..., custom_generate=...)`` that carries specee's options.

    transformers 5 rejects generate kwargs it does not know (``mode=...``), so the options travel in
    this closure instead. ``compile`` as in :func:`generate`.

    Examples
    --------
    >>> out = model.generate(input_ids, max_new_tokens=32,
    ...                      custom_generate=specee.custom_generate(mode="skipdecode"))
    """
    if mode == "self_speculative":
        config = exit_config
    else:
        config = ExitConfig.coerce(exit_config)

    def specee_decode(model, input_ids, logits_processor, stopping_criteria, generation_config,
                      synced_gpus=False, streamer=None, **model_kwargs):
        if synced_gpus:
            raise ValueError("specee does not support synced_gpus (DeepSpeed ZeRO-3 / FSDP generation); "
                             "decode on a single device.")
        if streamer is None:
            streamer = _callers_streamer()
        attention_mask = model_kwargs.get("attention_mask")
        validate_inputs(model, input_ids, attention_mask)
        if mode == "self_speculative":
            engine = SelfSpeculativeDecoder(model, config, compile=compile)
        else:
            engine = Engine(model, mode, config, compile=compile)
        res = engine.decode(input_ids, attention_mask, logits_processor=logits_processor,
                            stopping_criteria=stopping_criteria, generation_config=generation_config,
                            streamer=streamer)
        model._specee_last_stats = res.stats  # for callers that did not ask for a dict
        if not generation_config.return_dict_in_generate:
            return res.sequences
        return SpeceeGenerateOutput(sequences=res.sequences, scores=res.scores, logits=res.logits,
                                    exit_layers=res.exit_layers, stats=res.stats)

    specee_decode.mode = mode
    specee_decode.exit_config = config
    return specee_decode


def generate(model, input_ids, attention_mask=None, *, mode: str = "full", exit_config=None, compile=None,
             **generate_kwargs):
    """Generate with early exits; accepts and returns what ``model.generate`` does.

    Parameters
    ----------
    model : LlamaForCausalLM | MistralForCausalLM | Qwen2ForCausalLM
    input_ids : LongTensor [batch, seq_len]
        Left-padded prompts.
    attention_mask : LongTensor [batch, seq_len], optional
    mode : str
        ``full`` (token-identical to ``model.generate``), ``skipdecode``, ``confidence`` or ``early_exit``.
    exit_config : ExitConfig or dict, optional
        See :class:`specee.ExitConfig`.
    compile : bool, str or dict, optional
        Decode through compiled code (``torch.compile``): one compiled decoder-layer step reused by
        every layer, over a static KV cache, so exits cause no recompiles. ``True`` uses inductor; a
        backend name (``"inductor"``, ``"aot_eager"``, ``"eager"``) or ``dict(backend=..., mode=...)``
        picks another; ``dict(graphs=True)`` replays CUDA graphs (``specee.graphs``) and
        ``dict(options={"cpp_wrapper": True})`` patches inductor's config (see
        :func:`specee.compiled.parse_compile`). The first call in a process compiles (see
        :func:`specee.compiled.warmup`).
    **generate_kwargs
        Anything ``model.generate`` accepts: ``generation_config`` and its fields (``max_new_tokens``,
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ...), ``logits_processor``,
        ``stopping_criteria``, ``streamer``, ``return_dict_in_generate``, ``output_scores``.

    Returns
    -------
    LongTensor [batch, seq_len + new_tokens], or :class:`SpeceeGenerateOutput` with
    ``return_dict_in_generate=True`` (adds ``exit_layers`` [batch, new_tokens]).

    Examples
    --------
    >>> out = specee.generate(model, ids, mode="confidence", exit_config={"thresholds": 0.9},
    ...                       max_new_tokens=64, return_dict_in_generate=True)
    >>> out.exit_layers.float().mean()
    """
    validate_inputs(model, input_ids, attention_mask, generate_kwargs.get("max_new_tokens"))
    parse_compile(compile)  # fail early on bad compile options
    num_layers = DecoderAdapter(model).num_layers  # fails early on unsupported models
    if mode == "self_speculative":
        config = SpecConfig.coerce(exit_config, num_layers)
    else:
        config = ExitConfig.coerce(exit_config)
        make_policy(mode, num_layers, config)  # fail early on bad options
    if "custom_generate" in generate_kwargs:
        raise ValueError("specee.generate already sets custom_generate; call model.generate(..., "
                         "custom_generate=specee.custom_generate(...)) to pass your own.")
    if generate_kwargs.get("max_new_tokens") == 0:
        return input_ids
    return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                          custom_generate=custom_generate(mode, config, compile), **generate_kwargs)
