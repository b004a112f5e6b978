"""Compiled decode: specee's modes against transformers' compiled static-cache decode, side by side.

    python bench/bench_compile.py [--num-prompts 6] [--max-new-tokens 64] [--threads 1]
                                  [--modes skipdecode confidence early_exit self_speculative] [--out compile_cpu]
    python bench/bench_compile.py --shape llama2-7b --device cuda --batch-sizes 1 16 --graphs --out compile_<gpu>

Methods (greedy, batch 1, the default model, Spec-Bench prompts spread over categories):
  hf_eager            model.generate
  gptfast_compiled    the whole decode step as one compiled graph (bench/gptfast_loop.py): the
                      yardstick for full_compiled; decodes past EOS, so its tokens/s counts them all
  hf_static_compiled  model.generate with a StaticCache sized for the longest prompt and
                      CompileConfig(fullgraph=True): transformers' own recipe, decode step compiled
                      (specee.bench.hf_static_compiled)
  full_eager          specee full
  full_compiled       specee full, compile=True
  <mode>_compiled     specee <mode>, compile=True (the exit modes)
  <mode>_graphs       the same with compile=dict(graphs=True): per-layer CUDA graphs (--graphs, GPU only)
  full_cpp_wrapper    full, compile=dict(options={"cpp_wrapper": True}): inductor's C++ wrapper calls the kernels
                      instead of Python (--cpp-wrapper; its first compile takes minutes)
Every prompt is decoded by every method in turn, after a warm-up that compiles (its seconds are
reported apart, per method). Reports tokens/s, speedup over hf_static_compiled and over hf_eager,
token agreement with full greedy, mean exit layer, the graphs dynamo compiled inside timed runs (a
compile stall counted as decode time; 0 when warm-up covered every shape) and, for *_graphs methods, the CUDA
graphs captured inside them, and the oracle bound priced with
the compiled layer and head costs measured in the same run. Writes bench/results/<out>.json and <out>.png.
With --shape (a random-weight model of a real shape, for GPUs) see main_shape.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, default_prompt_file, write_json  # noqa: E402
from e2e import pick_prompts  # noqa: E402
from gptfast_loop import GptFastDecoder  # noqa: E402

import specee  # noqa: E402
from specee import compiled  # noqa: E402
from specee.bench import DEFAULT_CONFIGS, hf_static_compiled, oracle_exits, synchronize  # noqa: E402
from specee.prompts import encode, new_tokens  # noqa: E402


def methods(model, modes, max_cache_len, graphs=False, cpp_wrapper=False):
    """The methods to time; with ``graphs`` each compiled specee method gets a ``*_graphs`` twin (CUDA graphs), with
    ``cpp_wrapper`` full gets a ``full_cpp_wrapper`` twin."""
    L = model.config.num_hidden_layers
    m = {"hf_eager": ("hf", model.generate),
         "hf_static_compiled": ("hf", hf_static_compiled(model, max_cache_len=max_cache_len)),
         "gptfast_compiled": ("gptfast", (GptFastDecoder(model), max_cache_len)),
         "full_eager": ("specee", dict(mode="full"))}
    for mode in ("full", *modes):
        cfg = DEFAULT_CONFIGS[mode](L) if mode in DEFAULT_CONFIGS else None
        if mode == "early_exit":
            from specee.predictors import load_predictors

            cfg = {"predictor": load_predictors(None, model)}
        m[f"{mode}_compiled"] = ("specee", dict(mode=mode, exit_config=cfg, compile=True))
        if graphs:
            m[f"{mode}_graphs"] = ("specee", dict(mode=mode, exit_config=cfg, compile=dict(graphs=True)))
        if cpp_wrapper and mode == "full":
            m["full_cpp_wrapper"] = ("specee", dict(mode="full", compile=dict(options={"cpp_wrapper": True})))
    return m


def run(model, ids, mask, how, n):
    kind, what = how
    synchronize(ids.device)
    t = time.perf_counter()
    if kind == "hf":
        seq, exits = what(ids, attention_mask=mask, max_new_tokens=n, do_sample=False), None
    elif kind == "gptfast":  # no EOS stop: it always decodes n tokens
        dec, max_len = what
        seq, exits = dec.generate(ids, n, max_len), None
    else:
        out = specee.generate(model, ids, mask, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, **what)
        seq, exits = out.sequences, out.exit_layers
    synchronize(ids.device)
    return seq, exits, time.perf_counter() - t


def run_counted(model, ids, mask, how, n, counts):
    """run(), adding to ``counts`` [graphs compiled, CUDA graphs captured] what happened during it (after warm-up,
    both should stay 0: otherwise a compile or capture stall is counted as decode time)."""
    graphs, captured = counters["stats"]["unique_graphs"], captures(model)
    out = run(model, ids, mask, how, n)
    counts[0] += counters["stats"]["unique_graphs"] - graphs
    counts[1] += captures(model, since=captured)
    return out


def captures(model, since=None):
    """CUDA graphs captured so far for the model's persistent graph set (specee.graphs), as (set, count); with
    ``since`` (an earlier return) the captures made after it (a new set, for a new batch or slot bucket, counts
    whole)."""
    p = getattr(model, "_specee_graphs", None)
    if since is None:  # a weak reference: holding the set would keep its KV buffers alive past a reallocation
        return (weakref.ref(p) if p is not None else None), (p.captures if p is not None else 0)
    ref, count = since
    now = p.captures if p is not None else 0
    return now - count if ref is not None and ref() is p else now


def copy_bandwidth(device, nbytes=1 << 30, reps=10):
    """Bytes/s of a device-to-device copy of ``nbytes`` (read + write counted once, as decoding reads weights)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(src.device)
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    synchronize(src.device)
    return nbytes * reps / (time.perf_counter() - t)


