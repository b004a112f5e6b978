"""Adapter: run a transformers Llama-family causal LM one piece at a time.

The engine needs the model as parts it can schedule: embeddings, each decoder layer with a KV cache
that specee owns, the final norm and the LM head. We call the model's own modules (its decoder
layers, rotary embedding, norm and head) so the arithmetic is exactly transformers', and only the
cache and the attention mask are ours.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import rotate_half

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float


class DecoderAdapter:
    """The pieces of a Llama-family model, in the order decoding runs them.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM`` (tied or untied head, GQA).
    """

    static = False  # True for compiled.CompiledAdapter: needs a static cache and full-length masks

    def __init__(self, model):
        name = type(model).__name__
        if name not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"specee does not support {name}. Supported model classes: {', '.join(SUPPORTED_ARCHITECTURES)} "
                "(transformers 5). Load a Llama-family checkpoint with AutoModelForCausalLM."
            )
        attn = getattr(model.config, "_attn_implementation", None) or "eager"
        if attn not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"attention implementation {attn!r} is not supported by specee's KV cache; load the model with "
                f"attn_implementation='sdpa' (or 'eager')."
            )
        self.model = model
        self.config = model.config
        self.attn_implementation = attn
        inner = model.model
        self.embed_tokens = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary_emb = inner.rotary_emb
        self.lm_head = model.lm_head
        cfg = model.config
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        self.shape = ModelShape(
            num_layers=len(self.layers), hidden_size=cfg.hidden_size, vocab_size=self.lm_head.weight.shape[0],
            num_heads=num_heads, num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim, rms_eps=float(cfg.rms_norm_eps),
        )

    @property
    def num_layers(self) -> int:
        return self.shape.num_layers

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def uncaptured(self):
        """Context for one-off calls (the prefill): graph-capturing adapters run them unrecorded."""
        return contextlib.nullcontext()

    def new_cache(self, batch: int, max_len: int):
        """The KV cache for one generation of ``batch`` rows and ``max_len`` slots."""
        from .cache import KVCache

        return KVCache(self.shape, batch, max_len, self.dtype, self.device, static=self.static)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def rope(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        # position_ids: [B, q]; returns (cos, sin) shared by every layer of this step.
        return self.rotary_emb(hidden, position_ids=position_ids)

    def layer(self, idx: int, hidden, mask, position_ids, position_embeddings, kv_view):
        """Run decoder layer ``idx`` on ``hidden`` [B, q, d]; its K/V go to ``kv_view`` (see cache.LayerKV)."""
        return self.layers[idx](
            hidden, attention_mask=mask, position_ids=position_ids, past_key_values=kv_view,
            use_cache=True, position_embeddings=position_embeddings,
        )

    def precompile(self, batch: int, spans: bool, fills: bool = False, verify: bool = False):
        """Nothing to compile eagerly (see ``CompiledAdapter.precompile``)."""

    def segment(self, start: int, n: int, hidden, mask, position_ids, position_embeddings, kv_view):
        """Layers ``start`` .. ``start + n - 1`` under one mask (the engine guarantees it serves them all)."""
        for idx in range(start, start + n):
            hidden = self.layer(idx, hidden, mask, position_ids, position_embeddings, kv_view)
        return hidden

    def kv_projection(self, idx: int, hidden, position_embeddings):
        """K and V of layer ``idx`` computed from ``hidden`` [B, q, d] (projections only: CALM's propagation)."""
        layer = self.layers[idx]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, self.shape.head_dim)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        k = k * position_embeddings[0].unsqueeze(1) + rotate_half(k) * position_embeddings[1].unsqueeze(1)
        return k, v

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        return self.lm_head(normed)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (fp32) of ``hidden`` [..., d] after the final norm."""
        return self.head(self.final_norm(hidden)).float()
