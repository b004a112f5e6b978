"""Regenerate the results tables of bench/README.md from bench/results/*.json.

    python bench/report.py

Replaces the text between `<!-- results:begin -->` and `<!-- results:end -->` in bench/README.md.
"""
from __future__ import annotations

import argparse
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
    for name, why in doc.get("peers_skipped", {}).items():
        lines += ["", f"Peer `{name}` skipped: {why}."]
    for batch, rows in doc["results"].items():
        lines += ["", f"{batch.replace('_', ' ')}:", "",
                  "| mode | tok/s | vs HF | token agreement with full | exact | p50 / p99 ms | TTFT ms | mean exit layer |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            lat = r["latency_ms"]
            agree, exact = _agree(r)
            lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['speedup_vs_hf']:.2f}x | {agree} "
                         f"| {exact} | {lat['p50']:.1f} / {lat['p99']:.1f} | {_fmt(r['ttft_ms'], '.0f')} "
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


def compile_table(doc):
    o = doc["oracle"]
    lines = [f"**Compiled decode** (`bench/bench_compile.py`, {doc['num_prompts']} Spec-Bench prompts, "
             f"{doc['max_new_tokens']} new tokens, greedy, batch 1). " + _meta_line(doc["meta"]), "",
             "| method | tok/s | vs HF static + compile | vs HF eager | agreement with full | mean exit layer "
             "| first call s (compiles) | graphs compiled while timed |", "|---|---|---|---|---|---|---|---|"]
    for name, r in doc["results"].items():
        lines.append(f"| {name} | {r['tokens_per_s']:.2f} | {r['vs_hf_static_compiled']:.2f}x | {r['vs_hf_eager']:.2f}x "
                     f"| {r['token_agreement_with_full']:.1%} | {r['mean_exit_layer']:.1f} | {r['first_call_s']:.1f} "
                     f"| {r.get('graphs_compiled_while_timed', 'not counted')}"
                     f"{' (%d CUDA graphs captured)' % r['cuda_graphs_captured_while_timed'] if r.get('cuda_graphs_captured_while_timed') else ''} |")
    lines += ["", f"Oracle: mean exit layer {o['mean_exit_layer']:.1f} of {doc['num_layers']}; with a compiled layer at "
              f"{o['compiled_layer_ms']:.2f} ms and the head at {o['compiled_head_ms']:.2f} ms, layer skipping can buy "
              f"at most {o['speedup_bound_vs_full']:.2f}x over full_compiled."]
    return lines


def spans_table(doc):
    lines = [f"**Spans** (`bench/bench_spans.py`, {doc['model']} {doc['dtype']}, one step through "
             f"{doc['layers_timed']} of {doc['num_layers']} layers, {doc['context']} tokens cached; chunks "
             f"{doc['chunks']}: {doc['chunk_calls']} calls). " + _meta_line(doc["meta"]), ""]
    ways = ("per_layer", "chunks", "whole", "graphs_per_layer", "graphs_chunks", "graphs_whole")
    ways = [w for w in ways if any(f"{w}_ms" in r for r in doc["results"].values())]
    lines += ["| batch | queries | " + " | ".join(f"{w} ms" for w in ways) + " | chunks vs per layer |",
              "|---" * (len(ways) + 3) + "|"]
    for key, r in doc["results"].items():
        parts = key.split("_")
        lines.append(f"| {parts[1]} | {parts[3] if len(parts) > 3 else 1} | "
                     + " | ".join(_fmt(r.get(w + "_ms"), ".2f") for w in ways)
                     + f" | {r['chunks_vs_per_layer']:.2f}x |")
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


def _agree(r):
    if r.get("token_agreement") is None:
        return "—", "—"
    return f"{r['token_agreement']:.1%}", f"{r['exact_match']:.0%}"


def bench_table(doc):
    """`specee bench` (the CLI's bench.json, copied to results/): modes, HF and peers side by side."""
    lines = e2e_table(doc)
    lines[0] = lines[0].replace("`bench/e2e.py`", "`specee bench`")
    run = doc.get("run")
    if run:
        lines += ["", f"Run: `{run['command']}` took {run['wall_s']:.0f} s" + (f" ({run['note']})." if run.get("note")
                                                                              else ".")]
    for name, info in doc.get("peers", {}).items():
        lines += ["", f"Peer `{name}`: " + ", ".join(f"{k} {v}" if not isinstance(v, float) else f"{k} {v:.0f}"
                                                      for k, v in info.items()) + "."]
    return lines


