"""`specee demo` and `specee generate`: load a model, decode, report what early exit bought."""
from __future__ import annotations

import time

import torch

from .bench import DEFAULT_CONFIGS, head_cost_ms, oracle_bound, oracle_exits, synchronize
from .generate import generate
from .prompts import encode, load_prompts, new_tokens


def resolve_device(device=None) -> torch.device:
    """The --device to decode on (default: the CPU), refused with the fix when torch cannot reach it."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; install a CUDA "
                         "build of torch on a machine with a GPU, or drop --device to decode on the CPU.")
    return dev


def load_model(name=None, device=None, dtype=None):
    """(model, tokenizer): the default model or a checkpoint directory, on ``device`` (default: the CPU), its weights
    cast to ``dtype`` (a torch dtype or its name) when given."""
    dev = resolve_device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if name is None:
        from .default_model import load_default_model

        model, tokenizer = load_default_model()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sdpa").eval()
    return model.to(device=dev, dtype=dtype), tokenizer


def load_model_from_args(args):
    return load_model(args.model, getattr(args, "device", None), getattr(args, "dtype", None))


def exit_config_from_args(args, num_layers, model=None):
    """The exit_config of --mode: the command line's defaults (``bench.DEFAULT_CONFIGS``, as `specee bench` uses)
    under the options given."""
    cfg = {"kv_policy": args.kv_policy, **(DEFAULT_CONFIGS[args.mode](num_layers) or {})}
    if args.mode == "confidence" and args.threshold is not None:
        cfg["thresholds"] = args.threshold
    if args.mode == "skipdecode" and args.min_layers is not None:
        cfg["min_layers"] = args.min_layers
    if args.mode == "early_exit" and model is not None:
        cfg["predictor"] = predictor_bank(getattr(args, "predictors", None), model)
    return cfg


def predictor_bank(path, model):
    """The predictor bank for ``early_exit``: from ``path`` (``specee train --out``), or the one shipped for the
    default model; a model it was not trained for gets the ways out."""
    from .predictors import load_predictors

    try:
        return load_predictors(path, model)
    except ValueError as e:
        if path is not None:
            raise
        raise ValueError(f"{e} Or pick a --mode that needs no predictors (self_speculative, confidence, "
                         "skipdecode, full).") from None


def _compile(args):
    return getattr(args, "compile", False) or None


def _warmup(model, modes, cfg, compile):
    """Compile before timing, and say how long it took (decode timings exclude it)."""
    from . import compiled

    t = time.perf_counter()
    for mode in dict.fromkeys(modes):
        compiled.warmup(model, mode=mode, exit_config=cfg if mode != "full" else None, compile=compile)
    stats = compiled.compile_stats()
    print(f"[compile: {time.perf_counter() - t:.1f} s warm-up, {stats['graphs']} graphs, "
          f"{stats['total']:.1f} s in the compiler; cached in {compiled.inductor_cache_dir()}]")


def _sampling(args):
    if not args.sample:
        return dict(do_sample=False)
    return dict(do_sample=True, temperature=args.temperature, top_p=args.top_p)


def _timed(model, ids, mask, mode, cfg, args, streamer=None):
    torch.manual_seed(args.seed)
    synchronize(ids.device)
    t = time.perf_counter()
    out = generate(model, ids, mask, mode=mode, exit_config=cfg if mode != "full" else None,
                   max_new_tokens=args.max_new_tokens, return_dict_in_generate=True, streamer=streamer,
                   compile=_compile(args), **_sampling(args))
    synchronize(ids.device)
    return out, time.perf_counter() - t


def run_demo(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model_from_args(args)
    dev = model.device
    L = model.config.num_hidden_layers
    cfg = exit_config_from_args(args, L, model)
    prompts = load_prompts(args.prompts, args.num_prompts)
    ids, mask = encode(tok, [prompts[0].text], device=dev)
    generate(model, ids, mask, max_new_tokens=4)  # warm-up, not timed
    if _compile(args):
        _warmup(model, ("full", args.mode), cfg, _compile(args))
    totals = {"full": [0, 0.0], args.mode: [0, 0.0]}
    oracle = []
    exit_sum = exit_count = agree = compared = 0
    print(f"specee demo: {type(model).__name__}, {L} layers, mode={args.mode}, exit_config={cfg}\n")
    for p in prompts:
        ids, mask = encode(tok, [p.text], device=dev)
        P = ids.shape[1]
        ref, t_full = _timed(model, ids, mask, "full", cfg, args)
        out, t_mode = _timed(model, ids, mask, args.mode, cfg, args)
        ref_toks = new_tokens(ref.sequences, P, tok.eos_token_id)[0]
        toks = new_tokens(out.sequences, P, tok.eos_token_id)[0]
        totals["full"][0] += len(ref_toks)
        totals["full"][1] += t_full
        totals[args.mode][0] += len(toks)
        totals[args.mode][1] += t_mode
        n = len(toks)
        exit_sum += int(out.exit_layers[0, :n].sum())
        exit_count += n
        m = min(len(toks), len(ref_toks))
        agree += sum(a == b for a, b in zip(toks[:m], ref_toks[:m]))
        compared += max(len(toks), len(ref_toks))
        print(f"[{p.category}] {p.text[:90]}")
        print(f"  -> {tok.decode(toks, skip_special_tokens=True).strip()}")
        print(f"     {len(toks) / t_mode:6.1f} tok/s ({args.mode}) vs {len(ref_toks) / t_full:6.1f} tok/s (full), "
              f"mean exit layer {out.exit_layers[0, :n].float().mean():.1f}/{L}\n")
        oracle.append(oracle_exits(model, ref.sequences[:, : P + len(ref_toks)], P))
    tps = {k: n / t for k, (n, t) in totals.items()}
    print(f"summary over {len(prompts)} prompts: full {tps['full']:.1f} tok/s, {args.mode} {tps[args.mode]:.1f} tok/s, "
          f"speedup {tps[args.mode] / tps['full']:.2f}x, mean exit layer {exit_sum / max(1, exit_count):.1f}/{L}, "
          f"token agreement with full {agree / max(1, compared):.1%}")
    o = torch.cat(oracle).float().mean().item()
    bound = oracle_bound(o, L, 1e3 / tps["full"], head_cost_ms(model))
    print(f"oracle bound: {bound:.2f}x (every full token leaving at its first layer whose argmax is full's: mean "
          f"layer {o:.1f}/{L}, priced with this run's step and head times)")


def run_generate(args):
    from transformers import TextStreamer

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model_from_args(args)
    ids, mask = encode(tok, [args.prompt], device=model.device, chat=not args.no_chat)
    cfg = exit_config_from_args(args, model.config.num_hidden_layers, model)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    if _compile(args):
        _warmup(model, (args.mode,), cfg, _compile(args))
    out, dt = _timed(model, ids, mask, args.mode, cfg, args, streamer)
    n = len(new_tokens(out.sequences, ids.shape[1], tok.eos_token_id)[0])
    print(f"\n[{n} tokens in {dt:.2f} s, {n / dt:.1f} tok/s, mean exit layer "
          f"{out.exit_layers[0, :n].float().mean():.1f}/{model.config.num_hidden_layers}]")
