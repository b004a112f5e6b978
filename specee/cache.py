"""KV cache with per-layer presence, written by slot; the deferred-fill queue.

Slots are columns of the padded batch: the prompt fills slots [0, P), the token of decode step i
goes to slot P + i - 1 in every row. Buffers are allocated once (static shapes, compile-ready) and
written by index; nothing is concatenated per token.

An early exit leaves a *hole*: slot s has no K/V at the layers above the step's exit layer. Exits
are shared by the batch (one exit point per step), so presence is tracked per (layer, slot), not
per row. Attention at layer l masks out the slots that are not present there.
"""
from __future__ import annotations

import torch

from .models import ModelShape


class KVCache:
    """Static per-layer K/V buffers ``[layers, batch, kv_heads, max_len, head_dim]`` (``k_layers`` / ``v_layers``:
    one ``[batch, kv_heads, max_len, head_dim]`` per layer; ``k`` / ``v`` hold all layers unless ``static``).

    Attributes
    ----------
    present : BoolTensor [layers, max_len]
        Slot s holds K/V at layer l.
    token_valid : BoolTensor [batch, max_len]
        Slot s of row b holds a real token (False for left padding).
    positions : LongTensor [batch, max_len]
        The RoPE position of each slot in its row.
    limit : int
        Slots tokens may use (``max_len`` unless the cache keeps scratch slots at its end).
    length : int
        Slots in use (a host-side int: it is fixed by the schedule, not by device values).
    has_holes : bool
        Some slot lacks K/V at some layer, so masks consult ``present`` (host-side; the engine sets it, for good
        under ``skip``, while deferred slots wait under ``deferred``).
    """

    def __init__(self, shape: ModelShape, batch: int, max_len: int, dtype, device, static: bool = False,
                 limit: int | None = None):
        kv = (shape.num_layers, batch, shape.num_kv_heads, max_len, shape.head_dim)
        if static:  # one buffer per layer: views of a 5-D buffer make dynamo guard on the base's layout
            self.k = self.v = None
            self.k_layers = tuple(torch.zeros(kv[1:], dtype=dtype, device=device) for _ in range(kv[0]))
            self.v_layers = tuple(torch.zeros(kv[1:], dtype=dtype, device=device) for _ in range(kv[0]))
        else:
            self.k = torch.zeros(kv, dtype=dtype, device=device)
            self.v = torch.zeros(kv, dtype=dtype, device=device)
            # per-layer views, made once: indexing the 5-D buffer on every update costs more than the copy
            self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)
        self.present = torch.zeros(shape.num_layers, max_len, dtype=torch.bool, device=device)
        self.token_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.max_len = max_len
        # Slots tokens may use; those above are scratch (specee.graphs captures there), never attended.
        self.limit = max_len if limit is None else limit
        # static: attention always spans all max_len slots under a mask (fixed shapes for compiled code)
        self.static = static
        self._clear()

    def _clear(self):
        self.length = 0
        self.has_holes = False
        self.all_valid = True  # host-side: no padding and no rolled-back slot so far (set by the engine)

    def reset(self) -> "KVCache":
        """Empty the cache for a new generation in the same buffers (CUDA graphs keep reading their addresses)."""
        for t in (*self.k_layers, *self.v_layers, self.present, self.token_valid, self.positions):
            t.zero_()
        self._clear()
        return self

    def append(self, valid: torch.Tensor, positions: torch.Tensor) -> slice:
        """Reserve the next ``valid.shape[1]`` slots for new tokens; returns their slot range."""
        n = valid.shape[1]
        if self.length + n > self.limit:
            raise ValueError(f"KV cache is full ({self.limit} slots); raise max_length or max_new_tokens' budget.")
        slots = slice(self.length, self.length + n)
        self.token_valid[:, slots] = valid
        self.positions[:, slots] = positions
        self.length += n
        return slots

    def needs_mask(self, q: int, first_slot: int, additive: bool) -> bool:
        """False when attention needs no mask at all, so transformers' unmasked fast path runs, as in
        ``model.generate`` (which drops an all-ones mask): one query over a cache without padding,
        holes or rollbacks, or an sdpa prefill from slot 0 (sdpa is then causal by itself)."""
        if self.static or not self.all_valid or self.has_holes:
            return True
        return not (q == 1 or (not additive and first_slot == 0 and q == self.length))

    def view(self, slots: torch.Tensor, contiguous: slice | None) -> "LayerKV":
        return LayerKV(self, slots, contiguous)

    def mask(self, layer: int | None, slots: torch.Tensor, dtype, additive: bool) -> torch.Tensor:
        """Attention mask [B, 1, q, length] (``max_len`` if static) for queries at ``slots`` [q]; ``layer=None``
        ignores holes.

        A query may attend to real tokens at or before its slot that are present at this layer; it
        always sees itself, so padding queries never produce NaN (their outputs are never read).
        """
        n = self.max_len if self.static else self.length
        keys = torch.arange(n, device=slots.device)
        allowed = self.token_valid[:, None, :n] & (keys[None, None, :] <= slots[None, :, None])
        if layer is not None and self.has_holes:
            present = self.present[layer, :n].clone()
            present[slots] = True  # the queries' own K/V are written by this very call
            allowed = allowed & present[None, None, :]
        allowed = (allowed | (keys[None, None, :] == slots[None, :, None]))[:, None]
        if not additive:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=slots.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min)


