"""Compiled decode: one compiled decoder-layer step serves every layer, so exits cost no recompiles.

``torch.compile`` of a whole model forward bakes the layer count into the graph; an exit then means
a graph break or a second graph per depth. Instead we compile a functional decoder layer (gpt-fast
style) whose weights are *inputs*: every layer of a model has the same shapes, so the 30 layers of
SmolLM2 share one graph, and the engine chooses the exit between calls. The KV cache is static
([batch, kv_heads, max_len, head_dim] per layer, written by slot with ``index_copy_``) and attention
always spans all ``max_len`` slots under a boolean mask, so a step has the same shapes whatever the
sequence length, the exit layer or the holes. Shapes that legitimately vary (batch size, cache
length, several queries per call for prefill, deferred fills and speculative verification) are
marked dynamic the first time they are seen, so each compiles once per process.

The engine hands over runs of layers between two exit tests (spans, ``segment``): a whole stack that tests no
exit is one graph (as a gpt-fast step); any other run is a few calls of chunk graphs of ``SEGMENT_CHUNKS`` layers,
one graph per chunk size whatever the start layer. Before its first generation of a shape class (batch 1 or more)
the engine has every graph its mode can call compiled on scratch inputs (``CompiledAdapter.precompile``), so no
exit pattern compiles anything in the middle of a generation, however late it first occurs.

The arithmetic is transformers' Llama/Mistral/Qwen2 decoder layer op for op (RMSNorm in fp32,
rotate-half RoPE, SDPA, SwiGLU); grouped-query attention packs the query heads of a KV head
together instead of repeating K/V (transformers' ``pack_gqa``). Compiled kernels round differently
from eager ones, so outputs match eager to rounding, not bit for bit.

Inductor caches what it compiles on disk (its FX-graph cache, on by default, in
``$TORCHINDUCTOR_CACHE_DIR`` or ``/tmp/torchinductor_<user>``), so a second process skips code
generation and C++ compilation; dynamo still traces once per process (seconds).
"""
from __future__ import annotations

import time
import types
import warnings
from functools import partial

import torch
import torch.nn.functional as F

from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .models import DecoderAdapter

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
                "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}
_BACKENDS = ("inductor", "aot_eager", "eager")
_COMPILED: dict = {}          # (function, backend, mode, model signature) -> compiled callable, shared by engines
_PRECOMPILED: set = set()     # shape classes whose graphs CompiledAdapter.precompile compiled in this process
COMPILE_SECONDS = {"total": 0.0, "graphs": 0}
# Layers per compiled call when a step runs several layers between exit tests: one graph per size serves every
# start layer (weights are inputs). Larger chunks save calls (~0.3 ms each on a CPU, a dozen launches each on a
# GPU) but compile for longer, as inductor unrolls them.
SEGMENT_CHUNKS = (8, 4, 2, 1)


