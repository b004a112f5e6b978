"""End-to-end decode speed on the default model: HF generate vs specee's modes, side by side.

    python bench/e2e.py [--prompts FILE] [--num-prompts 12] [--max-new-tokens 64] [--threads 2]

Every prompt is decoded by every mode in turn (greedy, batch 1), so machine noise hits all modes
alike; speedups are ratios of summed wall time over the same prompts. Also reported:
- token agreement with `full` greedy (position-wise over the full-mode tokens) and exact-match rate;
- the oracle exit bound: each `full` token's oracle exit layer (the first layer whose normed
  argmax equals the final argmax), priced with the measured per-layer and LM-head costs.
Writes bench/results/e2e_cpu.json and e2e_cpu.png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_prompt_file, write_json  # noqa: E402

import specee  # noqa: E402
from specee.models import DecoderAdapter  # noqa: E402
from specee.prompts import encode, load_prompts, new_tokens  # noqa: E402


def modes(num_layers):
    return {
        "hf": None,
        "full": ("full", None),
        "skipdecode": ("skipdecode", dict(min_layers=(3 * num_layers) // 4)),
        "confidence": ("confidence", dict(thresholds=0.95, layers=list(range(num_layers // 2, num_layers - 1, 3)))),
    }


def decode(model, ids, mask, spec, n):
    kw = dict(max_new_tokens=n, do_sample=False)
    t = time.perf_counter()
    if spec is None:
        seq = model.generate(ids, attention_mask=mask, **kw)
        exits = None
    else:
        out = specee.generate(model, ids, mask, mode=spec[0], exit_config=spec[1], return_dict_in_generate=True, **kw)
        seq, exits = out.sequences, out.exit_layers
    return seq, exits, time.perf_counter() - t


@torch.no_grad()
def oracle_exits(model, seq, prompt_len):
    """Oracle exit layer (layers run, 1-based) of each generated token, teacher-forced."""
    a = DecoderAdapter(model)
    hs = model(seq, output_hidden_states=True).hidden_states  # L+1 tensors [1, T, d]
    pos = slice(prompt_len - 1, seq.shape[1] - 1)  # the states that predicted each generated token
    final = a.logits(hs[-1][:, pos]).argmax(-1)
    L = a.num_layers
    oracle = torch.full_like(final, L)
    for l in range(L, 0, -1):  # hidden_states[l] = after layer l
        hit = a.logits(hs[l][:, pos]).argmax(-1) == final
        oracle = torch.where(hit, torch.full_like(oracle, l), oracle)
    return oracle[0]  # walking down, the smallest agreeing layer wins (SpecEE's labels)


@torch.no_grad()
def head_cost_ms(model, reps=30):
    """Measured ms of the final norm + LM head at batch 1 (a layer's cost is derived from full's ms/token)."""
    a = DecoderAdapter(model)
    h = torch.randn(1, 1, a.shape.hidden_size)
    for _ in range(3):
        a.logits(h)
    t = time.perf_counter()
    for _ in range(reps):
        a.logits(h)
    head = (time.perf_counter() - t) / reps * 1e3
    return head


def pick_prompts(path, n):
    """n prompts spread round-robin over the file's categories (Spec-Bench has 13)."""
    by_cat = {}
    for p in load_prompts(path):
        by_cat.setdefault(p.category, []).append(p)
    picked, i = [], 0
    total = sum(len(v) for v in by_cat.values())
    while len(picked) < min(n, total):
        for ps in by_cat.values():
            if i < len(ps) and len(picked) < n:
                picked.append(ps[i])
        i += 1
    return picked


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default=str(default_prompt_file()))
    ap.add_argument("--num-prompts", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="e2e_cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    model, tok = specee.load_default_model()
    L = model.config.num_hidden_layers
    specs = modes(L)
    picked = pick_prompts(args.prompts, args.num_prompts)

    ids, mask = encode(tok, [picked[0].text])
    for spec in specs.values():  # warm-up
        decode(model, ids, mask, spec, 4)

    stats = {name: dict(tokens=0, seconds=0.0, agree=0, compared=0, exact=0, exit_sum=0) for name in specs}
    oracle_all = []
    for p in tqdm(picked, desc="e2e prompts"):
        ids, mask = encode(tok, [p.text])
        P = ids.shape[1]
        outs = {name: decode(model, ids, mask, spec, args.max_new_tokens) for name, spec in specs.items()}
        ref = new_tokens(outs["full"][0], P, tok.eos_token_id)[0]
        ref_seq = outs["full"][0][:, : P + len(ref)]
        oracle_all.append(oracle_exits(model, ref_seq, P))
        for name, (seq, exits, dt) in outs.items():
            toks = new_tokens(seq, P, tok.eos_token_id)[0]
            s = stats[name]
            s["tokens"] += len(toks)
            s["seconds"] += dt
            s["agree"] += sum(a == b for a, b in zip(toks, ref))
            s["compared"] += len(ref)
            s["exact"] += int(toks == ref)
            s["exit_sum"] += int(exits[0, : len(toks)].sum()) if exits is not None else L * len(toks)

    head_ms = head_cost_ms(model)
    full = stats["full"]
    ms_full = full["seconds"] / full["tokens"] * 1e3
    layer_ms = (ms_full - head_ms) / L
    oracle = torch.cat(oracle_all).float()
    bound = (L * layer_ms + head_ms) / (oracle.mean().item() * layer_ms + head_ms)
    rows = {}
    for name, s in stats.items():
        tps = s["tokens"] / s["seconds"]
        rows[name] = dict(tokens_per_s=tps, ms_per_token=1e3 / tps, speedup_vs_hf=tps / (stats["hf"]["tokens"] / stats["hf"]["seconds"]),
                          speedup_vs_full=tps / (full["tokens"] / full["seconds"]),
                          token_agreement=s["agree"] / s["compared"], exact_match=s["exact"] / len(picked),
                          mean_exit_layer=s["exit_sum"] / s["tokens"], mode=specs[name][0] if specs[name] else "hf",
                          exit_config=specs[name][1] if specs[name] else None)
    payload = dict(benchmark="e2e", model="SmolLM2-135M-Instruct (fp32, de-quantized Q4_1 GGUF)",
                   prompts=str(args.prompts), num_prompts=len(picked), max_new_tokens=args.max_new_tokens,
                   batch_size=1, greedy=True, results=rows,
                   oracle=dict(mean_exit_layer=oracle.mean().item(), num_layers=L, layer_ms=layer_ms, head_ms=head_ms,
                               speedup_bound_vs_full=bound,
                               histogram=torch.bincount(oracle.long(), minlength=L + 1).tolist()))
    path = write_json(f"{args.out}.json", payload)
    plot(rows, bound, path.with_suffix(".png"))
    print(f"{'mode':<12}{'tok/s':>8}{'vs hf':>8}{'vs full':>9}{'agree':>8}{'exit':>7}")
    for name, r in rows.items():
        print(f"{name:<12}{r['tokens_per_s']:8.1f}{r['speedup_vs_hf']:8.2f}{r['speedup_vs_full']:9.2f}"
              f"{r['token_agreement']:8.1%}{r['mean_exit_layer']:7.1f}")
    print(f"oracle: mean exit layer {oracle.mean():.1f}/{L}, speedup bound {bound:.2f}x over full "
          f"(layer {layer_ms:.2f} ms, head {head_ms:.2f} ms); wrote {path}")


def plot(rows, bound, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, r in rows.items():
        ax.scatter(r["token_agreement"], r["speedup_vs_full"], s=40)
        ax.annotate(name, (r["token_agreement"], r["speedup_vs_full"]), textcoords="offset points", xytext=(5, 4))
    ax.axhline(bound, ls="--", c="gray", lw=1)
    ax.text(0.02, bound, f" oracle bound {bound:.2f}x", va="bottom", fontsize=8, transform=ax.get_yaxis_transform())
    ax.set_xlabel("token agreement with full (greedy)")
    ax.set_ylabel("speedup over specee full")
    ax.set_title("SmolLM2-135M, CPU, batch 1")
    ax.set_xlim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
