"""Training the predictor bank: collection, training, calibration, layer selection (`specee train`).

1. **Generate** greedy continuations at full depth (chunks of prompts, one file each: resumable).
2. **Collect** teacher-forced, per generated token: each layer's normed argmax (the label: it equals
   the final argmax), the draft source's k candidates and their logits at every layer (k rows of the
   head), streamed to disk per chunk. Tables the drafts need (frequent tokens, successors) come from
   the training split's generations between the two passes.
3. **Select layers** offline from the oracle-exit distribution (the first layer whose argmax equals
   the final one): predictors where oracle exits lie, always-on layers where most of them lie.
4. **Train** one MLP per layer (class-balanced BCE, Adam, early stopping on a validation split) on
   the (layer, previously evaluated layer) pairs that decoding evaluates together: the gap feature is
   the change since the row's previous evaluated layer, under the contextual schedule.
5. **Calibrate** with Learn-then-Test (Angelopoulos et al. 2021, arXiv 2110.01052; CALM, Schuster et
   al. 2022): a one-parameter family of per-layer thresholds, tested from conservative to aggressive
   on held-out sequences by simulating the decode loop, each with a binomial p-value for "exit
   precision < target"; the most aggressive member that passes holds precision >= target with
   probability >= 1 - delta (tokens treated as exchangeable). A requested speed picks instead the most
   conservative member that reaches it, and reports its certified precision.

Prompts are split by sequence into train (70%), validation (10%) and calibration (20%), seeded.
Collection lives in ``specee.collect``, calibration and the decode-loop simulation in ``specee.calibrate``.

Determinism: with the same prompts, seed, options, thread count and pinned costs (the measured costs
of the LM head, a predictor and the draft move with machine load and steer the always-on layers), two
runs give the same bank bit for bit. The shipped bank (specee/data/predictors) is reproduced, from a
checkout beside ../shared, on the CPU (45-65 min at 1 thread: generation and collection; ~2 min from the
``--work`` cache) by::

    SPECEE_CACHE=/tmp/specee_cache specee train \
        --prompts '../shared/data/gsm8k_train_questions.jsonl[:128]' '../shared/data/spec_bench_dev.jsonl[0::2]' \
        --threads 1 --head-cost 4.5 --predictor-cost 0.03 --draft-cost 0.01 \
        --work /tmp/specee_collect --out /tmp/specee_bank --check shipped

``--check DIR`` (or ``shipped``) compares the result with a saved bank (``predictors.compare_banks``:
structure, thresholds of every operating point, every tensor, training metrics) and fails listing the
differences; ``--check-atol`` allows a tolerance. To regenerate the shipped bank, give
``--out specee/data/predictors`` instead (keep ``--work`` outside the package).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .calibrate import (ltt_select, measure_costs, oracle_bound, precision_lower_bound, simulate, summarize,
                        thresholds_for_precision)
from .collect import _progress, collect_chunks, generate_chunks, oracle_exits, split_sequences, subset
from .drafts import (DRAFT_TYPES, DraftSource, HybridSource, NGramSource, ProbeSource, frequent_tokens,
                     recall_at_k, successor_table)
from .models import DecoderAdapter
from .predictors import (PredictorBank, _head_sample, compare_banks, features_from_logits, model_fingerprint,
                         schedule_rows)

# The family's members, conservative -> aggressive: per-layer thresholds reaching precision q on the training
# split. Fixed-sequence testing pays nothing for a fine grid.
PRECISION_GRID = (0.9999, 0.9998, 0.9995, 0.999, 0.998, 0.997, 0.996, 0.995, 0.994, 0.993, 0.992, 0.991, 0.99,
                  0.988, 0.986, 0.984, 0.982, 0.98, 0.978, 0.975, 0.97, 0.965, 0.96, 0.955, 0.95, 0.94, 0.93, 0.92,
                  0.91, 0.9, 0.88, 0.86, 0.84, 0.82, 0.8, 0.75, 0.7)


@dataclass
class TrainConfig:
    max_new_tokens: int = 64
    batch_size: int = 8
    chunk_prompts: int = 16
    seed: int = 0
    k: int = 4
    draft: str = "ngram"
    probe_layer: int | None = None      # default: L // 3
    vocab: int = 8192                   # reduced head rows of the probe
    hidden: int = 128                   # MLP width (SpecEE: 512)
    first_layer: int | None = None      # lowest predictor layer (default: see select_layers)
    num_always: int | None = None       # always-on layers (default: chosen by simulation among 2..8)
    window: int = 5
    offsets: tuple = (-2, 0, 2)
    confirm: str = "logits"
    target_precision: float = 0.98
    target_speedup: float | None = None
    delta: float = 0.1
    epochs: int = 40
    head_cost: float | None = None      # LM head / one layer (default: measured)
    predictor_cost: float | None = None  # one evaluated layer's predictor / one layer (default: measured)
    draft_cost: float | None = None     # the draft source per token / one layer (default: measured)
    splits: tuple = (0.7, 0.1, 0.2)
    eagle: bool = False                 # also train an EAGLE-style draft head (saved beside, measured, not shipped)
    eagle_epochs: int = 2
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ prompts
def parse_prompt_spec(spec: str):
    """``path`` or ``path[start:stop:step]`` -> (path, slice)."""
    m = re.fullmatch(r"(.*?)\[(-?\d*):?(-?\d*)(?::(-?\d*))?\]", spec)
    if not m:
        return spec, slice(None)
    num = lambda s: int(s) if s else None  # noqa: E731
    return m.group(1), slice(num(m.group(2)), num(m.group(3)), num(m.group(4)))


def load_prompt_specs(specs) -> list[str]:
    from .prompts import load_prompts

    out = []
    for spec in specs:
        path, sl = parse_prompt_spec(spec)
        out += [p.text for p in load_prompts(path)[sl]]
    if not out:
        raise ValueError(f"no prompts in {list(specs)}; give JSONL files with 'prompt', 'turns' or 'question'.")
    return out


# ------------------------------------------------------------------------------------------- drafts
def build_draft(kind: str, seqs: list[dict], vocab_size: int, num_layers: int, cfg: TrainConfig) -> DraftSource:
    """A draft source whose tables (frequent tokens, successors) come from the training generations."""
    if kind not in DRAFT_TYPES or kind == "eagle":
        raise ValueError(f"draft {kind!r} cannot back the predictor bank; choose ngram, probe or hybrid "
                         "(the EAGLE head is trained and measured by bench/bench_predictors.py).")
    toks = torch.tensor([t for s in seqs for t in s["gen"]] or [0], dtype=torch.long)
    freq = frequent_tokens(toks, vocab_size, cfg.vocab)
    probe_layer = cfg.probe_layer if cfg.probe_layer is not None else num_layers // 3
    ngram = NGramSource(cfg.k, 3, freq[:64], freq[:4096], successor_table([s["prompt"] + s["gen"] for s in seqs],
                                                                           freq[:4096], cfg.k))
    if kind == "ngram":
        return ngram
    probe = ProbeSource(probe_layer, cfg.k, freq)
    return probe if kind == "probe" else HybridSource(ngram, probe)


# ----------------------------------------------------------------------------------------- 3. layer selection
def select_layers(oracle: torch.Tensor, num_layers: int, first_layer: int | None = None, num_always: int = 4,
                  min_layer: int = 0, agree: torch.Tensor | None = None, min_agree: float = 0.1):
    """Predictor layers and always-on layers from the oracle-exit distribution.

    Predictors sit from ``first_layer`` to the second-to-last layer. By default ``first_layer`` is the
    first layer whose normed argmax agrees with the final one for ``min_agree`` of the tokens (``agree``
    [L], a fraction per layer) or, without ``agree``, where the oracle distribution reaches its 2nd
    percentile; never below ``min_layer``. The always-on layers are the ``num_always`` layers with the
    most oracle exits among them (SpecEE's offline choice).
    """
    hist = torch.bincount(oracle.long(), minlength=num_layers).float()
    if first_layer is None:
        if agree is not None:
            first_layer = int(torch.nonzero(agree >= min_agree).flatten()[0]) if (agree >= min_agree).any() else 0
        else:
            cdf = hist.cumsum(0) / hist.sum().clamp_min(1)
            first_layer = int((cdf < 0.02).sum())
    first_layer = max(min_layer, min(first_layer, num_layers - 2))
    layers = list(range(first_layer, num_layers - 1))
    order = sorted(layers, key=lambda l: (-float(hist[l]), l))
    return layers, sorted(order[:max(1, num_always)]), hist


# ---------------------------------------------------------------------------------------------- 4. training
def schedule_pairs(data, layers, always, window, offsets, exits=None):
    """(token index, layer, previous evaluated layer or -1) for every evaluation the schedule makes.

    ``exits`` [N] (0-based) drives the contextual part; default: the oracle exits.
    """
    exits = oracle_exits(data) if exits is None else exits
    L = data["argmax"].shape[1]
    ex = torch.where(exits < torch.tensor(layers[-1] + 1), exits, torch.full_like(exits, L - 1)).tolist()
    seq, pos = data["seq"].tolist(), data["pos"].tolist()
    out, hist, prev_seq = [], [], None
    for i in range(len(seq)):
        if seq[i] != prev_seq:
            hist, prev_seq = [], seq[i]
        s = sorted(schedule_rows([hist[-window:] if window else []], always, layers, offsets)[0])
        for j, l in enumerate(s):
            out.append((i, l, s[j - 1] if j else -1))
        hist.append(ex[i])
    return torch.tensor(out, dtype=torch.long).reshape(-1, 3)


def pair_features(data, pairs, k):
    """Features and labels of (token, layer, prev) pairs. -> feats [M, 3k], label [M] bool, confirmable [M]."""
    t, l, p = pairs.unbind(1)
    logits = data["cand_logits"][t, l].float()
    prev = torch.full((len(t), k), 1.0 / k)
    has = p >= 0
    if has.any():
        prev[has] = torch.softmax(data["cand_logits"][t[has], p[has]].float(), -1)
    feats, _ = features_from_logits(logits, prev)
    am = data["argmax"][t, l].long()
    confirmable = (data["cands"][t] == am[:, None]).any(-1)
    correct = am == data["final"][t]
    return feats, correct & confirmable, confirmable, correct


def top_candidate_correct(data, pairs):
    """[M] bool: the candidate with the highest layer-l logit is the final token."""
    t, l = pairs[:, 0], pairs[:, 1]
    best = data["cand_logits"][t, l].argmax(-1, keepdim=True)
    return data["cands"][t].gather(1, best)[:, 0] == data["final"][t]


def train_mlp(x, y, xv, yv, hidden: int, epochs: int, seed: int, lr: float = 3e-3, batch: int = 512):
    """One predictor: class-balanced BCE, Adam, early stopping on validation loss (patience 4).

    Features are standardized for training and the scaling is folded into w1, b1, so the saved MLP
    takes the raw features (as ops.exit_predict does). Returns (w1 [H, 3k], b1 [H], w2 [H], b2 [1]), info.
    """
    g = torch.Generator().manual_seed(seed)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-4)
    fc1 = torch.nn.Linear(x.shape[1], hidden)
    fc2 = torch.nn.Linear(hidden, 1)
    with torch.no_grad():
        for p in (*fc1.parameters(), *fc2.parameters()):
            p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=g) / math.sqrt(p.shape[-1]))
    net = torch.nn.Sequential(fc1, torch.nn.ReLU(), fc2)
    pos = y.float().mean().clamp(1e-3, 1 - 1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(1 - pos) / pos)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    xs, xvs = (x - mu) / sd, (xv - mu) / sd
    best, best_state, bad = float("inf"), None, 0
    for epoch in range(epochs):
        perm = torch.randperm(len(xs), generator=g)
        for i in range(0, len(xs), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            loss_fn(net(xs[idx]).squeeze(-1), y[idx].float()).backward()
            opt.step()
        with torch.no_grad():
            v = loss_fn(net(xvs).squeeze(-1), yv.float()).item() if len(xvs) else -epoch
        if v < best - 1e-4:
            best, best_state, bad = v, [p.detach().clone() for p in net.parameters()], 0
        else:
            bad += 1
            if bad >= 4:
                break
    with torch.no_grad():
        for p, b in zip(net.parameters(), best_state):
            p.copy_(b)
        w1 = fc1.weight / sd
        b1 = fc1.bias - (fc1.weight * (mu / sd)).sum(1)
        mlp = tuple(t.detach().clone().contiguous() for t in (w1, b1, fc2.weight[0], fc2.bias))
        return mlp, dict(
            epochs=epoch + 1, val_loss=best, positive_rate=float(pos))


def dense_scores(data, layers, weights, k):
    """Score of every (token, layer, previous layer) combination: [N, nL, nL + 1] (prev slot 0 = none)."""
    N, nL = len(data["final"]), len(layers)
    out = torch.zeros(N, nL, nL + 1)
    logits = data["cand_logits"][:, layers].float()  # [N, nL, k]
    probs = torch.softmax(logits, -1)
    for i, l in enumerate(layers):
        w1, b1, w2, b2 = weights[l]
        for j in range(i + 1):
            prev = torch.full((N, k), 1.0 / k) if j == 0 else probs[:, j - 1]
            feats, _ = features_from_logits(logits[:, i], prev)
            out[:, i, j] = torch.sigmoid(torch.relu(feats @ w1.T + b1) @ w2 + b2)
    return out


# ------------------------------------------------------------------------------------------------- EAGLE head
@torch.no_grad()
def _final_states(model, seq, a, max_positions):
    """Final hidden (before the norm) and the model's greedy next token at every position of prompt + gen."""
    ids = (seq["prompt"] + seq["gen"])[-max_positions:]
    t = torch.tensor([ids], device=a.device)
    caps = []  # the last layer's output: the final hidden state before the norm
    hook = a.layers[-1].register_forward_hook(lambda m_, i_, o: caps.append(o[0] if isinstance(o, tuple) else o))
    try:
        model.model(t)
    finally:
        hook.remove()
    h = caps[0][0]
    return t[0], h.half(), a.logits(h).argmax(-1)


def train_eagle(model, train_seqs, val_seqs, vocab_ids, k: int = 4, epochs: int = 2, lr: float = 1e-3,
                max_positions: int = 512, seed: int = 0, log=print):
    """Train an EAGLE-style head (``drafts.EagleHead``) to predict the target's greedy next token.

    Input at position t: the target's final hidden state at t-1 and the embedding of token t; label: the
    target's argmax at t, over the reduced vocabulary ``vocab_ids`` (other labels ignored). Returns the
    source and its validation recall@k on the generated tokens.
    """
    from .drafts import EagleHead, EagleSource

    torch.manual_seed(seed)
    a = DecoderAdapter(model)
    head = EagleHead(model.config).to(a.device)
    remap = torch.full((a.shape.vocab_size,), -100, dtype=torch.long, device=a.device)
    remap[vocab_ids.to(a.device)] = torch.arange(len(vocab_ids), device=a.device)
    rows = a.lm_head.weight.detach()[vocab_ids.to(a.device)]
    cache = [_final_states(model, s, a, max_positions) for s in _progress(train_seqs, desc="eagle: states")]
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        total = 0.0
        for i in _progress(torch.randperm(len(cache), generator=g).tolist(), desc=f"eagle: epoch {epoch + 1}"):
            ids, h, nxt = cache[i]
            if len(ids) < 3:
                continue
            feats = head(h[None, :-1].float(), a.embed(ids[None, 1:]).detach())
            logits = a.final_norm(feats)[0] @ rows.T
            loss = torch.nn.functional.cross_entropy(logits, remap[nxt[1:]], ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        log(f"eagle epoch {epoch + 1}: mean loss {total / max(1, len(cache)):.3f}")
    src = EagleSource(head.eval(), k, vocab_ids)
    return src, eagle_recall(model, src, val_seqs, max_positions)


@torch.no_grad()
def eagle_recall(model, src, seqs, max_positions: int = 512) -> float:
    """recall@k of an EagleSource on the generated tokens of ``seqs`` (teacher-forced)."""
    a = DecoderAdapter(model)
    hit = n = 0
    for s in seqs:
        ids, h, nxt = _final_states(model, s, a, max_positions)
        T = min(len(s["gen"]), len(ids) - 1)
        if T < 2:
            continue
        c = src.propose_sequence(h[None, :-1].float(), ids[None, 1:], a)[0]  # [S-1, k]: c[t] predicts nxt[t + 1]
        c, y = c[-T:-1], nxt[-T:-1]  # the positions whose prediction is a generated token (t >= 1)
        hit += int((c == y[:, None]).any(-1).sum())
        n += len(y)
    return hit / max(1, n)


# ---------------------------------------------------------------------------------------------- the driver
def train_bank(model, tokenizer, prompts, out: str | Path, cfg: TrainConfig | None = None, work=None,
               log=print) -> PredictorBank:
    """Collect, select layers, train, calibrate, save. Returns the bank (also written to ``out``)."""
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    out = Path(out)
    work = Path(work) if work is not None else out / "collect"
    a = DecoderAdapter(model)
    L, V, k = a.num_layers, a.shape.vocab_size, cfg.k
    t0 = time.perf_counter()
    seqs = generate_chunks(model, tokenizer, prompts, work, cfg)
    split = split_sequences(len(seqs), cfg.splits, cfg.seed)
    draft = build_draft(cfg.draft, [seqs[i] for i in split["train"]], V, L, cfg)
    tables = b"".join(t.numpy().tobytes() for t in draft.tensors().values())
    tag = f"{cfg.draft}-k{k}-p{draft.layer}-{hashlib.sha256(tables).hexdigest()[:8]}"
    data = collect_chunks(model, seqs, work, draft, cfg, tag)
    parts = {name: subset(data, ids) for name, ids in split.items()}
    tr, va, ca = parts["train"], parts["val"], parts["calib"]
    oracle = oracle_exits(tr)
    min_layer = 0 if draft.layer is None else draft.layer
    if cfg.head_cost is not None and cfg.predictor_cost is not None:
        costs = dict(head=cfg.head_cost, predictor=cfg.predictor_cost, draft=cfg.draft_cost or 0.0)
    else:
        costs = measure_costs(model, draft)
        for key, val in (("head", cfg.head_cost), ("predictor", cfg.predictor_cost), ("draft", cfg.draft_cost)):
            if val is not None:
                costs[key] = val
        log(f"costs in layers: head {costs['head']:.3f}, predictor {costs['predictor']:.4f}, draft "
            f"{costs.get('draft', 0.0):.4f} (measured on this machine: pin them with --head-cost, --predictor-cost "
            "and --draft-cost to make the bank reproducible)")

    # 3-4: layers, then one MLP per layer on the schedule's pairs (oracle-driven and dense schedules)
    agree = (tr["argmax"] == tr["final"][:, None].int()).float().mean(0)
    layers, _, hist = select_layers(oracle, L, cfg.first_layer, 1, min_layer, agree)
    weights, info = {}, {}
    always_all = sorted(layers, key=lambda l: (-float(hist[l]), l))
    pairs_tr = torch.cat([schedule_pairs(tr, layers, always_all[:4], cfg.window, cfg.offsets),
                          schedule_pairs(tr, layers, layers, 0, cfg.offsets)]).unique(dim=0)
    pairs_va = schedule_pairs(va, layers, always_all[:4], cfg.window, cfg.offsets)
    ftr, ytr, _, _ = pair_features(tr, pairs_tr, k)
    fva, yva, _, _ = pair_features(va, pairs_va, k)
    if cfg.confirm == "none":  # an unconfirmed exit emits the best candidate: that is what must be right
        ytr, yva = top_candidate_correct(tr, pairs_tr), top_candidate_correct(va, pairs_va)
    for l in _progress(layers, desc="specee train: predictors", unit="layer"):
        m, mv = pairs_tr[:, 1] == l, pairs_va[:, 1] == l
        weights[l], info[l] = train_mlp(ftr[m], ytr[m], fva[mv], yva[mv], cfg.hidden, cfg.epochs, cfg.seed + l)

    # thresholds for a precision q, fitted on the training split's (contextual) pairs
    s_tr = dense_scores(tr, layers, weights, k)
    li = {l: i for i, l in enumerate(layers)}

    pair_cache = {}

    def family(q, always):
        key = tuple(always)
        if key not in pair_cache:
            pr = schedule_pairs(tr, layers, always, cfg.window, cfg.offsets)
            pair_cache[key] = (pr, *pair_features(tr, pr, k)[2:])
        pr, conf, cor = pair_cache[key]
        t, l, p = pr.unbind(1)
        sc = s_tr[t, torch.tensor([li[x] for x in l.tolist()]), torch.tensor(
            [0 if x < 0 else li[x] + 1 for x in p.tolist()])]
        if cfg.confirm == "none":
            conf, cor = torch.ones_like(conf), top_candidate_correct(tr, pr)
        return {x: thresholds_for_precision(sc[l == x], conf[l == x], cor[l == x], q) for x in layers}

    # always-on layers: the count with the best simulated speed on the training split
    if cfg.num_always is None:
        best = None
        for n in (2, 4, 6, 8):
            alw = sorted(always_all[:n])
            sim = simulate(tr, layers, alw, s_tr, family(cfg.target_precision, alw), cfg.window, cfg.offsets,
                           cfg.confirm, costs)
            if best is None or sim["speedup"] > best[0] + 1e-3:
                best = (sim["speedup"], alw)
        always = best[1]
    else:
        always = sorted(always_all[:cfg.num_always])

    # 5: Learn-then-Test on the calibration split over the family, conservative -> aggressive
    s_ca = dense_scores(ca, layers, weights, k)
    members = []
    for q in PRECISION_GRID:
        th = family(q, always)
        sim = simulate(ca, layers, always, s_ca, th, cfg.window, cfg.offsets, cfg.confirm, costs)
        expected = summarize(simulate(tr, layers, always, s_tr, th, cfg.window, cfg.offsets, cfg.confirm),
                             L)["exits"] * len(ca["final"]) / max(1, len(tr["final"]))
        members.append((q, th, summarize(sim, L), expected))
    op_points = {}
    for target in sorted({0.9, 0.95, 0.98, 0.99, cfg.target_precision}):
        # a member whose training-split exits predict too few calibration exits to pass is skipped
        # (decided without the calibration data, so the fixed-sequence guarantee stands)
        n_min = 2 * math.log(cfg.delta) / math.log(target)  # 2x: room for an error or two in the first test
        j = ltt_select([None if m[3] < n_min else (m[2]["exits"], m[2]["errors"]) for m in members],
                       target, cfg.delta)
        th = members[j][1] if j >= 0 else {l: 1.0 for l in layers}
        stats = members[j][2] if j >= 0 else dict(exit_rate=0.0, precision=1.0, speedup=1.0,
                                                  mean_exit_layer=float(L), exits=0, errors=0)
        bound = precision_lower_bound(stats.get("errors", 0), stats.get("exits", 0), cfg.delta)
        op_points[f"{target:g}"] = dict(thresholds={str(l): v for l, v in th.items()}, confirm=cfg.confirm,
                                        family_q=members[j][0] if j >= 0 else None, calib=stats,
                                        precision_lower_bound=bound)
    family_table = [dict(q=m[0], expected_exits=m[3], **{k_: v for k_, v in m[2].items()}) for m in members]
    chosen = f"{cfg.target_precision:g}"
    if cfg.target_speedup is not None:
        fast = [m for m in members if (m[2]["speedup"] or 0) >= cfg.target_speedup]
        if not fast:
            raise ValueError(f"no calibrated operating point reaches a simulated speedup of {cfg.target_speedup}; "
                             f"the fastest gives {max(m[2]['speedup'] for m in members):.3f}.")
        q, th, stats, _ = fast[0]
        op_points["speed"] = dict(thresholds={str(l): v for l, v in th.items()}, confirm=cfg.confirm, family_q=q,
                                  calib=stats, precision_lower_bound=precision_lower_bound(
                                      stats["errors"], stats["exits"], cfg.delta))
        chosen = "speed"
    thresholds = {int(l): v for l, v in op_points[chosen]["thresholds"].items()}

    recall = {name: recall_at_k(p["cands"], p["final"]) for name, p in parts.items()}
    oracle_all = oracle_exits(data)
    metrics = dict(
        tokens={n: len(p["final"]) for n, p in parts.items()}, prompts=len(seqs), draft_recall=recall,
        oracle_mean_exit_layer=float((oracle_all + 1).float().mean()),
        oracle_histogram=torch.bincount(oracle_all.long(), minlength=L).tolist(),
        oracle_bound=oracle_bound(oracle_all, L, costs["head"]), costs=costs, operating_point=chosen,
        family=family_table,
        calib=op_points[chosen]["calib"], precision_lower_bound=op_points[chosen]["precision_lower_bound"],
        layers={str(l): dict(info[l], threshold=thresholds[l], oracle_share=float(hist[l] / hist.sum()))
                for l in layers},
        train_config={k_: v for k_, v in asdict(cfg).items() if k_ != "extra"}, seconds=time.perf_counter() - t0)
    bank = PredictorBank(weights, thresholds, draft, always, cfg.window, cfg.offsets, cfg.confirm,
                         model_fingerprint(model), op_points, metrics, _head_sample(model))
    if cfg.eagle:
        from safetensors.torch import save_file

        toks = torch.tensor([t for i in split["train"] for t in seqs[i]["gen"]] or [0])
        src, rec = train_eagle(model, [seqs[i] for i in split["train"]], [seqs[i] for i in split["calib"]],
                               frequent_tokens(toks, V, cfg.vocab), k, cfg.eagle_epochs, seed=cfg.seed, log=log)
        save_file({n: t.detach().cpu().contiguous() for n, t in src.tensors().items()}, str(out / "eagle.safetensors"))
        (out / "eagle.json").write_text(json.dumps(dict(src.config(), recall_at_k=rec), indent=1) + "\n")
        metrics["eagle_recall"] = rec
        bank.metrics = metrics
    bank.save(out)
    log(summary_table(bank))
    return bank


def summary_table(bank: PredictorBank) -> str:
    m = bank.metrics
    lines = [f"{'layer':>5} {'always':>6} {'oracle%':>7} {'pos%':>6} {'epochs':>6} {'threshold':>9}"]
    for l in bank.predictor_layers:
        r = m["layers"][str(l)]
        lines.append(f"{l:>5} {'*' if l in bank.always else '':>6} {100 * r['oracle_share']:>7.1f} "
                     f"{100 * r['positive_rate']:>6.1f} {r['epochs']:>6} {r['threshold']:>9.4f}")
    c = m["calib"]
    lines.append(f"draft {bank.draft.type} recall@{bank.k}: " + ", ".join(f"{n} {v:.3f}" for n, v in m["draft_recall"].items()))
    lines.append(f"oracle mean exit layer {m['oracle_mean_exit_layer']:.2f}/{len(m['oracle_histogram'])}, "
                 f"oracle bound {m['oracle_bound']:.3f}x (head = {m['costs']['head']:.2f} layers)")
    lines.append(f"operating point {m['operating_point']}: exit rate {c.get('exit_rate', 0):.3f}, precision "
                 f"{c.get('precision', 1):.4f} (>= {m['precision_lower_bound']:.4f} w.p. 1-delta), mean exit layer "
                 f"{c.get('mean_exit_layer', 0):.2f}, simulated speedup {c.get('speedup') or 1:.3f}x")
    return "\n".join(lines)


def main_train(args):
    """`specee train`: see cli.py for the options."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from .demo import load_model

    model, tok = load_model(args.model)
    cfg = TrainConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed, k=args.k,
                      draft=args.draft, probe_layer=args.probe_layer, vocab=args.vocab, hidden=args.hidden,
                      num_always=args.num_always, confirm=args.confirm, target_precision=args.target_precision,
                      target_speedup=args.target_speedup, delta=args.delta, eagle=args.eagle,
                      head_cost=args.head_cost, predictor_cost=args.predictor_cost, draft_cost=args.draft_cost,
                      splits=tuple(args.splits))
    prompts = load_prompt_specs(args.prompts)
    if args.num_prompts:
        prompts = prompts[:args.num_prompts]
    bank = train_bank(model, tok, prompts, args.out, cfg, work=args.work)
    import shlex
    import sys

    bank.metrics["command"] = shlex.join(["specee", *sys.argv[1:]])
    bank.save(args.out)
    print(f"saved {len(bank.predictor_layers)} predictors to {args.out}")
    if args.check:
        ref = None if args.check == "shipped" else args.check
        diffs = compare_banks(args.out, ref, atol=args.check_atol)
        name = "the shipped bank" if ref is None else ref
        if diffs:
            print("\n".join(diffs[:50] + ([f"... {len(diffs) - 50} more"] if len(diffs) > 50 else [])))
            raise ValueError(f"--check: the trained bank differs from {name} in {len(diffs)} places (listed above, "
                             f"tolerance {args.check_atol:g}).")
        print(f"--check: the trained bank equals {name} (tolerance {args.check_atol:g}).")
    return bank
