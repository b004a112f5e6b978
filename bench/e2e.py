"""End-to-end decode speed on the default model: HF generate vs specee's modes, side by side.

    python bench/e2e.py [--prompts FILE] [--num-prompts 13] [--max-new-tokens 64] [--threads 2]
                        [--modes ...  (default: every mode)] [--batch-sizes 1]
                        [--peers llama_cpp hf_compile]

The Spec-Bench prompts (../shared/data/spec_bench_dev.jsonl) are spread over its categories; every
prompt is decoded by every method in turn (specee.bench.run_bench), so noise hits all alike.
Writes bench/results/<out>.json and <out>_modes.png (speedup per category, latency percentiles,
exit histograms with the oracle's).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, default_prompt_file, write_json  # noqa: E402

import specee  # noqa: E402
from specee.bench import bench_modes, plot_bench, run_bench, summary_table  # noqa: E402
from specee.prompts import load_prompts  # noqa: E402


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
    ap.add_argument("--num-prompts", type=int, default=13)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=None, help="default: every mode (as specee bench)")
    ap.add_argument("--predictors", default=None, help="early_exit's bank (default: the shipped one)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", nargs="*", default=[], help="llama_cpp hf_compile (see specee bench --peers)")
    ap.add_argument("--out", default="e2e_cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = specee.load_default_model()
    modes, configs, _ = bench_modes(args, model)
    doc = run_bench(model, tok, pick_prompts(args.prompts, args.num_prompts), modes=modes, exit_configs=configs,
                    batch_sizes=args.batch_sizes, max_new_tokens=args.max_new_tokens, peers=args.peers,
                    default_model=True)
    path = write_json(f"{args.out}.json", dict(benchmark="e2e", model="SmolLM2-135M-Instruct (fp32)",
                                               prompts=args.prompts, **doc))
    tmp = RESULTS / f".{args.out}_plots"
    tmp.mkdir(exist_ok=True)
    for p in plot_bench(doc, tmp):
        shutil.move(p, RESULTS / f"{args.out}_{p.stem.replace('bench_', '')}.png")
    tmp.rmdir()
    print(summary_table(doc))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
