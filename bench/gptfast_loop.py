"""A gpt-fast-style compiled decode loop: the yardstick for specee's compiled `full` mode.

The whole decode step (every layer and the LM head's argmax) is one compiled function over a static
KV cache, so a token costs one call and no Python per layer; on a GPU it is captured as a CUDA graph
(``mode="reduce-overhead"``), as in gpt-fast (pytorch-labs). Greedy, no logits processors, batch of
equal-length prompts. It reuses specee's functional layer (``specee.compiled.layer_step``) so the two
differ only in how the step is cut: one graph per token here, one call per layer in specee (which is
what lets specee exit between layers).

    from gptfast_loop import GptFastDecoder
    dec = GptFastDecoder(model)                  # compiles on the first call
    tokens = dec.generate(input_ids, max_new_tokens=64)
"""
from __future__ import annotations

import time

import torch

from specee.cache import KVCache
from specee.compiled import CompiledAdapter, head_step, layer_step


class GptFastDecoder:
    def __init__(self, model, mode: str | None = None):
        self.a = CompiledAdapter(model, "eager")  # weights and static args only; the step compiles below
        cuda = self.a.device.type == "cuda"
        self.mode = mode or ("reduce-overhead" if cuda else "default")
        self.step = torch.compile(self._step, mode=self.mode, fullgraph=True, dynamic=False)
        self.compile_seconds = None
        self._cache = None

    def _new_cache(self, B, S, device):
        """One cache per (batch, slots), reused and zeroed: CUDA-graph trees read mutated inputs only at static
        addresses (``mark_static_address``, as gpt-fast's module buffers and transformers' StaticCache)."""
        c = self._cache
        if c is None or c.k_layers[0].shape[0] != B or c.max_len != S:
            c = self._cache = KVCache(self.a.shape, B, S, self.a.dtype, device, static=True)
            for t in (*c.k_layers, *c.v_layers):
                torch._dynamo.mark_static_address(t)
            return c
        return c.reset()

    def _step(self, x, k_layers, v_layers, slots, cos, sin, mask):
        a = self.a
        for l in range(a.num_layers):
            x = layer_step(x, a.weights[l], k_layers[l], v_layers[l], slots, cos, sin, mask, **a.static_args)
        return head_step(x[:, -1], a.norm.weight, a.lm_head.weight, a.shape.rms_eps).argmax(-1)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, max_len: int | None = None):
        """Greedy tokens [B, P + max_new_tokens] for unpadded prompts ``input_ids`` [B, P]."""
        a = self.a
        B, P = input_ids.shape
        S = max_len or P + max_new_tokens
        cache = self._new_cache(B, S, input_ids.device)
        cache.append(torch.ones(B, P, dtype=torch.bool, device=input_ids.device),
                     torch.arange(P, device=input_ids.device).expand(B, P))
        slots = torch.arange(P, device=input_ids.device)
        x = a.embed(input_ids)
        rope = a.rope(x, cache.positions[:, :P])
        mask = cache.mask(None, slots, a.dtype, False)
        for l in range(a.num_layers):  # prefill, uncompiled: it runs once
            x = layer_step(x, a.weights[l], cache.k_layers[l], cache.v_layers[l], slots, *rope, mask,
                           **a.static_args)
        tok = head_step(x[:, -1], a.norm.weight, a.lm_head.weight, a.shape.rms_eps).argmax(-1)
        out = [tok]
        for i in range(max_new_tokens - 1):
            slot = cache.length
            pos = torch.full((B, 1), P + i, device=input_ids.device)
            cache.append(torch.ones(B, 1, dtype=torch.bool, device=input_ids.device), pos)
            slots = torch.tensor([slot], device=input_ids.device)
            x = a.embed(tok[:, None])
            cos, sin = a.rope(x, pos)
            mask = cache.mask(None, slots, a.dtype, False)
            t = time.perf_counter()
            tok = self.step(x, cache.k_layers, cache.v_layers, slots, cos, sin, mask)
            if self.compile_seconds is None:
                self.compile_seconds = time.perf_counter() - t
            if a.device.type == "cuda":
                tok = tok.clone()  # CUDA-graph outputs are overwritten by the next replay
            out.append(tok)
        return torch.cat([input_ids, torch.stack(out, 1)], 1)
