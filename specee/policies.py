"""Exit policies and schedules: they decide, the engine executes.

A policy answers two questions per decoding step: which layers run (``plan``), and, after an
evaluated layer, which rows are done with their token (``decide``). Decisions are device tensors;
the engine chooses when to read them back.

- ``full``: every layer, no exits.
- ``skipdecode``: a depth per step that decays linearly from ``max_layers`` to ``min_layers``
  (SkipDecode, Del Corro et al. 2023, arXiv 2307.02628); the bottom ``warmup_layers`` always run,
  then the top layers; the lower/middle layers are bypassed. Monotone, so no KV hole is ever read.
- ``confidence``: CALM (Schuster et al. 2022, arXiv 2207.07061): at scheduled layers, the full LM
  head's softmax maximum (or its top-2 gap) against a per-layer threshold. Needs no training.
- ``early_exit``: SpecEE-style predictors (Xu et al. 2025); the predictor object plugs in here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

MODES = ("full", "skipdecode", "confidence", "early_exit", "self_speculative")
KV_POLICIES = ("skip", "propagate", "deferred", "monotone")


@dataclass
class ExitConfig:
    """Options of the exit modes. Every field has a default that works on any model.

    Parameters
    ----------
    kv_policy : str
        How later tokens see the KV holes left by exits: ``skip``, ``propagate``, ``deferred`` (exact)
        or ``monotone``. Ignored by ``full``; ``skipdecode`` is monotone by construction.
    max_layers, min_layers, warmup_layers : int
        SkipDecode's depth schedule (defaults: all layers, half, 1).
    layers : sequence of int
        Layers (0-based) after which ``confidence``/``early_exit`` test for an exit
        (default: every layer from a quarter of the stack up to the second to last).
    thresholds : float or sequence of float
        Per-layer exit thresholds in [0, 1] (one value for all, or one per entry of ``layers``).
    measure : str
        ``confidence``'s score: ``softmax`` (max probability) or ``gap`` (top-1 minus top-2 probability).
    predictor : object
        ``early_exit``'s predictor bank: ``predictor.decide(layer, hidden, adapter) -> (exit[B], logits|None)``;
        ``exit`` may be None when no row exits there and the predictor knows it on the host (no read-back), and
        the pair may come as a ``readback.Pending`` whose read-back is in flight.
    lookahead : bool
        Queue the layer after an evaluated one behind the exit decision's copy to the host, so a GPU computes
        while the host waits (costs one layer when the batch exits there; tokens unchanged). Needs ``kv_policy``
        ``deferred``. A predictor bank's own read of whether a row fired (it runs the head only then) is
        overlapped too: ``decide`` returns it in flight (``readback.Pending``). Off by default: its GPU gain is not
        measured yet (bench/GPU_OWED.md E3).
    """

    kv_policy: str = "deferred"
    max_layers: int | None = None
    min_layers: int | None = None
    warmup_layers: int = 1
    layers: Sequence[int] | None = None
    thresholds: float | Sequence[float] = 0.9
    measure: str = "softmax"
    predictor: object | None = None
    lookahead: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def coerce(cls, value) -> "ExitConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown exit_config keys {sorted(unknown)}; valid keys: "
                                 f"{sorted(cls.__dataclass_fields__)}")
            return cls(**value)
        raise TypeError(f"exit_config must be an ExitConfig or a dict, got {type(value).__name__}")


@dataclass(frozen=True)
class StepPlan:
    layers: tuple[int, ...]          # layers to run, in order
    eval_layers: frozenset[int]      # layers after which the policy is asked to decide


class Policy:
    """Base policy: run every layer, never exit."""

    name = "full"

    def __init__(self, num_layers: int, config: ExitConfig):
        self.num_layers = num_layers
        self.config = config
        self._all = StepPlan(tuple(range(num_layers)), frozenset())

    def reset(self, batch_size: int, max_new_tokens: int):
        pass

    def plan(self, step: int, max_depth: int) -> StepPlan:
        """Layers of decode step ``step`` (0 = the first token after the prompt); at most ``max_depth``."""
        if max_depth >= self.num_layers:
            return self._all
        return StepPlan(tuple(range(max_depth)), frozenset())

    def decide(self, layer: int, hidden: torch.Tensor, adapter) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """After ``layer``: (exit [B] bool on the device, logits [B, V] or None); exit None means no row exits
        here, known on the host, so the engine reads nothing back. A ``readback.Pending`` of the pair lets the
        engine queue the next layer before the policy's own read-back is waited for."""
        raise NotImplementedError

    def observe(self, exit_layers: torch.Tensor):
        """Called after each step with the per-row exit layers (contextual scheduling hooks in here)."""

    def finish(self):
        """Called once when a decode ends (also on an error): release what ``reset`` set up."""


class FullPolicy(Policy):
    name = "full"


