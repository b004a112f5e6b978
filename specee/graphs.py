"""CUDA graphs over the compiled layer: one graph per (layer, step shape), replayed between exit decisions.

A compiled layer still launches a dozen kernels from Python; at batch 1 on a GPU that launch time is
comparable to the layer's memory time. A CUDA graph replays them in one launch, but it freezes every
address it touched: weights, KV cache, inputs and outputs. torch's own ``mode="reduce-overhead"``
treats the weights we pass as inputs like any input, so it re-records (or copies) per layer. Here
each graph is captured by hand with its layer's weights and cache baked in, over input buffers that
every layer of a step shape shares:

- a step shape is (batch, queries per call q, cache slots S); its buffers hold the hidden state
  [B, q, d], the slots [q], cos/sin [B, q, hd] and the attention mask [B, 1, q, S];
- layer l's graph reads them, writes layer l's K/V at the slots and the layer output back into the
  hidden buffer, so the next layer's graph starts where this one stopped; a full-depth graph chains
  all layers (one launch per step for ``full``); the head has its own graph per batch size;
- the prefill runs the compiled layer unrecorded (its shape rarely repeats); decode steps, deferred
  fills and speculative verification (up to ``MAX_GRAPH_QUERIES`` queries) replay graphs;
- the engine decides exits between replays, as with the compiled layer, so the exit layer may change
  every step without a new capture; a span of layers between two exit tests replays its layers' graphs back
  to back (inputs filled once);
- before a generation's prefill, every graph its mode may replay is captured (``GraphedAdapter.precompile``:
  each layer for 1 .. ``MAX_GRAPH_QUERIES`` queries where deferred fills or verification feed several), so a
  late first exit captures nothing mid-generation.

Persistent cache: graphs read the cache at fixed addresses, so the KV buffers outlive a generation.
They belong to the model (one set, for the latest batch size and slot bucket); a generation whose
length fits the bucket (``SLOT_BUCKET`` slots) reuses them and every graph captured so far, and
:func:`release` frees them. Capture
runs the layer once beforehand (compilation and autotuning must not happen inside a capture) on
scratch slots at the end of the cache, which no token ever uses or attends to.

Inputs reach the buffers by copy, skipped when the tensor is the one copied last (the rope and mask of
a step are copied once, not per layer; a layer's output feeds the next layer with no copy); outputs
are returned as clones, so a caller may keep them while later replays overwrite the buffers.

``graphs="host"`` replays the captured Python closure instead of a CUDA graph: no speed-up, but the
same discipline (everything a replay reads comes through the persistent buffers), which is what the
CPU tests check.
"""
from __future__ import annotations

import contextlib

import torch

from .cache import KVCache
from .compiled import CompiledAdapter, _dynamic_dims, _mark_cache, changed, options_key

SLOT_BUCKET = 256        # cache slots are rounded up to a multiple: nearby lengths share buffers and graphs
MAX_GRAPH_QUERIES = 8    # calls with more queries (prefill, long deferred fills) run the compiled layer unrecorded


class HostGraph:
    """A CUDA graph's stand-in on the CPU: replay re-runs the captured closure over the same buffers."""

    def __init__(self, fn, pool=None):
        fn()  # the warm-up run a capture needs
        self.fn = fn

    def replay(self):
        self.fn()


class CudaGraph:
    """``fn`` recorded once (after a warm-up run on a side stream, so compilation happens outside the capture)."""

    def __init__(self, fn, pool=None):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            fn()

    def replay(self):
        self.graph.replay()


class _Step:
    """Input buffers of one step shape and the graphs that read them."""

    def __init__(self, batch, q, slots, hidden_size, head_dim, dtype, rope_dtype, device):
        self.q = q
        self.x = torch.zeros(batch, q, hidden_size, dtype=dtype, device=device)
        self.slots = torch.zeros(q, dtype=torch.long, device=device)
        self.cos = torch.zeros(batch, q, head_dim, dtype=rope_dtype, device=device)
        self.sin = torch.zeros_like(self.cos)
        self.mask = torch.ones(batch, 1, q, slots, dtype=torch.bool, device=device)
        _dynamic_dims(self.x, self.slots, self.cos, self.sin, self.mask)  # share the compiled graphs
        self.layers: dict = {}   # layer index -> graph
        self.whole = None        # graph of the whole stack
        self.sources: dict = {}

    def scratch(self):
        """Harmless values for the warm-up run before a capture: the queries sit on the last slots."""
        S = self.mask.shape[-1]
        self.x.zero_()
        self.slots.copy_(torch.arange(S - self.q, S, device=self.slots.device))
        self.cos.fill_(1)
        self.sin.zero_()
        self.mask.fill_(True)
        self.sources.clear()

    def fill(self, **inputs):
        for name, t in inputs.items():
            if changed(self.sources, name, t):
                getattr(self, name).copy_(t)

    def output(self):
        out = self.x.clone()
        changed(self.sources, "x", out)  # the buffer holds exactly this: passing it back needs no copy
        return out


