"""Draft sources: where the k candidate tokens of an exit predictor come from.

SpecEE's predictor (DESIGN.md, "Exit predictor") scores a layer by the logits of a few candidate
tokens for the position being decoded; a source proposes them. Every source answers the same calls:

    reset(batch_size)            a new generation
    feed(input_ids)              tokens entering the model: [B, P] prompt at prefill, then [B, 1] per step
    propose(hidden, adapter)     -> cand_ids [B, k] int64, once per step, after layer ``source.layer``
                                 (``layer is None``: before any layer; ``hidden`` is then None)

Sources, cheapest first (on SmolLM2-135M one layer costs about as much as 4,000 rows of the LM head):

- ``NGramSource``: prompt lookup (Saxena 2023; Fu et al. 2024 "lookahead"): the tokens that followed
  the longest recent match of the current suffix in the row's own prompt and answer, then a static
  successor table counted from data, then the most frequent tokens. No model work at all.
- ``ProbeSource``: a shallow exit: norm(h_p) of layer p times a reduced-vocabulary head (the N most
  frequent tokens' rows), top-k. Costs N/V of the LM head once per token.
- ``HybridSource``: the n-gram's matches first, the probe's top tokens to fill the k.
- ``EagleSource``: an EAGLE-style head (Li et al. 2024, arXiv 2401.15077): fc over [final hidden of the
  previous token, embedding of the current token], one decoder layer, the (reduced) LM head.
  Trainable with ``specee train --draft eagle``; about one decoder layer plus a head slice per token.

``recall_at_k`` and ``source_cost_ms`` measure them (bench/bench_predictors.py reports both).
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch

DRAFT_TYPES = ("ngram", "probe", "hybrid", "eagle")


# --------------------------------------------------------------------------------------------- helpers
def _fill(cands: list[int], extra, k: int) -> list[int]:
    """Append the tokens of ``extra`` not yet in ``cands`` until there are k."""
    for t in extra:
        if len(cands) >= k:
            break
        if t not in cands:
            cands.append(t)
    return cands


def frequent_tokens(token_ids: torch.Tensor, vocab_size: int, n: int) -> torch.Tensor:
    """The ``n`` most frequent ids of ``token_ids`` (ties: lowest id), padded with the lowest unseen ids.

    Shape: token_ids [N] -> [n] int64, most frequent first.
    """
    counts = torch.bincount(token_ids.flatten().long(), minlength=vocab_size).double()
    # NOTE: subtracting a tiny id-proportional term makes the order of equal counts deterministic.
    key = counts - torch.arange(vocab_size, dtype=torch.float64) / (2.0 * vocab_size)
    return key.topk(min(n, vocab_size)).indices


def successor_table(sequences: list[list[int]], vocab_ids: torch.Tensor, k: int) -> torch.Tensor:
    """For each token of ``vocab_ids``, its k most frequent successors in ``sequences`` (-1 pads).

    Shape: -> [len(vocab_ids), k] int64.
    """
    row_of = {int(t): i for i, t in enumerate(vocab_ids.tolist())}
    counts = [defaultdict(int) for _ in range(len(row_of))]
    for seq in sequences:
        for a, b in zip(seq[:-1], seq[1:]):
            r = row_of.get(a)
            if r is not None:
                counts[r][b] += 1
    table = torch.full((len(row_of), k), -1, dtype=torch.long)
    for r, c in enumerate(counts):
        best = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        for j, (t, _) in enumerate(best):
            table[r, j] = t
    return table


class DraftSource:
    """Base class; see the module docstring for the protocol."""

    type = "base"
    layer: int | None = None

    def __init__(self, k: int = 4):
        if k < 1:
            raise ValueError(f"a draft source needs k >= 1 candidates, got k={k}.")
        self.k = k

    def reset(self, batch_size: int):
        self.batch_size = batch_size

    def feed(self, input_ids: torch.Tensor):
        pass

    def propose(self, hidden, adapter) -> torch.Tensor:
        raise NotImplementedError

    # save/load: a JSON-able config and named tensors
    def config(self) -> dict:
        return {"type": self.type, "k": self.k, "layer": self.layer}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def to(self, device):
        for name, t in self.tensors().items():
            setattr(self, name, t.to(device))
        return self


# ------------------------------------------------------------------------------------------------ n-gram
class NGramSource(DraftSource):
    """Prompt lookup over each row's history, then a successor table, then frequent tokens.

    Parameters
    ----------
    k : int
    max_ngram : int
        Longest suffix matched (tried from ``max_ngram`` down to 1, most recent match first).
    fallback : LongTensor [F], optional
        Frequent tokens that pad the candidates when the lookup finds fewer than k.
    succ_ids, succ_table : LongTensor [S], [S, k'], optional
        Static successor table (``successor_table``): the usual next tokens of frequent tokens.
    """

    type = "ngram"

    def __init__(self, k: int = 4, max_ngram: int = 3, fallback=None, succ_ids=None, succ_table=None):
        super().__init__(k)
        self.max_ngram = max_ngram
        self.fallback = torch.zeros(0, dtype=torch.long) if fallback is None else fallback.long()
        self.succ_ids = torch.zeros(0, dtype=torch.long) if succ_ids is None else succ_ids.long()
        self.succ_table = torch.zeros(0, k, dtype=torch.long) if succ_table is None else succ_table.long()
        self._fallback = self.fallback.tolist()
        self._succ = {int(t): [x for x in row if x >= 0] for t, row in zip(self.succ_ids.tolist(),
                                                                         self.succ_table.tolist())}
        self.reset(1)

    def reset(self, batch_size):
        super().reset(batch_size)
        self.history = [[] for _ in range(batch_size)]
        # index[b][n-gram tuple] -> next tokens seen after it, most recent last
        self.index = [defaultdict(list) for _ in range(batch_size)]

    def _append(self, b: int, token: int):
        h, idx = self.history[b], self.index[b]
        for n in range(1, self.max_ngram + 1):
            if len(h) >= n:
                idx[tuple(h[-n:])].append(token)
        h.append(token)

    def feed(self, input_ids):
        for b, row in enumerate(input_ids.tolist()):
            for t in row:
                self._append(b, t)

    def lookup(self, b: int) -> list[int]:
        """Candidates of row b from its own history only (may be fewer than k)."""
        h, idx, out = self.history[b], self.index[b], []
        for n in range(min(self.max_ngram, len(h)), 0, -1):
            nexts = idx.get(tuple(h[-n:]))
            if nexts:
                _fill(out, reversed(nexts), self.k)
                if len(out) >= self.k:
                    break
        return out

    def candidates(self, b: int) -> list[int]:
        out = self.lookup(b)
        if len(out) < self.k and self.history[b]:
            _fill(out, self._succ.get(self.history[b][-1], ()), self.k)
        _fill(out, self._fallback, self.k)
        _fill(out, range(2 * self.k), self.k)
        return out

    def propose(self, hidden, adapter):
        device = adapter.device if adapter is not None else "cpu"
        return torch.tensor([self.candidates(b) for b in range(self.batch_size)], dtype=torch.long, device=device)

    def config(self):
        return {**super().config(), "max_ngram": self.max_ngram}

    def tensors(self):
        return {"fallback": self.fallback, "succ_ids": self.succ_ids, "succ_table": self.succ_table}

    def to(self, device):
        return self  # host-side tables


# ------------------------------------------------------------------------------------------------- probe
class ProbeSource(DraftSource):
    """Top-k of a reduced-vocabulary LM head on the final-normed hidden state of a shallow layer.

    Parameters
    ----------
    layer : int
        0-based layer whose output is probed.
    vocab_ids : LongTensor [N], optional
        Rows of the LM head to score (the most frequent tokens); None scores the whole vocabulary.
    """

    type = "probe"

    def __init__(self, layer: int, k: int = 4, vocab_ids=None):
        super().__init__(k)
        self.layer = int(layer)
        self.vocab_ids = None if vocab_ids is None else vocab_ids.long()
        self._rows = None  # [N, d] head rows, built on first use on the model's device and dtype

    def rows(self, adapter) -> torch.Tensor:
        w = adapter.lm_head.weight
        if self._rows is None or self._rows.device != w.device or self._rows.dtype != w.dtype:
            self._rows = w.detach() if self.vocab_ids is None else w.detach()[self.vocab_ids.to(w.device)].contiguous()
        return self._rows

    def topk(self, normed: torch.Tensor, adapter) -> torch.Tensor:
        """normed [B, d] (after the final norm) -> [B, k] token ids."""
        top = (normed @ self.rows(adapter).T).topk(self.k, dim=-1).indices
        if self.vocab_ids is None:
            return top
        return self.vocab_ids.to(top.device)[top]

    def propose(self, hidden, adapter):
        return self.topk(adapter.final_norm(hidden), adapter)

    def config(self):
        return {**super().config(), "vocab": None if self.vocab_ids is None else int(self.vocab_ids.numel())}

    def tensors(self):
        return {} if self.vocab_ids is None else {"vocab_ids": self.vocab_ids}

    def to(self, device):
        self._rows = None
        if self.vocab_ids is not None:
            self.vocab_ids = self.vocab_ids.to(device)
        return self


class HybridSource(DraftSource):
    """The n-gram lookup's matches first, then the probe's top tokens, k in all."""

    type = "hybrid"

    def __init__(self, ngram: NGramSource, probe: ProbeSource):
        super().__init__(probe.k)
        self.ngram, self.probe, self.layer = ngram, probe, probe.layer

    def reset(self, batch_size):
        super().reset(batch_size)
        self.ngram.reset(batch_size)

    def feed(self, input_ids):
        self.ngram.feed(input_ids)

    def propose(self, hidden, adapter):
        top = self.probe.topk(adapter.final_norm(hidden), adapter)  # [B, k]
        return merge_candidates([self.ngram.lookup(b) for b in range(self.batch_size)], top, self.k)

    def config(self):
        return {"type": self.type, "k": self.k, "layer": self.layer, "ngram": self.ngram.config(),
                "probe": self.probe.config()}

    def tensors(self):
        return {**{f"ngram.{n}": t for n, t in self.ngram.tensors().items()},
                **{f"probe.{n}": t for n, t in self.probe.tensors().items()}}

    def to(self, device):
        self.probe.to(device)
        return self


def merge_candidates(first: list[list[int]], fill: torch.Tensor, k: int) -> torch.Tensor:
    """Per row: the ids of ``first[b]`` (at most k - 1 of them), then ``fill[b]``'s not yet taken, k in all.

    NOTE: the probe's top-1 always keeps a slot, so a hybrid never does worse than an n-gram hit
    pushing out the shallow layer's favourite.
    """
    rows = fill.tolist()
    out = []
    for b, f in enumerate(rows):
        c = list(first[b][: k - 1]) if first[b] else []
        if f and f[0] not in c:
            c = c[: k - 1] + [f[0]]
        out.append(_fill(c, f, k))
    return torch.tensor(out, dtype=torch.long, device=fill.device)


# ------------------------------------------------------------------------------------------------- EAGLE
class EagleHead(torch.nn.Module):
    """fc([h_prev, emb(x)]) -> one Llama decoder layer -> final norm -> (reduced) LM head.

    ``h_prev`` is the final hidden state (before the final norm) of the previous position and ``x`` the
    current token; the output scores the next token. The embeddings, norm and head are the target's
    (passed in, not owned), as in EAGLE.

    Shape: forward(h_prev [B, T, d], emb [B, T, d]) -> features [B, T, d] (before the final norm).
    """

    def __init__(self, config):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        d = config.hidden_size
        self.fc = torch.nn.Linear(2 * d, d, bias=True)
        cfg = type(config).from_dict(config.to_dict())
        cfg._attn_implementation = "sdpa"
        self.layer = LlamaDecoderLayer(cfg, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(cfg)

    def forward(self, h_prev, emb, position_ids=None):
        x = self.fc(torch.cat([h_prev, emb], dim=-1))
        B, T, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device)[None].expand(B, T)
        rope = self.rotary(x, position_ids=position_ids)
        mask = torch.full((T, T), float("-inf"), device=x.device, dtype=x.dtype).triu(1)[None, None]
        out = self.layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=rope)
        return out[0] if isinstance(out, tuple) else out


class EagleSource(DraftSource):
    """Candidates from a trained ``EagleHead`` (teacher-forced: ``propose_sequence``).

    Online it needs the previous token's final hidden state, which an early-exit step never computes
    (its token left the stack early): the step's last hidden state stands in for it, as in SpecEE.
    """

    type = "eagle"

    def __init__(self, head: EagleHead, k: int = 4, vocab_ids=None):
        super().__init__(k)
        self.head = head.eval()
        self.vocab_ids = None if vocab_ids is None else vocab_ids.long()
        self._probe = ProbeSource(0, k, self.vocab_ids)

    @torch.no_grad()
    def propose_sequence(self, h_prev, token_ids, adapter) -> torch.Tensor:
        """Teacher-forced candidates for every position: h_prev [B, T, d], token_ids [B, T] -> [B, T, k]."""
        feats = self.head(h_prev, adapter.embed(token_ids))
        normed = adapter.final_norm(feats)
        B, T, d = normed.shape
        return self._probe.topk(normed.reshape(B * T, d), adapter).reshape(B, T, self.k)

    def propose(self, hidden, adapter):
        raise NotImplementedError("EagleSource is measured teacher-forced (recall_at_k, source_cost_ms); "
                                  "online use needs the previous step's hidden state, which the early-exit "
                                  "interface does not pass yet: use the 'ngram', 'probe' or 'hybrid' source.")

    def config(self):
        return {**super().config(), "vocab": None if self.vocab_ids is None else int(self.vocab_ids.numel())}

    def tensors(self):
        t = {f"head.{n}": p.detach() for n, p in self.head.state_dict().items()}
        if self.vocab_ids is not None:
            t["vocab_ids"] = self.vocab_ids
        return t


# ------------------------------------------------------------------------------------------ build / save
def build_source(config: dict, tensors: dict[str, torch.Tensor], model_config=None) -> DraftSource:
    """Rebuild a source from ``DraftSource.config()`` and ``tensors()`` (as saved by predictors.save)."""
    kind, k = config.get("type"), int(config.get("k", 4))
    if kind == "ngram":
        return NGramSource(k, config.get("max_ngram", 3), tensors.get("fallback"), tensors.get("succ_ids"),
                           tensors.get("succ_table"))
    if kind == "probe":
        return ProbeSource(config["layer"], k, tensors.get("vocab_ids"))
    if kind == "hybrid":
        sub = lambda p: {n[len(p) + 1:]: t for n, t in tensors.items() if n.startswith(p + ".")}  # noqa: E731
        return HybridSource(build_source(config["ngram"], sub("ngram")), build_source(config["probe"], sub("probe")))
    if kind == "eagle":
        if model_config is None:
            raise ValueError("rebuilding an EAGLE draft head needs the target model's config.")
        head = EagleHead(model_config)
        head.load_state_dict({n[5:]: t for n, t in tensors.items() if n.startswith("head.")})
        return EagleSource(head, k, tensors.get("vocab_ids"))
    raise ValueError(f"unknown draft source type {kind!r}; choose one of {', '.join(DRAFT_TYPES)}.")


# ---------------------------------------------------------------------------------------- measurement
def recall_at_k(cand_ids: torch.Tensor, target_ids: torch.Tensor) -> float:
    """Fraction of positions whose target token is among the candidates. cand_ids [N, k], target_ids [N]."""
    if target_ids.numel() == 0:
        return float("nan")
    return (cand_ids == target_ids[:, None]).any(-1).float().mean().item()


@torch.no_grad()
def source_cost_ms(source: DraftSource, adapter, batch_size: int = 1, history: int = 256, repeats: int = 50,
                   seed: int = 0) -> float:
    """Median milliseconds of one ``propose`` (plus the ``feed`` of one token) at a given history length."""
    g = torch.Generator().manual_seed(seed)
    V, d = adapter.shape.vocab_size, adapter.shape.hidden_size
    source.reset(batch_size)
    source.feed(torch.randint(0, min(V, 500), (batch_size, history), generator=g).to(adapter.device))
    hidden = torch.randn(batch_size, d, generator=g).to(adapter.device, adapter.dtype)
    tok = torch.randint(0, min(V, 500), (batch_size, 1), generator=g).to(adapter.device)
    times = []
    for i in range(repeats + 3):
        t = time.perf_counter()
        source.feed(tok)
        source.propose(hidden, adapter)
        if i >= 3:
            times.append(time.perf_counter() - t)
    times.sort()
    return 1e3 * times[len(times) // 2]