class SkipDecodePolicy(Policy):
    name = "skipdecode"

    def __init__(self, num_layers: int, config: ExitConfig):
        super().__init__(num_layers, config)
        self.max_layers = config.max_layers if config.max_layers is not None else num_layers
        self.min_layers = config.min_layers if config.min_layers is not None else max(1, num_layers // 2)
        self.warmup = config.warmup_layers
        if not 1 <= self.min_layers <= num_layers or not 1 <= self.max_layers <= num_layers:
            raise ValueError(f"skipdecode needs 1 <= min_layers <= max_layers <= {num_layers} (the model's layers); "
                             f"got min_layers={self.min_layers}, max_layers={self.max_layers}.")
        if self.min_layers > self.max_layers:
            raise ValueError(f"min_layers ({self.min_layers}) > max_layers ({self.max_layers}); "
                             "skipdecode's depth decays from max_layers down to min_layers.")
        if not 0 <= self.warmup <= self.min_layers:
            raise ValueError(f"warmup_layers ({self.warmup}) must lie in [0, min_layers={self.min_layers}].")
        self.steps = 1

    def reset(self, batch_size: int, max_new_tokens: int):
        self.steps = max(1, max_new_tokens)

    def depth(self, step: int) -> int:
        frac = min(1.0, step / max(1, self.steps - 1))
        return int(round(self.max_layers - frac * (self.max_layers - self.min_layers)))

    def plan(self, step: int, max_depth: int) -> StepPlan:
        d = self.depth(step)
        top = d - self.warmup
        layers = tuple(range(self.warmup)) + tuple(range(self.num_layers - top, self.num_layers))
        return StepPlan(layers, frozenset())


def _per_layer_thresholds(layers: Sequence[int], thresholds) -> dict[int, float]:
    values = [float(thresholds)] * len(layers) if isinstance(thresholds, (int, float)) else list(thresholds)
    if len(values) != len(layers):
        raise ValueError(f"got {len(values)} thresholds for {len(layers)} exit layers; give one per layer or a single value.")
    for t in values:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"exit threshold {t} is outside [0, 1]; thresholds are probabilities.")
    return dict(zip(layers, values))


class ExitPolicyBase(Policy):
    """Shared by the policies that test for exits at scheduled layers."""

    def __init__(self, num_layers: int, config: ExitConfig):
        super().__init__(num_layers, config)
        layers = config.layers if config.layers is not None else range(max(0, num_layers // 4), num_layers - 1)
        layers = sorted(set(int(l) for l in layers))
        for l in layers:
            if not 0 <= l < num_layers:
                raise ValueError(f"exit layer {l} is out of range for a model with {num_layers} layers (0-based).")
        self.thresholds = _per_layer_thresholds(layers, config.thresholds)
        self.eval_layers = frozenset(l for l in layers if l < num_layers - 1)

    def plan(self, step: int, max_depth: int) -> StepPlan:
        depth = min(max_depth, self.num_layers)
        return StepPlan(tuple(range(depth)), frozenset(l for l in self.eval_layers if l < depth - 1))


class ConfidencePolicy(ExitPolicyBase):
    name = "confidence"

    def __init__(self, num_layers: int, config: ExitConfig):
        super().__init__(num_layers, config)
        if config.measure not in ("softmax", "gap"):
            raise ValueError(f"unknown confidence measure {config.measure!r}; use 'softmax' or 'gap'.")

    def decide(self, layer, hidden, adapter):
        logits = adapter.logits(hidden)  # [B, V] fp32
        probs = torch.softmax(logits, dim=-1)
        if self.config.measure == "softmax":
            conf = probs.max(dim=-1).values
        else:
            top2 = probs.topk(2, dim=-1).values
            conf = top2[:, 0] - top2[:, 1]
        return conf >= self.thresholds[layer], logits


class EarlyExitPolicy(ExitPolicyBase):
    name = "early_exit"

    def __init__(self, num_layers: int, config: ExitConfig):
        if config.predictor is None:
            raise ValueError(
                "mode='early_exit' needs a predictor bank: pass exit_config={'predictor': bank} with an object whose "
                "decide(layer, hidden, adapter) returns (exit[B] bool, logits or None). For an exit rule that needs "
                "no training use mode='confidence'.")
        if config.layers is None and hasattr(config.predictor, "layers"):
            config.layers = list(config.predictor.layers)
        super().__init__(num_layers, config)

    def reset(self, batch_size: int, max_new_tokens: int):
        if hasattr(self.config.predictor, "reset"):
            self.config.predictor.reset(batch_size)

    def plan(self, step: int, max_depth: int) -> StepPlan:
        plan = super().plan(step, max_depth)
        scheduled = getattr(self.config.predictor, "step_layers", None)  # a bank's per-step schedule, if it has one
        return plan if scheduled is None else StepPlan(plan.layers, plan.eval_layers & scheduled())

    def decide(self, layer, hidden, adapter):
        return self.config.predictor.decide(layer, hidden, adapter)

    def observe(self, exit_layers):
        if hasattr(self.config.predictor, "observe"):
            self.config.predictor.observe(exit_layers)

    def finish(self):
        if hasattr(self.config.predictor, "finish"):
            self.config.predictor.finish()


_POLICIES = {"full": FullPolicy, "skipdecode": SkipDecodePolicy, "confidence": ConfidencePolicy,
             "early_exit": EarlyExitPolicy}


def make_policy(mode: str, num_layers: int, config: ExitConfig) -> Policy:
    if mode not in _POLICIES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
    if config.kv_policy not in KV_POLICIES:
        raise ValueError(f"unknown kv_policy {config.kv_policy!r}; choose one of {', '.join(KV_POLICIES)}.")
    return _POLICIES[mode](num_layers, config)