class _Persistent:
    """The buffers graphs read, kept with the model across generations: KV cache, step inputs, head."""

    def __init__(self, key, adapter, batch, limit):
        self.key, self.batch, self.slots = key, batch, limit + MAX_GRAPH_QUERIES
        self.cache = KVCache(adapter.shape, batch, self.slots, adapter.dtype, adapter.device, static=True, limit=limit)
        _mark_cache(self.cache)
        # one memory pool for all graphs of this set: they run one at a time on one stream
        self.pool = torch.cuda.graph_pool_handle() if adapter.graph_cls is CudaGraph else None
        self.steps: dict = {}    # q -> _Step
        self.head = None         # (input buffer, logits buffer, graph)
        self.precaptured = set()  # (spans, several queries) whose graphs GraphedAdapter.precompile captured
        self.captures = self.replays = 0


class GraphedAdapter(CompiledAdapter):
    """CompiledAdapter whose calls of up to ``MAX_GRAPH_QUERIES`` queries replay captured graphs.

    ``graphs=True`` records CUDA graphs (the model must be on a CUDA device); ``graphs="host"`` replays the
    captured closures (CPU tests of the persistent-buffer path).
    """

    def __init__(self, model, compile=True):
        super().__init__(model, compile)
        kind = self.opts["graphs"]
        if kind is True and self.device.type != "cuda":
            raise ValueError(f"compile=dict(graphs=True) records CUDA graphs, but the model is on {self.device}; "
                             "move it to a GPU or drop graphs=True (graphs='host' runs the same path on the CPU "
                             "without graphs, for tests).")
        self.graph_cls = CudaGraph if kind is True else HostGraph

    _uncaptured = False

    @contextlib.contextmanager
    def uncaptured(self):
        """Calls inside run the compiled layer unrecorded: a prefill's shape rarely repeats."""
        self._uncaptured = True
        try:
            yield
        finally:
            self._uncaptured = False

    # -------------------------------------------------------------- buffers
    @property
    def persistent(self) -> _Persistent | None:
        return getattr(self.model, "_specee_graphs", None)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A cache over the model's persistent buffers (made, with fresh graphs, when the shape changes)."""
        S = -(-max_len // SLOT_BUCKET) * SLOT_BUCKET
        key = (batch, S, self.signature, *options_key(self.opts), self.graph_cls.__name__,
               tuple(w[1].data_ptr() for w in self.weights), self.lm_head.weight.data_ptr())
        p = self.persistent
        if p is None or p.key != key:
            self.model._specee_graphs = None  # free the old buffers and graphs before allocating new ones
            p = self.model._specee_graphs = _Persistent(key, self, batch, S)
        return p.cache.reset()

    def _step(self, hidden, mask, cos, kv_view) -> _Step | None:
        p = self.persistent
        B, q = hidden.shape[:2]
        if (self._uncaptured or p is None or kv_view.cache is not p.cache or q > MAX_GRAPH_QUERIES or mask is None
                or mask.dtype != torch.bool):
            return None
        return self._step_of(q, cos.dtype)

    def _step_of(self, q: int, rope_dtype) -> _Step:
        p = self.persistent
        if q not in p.steps:
            s = self.shape
            p.steps[q] = _Step(p.batch, q, p.slots, s.hidden_size, s.head_dim, self.dtype, rope_dtype, self.device)
        return p.steps[q]

    def precompile(self, batch: int, spans: bool, fills: bool = False, verify: bool = False):
        """``CompiledAdapter.precompile``, then capture every graph the generation may replay over the persistent
        buffers: the whole stack and the head, with ``spans`` each layer for one query, with ``fills`` or ``verify``
        each layer for 2 .. ``MAX_GRAPH_QUERIES`` queries. A capture runs its layer once and records it; lazily,
        the first deferred fill of a new size would capture a stack of layers in the middle of a generation."""
        super().precompile(batch, spans, fills, verify)
        p = self.persistent
        key = (spans, fills or verify)
        if self._uncaptured or p is None or p.batch != batch or key in p.precaptured:
            return
        p.precaptured.add(key)
        x = torch.zeros(1, 1, self.shape.hidden_size, dtype=self.dtype, device=self.device)
        rope_dtype = self.rope(x, torch.zeros(1, 1, dtype=torch.long, device=self.device))[0].dtype
        one = self._step_of(1, rope_dtype)
        if one.whole is None:
            one.whole = self._capture(one, self._whole_fn(one))
        queries = ([1] if spans else []) + (list(range(2, MAX_GRAPH_QUERIES + 1)) if fills or verify else [])
        for q in queries:
            step = self._step_of(q, rope_dtype)
            for idx in range(self.num_layers):
                if idx not in step.layers:
                    step.layers[idx] = self._capture(step, self._layer_fn(step, idx))
        self.logits(torch.zeros(batch, self.shape.hidden_size, dtype=self.dtype, device=self.device))

    def _capture(self, step: _Step, fn):
        p = self.persistent
        step.scratch()
        graph = self.graph_cls(fn, p.pool)
        c = p.cache
        for t in (*c.k_layers, *c.v_layers):  # the warm-up wrote K/V on the scratch slots: keep them zero
            t[:, :, p.slots - step.q:].zero_()
        c.present[:, p.slots - step.q:] = False
        p.captures += 1
        return graph

    def _layer_fn(self, step: _Step, idx: int):
        c, fn, w, static = self.persistent.cache, self._layer, self.weights[idx], self.static_args
        present, k, v = c.present[idx], c.k_layers[idx], c.v_layers[idx]

        def run():
            present.index_fill_(0, step.slots, True)
            step.x.copy_(fn(step.x, w, k, v, step.slots, step.cos, step.sin, step.mask, **static))
        return run

    def _whole_fn(self, step: _Step):
        runs = [self._layer_fn(step, i) for i in range(self.num_layers)]
        return lambda: [run() for run in runs]

    # -------------------------------------------------------------- adapter interface
    def segment(self, start, n, hidden, mask, position_ids, position_embeddings, kv_view):
        """The whole stack replays one graph; any other run replays its layers' graphs back to back (inputs filled
        once, each layer's output already in the hidden buffer), so runs that start anywhere capture nothing new."""
        step = self._step(hidden, mask, position_embeddings[0], kv_view)
        if step is None:
            return super().segment(start, n, hidden, mask, position_ids, position_embeddings, kv_view)
        if start == 0 and n == self.num_layers:
            if step.whole is None:
                step.whole = self._capture(step, self._whole_fn(step))
            graphs = [step.whole]
        else:
            for idx in range(start, start + n):
                if idx not in step.layers:
                    step.layers[idx] = self._capture(step, self._layer_fn(step, idx))
            graphs = [step.layers[idx] for idx in range(start, start + n)]
        step.fill(x=hidden, slots=kv_view.slots, cos=position_embeddings[0], sin=position_embeddings[1], mask=mask)
        for graph in graphs:
            graph.replay()
        self.persistent.replays += len(graphs)
        return step.output()

    def logits(self, hidden):
        p = self.persistent
        if p is None or hidden.dim() != 2 or hidden.shape[0] != p.batch:
            return super().logits(hidden)
        if p.head is None:
            h = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
            if p.batch > 1:
                torch._dynamo.maybe_mark_dynamic(h, 0)
            out = torch.empty(hidden.shape[0], self.shape.vocab_size, device=self.device)
            head, norm_w, head_w, eps = self._head, self.norm.weight, self.lm_head.weight, self.shape.rms_eps
            graph = self.graph_cls(lambda: out.copy_(head(h, norm_w, head_w, eps)), p.pool)
            p.captures += 1
            p.head = (h, out, graph)
        h, out, graph = p.head
        h.copy_(hidden)
        graph.replay()
        p.replays += 1
        return out.clone()

    def graph_stats(self) -> dict:
        """Captures and replays so far for the persistent shape, and the step shapes (queries per call) recorded."""
        return graph_stats(self.model)


def release(model):
    """Free ``model``'s persistent KV cache and graphs (the next graphed generation makes new ones)."""
    model._specee_graphs = None


def graph_stats(model) -> dict:
    """Captures and replays of ``model``'s persistent graphs (for its latest batch size and slot bucket)."""
    p = getattr(model, "_specee_graphs", None)
    if p is None:
        return dict(captures=0, replays=0, batch=None, slots=None, queries=[])
    return dict(captures=p.captures, replays=p.replays, batch=p.batch, slots=p.slots, queries=sorted(p.steps))
