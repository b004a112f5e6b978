"""What a span costs: the layers of one decode step as one call per layer, as chunks, as one graph.

    python bench/bench_spans.py [--threads 1] [--out spans_cpu]                      # the default model, CPU
    python bench/bench_spans.py --shape llama2-7b --device cuda --batch-sizes 1 16 --graphs --out spans_<gpu>

The engine runs the layers between two exit tests as one span (specee/engine.py): compiled, a span is a few calls
of chunk graphs (``compiled.SEGMENT_CHUNKS``), the whole stack of a step that tests no exit one graph; with CUDA
graphs a span replays its layers' graphs back to back. This times one step (batch B, one query, a cache holding
``--context`` tokens) through L - 1 layers, side by side in one run:

  per_layer   L - 1 compiled layer calls (what every step did before spans)
  chunks      one span of L - 1 layers (chunk graphs: 8, 8, 8, 4, 2, 1 calls for 31 layers)
  whole       the L layers as one graph (a full-depth step; compiled, one query only), scaled to L - 1 layers
  graphs_*    --graphs (CUDA): the same through specee.graphs (per-layer replays / the whole-stack graph)

for 1 query per row (decoding) and for K + 1 (a speculative verification: on a GPU it should cost about one query,
memory-bound; on a CPU it does not). Reports ms per step and the ratio of each to per_layer; the outputs of
per_layer and chunks must agree to rounding.
Decides whether chunks pay on a device (call overhead against longer compiles) and whether spans deserve graphs of
their own (graphs_per_layer against graphs_whole).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

from specee import compiled  # noqa: E402
from specee.bench import synchronize  # noqa: E402


@torch.no_grad()
def time_step(adapter, batch, queries, context, reps):
    """ms per step of each way to run L - 1 layers for ``queries`` tokens per row (1: decoding; K + 1: a speculative
    verification), and the largest |per_layer - chunks| difference."""
    a, L = adapter, adapter.num_layers
    cache = a.new_cache(batch, context + 8)
    cache.append(torch.ones(batch, context, dtype=torch.bool, device=a.device),
                 torch.arange(context, device=a.device).expand(batch, -1))
    first = context - queries
    slots = torch.arange(first, context, device=a.device)
    pos = cache.positions[:, first:context]
    x = torch.randn(batch, queries, a.shape.hidden_size, dtype=a.dtype, device=a.device)
    rope, mask = a.rope(x, pos), cache.mask(None, slots, a.dtype, False)
    view = cache.view(slots, slice(first, context))

    def per_layer():
        h = x
        for l in range(L - 1):
            h = a.layer(l, h, mask, pos, rope, view)
        return h

    ways = dict(per_layer=per_layer, chunks=lambda: a.segment(0, L - 1, x, mask, pos, rope, view))
    if queries == 1:  # the whole-stack graph serves one-query steps only
        ways["whole"] = lambda: a.segment(0, L, x, mask, pos, rope, view)
    outs = {name: fn() for name, fn in ways.items()}  # compiles (and captures) outside the timing
    ms = {name: [] for name in ways}
    for _ in range(reps):  # interleaved; the median is kept
        for name, fn in ways.items():
            synchronize(a.device)
            t = time.perf_counter()
            for _ in range(10):
                fn()
            synchronize(a.device)
            ms[name].append((time.perf_counter() - t) / 10 * 1e3)
    ms = {name: statistics.median(v) for name, v in ms.items()}
    if "whole" in ms:
        ms["whole"] *= (L - 1) / L
    return ms, float((outs["per_layer"] - outs["chunks"]).abs().max())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=None, help="a random-weight model of this shape (specee.replay.SHAPES); "
                    "default: the default model")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 2, 5],
                    help="tokens per row and step (1: decoding; K + 1: verifying K drafts)")
    ap.add_argument("--context", type=int, default=256, help="tokens in the cache")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--graphs", action="store_true", help="also through specee.graphs (CUDA only)")
    ap.add_argument("--out", default="spans_cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shape:
        from specee.replay import build_model

        model, name = build_model(args.shape, args.device), args.shape
    else:
        import specee

        model, _ = specee.load_default_model(device=args.device)
        name = "SmolLM2-135M-Instruct"
    kinds = {"": compiled.CompiledAdapter(model, True)}
    if args.graphs:
        from specee.graphs import GraphedAdapter

        kinds["graphs_"] = GraphedAdapter(model, dict(graphs=True))
    results = {}
    for bs in args.batch_sizes:
        for q in args.queries:
            row = {}
            for prefix, adapter in kinds.items():
                ms, diff = time_step(adapter, bs, q, args.context, args.reps)
                row.update({f"{prefix}{k}_ms": v for k, v in ms.items()})
                row[f"{prefix}max_abs_diff_per_layer_vs_chunks"] = diff
                row.update({f"{prefix}{k}_vs_per_layer": ms["per_layer"] / v for k, v in ms.items() if k != "per_layer"})
            results[f"batch_{bs}_queries_{q}"] = row
            print(f"batch {bs}, {q} queries: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()))
    L = model.config.num_hidden_layers
    path = write_json(f"{args.out}.json", dict(
        benchmark="spans", model=name, dtype=str(next(model.parameters()).dtype), num_layers=L,
        layers_timed=L - 1, context=args.context, chunks=list(compiled.SEGMENT_CHUNKS),
        chunk_calls=len(compiled.chunk_sizes(L - 1)), reps=args.reps, results=results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
