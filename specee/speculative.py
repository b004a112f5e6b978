"""Lossless self-speculative decoding: draft with the first e layers, verify with the rest, on device.

A round (LayerSkip, Elhoushi et al. 2024, arXiv 2404.16710; Kangaroo, Liu et al. 2024; DEL, 2025):
1. Draft: feed the last emitted token through layers [0, e) and the LM head at layer e; take a draft
   token (argmax, or a sample of the processed draft distribution); repeat up to K times. A row stops
   drafting when its draft confidence drops below ``draft_stop`` (Kangaroo's double exit).
2. Verify: run layers [e, L) over all fed positions of all rows in one pass. The shallow layers' KV
   written while drafting is reused (one cache, not two), then ``specee.ops.verify_greedy`` /
   ``verify_sample`` accept a prefix per row and add one target token.
3. Roll back: slots that no row kept are handed back (the cache length moves back; the next round
   rewrites them), and a row's rejected positions below that are masked out in every layer (their
   ``token_valid`` bit drops), so the valid KV is exactly a full run's over the accepted tokens;
   positions are per row.
The host reads back once per round (the accepted counts and tokens); EOS and max-length stops are then
decided on those host ids (``host_stopper``), other stopping criteria are called per emitted token.

Sampling is lossless: draft and target logits pass through the same transformers logits processors
(temperature, top-k, top-p, ...), the draft distribution is what the draft really sampled from, and
verification uses min(1, target/draft) acceptance with residual resampling (arXiv 2211.17192).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import ops
from .engine import DecodeResult, Engine
from .policies import StepPlan


@dataclass
class SpecConfig:
    """Options of ``mode="self_speculative"`` (pass as ``exit_config``).

    exit_layer : int or None
        Draft depth e (layers run to draft). None: chosen per round from online acceptance (DEL).
    num_draft : int
        Most drafts per round, K.
    draft_stop : float
        A row stops drafting when its draft's top probability falls below this (0 = never).
    candidates : list of int or None
        Draft depths the adaptive controller may pick (default: 1/4, 1/3, 1/2, 2/3 of the stack).
    head_cost_layers : float or None
        LM-head cost in layer units for the controller (default: from parameter counts).
    verify_cost : float or None
        Cost of a pass over a round's K+1 positions per row relative to a one-position pass, for the
        controller. None: 1.0 on CUDA (decoding is memory-bound: more positions read the same weights) and
        ``CPU_VERIFY_COST`` on the CPU, where a matrix product over 2 to 5 rows costs about twice a
        matrix-vector one (bench/results/spans_cpu.json); there drafts must be accepted far more often to pay.
    draft_vocab : int, sequence of int or None
        FR-Spec's reduced draft head (Zhao et al. 2025, arXiv 2502.14856): drafts are scored over
        these token ids only (an int n means ids 0..n-1, which BPE tokenizers order roughly by merge
        frequency; pass ids sorted by corpus frequency for a better set). Tokens outside are never
        proposed; output stays exact, since the draft distribution is what was really sampled.
    """

    exit_layer: int | None = None
    num_draft: int = 4
    draft_stop: float = 0.0
    candidates: list | None = None
    head_cost_layers: float | None = None
    verify_cost: float | None = None
    adaptive_k: bool = True
    draft_vocab: object = None
    stats: dict = field(default_factory=dict)

    @classmethod
    def coerce(cls, value, num_layers):
        if value is None:
            cfg = cls()
        elif isinstance(value, cls):
            cfg = value
        elif isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__) - {"kv_policy"}
            if unknown:
                raise ValueError(f"unknown self_speculative options {sorted(unknown)}; valid: "
                                 f"{sorted(set(cls.__dataclass_fields__) - {'stats'})}")
            cfg = cls(**{k: v for k, v in value.items() if k != "kv_policy"})
        else:
            raise TypeError(f"exit_config for self_speculative must be a dict or SpecConfig, got {type(value).__name__}")
        if cfg.exit_layer is not None and not 1 <= cfg.exit_layer <= num_layers - 1:
            raise ValueError(f"exit_layer must lie in [1, {num_layers - 1}] (draft with that many layers), "
                             f"got {cfg.exit_layer}.")
        if cfg.num_draft < 1:
            raise ValueError(f"num_draft must be >= 1, got {cfg.num_draft}.")
        if not 0.0 <= cfg.draft_stop <= 1.0:
            raise ValueError(f"draft_stop {cfg.draft_stop} is outside [0, 1].")
        if cfg.verify_cost is not None and not cfg.verify_cost >= 1.0:
            raise ValueError(f"verify_cost must be >= 1 (a pass over several positions costs at least one over "
                             f"one), got {cfg.verify_cost}.")
        return cfg


class DraftController:
    """Chooses (e, K) per round to maximise tokens per unit of cost (DEL's objective).

    Per draft depth e, the per-token acceptance a_e is an exponential moving average of what
    verification saw. A round with K drafts costs (K+1)·e + K·h (drafting) + v·((L-e) + h) (one verify
    pass over K+1 positions; v = ``verify_cost``: about 1 where decoding is memory-bound) layer units
    and yields (1 - a^(K+1)) / (1 - a) tokens in expectation. Plain decoding (L + h per token) is the fallback.
    While it wins, the best draft depth is probed again after ``probe`` rounds, an interval that
    doubles after every probe that does not pay, so a hopeless model costs a few probes in all.
    """

    def __init__(self, num_layers, cfg: SpecConfig, head_cost, draft_head_cost=None, verify_cost=1.0):
        L = num_layers
        self.L, self.h, self.cfg = L, head_cost, cfg
        self.hd = head_cost if draft_head_cost is None else draft_head_cost
        self.v = verify_cost if cfg.verify_cost is None else cfg.verify_cost  # the device's default, or the user's
        if cfg.exit_layer is not None:
            self.candidates = [cfg.exit_layer]
        else:
            cands = cfg.candidates or sorted({max(1, round(L * f)) for f in (0.25, 1 / 3, 0.5, 2 / 3)})
            self.candidates = [e for e in cands if 1 <= e < L]
        self.accept = {e: 0.5 for e in self.candidates}
        self.rounds = 0
        self.probe, self.next_probe = 8, 8

    def expected_cost(self, e, k, a):
        tokens = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
        return ((k + 1) * e + k * self.hd + self.v * (self.L - e + self.h)) / tokens

    def choose(self):
        """(e, K); K = 0 means a plain full-depth step."""
        self.rounds += 1
        ks = range(1, self.cfg.num_draft + 1) if self.cfg.adaptive_k else [self.cfg.num_draft]
        best = min(((self.expected_cost(e, k, self.accept[e]), e, k) for e in self.candidates for k in ks))
        if self.cfg.exit_layer is not None and not self.cfg.adaptive_k:
            return best[1], best[2]
        if best[0] < self.L + self.h:
            self.probe = 8
            return best[1], best[2]
        if self.rounds >= self.next_probe:
            self.probe *= 2
            self.next_probe = self.rounds + self.probe
            return best[1], best[2]
        return self.L, 0

    def update(self, e, accepted, drafted, weight=0.3):
        if e not in self.accept or drafted.sum() == 0:
            return
        rejected = (accepted < drafted).sum().item()
        rate = accepted.sum().item() / max(1, accepted.sum().item() + rejected)
        self.accept[e] = (1 - weight) * self.accept[e] + weight * rate


def host_stopper(criteria):
    """``stop(length, token)`` deciding on host-side ids what ``criteria`` would on the device, for the criteria
    transformers builds from max_length and eos_token_id; None when another criterion is in the list (stop
    strings, custom ones: those are called per token, a device read-back each)."""
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    eos, max_len = set(), None
    for c in criteria:
        if isinstance(c, EosTokenCriteria):
            eos |= set(torch.as_tensor(c.eos_token_id).view(-1).tolist())
        elif isinstance(c, MaxLengthCriteria):
            max_len = c.max_length if max_len is None else min(max_len, c.max_length)
        else:
            return None
    return lambda length, token: token in eos or (max_len is not None and length >= max_len)


CPU_VERIFY_COST = 2.0  # 2 and 5 query positions cost 1.8x and 2.0x one on the CPU (bench/bench_spans.py --queries)


def _head_cost_layers(adapter):
    s = adapter.shape
    attn = s.hidden_size * (2 * s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    mlp = 3 * s.hidden_size * adapter.config.intermediate_size
    return s.vocab_size * s.hidden_size / (attn + mlp)


class SelfSpeculativeDecoder:
    """Decodes with early-exit drafts verified by the remaining layers; exact (greedy) or lossless (sampling)."""

    def __init__(self, model, config=None, compile=None):
        self.engine = Engine(model, "full", compile=compile)
        self.adapter = self.engine.adapter
        self.cfg = SpecConfig.coerce(config, self.adapter.num_layers)
        h = self.cfg.head_cost_layers if self.cfg.head_cost_layers is not None else _head_cost_layers(self.adapter)
        self.draft_ids = self.draft_head = None
        V = self.adapter.shape.vocab_size
        if self.cfg.draft_vocab is not None:
            ids = self.cfg.draft_vocab
            ids = torch.arange(min(int(ids), V)) if isinstance(ids, int) else torch.as_tensor(ids, dtype=torch.long)
            if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= V:
                raise ValueError(f"draft_vocab must hold token ids in [0, {V}), got {ids.numel()} ids "
                                 f"in [{int(ids.min()) if ids.numel() else '-'}, {int(ids.max()) if ids.numel() else '-'}].")
            weight = self.adapter.lm_head.weight
            self.draft_ids = ids.to(weight.device)
            self.draft_head = weight[self.draft_ids].contiguous()
        hd = h * (len(self.draft_ids) / V if self.draft_ids is not None else 1.0)
        v = 1.0 if self.adapter.device.type == "cuda" else CPU_VERIFY_COST
        self.controller = DraftController(self.adapter.num_layers, self.cfg, h, hd, v)

    def _draft_logits(self, hidden):
        """Draft logits [B, V] at the exit layer: the full head, or FR-Spec's subset with -inf elsewhere."""
        if self.draft_ids is None:
            return self.adapter.logits(hidden)
        sub = (self.adapter.final_norm(hidden) @ self.draft_head.T).float()
        full = sub.new_full((hidden.shape[0], self.adapter.shape.vocab_size), float("-inf"))
        return full.index_copy_(1, self.draft_ids, sub)

    def _process(self, processors, seqs, lengths, rows_extra, logits):
        """Apply transformers' processors row by row, each with its own true prefix (+ extra tokens)."""
        if not len(processors):
            return logits
        out = torch.empty_like(logits)
        for b in range(logits.shape[0]):
            prefix = torch.cat([seqs[b, : lengths[b]], rows_extra[b]])[None]
            out[b] = processors(prefix, logits[b: b + 1])[0]
        return out

    @torch.no_grad()
    def decode(self, input_ids, attention_mask=None, *, logits_processor, stopping_criteria, generation_config,
               streamer=None) -> DecodeResult:
        a, eng, ctl = self.adapter, self.engine, self.controller
        device = input_ids.device
        B, P = input_ids.shape
        L, K_max = a.num_layers, self.cfg.num_draft
        gc = generation_config
        do_sample = bool(gc.do_sample)
        pad = int(gc._pad_token_tensor) if getattr(gc, "_pad_token_tensor", None) is not None else 0
        max_new = gc.max_length - P
        valid = torch.ones(B, P, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        positions = (valid.long().cumsum(-1) - 1).clamp_(min=0)
        # A round feeds up to K + 1 slots; the slots no row kept are handed back (see _rollback), so one row needs
        # its tokens plus one round's drafts, while rows that accept different counts leave masked slots behind.
        grow = max_new if B == 1 else max_new * (K_max + 1)
        eng.cache = a.new_cache(B, P + grow + K_max + 2)
        a.precompile(B, spans=True, verify=True)  # drafting runs spans, verification several queries and heads
        eng.cache.all_valid = attention_mask is None or bool(valid.all())
        eng.host_syncs = 0
        eng.cache.append(valid, positions)

        with a.uncaptured():
            hidden, _, _ = eng._run(a.embed(input_ids), list(range(P)), eng.policy._all, None, spans=False)
        logits = a.logits(hidden[:, -1])
        seqs = torch.full((B, P + max_new), pad, dtype=torch.long, device=device)
        seqs[:, :P] = input_ids
        lengths = [P] * B
        exit_rec = [[] for _ in range(B)]
        unfinished = [True] * B
        next_pos = positions[:, -1] + 1
        seed = torch.randint(0, 2**62, (), dtype=torch.long)  # from torch's RNG: torch.manual_seed reproduces
        offset = 0
        accept_hist = [0] * (K_max + 2)
        rounds = 0

        # The first token comes from the prefill, like transformers'.
        scores = self._process(logits_processor, seqs, lengths, [seqs.new_empty(0)] * B, logits)
        first = torch.multinomial(torch.softmax(scores, -1), 1)[:, 0] if do_sample else scores.argmax(-1)
        stop = self._stopper(stopping_criteria, seqs)
        self._emit(first[:, None], first[:, None].tolist(), [1] * B, seqs, lengths, unfinished, exit_rec,
                   [L], stop, max_new + P, streamer)
        last = first
        while any(unfinished):
            e, K = ctl.choose()
            active = torch.tensor(unfinished, device=device)
            slots, shallow, drafts, dprobs, num_draft = self._draft(e, K, last, next_pos, active, seqs, lengths,
                                                                    logits_processor, do_sample)
            out_tokens, n_emit = self._verify(e, slots, shallow, drafts, dprobs, num_draft, seqs, lengths,
                                              logits_processor, do_sample, seed, offset)
            offset += 1
            rounds += 1
            host = torch.cat([n_emit[:, None], out_tokens], 1).tolist()  # the one read-back per round
            eng.host_syncs += 1
            n_emit_host = [row[0] for row in host]
            ctl.update(e, n_emit - 1, num_draft)
            for b in range(B):
                if unfinished[b]:
                    accept_hist[n_emit_host[b] - 1] += 1
            appended = self._emit(out_tokens, [row[1:] for row in host], n_emit_host, seqs, lengths, unfinished,
                                  exit_rec, [e] * (K + 1), stop, max_new + P, streamer)
            self._rollback(slots, active, appended)
            idx = (n_emit - 1).clamp(min=0)[:, None]
            last = torch.where(active, out_tokens.gather(1, idx)[:, 0], torch.full_like(last, pad))
            next_pos = next_pos + n_emit

        if streamer is not None:
            streamer.end()
        T = max(lengths) - P
        exit_layers = torch.zeros(B, T, dtype=torch.long, device=device)
        for b in range(B):
            exit_layers[b, : len(exit_rec[b])] = torch.tensor(exit_rec[b], dtype=torch.long)
        stats = dict(host_syncs=eng.host_syncs, rounds=rounds, num_layers=L, accepted_histogram=accept_hist,
                     mean_accepted=sum(i * c for i, c in enumerate(accept_hist)) / max(1, sum(accept_hist)),
                     acceptance=dict(ctl.accept))
        return DecodeResult(seqs[:, : P + T], exit_layers, None, None, stats)

    def _draft(self, e, K, last, next_pos, active, seqs, lengths, processors, do_sample):
        """Feed ``last`` and up to K drafts through layers [0, e); returns what verification needs.

        Shape: last [B], next_pos [B] -> slots (list of K'+1 ints), shallow (K'+1 tensors [B, 1, d]),
        drafts (K' tensors [B]), draft_probs (K' tensors [B, V]), num_draft [B] (K' <= K).
        """
        a, eng = self.adapter, self.engine
        plan = StepPlan(tuple(range(min(e, a.num_layers))), frozenset())
        slots, shallow, drafts, dprobs = [], [], [], []
        num_draft = torch.zeros_like(next_pos)
        drafting = active.clone()
        tok = last
        for i in range(K + 1):
            slots.append(self._append(next_pos + i))
            h, _, _ = eng._run(a.embed(tok[:, None]), [slots[-1]], plan, None)
            shallow.append(h)
            if i == K:
                break
            prefix = [torch.stack(drafts, 1)[b] if drafts else seqs.new_empty(0) for b in range(len(lengths))]
            scores = self._process(processors, seqs, lengths, prefix, self._draft_logits(h[:, -1]))
            probs = torch.softmax(scores, -1)
            tok = torch.multinomial(probs, 1)[:, 0] if do_sample else scores.argmax(-1)
            if self.cfg.draft_stop > 0:  # Kangaroo's double exit: stop a row whose draft is unsure
                drafting &= probs.max(-1).values >= self.cfg.draft_stop
                eng.host_syncs += 1
                if not bool(drafting.any()):
                    break
            num_draft += drafting.long()
            drafts.append(tok)
            dprobs.append(probs)
        return slots, shallow, drafts, dprobs, num_draft

    def _verify(self, e, slots, shallow, drafts, dprobs, num_draft, seqs, lengths, processors, do_sample, seed,
                offset):
        """Layers [e, L) over every fed position in one pass, then accept on device.

        Returns out_tokens [B, K'+1] (-1 past each row's emitted tokens) and num_emitted [B].
        """
        a, L, B = self.adapter, self.adapter.num_layers, len(lengths)
        if e < L:
            deep, _, _ = self.engine._run(torch.cat(shallow, 1), slots, StepPlan(tuple(range(e, L)), frozenset()),
                                          None)
        else:
            deep = shallow[0]  # K = 0: a plain full-depth step
        target = a.logits(deep.flatten(0, 1)).view(B, deep.shape[1], -1)  # [B, K'+1, V]; 2-D: one head graph
        draft_t = torch.stack(drafts, 1) if drafts else num_draft.new_zeros(B, 0)
        scores = torch.stack([self._process(processors, seqs, lengths, [draft_t[b, :j] for b in range(B)],
                                            target[:, j]) for j in range(draft_t.shape[1] + 1)], 1)
        if not drafts:
            tokens = torch.multinomial(torch.softmax(scores[:, 0], -1), 1) if do_sample else scores[:, 0].argmax(-1, True)
            return tokens, torch.ones_like(num_draft)
        if do_sample:
            device = draft_t.device
            return ops.verify_sample(draft_t, num_draft, torch.stack(dprobs, 1), scores, torch.ones(B, device=device),
                                     seed.to(device), torch.tensor(offset, dtype=torch.long, device=device))
        return ops.verify_greedy(draft_t, num_draft, scores)

    def _rollback(self, slots, active, appended):
        """Slot j of the round holds draft j: it stays iff that draft was emitted and is not the row's last
        token (a stop may cut a row inside its accepted drafts); finished rows only fed padding. The slots no
        row kept are handed back by moving the cache length (the next round rewrites them at every layer before
        any query reads them); the others are masked for the rows that did not keep them."""
        cache = self.engine.cache
        keep = max(appended)
        cache.length = slots[0] + keep
        if all(n == keep for n in appended):
            return  # every row kept the same slots: nothing to mask, attention stays unmasked
        cache.all_valid = False
        kept = torch.tensor(appended, device=active.device)
        for j in range(keep):
            cache.token_valid[:, slots[j]] &= kept > j

    def _append(self, pos):
        cache = self.engine.cache
        slot = cache.length
        cache.append(torch.ones(pos.shape[0], 1, dtype=torch.bool, device=pos.device), pos[:, None])
        return slot

    def _stopper(self, criteria, seqs):
        """``stop(row, length, token)`` after a row grew to ``length`` with ``token``: :func:`host_stopper` where it
        applies, else transformers' criteria on the row's ids (written first; a device read-back per token)."""
        on_host = host_stopper(criteria)
        if on_host is not None:
            return lambda b, length, token: on_host(length, token)

        def on_device(b, length, token):
            seqs[b, length - 1] = token
            self.engine.host_syncs += 1
            return bool(criteria(seqs[b: b + 1, :length], None)[0])
        return on_device

    def _emit(self, tokens, toks, n_host, seqs, lengths, unfinished, exit_rec, layers, stop, max_len, streamer):
        """Append each row's emitted tokens (tokens [B, n] on the device, ``toks`` its host copy) one by one,
        asking ``stop`` (see :meth:`_stopper`) after each; a row's tokens reach ``seqs`` in one copy."""
        streamed, appended = [], [0] * len(lengths)
        for b in range(len(lengths)):
            if not unfinished[b]:
                continue
            start = lengths[b]
            for j in range(n_host[b]):
                appended[b] += 1
                lengths[b] += 1
                exit_rec[b].append(layers[j] if j < n_host[b] - 1 else self.adapter.num_layers)
                if b == 0:
                    streamed.append(toks[b][j])
                if lengths[b] >= max_len or stop(b, lengths[b], toks[b][j]):
                    unfinished[b] = False
                    break
            if appended[b]:
                seqs[b, start: lengths[b]] = tokens[b, : appended[b]]
        if streamer is not None and streamed and len(lengths) == 1:
            streamer.put(torch.tensor(streamed))
        return appended