def main_shape(args):
    """--shape: a random-weight model of a real shape (no tokenizer, no EOS), full decode only: HF eager, HF static +
    compile, the gpt-fast-style loop, specee full eager and compiled, per batch size; the share of the device's copy
    bandwidth that full_compiled's weight reads reach. (Exit modes on such a model: `specee bench --replay`.)"""
    from specee.replay import build_model

    model = build_model(args.shape, args.device)
    dev = next(model.parameters()).device
    L, N = model.config.num_hidden_layers, args.max_new_tokens
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    bandwidth = copy_bandwidth(dev)
    g = torch.Generator().manual_seed(0)
    groups = {}
    for bs in args.batch_sizes:
        ids = torch.randint(0, model.config.vocab_size, (bs, args.prompt_len), generator=g).to(dev)
        mask = torch.ones_like(ids)
        how = methods(model, [], max_cache_len=args.prompt_len + N, graphs=args.graphs, cpp_wrapper=args.cpp_wrapper)
        first = {name: run(model, ids, mask, h, min(8, N))[2] for name, h in how.items()}  # compiles
        secs = {name: [] for name in how}
        seqs, timed = {}, {name: [0, 0] for name in how}  # graphs compiled, CUDA graphs captured while timed
        for _ in range(args.reps):  # interleaved; the median is kept
            for name, h in how.items():
                seq, _, dt = run_counted(model, ids, mask, h, N, timed[name])
                secs[name].append(dt)
                seqs[name] = seq
        tps = {m: bs * N / sorted(v)[len(v) // 2] for m, v in secs.items()}
        groups[f"batch_{bs}"] = {m: dict(
            tokens_per_s=tps[m], vs_hf_static_compiled=tps[m] / tps["hf_static_compiled"],
            vs_hf_eager=tps[m] / tps["hf_eager"], vs_gptfast=tps[m] / tps["gptfast_compiled"],
            exact_vs_full_eager=bool(torch.equal(seqs[m], seqs["full_eager"])), first_call_s=first[m],
            weight_bandwidth_fraction=weight_bytes * tps[m] / bs / bandwidth, graphs_compiled_while_timed=timed[m][0],
            cuda_graphs_captured_while_timed=timed[m][1]) for m in how}
    doc = dict(benchmark="compile_shape", shape=args.shape, dtype=str(next(model.parameters()).dtype), num_layers=L,
               prompt_len=args.prompt_len, max_new_tokens=N, reps=args.reps, weight_bytes=weight_bytes,
               copy_bandwidth_bytes_per_s=bandwidth, results=groups)
    path = write_json(f"{args.out}.json", doc)
    for group, rows in groups.items():
        print(f"\n{group}: {'method':<22}{'tok/s':>9}{'vs HF compiled':>16}{'vs gpt-fast':>13}{'of copy BW':>12}"
              f"{'timed compiles/captures':>25}")
        for m, r in rows.items():
            print(f"{'':>9}{m:<22}{r['tokens_per_s']:>9.1f}{r['vs_hf_static_compiled']:>15.2f}x{r['vs_gptfast']:>12.2f}x"
                  f"{r['weight_bandwidth_fraction']:>12.0%}"
                  f"{r['graphs_compiled_while_timed']:>17d}/{r['cuda_graphs_captured_while_timed']}")
    print(f"wrote {path}")


@torch.no_grad()
def compiled_costs(model, reps=20):
    """ms of one compiled decoder layer and of the compiled head at batch 1 (q = 1, a 256-slot cache)."""
    from specee.cache import KVCache

    a = compiled.CompiledAdapter(model)
    c = KVCache(a.shape, 1, 256, a.dtype, a.device, static=True)
    c.append(torch.ones(1, 128, dtype=torch.bool), torch.arange(128)[None])
    x = torch.randn(1, 1, a.shape.hidden_size, dtype=a.dtype)
    slots, pos = torch.tensor([127]), torch.tensor([[127]])
    rope, mask = a.rope(x, pos), c.mask(None, slots, a.dtype, False)

    def timed(fn):
        for _ in range(3):
            fn(0)
        t = time.perf_counter()
        for i in range(reps):
            fn(i % a.num_layers)
        return (time.perf_counter() - t) / reps * 1e3

    layer = timed(lambda l: a.layer(l, x, mask, pos, rope, c.view(slots, None)))
    head = timed(lambda l: a.logits(x[:, -1]))
    return layer, head


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default=str(default_prompt_file()))
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", nargs="*", default=["skipdecode", "confidence", "early_exit", "self_speculative"])
    ap.add_argument("--out", default="compile_cpu")
    ap.add_argument("--shape", default=None, help="instead of the default model: a random-weight model of this shape "
                    "(specee.replay.SHAPES, e.g. llama2-7b), full decode only (GPU check C2 in bench/GPU_OWED.md)")
    ap.add_argument("--device", default=None, help="--shape: device (default: cuda when available)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="--shape: batch sizes")
    ap.add_argument("--prompt-len", type=int, default=32, help="--shape: random prompt tokens")
    ap.add_argument("--reps", type=int, default=3, help="--shape: interleaved repetitions (median kept)")
    ap.add_argument("--cpp-wrapper", action="store_true", help="also run full with inductor's C++ wrapper "
                    "(compile=dict(options={'cpp_wrapper': True}); row full_cpp_wrapper)")
    ap.add_argument("--graphs", action="store_true", help="also run each compiled specee method with "
                    "compile=dict(graphs=True): per-layer CUDA graphs (GPU only; rows named *_graphs)")
    args = ap.parse_args(argv)
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    if args.shape:
        return main_shape(args)
    model, tok = specee.load_default_model()
    L = model.config.num_hidden_layers
    prompts = pick_prompts(args.prompts, args.num_prompts)
    longest = max(encode(tok, [p.text])[0].shape[1] for p in prompts)
    how = methods(model, args.modes, max_cache_len=longest + args.max_new_tokens, graphs=args.graphs,
                  cpp_wrapper=args.cpp_wrapper)

    warm_ids, warm_mask = encode(tok, [prompts[0].text])
    compile_s = {}
    for name, h in how.items():  # first call of each method: compiles (transformers' and ours)
        before = compiled.compile_stats()["total"]
        _, _, dt = run(model, warm_ids, warm_mask, h, args.max_new_tokens)
        compile_s[name] = dict(first_call_s=dt, graph_compile_s=compiled.compile_stats()["total"] - before)

    tokens = {m: 0 for m in how}
    seconds = {m: 0.0 for m in how}
    agree = {m: [0, 0] for m in how}
    exits = {m: [] for m in how}
    timed = {m: [0, 0] for m in how}  # graphs compiled, CUDA graphs captured inside timed runs (see run_counted)
    oracle = []
    for p in tqdm(prompts, desc="bench_compile"):
        ids, mask = encode(tok, [p.text])
        P = ids.shape[1]
        rows = {}
        for name, h in how.items():
            seq, ex, dt = run_counted(model, ids, mask, h, args.max_new_tokens, timed[name])
            rows[name] = new_tokens(seq, P, tok.eos_token_id)[0]
            tokens[name] += seq.shape[1] - P if how[name][0] == "gptfast" else len(rows[name])
            seconds[name] += dt
            exits[name] += ex[0, : len(rows[name])].tolist() if ex is not None else [L] * len(rows[name])
            tqdm.write(f"  {p.category:<12} {name:<24} {dt:7.2f} s {len(rows[name]):4d} tokens")
        ref = rows["full_eager"]
        for name, r in rows.items():
            agree[name][0] += sum(x == y for x, y in zip(r, ref))
            agree[name][1] += len(ref)
        seq = torch.cat([ids[0], torch.tensor(ref, dtype=torch.long)])[None]
        oracle.append(oracle_exits(model, seq, P))

    layer_ms, head_ms = compiled_costs(model)
    o = torch.cat(oracle).float()
    bound = (L * layer_ms + head_ms) / (o.mean().item() * layer_ms + head_ms)
    tps = {m: tokens[m] / seconds[m] for m in how}
    results = {m: dict(tokens_per_s=tps[m], tokens=tokens[m], seconds=seconds[m],
                       vs_hf_static_compiled=tps[m] / tps["hf_static_compiled"], vs_hf_eager=tps[m] / tps["hf_eager"],
                       token_agreement_with_full=agree[m][0] / max(1, agree[m][1]),
                       mean_exit_layer=sum(exits[m]) / max(1, len(exits[m])), graphs_compiled_while_timed=timed[m][0],
                       cuda_graphs_captured_while_timed=timed[m][1],
                       **compile_s[m]) for m in how}
    doc = dict(benchmark="compile", model="SmolLM2-135M-Instruct (fp32)", prompts=args.prompts,
               num_prompts=len(prompts), max_new_tokens=args.max_new_tokens, num_layers=L, results=results,
               oracle=dict(mean_exit_layer=o.mean().item(), compiled_layer_ms=layer_ms, compiled_head_ms=head_ms,
                           speedup_bound_vs_full=bound))
    path = write_json(f"{args.out}.json", doc)
    plot(json.loads(path.read_text()), RESULTS / f"{args.out}.png")
    print(f"\n{'method':<24}{'tok/s':>8}{'vs HF compiled':>16}{'vs HF eager':>13}{'agree':>8}{'exit':>7}"
          f"{'first call s':>14}{'timed compiles':>16}")
    for m, r in results.items():
        print(f"{m:<24}{r['tokens_per_s']:>8.2f}{r['vs_hf_static_compiled']:>15.2f}x{r['vs_hf_eager']:>12.2f}x"
              f"{r['token_agreement_with_full']:>8.1%}{r['mean_exit_layer']:>7.1f}{r['first_call_s']:>14.1f}"
              f"{r['graphs_compiled_while_timed']:>16d}")
    print(f"oracle: mean exit {o.mean().item():.1f}/{L}, bound {bound:.2f}x over full (compiled layer "
          f"{layer_ms:.2f} ms, head {head_ms:.2f} ms)\nwrote {path}")


def plot(doc, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    names = list(res)
    fig, ax = plt.subplots(figsize=(8, 4))
    vals = [res[n]["vs_hf_static_compiled"] for n in names]
    ax.bar(names, vals, color=["#999" if n.startswith(("hf", "gptfast")) else "#2a7" for n in names])
    ax.axhline(1.0, color="k", lw=0.8)
    full = res["full_compiled"]["vs_hf_static_compiled"]
    ax.axhline(full * doc["oracle"]["speedup_bound_vs_full"], color="r", ls="--", lw=1,
               label=f"oracle exit bound over full_compiled ({doc['oracle']['speedup_bound_vs_full']:.2f}x)")
    for i, n in enumerate(names):
        ax.text(i, vals[i], f"{res[n]['token_agreement_with_full']:.0%}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("tokens/s relative to HF static + compile")
    ax.set_title(f"{doc['model']}, {doc['meta']['device']}, {doc['meta']['cpu_threads']} thread(s); "
                 "labels: agreement with full", fontsize=8)
    ax.tick_params(axis="x", rotation=30, labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