def rms_norm(x, weight, eps: float):
    """transformers' LlamaRMSNorm: normalise in fp32, scale in the input dtype."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def layer_step(x, w, k_cache, v_cache, slots, cos, sin, mask, eps: float, num_heads: int,
               num_kv_heads: int, head_dim: int, scale: float, act: str):
    """One decoder layer over queries x [B, q, d] at cache ``slots`` [q]; writes their K/V.

    w: (ln1, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, ln2, gate_w, gate_b, up_w, up_b, down_w, down_b),
    biases None where the model has none. k_cache/v_cache [B, Hkv, S, D];
    cos/sin [B, q, D]; mask [B, 1, q, S] bool (True = attend). Returns x after the layer.
    """
    ln1, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, ln2, g_w, g_b, u_w, u_b, d_w, d_b = w
    B, q, _ = x.shape
    rep = num_heads // num_kv_heads
    h = rms_norm(x, ln1, eps)
    qs = F.linear(h, q_w, q_b).view(B, q, num_heads, head_dim).transpose(1, 2)
    ks = F.linear(h, k_w, k_b).view(B, q, num_kv_heads, head_dim).transpose(1, 2)
    vs = F.linear(h, v_w, v_b).view(B, q, num_kv_heads, head_dim).transpose(1, 2)
    qs, ks = apply_rotary_pos_emb(qs, ks, cos, sin)
    k_cache.index_copy_(2, slots, ks)
    v_cache.index_copy_(2, slots, vs)
    # Query heads h = kv * rep + r share KV head kv: pack them as rep * q queries of that KV head.
    packed = qs.reshape(B, num_kv_heads, rep * q, head_dim)
    out = F.scaled_dot_product_attention(packed, k_cache, v_cache, attn_mask=mask.repeat(1, 1, rep, 1), scale=scale)
    out = out.reshape(B, num_heads, q, head_dim).transpose(1, 2).reshape(B, q, num_heads * head_dim)
    x = x + F.linear(out, o_w, o_b)
    h = rms_norm(x, ln2, eps)
    return x + F.linear(_ACTIVATIONS[act](F.linear(h, g_w, g_b)) * F.linear(h, u_w, u_b), d_w, d_b)


def stack_step(x, ws, ks, vs, slots, cos, sin, mask, **static):
    """n = len(ws) layers in a row in one graph: the whole stack of a step that tests no exit, or a chunk of a run
    between two exit tests."""
    for w, k, v in zip(ws, ks, vs):
        x = layer_step(x, w, k, v, slots, cos, sin, mask, **static)
    return x


def chunk_sizes(n: int) -> list[int]:
    """``n`` layers as compiled calls of ``SEGMENT_CHUNKS`` sizes, largest first (29 -> 8, 8, 8, 4, 1)."""
    out = []
    for size in SEGMENT_CHUNKS:
        out += [size] * (n // size)
        n %= size
    return out


def head_step(hidden, norm_w, head_w, eps: float):
    """Final norm and LM head: fp32 logits of hidden [..., d]."""
    return F.linear(rms_norm(hidden, norm_w, eps), head_w).float()


def parse_compile(value) -> dict | None:
    """``compile=`` of generate(): False/None, True (inductor), a backend name, or a dict(backend=, mode=, graphs=,
    options=).

    ``graphs=True`` replays the compiled layers as hand-captured CUDA graphs (``specee.graphs``); ``"host"``
    runs that path on the CPU without graphs (tests). ``options`` are inductor config patches for specee's graphs
    only, e.g. ``{"cpp_wrapper": True}`` (a C++ wrapper calls the kernels instead of Python: less host time per
    call, longer compiles)."""
    if value is None or value is False:
        return None
    if value is True:
        opts = {"backend": "inductor", "mode": None, "graphs": False, "options": {}}
    elif isinstance(value, str):
        opts = {"backend": value, "mode": None, "graphs": False, "options": {}}
    elif isinstance(value, dict):
        unknown = set(value) - {"backend", "mode", "graphs", "options"}
        if unknown:
            raise ValueError(f"unknown compile options {sorted(unknown)}; give "
                             "compile=dict(backend=..., mode=..., graphs=..., options=...).")
        opts = {"backend": value.get("backend", "inductor"), "mode": value.get("mode"),
                "graphs": value.get("graphs", False), "options": dict(value.get("options") or {})}
        if opts["graphs"] not in (False, True, "host"):
            raise ValueError(f"compile graphs={opts['graphs']!r}: use True (CUDA graphs), False or 'host'.")
        if opts["options"] and opts["backend"] != "inductor":
            raise ValueError(f"compile options= patch inductor's config; backend {opts['backend']!r} does not read "
                             "them: drop options or use backend='inductor'.")
    else:
        raise TypeError(f"compile must be a bool, a backend name or a dict, got {type(value).__name__}.")
    if opts["backend"] not in _BACKENDS:
        raise ValueError(f"unknown compile backend {opts['backend']!r}; choose one of {', '.join(_BACKENDS)}.")
    if opts["mode"] not in (None, "default", "max-autotune-no-cudagraphs"):
        raise ValueError(
            f"compile mode {opts['mode']!r} is not supported: torch's CUDA-graph modes ('reduce-overhead', "
            "'max-autotune') re-record a graph whenever the weight inputs change, which is every layer here; "
            "use the default mode (and graphs=True for specee's own per-layer CUDA graphs).")
    return opts


def _timed_backend(backend: str, mode, options=None):
    """Wrap a dynamo backend so the seconds spent compiling graphs are counted apart from decoding."""
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        patches = {**(torch._inductor.list_mode_options(mode) if mode else {}), **(options or {})}
        inner = partial(compile_fx, config_patches=patches) if patches else compile_fx
    else:
        from torch._dynamo.backends.registry import lookup_backend

        inner = lookup_backend(backend)

    def compile_graph(gm, example_inputs):
        t = time.perf_counter()
        out = inner(gm, example_inputs)
        COMPILE_SECONDS["total"] += time.perf_counter() - t
        COMPILE_SECONDS["graphs"] += 1
        return out

    return compile_graph


def options_key(opts) -> tuple:
    """What of ``parse_compile``'s options changes the compiled code (graphs compiled otherwise are kept apart)."""
    return opts["backend"], opts["mode"], repr(sorted(opts["options"].items()))


