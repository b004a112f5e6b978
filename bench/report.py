"""Regenerate the results tables of bench/README.md from bench/results/*.json.

    python bench/report.py

Replaces the text between `<!-- results:begin -->` and `<!-- results:end -->` in bench/README.md.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def _meta_line(meta):
    return (f"*{meta.get('device')}, torch {meta.get('torch')}, transformers {meta.get('transformers')}, "
            f"{meta.get('cpu_threads')} threads, commit `{meta.get('commit')}`, {meta.get('date')}*")


def e2e_table(doc):
    o, L = doc["oracle"], doc["num_layers"]
    lines = [f"**End to end** (`bench/e2e.py`, {doc['num_prompts']} Spec-Bench prompts, {doc['max_new_tokens']} "
             f"new tokens, greedy). " + _meta_line(doc["meta"])]
    for batch, rows in doc["results"].items():
        lines += ["", f"{batch.replace('_', ' ')}:", "",
                  "| mode | tok/s | vs HF | token agreement with full | exact | p50 / p99 ms | TTFT ms | mean exit layer |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            lat = r["latency_ms"]
            lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['speedup_vs_hf']:.2f}x | {r['token_agreement']:.1%} "
                         f"| {r['exact_match']:.0%} | {lat['p50']:.1f} / {lat['p99']:.1f} | {_fmt(r['ttft_ms'], '.0f')} "
                         f"| {r['mean_exit_layer']:.1f} |")
    lines += ["", f"Oracle: mean exit layer {o['mean_exit_layer']:.1f} of {L}; with a layer at {o['layer_ms']:.2f} ms "
              f"and the head at {o['head_ms']:.2f} ms, layer skipping can buy at most "
              f"{o['speedup_bound_vs_full']:.2f}x over full."]
    return lines


def speculative_table(doc):
    lines = [f"**Self-speculative** (`bench/bench_speculative.py`, {doc['num_prompts']} prompts, "
             f"{doc['max_new_tokens']} new tokens, greedy). " + _meta_line(doc["meta"])]
    for batch, rows in doc["results"].items():
        lines += ["", f"{batch.replace('_', ' ')}:", "",
                  "| method | tok/s | vs HF | vs full | exact vs HF | accepted drafts / round |", "|---|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['speedup_vs_hf']:.2f}x | {r['speedup_vs_full']:.2f}x "
                         f"| {r['exact_vs_hf']:.0%} | {_fmt(r['mean_accepted_per_round'], '.2f')} |")
    return lines


def ops_table(doc):
    cases = {}
    for r in doc["rows"]:
        cases.setdefault((r["op"], r["case"]), {})[r["provider"]] = r
    providers = sorted({r["provider"] for r in doc["rows"]}, key=lambda p: (p != "eager", p != "compiled", p))
    lines = [f"**Op microbenchmarks** (median µs; copy bandwidth {doc['copy_bandwidth_GB_s']:.1f} GB/s). "
             + _meta_line(doc["meta"]), "",
             "| op | case | " + " | ".join(providers) + " | best backend vs eager |",
             "|---|---|" + "---|" * (len(providers) + 1)]
    for (op, case), rows in cases.items():
        best = min((r for p, r in rows.items() if p not in ("eager", "compiled")), key=lambda r: r["median_us"],
                   default=None)
        speed = f"{best['speedup_vs_eager']:.1f}x ({best['provider']})" if best else "—"
        lines.append(f"| {op} | {case} | " + " | ".join(_fmt(rows[p]["median_us"], ".0f") if p in rows else "—"
                                                        for p in providers) + f" | {speed} |")
    return lines


RENDER = {"e2e": e2e_table, "self_speculative": speculative_table, "ops": ops_table}


def render():
    out = []
    for path in sorted((HERE / "results").glob("*.json")):
        doc = json.loads(path.read_text())
        fn = RENDER.get(doc.get("benchmark") or ("ops" if "bytes_models" in doc else None))
        if fn is None:
            out += [f"- `{path.relative_to(HERE)}`: {doc.get('benchmark', 'results')} (see the file)", ""]
            continue
        out += [f"### {path.name}", ""] + fn(doc) + [""]
        for png in sorted((HERE / "results").glob(f"{path.stem}*.png")):
            out += [f"![{png.stem}](results/{png.name})", ""]
    return "\n".join(out)


def main():
    readme = HERE / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + render() + "\n" + END + tail)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