class LayerKV:
    """What a transformers attention module sees as ``past_key_values``: ``update`` writes by slot."""

    def __init__(self, cache: KVCache, slots: torch.Tensor, contiguous: slice | None):
        self.cache, self.slots, self.contiguous = cache, slots, contiguous

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        c = self.cache
        k, v = c.k_layers[layer_idx], c.v_layers[layer_idx]
        if self.contiguous is not None:
            start, n = self.contiguous.start, self.contiguous.stop - self.contiguous.start
            k.narrow(2, start, n).copy_(key_states)
            v.narrow(2, start, n).copy_(value_states)
            c.present[layer_idx].narrow(0, start, n).fill_(True)
        else:
            k.index_copy_(2, self.slots, key_states)
            v.index_copy_(2, self.slots, value_states)
            c.present[layer_idx, self.slots] = True
        return k.narrow(2, 0, c.length), v.narrow(2, 0, c.length)


class DeferredQueue:
    """Slots whose hidden states stopped at an exit layer, waiting for the missing layers.

    ``depth[i]`` is how many layers slot ``slots[i]`` has been through; ``hidden[:, i]`` is its state
    after them. The next step that runs layer l takes every pending slot with depth <= l along with
    its own token (FREE / EE-LLM's deferred fill), so the KV ends exactly as a full forward's.
    """

    def __init__(self):
        self.slots: list[int] = []
        self.depth: list[int] = []
        self.hidden: torch.Tensor | None = None  # [B, n_pending, d]

    def __len__(self):
        return len(self.slots)

    def push(self, slot: int, depth: int, hidden: torch.Tensor):
        self.slots.append(slot)
        self.depth.append(depth)
        self.hidden = hidden if self.hidden is None else torch.cat([self.hidden, hidden], dim=1)

    def active(self, layer: int) -> list[int]:
        """Indices (into the queue) of the pending slots that must run ``layer``."""
        return [i for i, d in enumerate(self.depth) if d <= layer]

    def advance(self, reached: int, num_layers: int):
        """Pending slots went through layers up to ``reached``; drop those that are complete."""
        self.depth = [max(d, reached) for d in self.depth]
        keep = [i for i, d in enumerate(self.depth) if d < num_layers]
        if len(keep) < len(self.depth):
            self.slots = [self.slots[i] for i in keep]
            self.depth = [self.depth[i] for i in keep]
            self.hidden = self.hidden[:, keep] if keep else None