def _compiled(fn, opts, signature):
    """``fn`` compiled for one model signature (shapes, dtype, device). Dynamo keeps its graphs, and its budget
    of recompiles (8 by default), per code object: a private copy of ``fn``'s code per signature keeps models
    from using up each other's budget, without raising torch's limit for everyone else in the process."""
    key = (fn.__name__, *options_key(opts), signature)
    if key not in _COMPILED:
        private = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                     fn.__closure__)
        backend = _timed_backend(opts["backend"], opts["mode"], opts["options"])
        _COMPILED[key] = torch.compile(private, backend=backend, fullgraph=True)
    return _COMPILED[key]


def inductor_cache_dir() -> str:
    """Where inductor keeps compiled graphs between processes."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def _unsupported(model) -> str | None:
    act = getattr(model.config, "hidden_act", "silu")
    if act not in _ACTIVATIONS:
        return f"the activation {act!r} (supported: {', '.join(_ACTIVATIONS)})"
    return None


def _mark_cache(cache):
    """Mark the cache's sizes that vary between generations dynamic, once per cache."""
    if getattr(cache, "_marked_dynamic", False):
        return
    _mark_dynamic_kv((*cache.k_layers, *cache.v_layers))
    cache._marked_dynamic = True


def _mark_dynamic_kv(tensors):
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 2)
        if t.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)


def _dynamic_dims(x, slots, cos, sin, mask):
    """Mark the sizes that vary between calls dynamic (once compiled, every later size reuses the graph).
    Size-1 dims stay static (torch specializes them), so q = 1 and batch 1 get graphs of their own."""
    mark = torch._dynamo.maybe_mark_dynamic
    mark(mask, 3)
    if x.shape[0] > 1:
        for t in (x, cos, sin, mask):
            mark(t, 0)
    if x.shape[1] > 1:
        for t, d in ((x, 1), (cos, 1), (sin, 1), (mask, 2), (slots, 0)):
            mark(t, d)


def changed(record: dict, name: str, t) -> bool:
    """Whether ``t`` may hold other contents than the tensor recorded under ``name`` last time (then it is
    recorded). Identity without reading the data: the base object (held, so its memory cannot be reused
    meanwhile), view geometry and version counter (bumped by in-place writes)."""
    base = t._base if t._base is not None else t
    key = (base, (t.storage_offset(), tuple(t.shape), t.stride(), t._version))
    prev = record.get(name)
    if prev is not None and prev[0] is base and prev[1] == key[1]:
        return False
    record[name] = key
    return True


def _is_dense(t) -> bool:
    """Not a view, and strided exactly as a fresh contiguous tensor (dynamo guards on size-1 dims' strides too)."""
    if t._base is not None or t.storage_offset():
        return False
    stride, expect = t.stride(), 1
    for size, st in zip(reversed(t.shape), reversed(stride)):
        if st != expect:
            return False
        expect *= size
    return True


