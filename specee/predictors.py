"""The SpecEE predictor bank: per-layer exit predictors, their schedule, save/load with a model fingerprint.

After a scheduled layer l of a decoding step, for each row (DESIGN.md, "Exit predictor"; Xu et al.
2025, arXiv 2504.08850):

    cands    = draft.propose(...)                          # [B, k] candidate next tokens
    logits_k = norm(h_l) @ lm_head[cands].T                # [B, k], k rows of the head, not V
    probs    = softmax(logits_k)
    feats    = [logits_k, probs, probs - prev_probs]       # prev_probs: the row's previously evaluated
                                                           # layer in this step (1/k at the first)
    score    = sigmoid(w2 . relu(w1 feats + b1) + b2)      # one MLP 3k -> H -> 1 per layer
    exit     = score > threshold[l]  and  argmax(norm(h_l) @ lm_head.T) in cands   (confirmation)

All of it is one fused op, ``specee.ops.exit_predict``; the confirmation (the only full-vocabulary
head on this path) runs only when some row's score passed, and its logits are the exit's logits.
``confirm="argmax"`` uses ``specee.ops.lm_head_argmax`` instead (no [B, V] logits: greedy only),
``confirm="none"`` is the unconfirmed variant (emits the best candidate, no head at all).

Scheduling (per row): the ``always`` layers, plus e-2, e, e+2 around the exit layers e of the row's
last ``window`` tokens (SpecEE's contextual scheduling); the engine's batch rule then runs the step
until every row has exited. The engine calls ``decide`` at every layer of ``bank.layers`` (the union
over rows); a row not scheduled there is skipped at no cost.

Files: ``<dir>/predictors.json`` (config, thresholds, fingerprint, metrics) and
``<dir>/predictors.safetensors`` (MLPs, draft tables). ``load_predictors(dir_or_None, model)``.
"""
from __future__ import annotations

import hashlib
import json
import weakref
from collections import deque
from importlib import resources
from pathlib import Path

import torch

from . import ops, readback
from .drafts import DraftSource, build_source

FORMAT = "specee-predictors"
VERSION = 1
CONFIRM_MODES = ("logits", "argmax", "none")
CONFIG_NAME, WEIGHTS_NAME = "predictors.json", "predictors.safetensors"


