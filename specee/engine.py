"""The decode loop: prefill, step, the batch's exit point, the KV policy. Mechanism only.

One exit point per decoding step is shared by the whole batch (SkipDecode): a row whose exit fires
is done with its token, but keeps flowing through the step's layers until every row has exited, so
its KV is exact up to the step's exit layer. Above it the step leaves a hole, handled by the KV
policy: ``skip`` (later tokens attend only to what is present), ``propagate`` (K/V of the skipped
layers projected from the exit hidden state, CALM), ``deferred`` (the pending hidden states run the
missing layers with the next deeper step's token, exact), ``monotone`` (the exit layer never
increases, so no hole is read).

The layers between two exit tests run as one *span*: one adapter call under one attention mask (compiled:
a few chunk graphs, or one graph for a whole stack that tests no exit). A span ends at a tested layer and where
the holes change the mask or a deferred slot joins in (their depths are kept on the host).

Token selection follows transformers' ``_sample`` line for line (logits processors on fp32 logits,
argmax or ``torch.multinomial``), so ``full`` reproduces ``model.generate`` token for token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import DeferredQueue, KVCache
from .compiled import make_adapter
from .policies import ExitConfig, StepPlan, make_policy
from .readback import Pending, ReadBack


@dataclass
class DecodeResult:
    sequences: torch.Tensor                      # [B, P + T]
    exit_layers: torch.Tensor                    # [B, T] layers run for each token (0 after the row finished)
    scores: tuple | None = None
    logits: tuple | None = None
    stats: dict = field(default_factory=dict)


class Engine:
    """Decodes a Llama-family model with a given exit policy.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        See ``models.SUPPORTED_ARCHITECTURES``.
    mode : str
        ``full``, ``skipdecode``, ``confidence`` or ``early_exit`` (see ``policies``).
    exit_config : ExitConfig or dict, optional
    compile : bool, str or dict, optional
        Run layers and head through compiled code (see ``specee.compiled``).
    """

    def __init__(self, model, mode: str = "full", exit_config=None, compile=None):
        self.adapter = make_adapter(model, compile)
        self.config = ExitConfig.coerce(exit_config)
        self.mode = mode
        self.policy = make_policy(mode, self.adapter.num_layers, self.config)
        self.kv_policy = "monotone" if mode == "skipdecode" else self.config.kv_policy
        if self.config.lookahead and self.kv_policy != "deferred":
            raise ValueError(f"exit_config lookahead=True runs one layer past an exit and keeps its KV, which only "
                             f"kv_policy='deferred' leaves exact; got {self.kv_policy!r} (mode {mode!r}).")
        self.lookahead_layers = 0
        self.host_syncs = 0
        self.cache: KVCache | None = None
        self.pending = DeferredQueue()
        self.hole_depths: set[int] = set()  # skip policy: depths of the holes left so far (they stay)

    # ------------------------------------------------------------------ layers
    def _run(self, hidden: torch.Tensor, slots: list[int], plan: StepPlan, finished: torch.Tensor | None,
             spans: bool = True):
        """Run ``plan`` for the tokens at ``slots`` (hidden [B, q, d]) plus any deferred slots. ``spans=False`` runs
        layer by layer (prefills: a shape seen once per generation is not worth compiling span graphs for).

        Returns (hidden after the last layer run [B, q, d], layers run, exit bookkeeping or None).
        """
        a, cache = self.adapter, self.cache
        pend = self.pending if self.kv_policy == "deferred" and len(self.pending) else None
        all_slots = (pend.slots if pend else []) + slots
        slot_index = {s: i for i, s in enumerate(all_slots)}
        all_t = torch.tensor(all_slots, device=hidden.device)
        position_ids = cache.positions[:, all_t]
        cos, sin = a.rope(hidden, position_ids)
        additive = a.attn_implementation == "eager"
        contiguous = slice(slots[0], slots[-1] + 1)
        cur_t = all_t[len(all_slots) - len(slots):]
        unmasked = not pend and not cache.needs_mask(len(slots), slots[0], additive)

        exits = None
        if plan.eval_layers:
            B, V = hidden.shape[0], a.shape.vocab_size
            exits = dict(done=finished.clone(), logits=torch.zeros(B, V, device=hidden.device),
                         layer=torch.zeros(B, dtype=torch.long, device=hidden.device), all_exited=False)
        # Layers where the attention mask changes: a slot with a hole is present below it, absent from it on.
        boundaries = self.hole_depths | set(pend.depth) if pend else self.hole_depths
        layers = plan.layers
        region_masks = {}

        def region_mask(l, query_slots):
            """The mask of layer l's region: the holes and the deferred slots that join in change only at
            boundaries, so every span between two of them (span() never crosses one) shares one mask, made once
            per step (and, being the same tensor, copied once into compiled or graphed inputs). Without holes
            there are no boundaries: one mask for the whole step."""
            region = sum(b <= l for b in boundaries)
            if region not in region_masks:
                region_masks[region] = cache.mask(l, query_slots, a.dtype, additive)
            return region_masks[region]

        def span(i):
            """How many layers from layers[i] on run as one adapter call: consecutive, no exit test before the
            last, the same holes and deferred slots (a pending slot joins at its depth, a boundary), so one mask
            and one set of queries serve them all. A full-depth step that tests no exit is one call (one compiled
            graph for the stack, as a gpt-fast step)."""
            n = 1
            if not spans:
                return n
            while (i + n < len(layers) and layers[i + n] == layers[i + n - 1] + 1
                   and layers[i + n - 1] not in plan.eval_layers and layers[i + n] not in boundaries):
                n += 1
            return n

        def run_span(l, n, hidden):
            active = pend.active(l) if pend else []
            if not active:
                mask = None if unmasked else region_mask(l, cur_t)
                k = len(all_slots) - len(slots)
                return a.segment(l, n, hidden, mask, position_ids[:, k:], (cos[:, k:], sin[:, k:]),
                                 cache.view(cur_t, contiguous))
            q_slots = [pend.slots[i] for i in active] + slots
            idx = torch.tensor([slot_index[s] for s in q_slots], device=hidden.device)
            x = torch.cat([pend.hidden[:, active], hidden], dim=1)
            mask = region_mask(l, all_t[idx])
            out = a.segment(l, n, x, mask, position_ids[:, idx], (cos[:, idx], sin[:, idx]),
                            cache.view(all_t[idx], None))
            pend.hidden[:, active] = out[:, : len(active)]
            return out[:, len(active):]

        i, ahead = 0, None
        while i < len(layers):
            if ahead is None:
                n = span(i)
                hidden = run_span(layers[i], n, hidden)
            else:
                hidden, ahead, n = ahead, None, 1
            i += n
            l = layers[i - 1]
            if l in plan.eval_layers:
                decision = self.policy.decide(l, hidden[:, -1], a)
                if isinstance(decision, Pending):  # the policy's own read-back is in flight: queue ahead first
                    if self.config.lookahead and i < len(layers):
                        ahead = run_span(layers[i], 1, hidden)
                    decision = decision.resolve()
                exit_now, logits = decision
                if exit_now is None:  # the policy knows on the host that no row exits here: nothing to read
                    continue
                newly = exit_now & ~exits["done"]
                exits["done"] = exits["done"] | newly
                exits["layer"] = torch.where(newly, l + 1, exits["layer"])
                # The one read-back per evaluated layer: did a row exit, can the batch stop, did every row
                # exit for real (then the step's logits are all here and the head need not run again)?
                flags = ReadBack(torch.stack([newly.any(), exits["done"].all(), (exits["layer"] > 0).all()]))
                if self.config.lookahead and ahead is None and i < len(layers):
                    # Queue the next layer behind the read-back's copy, so the device runs it while the host waits
                    # for the copy alone; if the batch exits here it was one layer too many, whose KV is exact
                    # (kept, deferred policy).
                    ahead = run_span(layers[i], 1, hidden)
                any_new, all_done, exits["all_exited"] = flags.result()
                self.host_syncs += 1
                if any_new:
                    if logits is None:  # the predictor did not run the head: run it only when a row leaves
                        logits = a.logits(hidden[:, -1])
                    exits["logits"] = torch.where(newly[:, None], logits, exits["logits"])
                if all_done:
                    if ahead is not None:
                        hidden, i = ahead, i + 1
                        self.lookahead_layers += 1
                    break
        if pend:
            pend.advance(layers[i - 1] + 1, a.num_layers)
            if not len(pend):  # the deferred holes are all filled: later steps share one mask again
                cache.has_holes = False
        return hidden, layers[:i], exits

    def _fill_holes(self, hidden: torch.Tensor, slot: int, reached: int):
        """Apply the KV policy to the layers a step did not run (``reached`` .. L-1) for its slot."""
        L, cache = self.adapter.num_layers, self.cache
        if reached >= L:
            return
        if self.kv_policy == "skip":
            cache.has_holes = True  # for good: skip never fills a hole
            self.hole_depths.add(reached)
        elif self.kv_policy == "propagate":
            pos = cache.positions[:, slot: slot + 1]
            rope = self.adapter.rope(hidden, pos)
            for l in range(reached, L):
                k, v = self.adapter.kv_projection(l, hidden, rope)
                cache.k_layers[l][:, :, slot: slot + 1] = k
                cache.v_layers[l][:, :, slot: slot + 1] = v
                cache.present[l, slot] = True
        elif self.kv_policy == "deferred":
            cache.has_holes = True  # until the queue drains (_run, flush)
            self.pending.push(slot, reached, hidden)

    def flush(self):
        """Run every deferred slot through its missing layers (the KV then equals a full forward's)."""
        if self.kv_policy != "deferred" or not len(self.pending):
            return
        a, pend = self.adapter, self.pending
        while len(pend):
            l = min(pend.depth)
            active = pend.active(l)
            slots_t = torch.tensor([pend.slots[i] for i in active], device=pend.hidden.device)
            pos = self.cache.positions[:, slots_t]
            x = pend.hidden[:, active]
            rope = a.rope(x, pos)
            mask = self.cache.mask(l, slots_t, a.dtype, a.attn_implementation == "eager")
            pend.hidden[:, active] = a.layer(l, x, mask, pos, rope, self.cache.view(slots_t, None))
            pend.advance(l + 1, a.num_layers)
        self.cache.has_holes = False

    # ------------------------------------------------------------------ decode
    def decode(self, input_ids, attention_mask=None, **kwargs) -> DecodeResult:
        """Generate until ``stopping_criteria`` (transformers') says every row is done.

        Shape: input_ids [B, P] left-padded; attention_mask [B, P] or None. Keywords: ``logits_processor``,
        ``stopping_criteria``, ``generation_config``, ``streamer``, ``max_length``.
        """
        try:
            return self._decode(input_ids, attention_mask, **kwargs)
        finally:
            self.policy.finish()

    @torch.no_grad()
    def _decode(self, input_ids, attention_mask=None, *, logits_processor=None, stopping_criteria=None,
                generation_config=None, streamer=None, max_length: int | None = None) -> DecodeResult:
        a = self.adapter
        device = input_ids.device
        B, P = input_ids.shape
        gc = generation_config
        max_length = max_length or gc.max_length
        do_sample = bool(getattr(gc, "do_sample", False))
        pad = getattr(gc, "_pad_token_tensor", None)
        want_scores = gc.return_dict_in_generate and gc.output_scores
        want_logits = gc.return_dict_in_generate and gc.output_logits
        has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        L = a.num_layers

        valid = torch.ones(B, P, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        positions = (valid.long().cumsum(-1) - 1).clamp_(min=0)
        self.cache = a.new_cache(B, max_length)
        # Deferred fills feed several queries per call: their graphs too must exist before the first exit.
        a.precompile(B, spans=self.mode != "full",
                     fills=self.kv_policy == "deferred" and self.mode in ("confidence", "early_exit"))
        self.cache.all_valid = attention_mask is None or bool(valid.all())
        self.pending = DeferredQueue()
        self.hole_depths = set()
        self.host_syncs = self.lookahead_layers = 0
        self.policy.reset(B, max_length - P)
        self.cache.append(valid, positions)
        next_pos = positions[:, -1:] + 1

        # Prefill: the prompt at full depth.
        with a.uncaptured():
            hidden, _, _ = self._run(a.embed(input_ids), list(range(P)), self.policy._all, None, spans=False)
        logits = a.logits(hidden[:, -1])
        step_exit = torch.full((B,), L, dtype=torch.long, device=device)

        unfinished = torch.ones(B, dtype=torch.long, device=device)
        scores = () if want_scores else None
        raw, exit_layers = (), []
        max_depth, step = L, 0
        while True:
            next_scores = logits_processor(input_ids, logits)
            if want_scores:
                scores += (next_scores,)
            if want_logits:
                raw += (logits,)
            if do_sample:
                probs = torch.nn.functional.softmax(next_scores, dim=-1)
                tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                tokens = torch.argmax(next_scores, dim=-1)
            if has_eos:
                tokens = tokens * unfinished + pad * (1 - unfinished)
            exit_layers.append(step_exit * unfinished)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
            unfinished = unfinished & ~stopping_criteria(input_ids, scores)
            if streamer is not None:
                streamer.put(tokens.cpu())
            self.host_syncs += 1
            if bool(unfinished.max() == 0):
                break

            # One decode step for the token just emitted.
            slot = self.cache.length
            self.cache.append(torch.ones(B, 1, dtype=torch.bool, device=device), next_pos)
            next_pos = next_pos + 1
            plan = self.policy.plan(step, max_depth)
            hidden, ran, exits = self._run(a.embed(tokens[:, None]), [slot], plan, unfinished == 0)
            reached = ran[-1] + 1 if self.mode != "skipdecode" else len(ran)
            step_exit = torch.full((B,), reached, dtype=torch.long, device=device)
            if exits is not None and exits["all_exited"]:
                logits = exits["logits"]
            else:
                logits = a.logits(hidden[:, -1])
            if exits is not None:
                done = exits["done"]
                logits = torch.where(done[:, None], exits["logits"], logits)
                step_exit = torch.where(done & (exits["layer"] > 0), exits["layer"], step_exit)
            if self.mode != "skipdecode":
                self._fill_holes(hidden, slot, reached)
            # skipdecode leaves holes too, but its depth only shrinks: a later token runs a subset of
            # an earlier token's layers, so it never meets a hole and attention needs no hole mask.
            if self.kv_policy == "monotone":
                max_depth = reached
            self.policy.observe(step_exit)
            step += 1

        if streamer is not None:
            streamer.end()
        stats = dict(host_syncs=self.host_syncs, steps=step + 1, num_layers=L, lookahead_layers=self.lookahead_layers)
        return DecodeResult(input_ids, torch.stack(exit_layers, dim=1), scores, raw if want_logits else None, stats)