class CompiledAdapter(DecoderAdapter):
    """A DecoderAdapter whose layers and head run through compiled functional code over a static cache."""

    static = True

    def __init__(self, model, compile=True):
        super().__init__(model)
        self.opts = parse_compile(compile)
        why = _unsupported(model)
        if why:
            raise ValueError(f"compile=True does not support {why}; decode this model with compile=False.")
        self.attn_implementation = "sdpa"  # layer_step always attends with SDPA under a boolean mask
        cfg = model.config
        s = self.shape
        scale = getattr(self.layers[0].self_attn, "scaling", s.head_dim ** -0.5)
        self.static_args = dict(eps=s.rms_eps, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
                                head_dim=s.head_dim, scale=float(scale), act=getattr(cfg, "hidden_act", "silu"))
        self.weights = [self._layer_weights(layer) for layer in self.layers]
        # What the compiled code depends on: two models alike in all of it share graphs (and precompiled classes)
        self.signature = (s, self.dtype, str(self.device), tuple(sorted(self.static_args.items())),
                          tuple(None if w is None else tuple(w.shape) for w in self.weights[0]))
        self._layer = _compiled(layer_step, self.opts, self.signature)
        self._head = _compiled(head_step, self.opts, self.signature)
        self._chunks = {}                        # layers in a row -> compiled call (see _chunk)
        self._sources, self._dense_inputs = {}, {}  # name -> last input seen / its dense copy (see _dense)

    @staticmethod
    def _layer_weights(layer):
        at, mlp = layer.self_attn, layer.mlp

        def wb(lin):
            return lin.weight, lin.bias

        return (layer.input_layernorm.weight, *wb(at.q_proj), *wb(at.k_proj), *wb(at.v_proj), *wb(at.o_proj),
                layer.post_attention_layernorm.weight, *wb(mlp.gate_proj), *wb(mlp.up_proj), *wb(mlp.down_proj))

    def layer(self, idx, hidden, mask, position_ids, position_embeddings, kv_view):
        return self.segment(idx, 1, hidden, mask, position_ids, position_embeddings, kv_view)

    def segment(self, start, n, hidden, mask, position_ids, position_embeddings, kv_view):
        """Layers start..start+n-1 in few compiled calls: the whole stack of a one-query step in one graph, any
        other run in chunks of ``SEGMENT_CHUNKS`` layers (one graph per chunk size serves every start)."""
        c, (hidden, slots, cos, sin, mask) = self._inputs(hidden, mask, position_embeddings, kv_view)
        c.present[start:start + n].index_fill_(1, slots, True)
        whole = start == 0 and n == self.num_layers and hidden.shape[1] == 1
        for size in [n] if whole else chunk_sizes(n):
            hidden = self._chunk(size)(hidden, self.weights[start: start + size], c.k_layers[start: start + size],
                                       c.v_layers[start: start + size], slots, cos, sin, mask)
            start += size
        return hidden

    def _chunk(self, size):
        """Compiled layers (weights, caches) -> x for ``size`` layers in a row (made once per size: per-span hot path)."""
        if size not in self._chunks:
            static = self.static_args
            if size == 1:
                layer = self._layer
                self._chunks[size] = lambda x, ws, ks, vs, *rest: layer(x, ws[0], ks[0], vs[0], *rest, **static)
            else:
                stack = _compiled(stack_step, self.opts, (*self.signature, size))
                self._chunks[size] = lambda x, ws, ks, vs, *rest: stack(x, tuple(ws), ks, vs, *rest, **static)
        return self._chunks[size]

    def precompile(self, batch: int, spans: bool, fills: bool = False, verify: bool = False):
        """Compile, before a generation of ``batch`` rows starts, every graph its steps may call: the layer for
        several queries (prefill), the whole stack and the head; with ``spans`` (a mode that runs layers between
        exit tests) the layer and every chunk size for one query; with ``fills`` (deferred fills) or ``verify``
        (speculative verification) for several queries too, and with ``verify`` the head over several rows per
        batch row.

        Which of them a generation calls depends on where it exits: compiled on first use, a deferred fill
        after the first exit of the tenth generation would stall it for seconds. Done once per process and shape
        class, on scratch inputs of distinct sizes (batch 3, 5 queries, 37 slots), so that dynamo's duck sizing
        ties no two dims that vary apart (a first call with batch 2 and 2 queries would guard on their equality)."""
        key = (*options_key(self.opts), self.signature, batch > 1, spans, fills or verify, verify)
        if key in _PRECOMPILED:
            return
        _PRECOMPILED.add(key)
        B, L = (1 if batch == 1 else 3), self.num_layers
        chunks = [s for s in SEGMENT_CHUNKS if 1 < s <= L] if spans else []
        runs = [(1, [L]), (5, [1] + (chunks if fills or verify else []))]
        if spans:
            runs.append((1, [1] + chunks))
        for q, sizes in runs:
            for size in sizes:
                self._scratch_run(B, q, size)
        for rows in (B, B * 5) if verify else (B,):
            self.logits(torch.zeros(rows, self.shape.hidden_size, dtype=self.dtype, device=self.device))

    def _scratch_run(self, B: int, q: int, size: int, S: int = 37):
        """``size`` layers over q queries on scratch caches of S slots: compiles that call's graph."""
        s = self.shape
        ks = tuple(torch.zeros(B, s.num_kv_heads, S, s.head_dim, dtype=self.dtype, device=self.device)
                   for _ in range(2 * size))
        _mark_dynamic_kv(ks)
        x = torch.zeros(B, q, s.hidden_size, dtype=self.dtype, device=self.device)
        slots = torch.arange(S - q, S, device=self.device)
        cos, sin = self.rope(x, slots.expand(B, q))
        mask = torch.ones(B, 1, q, S, dtype=torch.bool, device=self.device)
        _dynamic_dims(x, slots, cos, sin, mask)
        self._chunk(size)(x, self.weights[:size], ks[:size], ks[size:], slots, cos, sin, mask)

    def _inputs(self, hidden, mask, position_embeddings, kv_view):
        if mask is None or mask.dtype != torch.bool:
            raise RuntimeError("CompiledAdapter needs a boolean mask over the whole static cache (KVCache(static=True)).")
        c = kv_view.cache
        _mark_cache(c)
        # The engine hands over slices and index results alike; dynamo guards on strides (even of size-1 dims)
        # and on a view's base, so one of each would be two graphs: give every call dense inputs (KBs), copied
        # once per step (the slots, rope and mask of a step are the same tensors for all its layers).
        if not _is_dense(hidden):
            hidden = hidden.clone(memory_format=torch.contiguous_format)
        slots, cos, sin, mask = (self._dense(name, t) for name, t in
                                 (("slots", kv_view.slots), ("cos", position_embeddings[0]),
                                  ("sin", position_embeddings[1]), ("mask", mask)))
        _dynamic_dims(hidden, slots, cos, sin, mask)
        return c, (hidden, slots, cos, sin, mask)

    def _dense(self, name, t):
        if changed(self._sources, name, t):
            self._dense_inputs[name] = t.clone(memory_format=torch.contiguous_format)
        return self._dense_inputs[name]

    def logits(self, hidden):
        # A row slice (hidden[:, -1]) keeps the parent's strides and offset, which dynamo guards on: copy it.
        hidden = hidden.clone(memory_format=torch.contiguous_format)
        if hidden.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(hidden, 0)
        return self._head(hidden, self.norm.weight, self.lm_head.weight, self.shape.rms_eps)


