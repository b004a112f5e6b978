"""Calibration of the exit thresholds and the decode-loop simulation it rests on.

Learn-then-Test (Angelopoulos et al. 2021, arXiv 2110.01052; CALM, Schuster et al. 2022): a family of
per-layer thresholds ordered from conservative to aggressive is tested in that order on held-out
tokens, each member with a binomial p-value for "exit precision < target"; the most aggressive
member that passes holds precision >= target with probability >= 1 - delta (tokens exchangeable with
the calibration tokens). ``simulate`` replays the engine's exit rule (contextual schedule,
confirmation) over teacher-forced tokens and prices it in layer units (``measure_costs``).
"""
from __future__ import annotations

import math
import time

import torch

from .drafts import DraftSource
from .models import DecoderAdapter
from .predictors import schedule_rows


def binom_cdf(x: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= x), exact (log-space sum)."""
    if n == 0 or x >= n:
        return 1.0
    if x < 0:
        return 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
            + (n - i) * math.log1p(-p) for i in range(x + 1)]
    m = max(logs)
    return min(1.0, math.exp(m) * sum(math.exp(v - m) for v in logs))


def precision_lower_bound(errors: int, n: int, delta: float) -> float:
    """Clopper-Pearson one-sided lower confidence bound on the precision (1 - error rate) at level 1 - delta."""
    if n == 0:
        return 0.0
    lo, hi = 0.0, 1.0  # bisection on the error rate r: largest r with P(Bin(n, r) <= errors) >= delta
    for _ in range(60):
        mid = (lo + hi) / 2
        if binom_cdf(errors, n, mid) >= delta:
            lo = mid
        else:
            hi = mid
    return 1.0 - lo


def ltt_select(candidates, target_precision: float, delta: float):
    """Learn-then-Test fixed-sequence selection.

    ``candidates``: a list, from conservative to aggressive, of (exits, errors) or None for a member
    that never exits (decided without the calibration data). Hypothesis j: the
    precision of candidate j is below ``target_precision``; its p-value is P(Bin(exits, 1 - target) <=
    errors). Reject in order while p <= delta; returns the index of the last rejected one (-1: none),
    so that P(precision of the choice < target) <= delta.
    """
    alpha = 1.0 - target_precision
    chosen = -1
    for j, cand in enumerate(candidates):
        if cand is None:
            continue  # a member that cannot exit (all thresholds 1.0, known before calibration): no hypothesis
        n, e = cand
        if binom_cdf(e, n, alpha) <= delta:
            chosen = j
        else:
            break
    return chosen


def thresholds_for_precision(scores, confirmable, correct, q: float, min_exits: int = 20) -> float:
    """Lowest threshold t whose exits {score > t, confirmable} have precision >= q (and >= min_exits of them).

    Only cuts between distinct scores are considered, so the exit set is exactly {score > t}. 1.0 if none.
    """
    s, c = scores[confirmable], correct[confirmable].float()
    if len(s) < min_exits:
        return 1.0
    order = s.argsort(descending=True)
    s, c = s[order], c[order]
    n = torch.arange(1, len(s) + 1)
    prec = c.cumsum(0) / n
    nxt = torch.cat([s[1:], s.new_zeros(1)])
    cut_ok = torch.cat([s[:-1] > s[1:], torch.tensor([True])])  # a strict drop after position j
    ok = (prec >= q) & (n >= min_exits) & cut_ok
    idx = torch.nonzero(ok).flatten()
    if len(idx) == 0:
        return 1.0
    return float(nxt[int(idx[-1])])


def simulate(data, layers, always, scores, thresholds, window, offsets, confirm="logits", costs=None):
    """Run the decode loop's exit rule over teacher-forced tokens, sequence by sequence.

    Returns dict(exit [N] 0-based (L-1 = no exit), exited [N], correct [N], evals, fires, cost per token
    in layer units, speedup over full). ``scores`` from ``dense_scores``.
    """
    L = data["argmax"].shape[1]
    li = {l: i for i, l in enumerate(layers)}
    th = torch.tensor([thresholds[l] for l in layers])
    fire_all = scores > th[None, :, None]  # [N, nL, nL+1]
    am, final, cands = data["argmax"].long(), data["final"].long(), data["cands"]
    confirmable = (cands[:, None, :] == am[:, :, None]).any(-1)  # [N, L]
    top_cand = cands.gather(1, data["cand_logits"].argmax(-1))  # [N, L]
    seq = data["seq"].tolist()
    N = len(seq)
    exit_l = torch.full((N,), L - 1, dtype=torch.long)
    correct = torch.ones(N, dtype=torch.bool)
    exited = torch.zeros(N, dtype=torch.bool)
    evals = fires = 0
    hist, prev_seq = [], None
    fire_list = fire_all.tolist()
    conf_l, cor_l, top_l = confirmable.tolist(), (am == final[:, None]).tolist(), (top_cand == final[:, None]).tolist()
    for i in range(N):
        if seq[i] != prev_seq:
            hist, prev_seq = [], seq[i]
        s = sorted(schedule_rows([hist[-window:] if window else []], always, layers, offsets)[0])
        prev = 0
        for l in s:
            evals += 1
            if fire_list[i][li[l]][prev]:
                fires += 1
                if confirm == "none":
                    exit_l[i], exited[i], correct[i] = l, True, top_l[i][l]
                    break
                if conf_l[i][l]:
                    exit_l[i], exited[i], correct[i] = l, True, cor_l[i][l]
                    break
            prev = li[l] + 1
        hist.append(int(exit_l[i]))
    out = dict(exit=exit_l, exited=exited, correct=correct, evals=evals, fires=fires)
    if costs is not None:
        head, pred, draft = costs["head"], costs["predictor"], costs.get("draft", 0.0)
        layers_run = (exit_l + 1).float().sum().item()
        confirm_heads = 0 if confirm == "none" else fires  # a fire runs the head; at an exit it is the logits
        final_heads = int((~exited).sum())
        total = layers_run + evals * pred + confirm_heads * head + final_heads * head + N * draft
        out["cost"] = total / max(1, N)
        out["speedup"] = (L + head) / out["cost"] if N else 1.0
    return out


def summarize(sim, L) -> dict:
    n = int(sim["exited"].sum())
    err = int((sim["exited"] & ~sim["correct"]).sum())
    return dict(exit_rate=float(sim["exited"].float().mean()), exits=n, errors=err,
                precision=(1 - err / n) if n else 1.0, mean_exit_layer=float((sim["exit"] + 1).float().mean()),
                speedup=sim.get("speedup"), cost_layers=sim.get("cost"))


def oracle_bound(oracle: torch.Tensor, L: int, head: float) -> float:
    """Speedup of exiting every token at its oracle layer with no predictor cost: (L + head) / (mean exit + head)."""
    return (L + head) / ((oracle + 1).float().mean().item() + head)


@torch.no_grad()
def measure_costs(model, draft: DraftSource | None = None, repeats: int = 30, tokens: int = 12) -> dict:
    """The LM head, one predictor evaluation and the draft, in units of one decoder layer.

    A layer is (one full-mode decode step - one LM head) / L, from specee's own decode loop, so the
    units are what an exit saves. Medians (head, predictor kernel, draft) and minima (decode) of repeats.
    ``predictor`` is what an evaluated layer costs the engine's decode (:func:`evaluation_cost_s`: the op, its
    read-back, the bookkeeping), ``predictor_kernel`` the op alone.
    """
    from . import ops
    from .drafts import source_cost_ms
    from .generate import generate

    a = DecoderAdapter(model)
    d, L = a.shape.hidden_size, a.num_layers
    x = torch.randn(1, d, device=a.device, dtype=a.dtype)

    def med(fn, n=repeats):
        ts = []
        for i in range(n + 2):
            t = time.perf_counter()
            fn()
            if i >= 2:
                ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2]

    ids = torch.arange(3, 11, device=a.device)[None]
    gen = lambda n, **kw: generate(model, ids, max_new_tokens=n, do_sample=False, pad_token_id=0,  # noqa: E731
                                   eos_token_id=None, min_new_tokens=n, **kw)
    def once(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    gen(2)  # warm-up
    step = min((once(lambda: gen(tokens + 1)) - once(lambda: gen(1))) / tokens for _ in range(3))
    head = med(lambda: a.logits(x))
    layer = max(step - head, 1e-9) / L
    k, H = 4, 128
    c = torch.zeros(1, k, dtype=torch.long, device=a.device)
    w = [t.to(a.device) for t in (torch.zeros(H, 3 * k), torch.zeros(H), torch.zeros(H), torch.zeros(1))]
    prev = torch.full((1, k), 0.25, device=a.device)
    kernel = med(lambda: ops.exit_predict(x, a.norm.weight, a.shape.rms_eps, a.lm_head.weight, c, prev, *w, 0.5))
    evaluation = evaluation_cost_s(model, gen, 2 * tokens)
    out = dict(layer_ms=1e3 * layer, step_ms=1e3 * step, head=head / layer, predictor=evaluation / layer,
               predictor_kernel=kernel / layer)
    if draft is not None:
        out["draft"] = source_cost_ms(draft, a, repeats=repeats) / (1e3 * layer)
    return out


class _FreeDraft(DraftSource):
    """Candidates 0..k-1 at no cost: what an evaluated layer costs, apart from the draft."""

    type = "free"

    def propose(self, hidden, adapter):
        return torch.arange(self.k, device=hidden.device).expand(hidden.shape[0], self.k)


def evaluation_cost_s(model, gen, tokens: int, k: int = 4, hidden: int = 128, repeats: int = 4) -> float:
    """Seconds one evaluated layer adds to a decode step, as the engine runs it: the predictor op, its read-back,
    the bookkeeping (and, where ``gen`` compiles, one more graph call, as the stack splits there). Decodes ``tokens`` tokens with ``early_exit`` and a bank
    that evaluates every layer from the middle and never fires (score 0.5 under threshold 0.9), against ``full``
    over the same tokens (``gen(n, **kw)`` decodes n tokens); the op alone is a small part of it."""
    from .predictors import PredictorBank

    L = model.config.num_hidden_layers
    layers = list(range(L // 2, L - 1))
    dev = next(model.parameters()).device
    zero = {l: tuple(torch.zeros(*shape, device=dev) for shape in ((hidden, 3 * k), (hidden,), (hidden,), (1,)))
            for l in layers}
    bank = PredictorBank(zero, 0.9, _FreeDraft(k), always=layers)
    ee = dict(mode="early_exit", exit_config=dict(predictor=bank))

    def once(**kw):
        t = time.perf_counter()
        gen(tokens + 1, **kw)
        return time.perf_counter() - t

    once(**ee)  # warm-up
    runs = [(once(**ee), once()) for _ in range(repeats)]  # interleaved; the fastest of each, as for the decode
    extra = min(r[0] for r in runs) - min(r[1] for r in runs)
    evaluations = tokens * len(layers)  # every decode step evaluates every layer of the bank
    if bank.stats["evaluations"] != evaluations:
        raise RuntimeError(f"the cost probe evaluated {bank.stats['evaluations']} layers, expected {evaluations}")
    return max(extra, 0.0) / evaluations
