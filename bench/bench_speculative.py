"""Self-speculative decoding against the peers a user would pick, side by side, on the default model.

    python bench/bench_speculative.py [--num-prompts 13] [--max-new-tokens 64] [--batch-sizes 1 8]

Batch 1 (every prompt decoded by every method in turn, greedy):
  hf                      model.generate
  hf_early_exit_<e>       model.generate(assistant_early_exit=e): LayerSkip-style self-speculation in
                          transformers (a second, shallow KV cache); the best e is the peer's number
  hf_prompt_lookup        model.generate(prompt_lookup_num_tokens=10)
  full                    specee full
  spec_fixed_e<e>         specee self_speculative at a fixed exit layer and K
  spec_adaptive           specee self_speculative, e and K per round from online acceptance
Batch 8 (transformers' assisted decoding is batch-1 only): hf, full, spec_fixed, spec_adaptive.
Reports tokens/s, speedup over hf and over full, mean accepted drafts per round, exactness against
hf greedy, per Spec-Bench category. Writes bench/results/speculative_cpu.json and .png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_prompt_file, write_json  # noqa: E402
from e2e import pick_prompts  # noqa: E402  (spread over categories)

import specee  # noqa: E402
from specee.prompts import batches, encode, new_tokens  # noqa: E402


def methods(L, batch):
    fixed_e = L // 2
    m = {"hf": ("hf", {}), "full": ("specee", dict(mode="full"))}
    if batch == 1:
        for e in (L // 4, L // 2, (3 * L) // 4):
            m[f"hf_early_exit_{e}"] = ("hf", dict(assistant_early_exit=e))
        m["hf_prompt_lookup"] = ("hf", dict(prompt_lookup_num_tokens=10))
    m[f"spec_fixed_e{fixed_e}"] = ("specee", dict(mode="self_speculative",
                                                  exit_config=dict(exit_layer=fixed_e, num_draft=4, adaptive_k=False)))
    m["spec_adaptive"] = ("specee", dict(mode="self_speculative", exit_config=None))
    return m


def run(model, ids, mask, how, n):
    kind, kw = how
    t = time.perf_counter()
    if kind == "hf":
        seq = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)
        stats = None
    else:
        out = specee.generate(model, ids, mask, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, **kw)
        seq, stats = out.sequences, out.stats
    return seq, stats, time.perf_counter() - t


def bench_batch(model, tok, prompts, batch, n, desc):
    from tqdm.auto import tqdm

    L = model.config.num_hidden_layers
    ms = methods(L, batch)
    ids, mask = encode(tok, [p.text for p in prompts[:batch]])
    for how in ms.values():  # warm-up
        run(model, ids, mask, how, 4)
    agg = {name: dict(tokens=0, seconds=0.0, exact=0, rows=0, accepted=0, rounds=0, by_cat={}) for name in ms}
    for group in tqdm(list(batches(prompts, batch)), desc=desc):
        ids, mask = encode(tok, [p.text for p in group])
        P = ids.shape[1]
        ref = None
        for name, how in ms.items():
            seq, stats, dt = run(model, ids, mask, how, n)
            rows = new_tokens(seq, P, tok.eos_token_id)
            ref = rows if name == "hf" else ref
            a = agg[name]
            a["tokens"] += sum(map(len, rows))
            a["seconds"] += dt
            a["rows"] += len(rows)
            a["exact"] += sum(r == f for r, f in zip(rows, ref))
            if stats and "accepted_histogram" in stats:
                h = stats["accepted_histogram"]
                a["accepted"] += sum(i * c for i, c in enumerate(h))
                a["rounds"] += sum(h)
            if batch == 1:  # per category at batch 1, where each call is one prompt
                c = a["by_cat"].setdefault(group[0].category, [0, 0.0])
                c[0] += len(rows[0])
                c[1] += dt
    hf_tps = agg["hf"]["tokens"] / agg["hf"]["seconds"]
    full_tps = agg["full"]["tokens"] / agg["full"]["seconds"]
    out = {}
    for name, a in agg.items():
        tps = a["tokens"] / a["seconds"]
        out[name] = dict(tokens_per_s=tps, speedup_vs_hf=tps / hf_tps, speedup_vs_full=tps / full_tps,
                         exact_vs_hf=a["exact"] / a["rows"],
                         mean_accepted_per_round=a["accepted"] / a["rounds"] if a["rounds"] else None,
                         per_category_tokens_per_s={k: v[0] / v[1] for k, v in a["by_cat"].items()} or None)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default=str(default_prompt_file()))
    ap.add_argument("--num-prompts", type=int, default=13)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="speculative_cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = specee.load_default_model()
    results = {}
    for b in args.batch_sizes:
        prompts = pick_prompts(args.prompts, max(args.num_prompts, b))
        results[f"batch_{b}"] = bench_batch(model, tok, prompts, b, args.max_new_tokens, f"batch {b}")
    payload = dict(benchmark="self_speculative", model="SmolLM2-135M-Instruct (fp32)", prompts=args.prompts,
                   num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens, greedy=True, results=results)
    path = write_json(f"{args.out}.json", payload)
    plot(results, path.with_suffix(".png"))
    for b, rows in results.items():
        print(f"\n{b}: {'method':<22}{'tok/s':>8}{'vs hf':>8}{'vs full':>9}{'exact':>7}{'acc/round':>10}")
        for name, r in rows.items():
            acc = "" if r["mean_accepted_per_round"] is None else f"{r['mean_accepted_per_round']:.2f}"
            print(f"{'':9}{name:<22}{r['tokens_per_s']:8.1f}{r['speedup_vs_hf']:8.2f}{r['speedup_vs_full']:9.2f}"
                  f"{r['exact_vs_hf']:7.0%}{acc:>10}")
    print(f"wrote {path}")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, (b, rows) in zip(axes[0], results.items()):
        names = list(rows)
        ax.barh(names, [rows[n]["speedup_vs_hf"] for n in names], color="tab:blue")
        ax.axvline(1.0, c="gray", lw=1, ls="--")
        ax.set_xlabel("speedup over HF generate (greedy)")
        ax.set_title(f"SmolLM2-135M, CPU, {b.replace('_', ' ')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