def replay_table(doc):
    t, r0 = doc["trace"], doc["results"]
    lines = [f"**Replay** (`specee bench --replay {t['name']} --shape {doc.get('shape')}`: random weights, "
             f"{doc['num_layers']} layers, {doc.get('dtype')}, batch {doc['batch_size']}, {doc['max_new_tokens']} "
             f"new tokens, kv policy {doc['kv_policy']}; trace rescaled from {t['source_layers']} layers: mean exit "
             f"{t['mean_exit_layer']:.1f}, {t['exit_fraction']:.0%} exit early; layer {doc['layer_ms']:.3f} ms, head "
             f"{doc['head_ms']:.3f} ms). " + _meta_line(doc["meta"]), "",
             "| schedule | ms/token | speedup vs full | ideal (trace) | of ideal | host syncs/token | CUDA syncs/token "
             "| mean exit | trace followed |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in r0.items():
        lines.append(f"| {name} | {r['ms_per_token']:.3f} | {r['speedup_vs_full']:.2f}x | {r['ideal_speedup']:.2f}x "
                     f"| {r['fraction_of_ideal']:.0%} | {r['host_syncs_per_token']:.1f} "
                     f"({_fmt(r.get('layer_syncs_per_token'), '.1f')} inside the layers) "
                     f"| {_fmt(r['cuda_syncs_per_token'], '.1f')} | {r['mean_exit_layer']:.1f} "
                     f"| {'yes' if r['trace_followed'] else 'NO'} |")
    if doc.get("note"):
        lines += ["", f"Note: {doc['note']}."]
    return lines


def predictors_table(doc):
    """bench/bench_predictors.py: the oracle, the drafts, the banks teacher-forced and decoding."""
    o = doc.get("oracle", {})
    lines = [f"**Predictors** (`bench/bench_predictors.py`, {doc.get('model')}, {doc.get('num_prompts')} Spec-Bench "
             f"prompts ({doc.get('prompt_lines', '')}), {doc.get('max_new_tokens')} new tokens, greedy). "
             + _meta_line(doc["meta"]), "",
             f"Oracle: mean exit layer {_fmt(o.get('mean_exit_layer'), '.1f')} of {o.get('num_layers')}; bound "
             f"{_fmt(o.get('speedup_bound'), '.2f')}x over full, {_fmt(o.get('bound_with_draft'), '.2f')}x when the "
             f"draft must hold the token (recall {_fmt(o.get('draft_recall'), '.0%')}), "
             f"{_fmt(o.get('bound_unconfirmed'), '.2f')}x unconfirmed."]
    sweep, frac = doc.get("sweep", {}), doc.get("fraction_of_bound", {})
    if sweep:
        lines += ["", "| bank | speedup vs full | ms/token | token agreement | mean exit layer | of the bound |",
                  "|---|---|---|---|---|---|"]
        for name, r in sweep.items():
            f = frac.get(name, {}).get("ratio")
            lines.append(f"| {name} | {r['speedup_vs_full']:.2f}x | {r['ms_per_token']:.1f} | {r['token_agreement']:.1%} "
                         f"| {r['mean_exit_layer']:.1f} | {_fmt(f, '.0%')} |")
    tf = doc.get("teacher_forced", {})
    if tf:
        lines += ["", "Teacher-forced (on the `full` tokens):", "",
                  "| bank | exit rate | precision | calibrated precision (lower bound) | mean exit layer | modelled speedup |",
                  "|---|---|---|---|---|---|"]
        for name, r in tf.items():
            lines.append(f"| {name} | {r['exit_rate']:.1%} | {r['precision']:.1%} "
                         f"| {_fmt(r.get('calibrated_precision_lower_bound'), '.1%')} | {r['mean_exit_layer']:.1f} "
                         f"| {r['speedup']:.2f}x |")
    drafts = doc.get("drafts", {})
    if drafts:
        lines += ["", "| draft source | recall@k | k | cost ms | cost (layers) |", "|---|---|---|---|---|"]
        for name, r in drafts.items():
            lines.append(f"| {name} | {r['recall_at_k']:.1%} | {r['k']} | {r['cost_ms']:.3f} | {r['cost_layers']:.2f} |")
    c = doc.get("cost")
    if c:
        lines += ["", f"Costs: layer {c['layer_ms']:.2f} ms; LM head {c['head_layers']:.1f} layers; exit_predict "
                      f"{c['exit_predict_ms']:.3f} ms ({c.get('exit_predict_backend')}); decide "
                      f"{c['decide_ms']:.3f} ms."]
    if doc.get("note"):
        lines += ["", f"Note: {doc['note']}."]
    return lines


RENDER = {"e2e": e2e_table, "self_speculative": speculative_table, "ops": ops_table, "specee_bench": bench_table,
          "replay": replay_table, "predictors": predictors_table, "compile": compile_table,
          "spans": spans_table}


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


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    readme = HERE / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + render() + "\n" + END + tail)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