# ------------------------------------------------------------------------------------------- fingerprint
def _head_sample(model) -> torch.Tensor:
    """A strided grid of at most 128 x 128 LM-head values, fp32 on the CPU: what the fingerprint hashes and keeps."""
    w = model.lm_head.weight.detach()
    V, d = w.shape
    return w[:: max(1, V // 128), :: max(1, d // 128)].float().cpu().contiguous()


def model_fingerprint(model) -> dict:
    """Architecture, layers, hidden size, vocabulary size and a hash of the LM head of ``model``.

    The hash is sha256 over the bf16-rounded values of a strided sample of head rows, so the same
    checkpoint loaded in fp32 or bf16 hashes alike (``check_fingerprint`` also accepts near-equal heads).
    """
    cfg = model.config
    sample = _head_sample(model).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return {
        "architecture": type(model).__name__,
        "num_layers": int(cfg.num_hidden_layers),
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": int(model.lm_head.weight.shape[0]),
        "lm_head_sha256": hashlib.sha256(sample).hexdigest()[:16],
    }


def check_fingerprint(saved: dict, model, head_sample: torch.Tensor | None = None, where: str = "predictors"):
    """Raise ValueError unless ``model`` is the model the predictors were trained for."""
    now = model_fingerprint(model)
    diff = [f"{key}: trained for {saved.get(key)!r}, this model has {now[key]!r}"
            for key in ("architecture", "num_layers", "hidden_size", "vocab_size") if saved.get(key) != now[key]]
    if not diff and saved.get("lm_head_sha256") != now["lm_head_sha256"]:
        close = head_sample is not None and head_sample.shape == _head_sample(model).shape and torch.allclose(
            head_sample.float(), _head_sample(model), rtol=2e-2, atol=2e-3)
        if not close:
            diff.append(f"LM head hash: trained for {saved.get('lm_head_sha256')}, this model has "
                        f"{now['lm_head_sha256']} (same shape, different weights)")
    if diff:
        raise ValueError(f"{where} were trained for another model ({'; '.join(diff)}). Train predictors for this "
                         "model with `specee train --model <dir> --prompts <file.jsonl> --out <dir>` and load those.")


# ----------------------------------------------------------------------------------------------- features
def candidate_features(hidden, norm_weight, eps, lm_head, cand_ids, prev_probs):
    """The 3k features of DESIGN.md in plain torch (training and tests; decode uses ops.exit_predict).

    Shape: hidden [N, d], lm_head [V, d], cand_ids [N, k], prev_probs [N, k] -> feats [N, 3k], probs [N, k].
    """
    x = hidden.float()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    logits = torch.einsum("nkd,nd->nk", lm_head[cand_ids].float(), normed)
    return features_from_logits(logits, prev_probs)


def features_from_logits(logits, prev_probs):
    """[k logits, softmax over the k, its change since prev_probs]. Shape: [N, k], [N, k] -> [N, 3k], [N, k]."""
    probs = torch.softmax(logits.float(), -1)
    return torch.cat([logits.float(), probs, probs - prev_probs.float()], -1), probs


def mlp_score(feats, w1, b1, w2, b2):
    """sigmoid(w2 . relu(w1 feats + b1) + b2). Shape: feats [N, 3k], w1 [H, 3k] -> [N]."""
    return torch.sigmoid(torch.relu(feats @ w1.T + b1) @ w2 + b2)


def schedule_rows(histories, always, predictor_layers, offsets=(-2, 0, 2)) -> list[set[int]]:
    """The layers each row evaluates this step: ``always`` plus e+o for e in its recent exits (0-based).

    ``histories[b]`` holds the 0-based exit layers (layers run - 1) of row b's recent tokens.
    """
    allowed = set(predictor_layers)
    out = []
    for hist in histories:
        s = set(always) & allowed
        for e in hist:
            s.update(l for l in (e + o for o in offsets) if l in allowed)
        out.append(s)
    return out


# ------------------------------------------------------------------------------------------------- bank
class PredictorBank:
    """Exit predictors for one model: plug in with ``exit_config={"predictor": bank}`` and ``mode="early_exit"``.

    Parameters
    ----------
    weights : dict[int, tuple[Tensor, Tensor, Tensor, Tensor]]
        Per predictor layer (0-based): w1 [H, 3k], b1 [H], w2 [H], b2 [1].
    thresholds : dict[int, float]
        Exit when score > threshold (1.0 never exits).
    draft : DraftSource
    always : list[int], optional
        Layers evaluated for every row (default: all predictor layers).
    window : int
        Contextual scheduling looks at the exits of the last ``window`` tokens (0 turns it off).
    offsets : tuple[int, ...]
        Contextual layers around each recent exit e (SpecEE: e-2, e, e+2).
    confirm : str
        ``logits`` (full head at an exit, exact logits for sampling), ``argmax`` (``ops.lm_head_argmax``;
        greedy only: the exit's logits are one-hot) or ``none`` (the unconfirmed variant).
    fingerprint : dict, optional
        ``model_fingerprint`` of the model it was trained for.

    Examples
    --------
    >>> bank = specee.load_predictors(None, model)          # the shipped bank of the default model
    >>> out = specee.generate(model, ids, mask, mode="early_exit", exit_config={"predictor": bank})
    """

    def __init__(self, weights, thresholds, draft: DraftSource, always=None, window: int = 5,
                 offsets=(-2, 0, 2), confirm: str = "logits", fingerprint=None, operating_points=None,
                 metrics=None, head_sample=None):
        if confirm not in CONFIRM_MODES:
            raise ValueError(f"unknown confirm mode {confirm!r}; choose one of {', '.join(CONFIRM_MODES)}.")
        self.weights = {int(l): tuple(t.float() for t in w) for l, w in weights.items()}
        self.predictor_layers = sorted(self.weights)
        if not self.predictor_layers:
            raise ValueError("a predictor bank needs at least one predictor layer.")
        self.k = self.weights[self.predictor_layers[0]][0].shape[1] // 3
        if draft.k != self.k:
            raise ValueError(f"the draft source proposes k={draft.k} candidates but the predictors take 3k="
                             f"{3 * self.k} features; train them together.")
        if draft.layer is not None and draft.layer > self.predictor_layers[0]:
            raise ValueError(f"the draft source proposes after layer {draft.layer}, later than the first predictor "
                             f"layer {self.predictor_layers[0]}; probe a shallower layer.")
        self.draft = draft
        self.always = sorted(set(self.predictor_layers if always is None else always) & set(self.predictor_layers))
        self.window, self.offsets, self.confirm = int(window), tuple(offsets), confirm
        self.fingerprint, self.head_sample = fingerprint, head_sample
        self.operating_points = operating_points or {}
        self.metrics = metrics or {}
        self.set_thresholds(thresholds)
        self._tap = None
        self._model = None
        self.stats = {}
        self.reset(1)

    def __repr__(self):
        return (f"PredictorBank(layers={self.predictor_layers}, always={self.always}, k={self.k}, "
                f"draft={self.draft.type}, confirm={self.confirm!r})")

    # -------------------------------------------------------------------------------------- configuration
    @property
    def layers(self) -> list[int]:
        """Every layer the engine must call ``decide`` at (predictor layers and the draft's probe layer)."""
        extra = [self.draft.layer] if self.draft.layer is not None else []
        return sorted(set(self.predictor_layers) | set(extra))

    def set_thresholds(self, thresholds):
        """Per-layer thresholds: a dict {layer: t}, one float for all, or an operating point's name."""
        if isinstance(thresholds, str):
            if thresholds not in self.operating_points:
                raise ValueError(f"no operating point {thresholds!r}; this bank has "
                                 f"{sorted(self.operating_points) or 'none'}.")
            thresholds = self.operating_points[thresholds]["thresholds"]
        if isinstance(thresholds, (int, float)):
            thresholds = {l: float(thresholds) for l in self.predictor_layers}
        th = {int(l): float(t) for l, t in thresholds.items()}
        missing = set(self.predictor_layers) - set(th)
        if missing:
            raise ValueError(f"no threshold for predictor layers {sorted(missing)}.")
        for t in th.values():
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"exit threshold {t} is outside [0, 1]; scores are sigmoid outputs.")
        self.thresholds = th
        return self

    def to(self, device):
        self.weights = {l: tuple(t.to(device) for t in w) for l, w in self.weights.items()}
        self.draft.to(device)
        return self

    def attach(self, model):
        """Feed the draft source the tokens entering ``model`` (a forward hook on its embedding) while this
        bank decodes: from ``reset`` (the engine's start) to ``finish`` (its end).

        NOTE: the engine's predictor interface (reset/decide/observe) passes no token ids, and an
        n-gram source needs them; the hook reads them where the engine already sends them. Outside a
        decode the hook is removed, so other forwards of the model (``model.generate``, a compiled
        forward that dynamo would trace into the hook) neither feed nor see it.
        """
        self._model = weakref.ref(model)
        return self

    def _hook(self):
        model = self._model() if self._model is not None else None
        if model is None:
            return
        self.detach()
        bank = weakref.ref(self)  # the hook must not keep a discarded bank (and its tables) alive

        def tap(module, args, out):
            b = bank()
            if b is None:
                handle.remove()
            else:
                b._feed(args[0])

        handle = model.get_input_embeddings().register_forward_hook(tap)
        self._tap = handle

    def detach(self):
        if self._tap is not None:
            self._tap.remove()
            self._tap = None

    def finish(self):
        """The engine's decode ended: stop listening to the model."""
        self.detach()

    # -------------------------------------------------------------------------------------- engine calls
    def reset(self, batch_size: int):
        self.batch_size = batch_size
        self.draft.reset(batch_size)
        self._hook()
        self.history = [deque(maxlen=max(1, self.window)) for _ in range(batch_size)]
        self.stats = dict(steps=0, evaluations=0, fired=0, exits=0, host_syncs=0)
        self._fed_prompt = False
        self._begin_step()

    def _feed(self, input_ids):
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            return  # not a decode of this bank's batch (e.g. a plain forward of the same model)
        self.draft.feed(input_ids)
        self._fed_prompt = True

    def _begin_step(self):
        self._cands = None
        self._prev = None
        self._done = None
        hist = [list(h) if self.window > 0 else [] for h in self.history]
        sched = schedule_rows(hist, self.always, self.predictor_layers, self.offsets)
        self._sched = {l: [l in s for s in sched] for l in self.predictor_layers}
        self._sched_t = {}
        probe = {self.draft.layer} if self.draft.layer is not None else set()
        self._step_layers = frozenset(l for l, rows in self._sched.items() if any(rows)) | probe

    def step_layers(self) -> frozenset[int]:
        """The layers where :meth:`decide` can act this step (some row is scheduled there, or the draft probes
        there); at the others it returns "no exit" at once, so the engine need not call it nor read anything back."""
        return self._step_layers

    def decide(self, layer: int, hidden: torch.Tensor, adapter):
        """Exit decisions after ``layer``: (exit [B] bool, logits [B, V] fp32), or (None, None) when no row exits
        here and this is known on the host (not scheduled, or no score passed: the engine then reads nothing
        back). With confirmation, a ``readback.Pending`` of that pair: the read of whether a row fired is in
        flight (unpacking waits). hidden: [B, d]."""
        B = hidden.shape[0]
        if self._cands is None and (self.draft.layer is None or layer >= self.draft.layer):
            self._cands = self.draft.propose(hidden, adapter).to(hidden.device)
        rows = self._sched.get(layer)
        if self._cands is None or rows is None or not any(rows):
            return None, None
        if layer not in self._sched_t:
            self._sched_t[layer] = torch.tensor(rows, device=hidden.device)
        sched = self._sched_t[layer]
        if self._prev is None:
            self._prev = torch.full((B, self.k), 1.0 / self.k, device=hidden.device)
            self._done = torch.zeros(B, dtype=torch.bool, device=hidden.device)
        w1, b1, w2, b2 = self.weights[layer]
        hidden = hidden.contiguous()
        score, probs, fire = ops.exit_predict(hidden, adapter.norm.weight, adapter.shape.rms_eps,
                                              adapter.lm_head.weight, self._cands, self._prev, w1, b1, w2, b2,
                                              self.thresholds[layer])
        self._prev = torch.where(sched[:, None], probs, self._prev)
        fire = fire & sched & ~self._done
        self.stats["evaluations"] += sum(rows)
        if self.confirm == "none":
            logits = torch.full((B, adapter.shape.vocab_size), float("-inf"), device=hidden.device)
            logits.scatter_(1, self._cands, torch.log(probs.clamp_min(1e-30)))
            self._done |= fire
            return fire, logits
        # Whether any row fired decides whether the head runs: read it back, letting the engine queue work behind
        # the copy first (readback.Pending; unpacking waits).
        fired = readback.ReadBack(fire.sum()[None])
        self.stats["host_syncs"] += 1
        return readback.Pending(lambda: self._confirm(fired.result()[0], fire, hidden, adapter))

    def _confirm(self, fired: int, fire, hidden, adapter):
        """The exits of the rows that fired, where the layer's own argmax is among the candidates."""
        if not fired:
            return None, None
        B = hidden.shape[0]
        self.stats["fired"] += fired
        if self.confirm == "argmax":
            token, in_cands = ops.lm_head_argmax(adapter.final_norm(hidden), adapter.lm_head.weight, self._cands)
            logits = torch.zeros(B, adapter.shape.vocab_size, device=hidden.device)
            logits.scatter_(1, token[:, None], 1.0)
        else:
            logits = adapter.logits(hidden)  # fp32 [B, V]: the exit's logits (sampling and processors see them)
            in_cands = (self._cands == logits.argmax(-1, keepdim=True)).any(-1)
        exit_now = fire & in_cands
        self._done |= exit_now  # counted into stats["exits"] by observe, with the step's one read-back
        return exit_now, logits

    def observe(self, exit_layers: torch.Tensor):
        """After a step: exit_layers [B] = layers run per row (0 for finished rows)."""
        self.stats["steps"] += 1
        done = self._done if self._done is not None else torch.zeros_like(exit_layers, dtype=torch.bool)
        layers, exited = torch.stack([exit_layers, done.to(exit_layers.dtype)]).tolist()
        self.stats["exits"] += sum(exited)
        for b, e in enumerate(layers):
            if e > 0:
                self.history[b].append(e - 1)
        self._begin_step()

    # ---------------------------------------------------------------------------------------- save/load
    def config(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "k": self.k,
            "hidden": int(self.weights[self.predictor_layers[0]][0].shape[0]),
            "predictor_layers": self.predictor_layers, "always": self.always, "window": self.window,
            "offsets": list(self.offsets), "confirm": self.confirm,
            "thresholds": {str(l): t for l, t in self.thresholds.items()},
            "operating_points": self.operating_points, "draft": self.draft.config(), "metrics": self.metrics,
        }

    def save(self, path):
        """Write ``path/predictors.json`` and ``path/predictors.safetensors`` (path: a directory)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for l, (w1, b1, w2, b2) in self.weights.items():
            for name, t in zip(("w1", "b1", "w2", "b2"), (w1, b1, w2, b2)):
                tensors[f"layer.{l}.{name}"] = t.detach().float().cpu().contiguous()
        for name, t in self.draft.tensors().items():
            t = t.detach().cpu()
            # token ids fit int32 (smaller files); clone: tables may share storage
            tensors[f"draft.{name}"] = (t.int() if t.dtype == torch.int64 else t).clone().contiguous()
        if self.head_sample is not None:
            tensors["fingerprint.head_sample"] = self.head_sample.to(torch.float16).cpu().contiguous()
        save_file(tensors, str(path / WEIGHTS_NAME))
        (path / CONFIG_NAME).write_text(json.dumps(self.config(), indent=1) + "\n")
        return path


def _shipped_dir():
    return resources.files("specee.data").joinpath("predictors")


def _read_bank(path):
    """(config dict, tensors) of a bank directory (or its predictors.json); None: the shipped bank."""
    from safetensors.torch import load_file

    if path is None:
        root = _shipped_dir()
        with resources.as_file(root.joinpath(WEIGHTS_NAME)) as wpath:
            return json.loads(root.joinpath(CONFIG_NAME).read_text()), load_file(str(wpath))
    p = Path(path)
    p = p.parent if p.is_file() else p
    if not (p / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{p / CONFIG_NAME} does not exist; give the directory `specee train --out` wrote.")
    return json.loads((p / CONFIG_NAME).read_text()), load_file(str(p / WEIGHTS_NAME))


# metrics that describe the run, not the bank: never compared
RUN_METRICS = ("seconds", "command")


def compare_banks(a, b, atol: float = 0.0, metrics: bool = True) -> list[str]:
    """Differences between two saved banks (directories; None = the shipped bank), one line each.

    Compared: the structure (fingerprint, k, width, predictor and always-on layers, window, offsets,
    confirmation, draft config), every threshold of every operating point, every tensor (MLP weights,
    draft tables, fingerprint sample) and, with ``metrics``, the training metrics (calibration
    counts, histograms, ...) except the run's own ``seconds`` and ``command``. Numbers match when
    ``|x - y| <= atol``; an empty list means the banks are the same. Needs no model.
    """
    (ca, ta), (cb, tb) = _read_bank(a), _read_bank(b)
    out = []

    def walk(x, y, where):
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y), key=str):
                if where == "metrics" and key in RUN_METRICS:
                    continue
                if key not in x or key not in y:
                    out.append(f"{where}.{key}: only in {'first' if key in x else 'second'}")
                else:
                    walk(x[key], y[key], f"{where}.{key}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}[{i}]")
        elif (isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool)
              and not isinstance(y, bool)):
            if not abs(x - y) <= atol:
                out.append(f"{where}: {x!r} != {y!r}")
        elif x != y:
            out.append(f"{where}: {x!r} != {y!r}")

    for key in sorted(set(ca) | set(cb)):
        if key == "metrics" and not metrics:
            continue
        if key not in ca or key not in cb:
            out.append(f"{key}: only in {'first' if key in ca else 'second'}")
        else:
            walk(ca[key], cb[key], key)
    for name in sorted(set(ta) | set(tb)):
        if name not in ta or name not in tb:
            out.append(f"tensor {name}: only in {'first' if name in ta else 'second'}")
            continue
        x, y = ta[name], tb[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            out.append(f"tensor {name}: {x.dtype}{list(x.shape)} != {y.dtype}{list(y.shape)}")
            continue
        diff = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        if not diff <= atol:
            out.append(f"tensor {name}: max |diff| {diff:.3g} > {atol:g}")
    return out


def load_predictors(path=None, model=None, *, operating_point: str | None = None, confirm: str | None = None,
                    attach: bool = True) -> PredictorBank:
    """Load a predictor bank for ``model``; ``path=None`` loads the bank shipped for the default model.

    Parameters
    ----------
    path : str or Path or None
        A directory written by ``PredictorBank.save`` / ``specee train`` (or its predictors.json).
    model : transformers model
        Checked against the bank's fingerprint (architecture, layers, sizes, LM head): a bank trained
        for another model raises ValueError.
    operating_point : str, optional
        A calibrated operating point stored in the bank (e.g. "0.95"); default: the bank's thresholds.
    confirm : str, optional
        Override the confirmation mode (``logits``, ``argmax``, ``none``).
    attach : bool
        Hook the model's embedding so the draft source sees the tokens (see ``PredictorBank.attach``).
    """
    if model is None:
        raise ValueError("load_predictors needs the model it will run with, to check the fingerprint: "
                         "load_predictors(path, model).")
    if path is None and not _shipped_dir().joinpath(CONFIG_NAME).is_file():
        raise FileNotFoundError("this specee install ships no predictors (specee/data/predictors is missing); "
                                "train them with `specee train`.")
    cfg, tensors = _read_bank(path)
    where = ("the shipped predictors (for SmolLM2-135M-Instruct)" if path is None
             else f"predictors {Path(path).parent if Path(path).is_file() else Path(path)}")
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{where} is not a specee predictor bank (format {cfg.get('format')!r}).")
    head_sample = tensors.get("fingerprint.head_sample")
    check_fingerprint(cfg.get("fingerprint") or {}, model, head_sample, where)
    weights = {}
    for l in cfg["predictor_layers"]:
        weights[int(l)] = tuple(tensors[f"layer.{l}.{n}"] for n in ("w1", "b1", "w2", "b2"))
    draft_t = {n[len("draft."):]: t for n, t in tensors.items() if n.startswith("draft.")}
    draft = build_source(cfg["draft"], draft_t, model.config)
    bank = PredictorBank(weights, {int(l): t for l, t in cfg["thresholds"].items()}, draft, cfg.get("always"),
                         cfg.get("window", 5), tuple(cfg.get("offsets", (-2, 0, 2))), confirm or cfg.get("confirm", "logits"),
                         cfg.get("fingerprint"), cfg.get("operating_points"), cfg.get("metrics"), head_sample)
    if operating_point is not None:
        bank.set_thresholds(str(operating_point))
    bank.to(model.lm_head.weight.device)
    if attach:
        bank.attach(model)
    return bank