def make_adapter(model, compile=None) -> DecoderAdapter:
    """The eager adapter, or the compiled one when ``compile`` asks for it (see :func:`parse_compile`)."""
    opts = parse_compile(compile)
    if opts is None:
        return DecoderAdapter(model)
    if opts["graphs"]:
        from .graphs import GraphedAdapter

        return GraphedAdapter(model, compile)
    return CompiledAdapter(model, compile)


def compile_stats() -> dict:
    """Seconds spent compiling graphs in this process and how many graphs were compiled."""
    return dict(COMPILE_SECONDS)


def warmup(model, tokenizer=None, *, mode="full", exit_config=None, batch_sizes=(1,), compile=True,
           max_new_tokens: int = 4, max_length: int | None = None) -> float:
    """Compile every graph a generation will need (batch 1 and batch > 1, one and several queries per
    call) with a short dummy generation per batch size; returns the seconds it took. Later generations
    of the same model in this process start at full speed. (A first generation compiles the same graphs
    before its prefill, ``CompiledAdapter.precompile``, whether or not the dummy exits or drafts: warm-up only
    moves that time out of the first request.)

    With ``compile=dict(graphs=True)`` the last batch size's CUDA graphs are captured too, over a cache sized for
    ``max_length`` (prompt + new tokens of the generations to come; default: the dummy's own), while decoding only
    ``max_new_tokens`` dummy tokens."""
    from transformers import StoppingCriteriaList
    from transformers.generation.stopping_criteria import MaxLengthCriteria

    from .generate import generate

    t = time.perf_counter()
    device = next(model.parameters()).device
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.generation_config, "eos_token_id", 0)
        pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    for bs in batch_sizes:
        ids = torch.arange(3, 3 + 3 * bs, device=device).view(bs, 3) % model.config.vocab_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            length = dict(max_length=max_length) if max_length else dict(max_new_tokens=max_new_tokens)
            stop = StoppingCriteriaList([MaxLengthCriteria(3 + max_new_tokens)])
            generate(model, ids, torch.ones_like(ids), mode=mode, exit_config=exit_config, compile=compile,
                     do_sample=False, pad_token_id=pad, stopping_criteria=stop, **length)
    return time.perf_counter() - t
