"""The `specee bench` driver: every requested mode and HF `generate`, side by side on the same prompts.

For each batch size, each batch of prompts is decoded by every method in turn (so machine noise hits
all alike), after a warm-up. Per method: tokens/s and speedup over HF per category; mean and
p50/p95/p99 per-token latency and time to first token (from a timing streamer); fidelity against
`full` greedy (token agreement, whole-sequence match); the exit-layer histogram. Once per run: the
oracle exit bound (each `full` token's first agreeing layer, priced with measured layer and head
costs). Writes one JSON and PNG plots.

Peers, opt-in (``peers=("llama_cpp", "hf_compile")``), measured in the same loop: llama.cpp
(llama-cpp-python) on the default model's GGUF with the same thread count, and HF ``generate``
with a static cache and ``torch.compile`` (:func:`hf_static_compiled`; its compile time is a
warm-up reported apart). A peer that cannot run is skipped with the reason printed and stored.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time
from pathlib import Path
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from .generate import generate
from .policies import MODES
from .models import DecoderAdapter
from .prompts import batches, encode, new_tokens

_REPO = Path(__file__).resolve().parent.parent


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def synchronize(device):
    """Wait for the device's queued work, so a host timer measures it (a no-op off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_metadata() -> dict:
    """Device, versions, commit and date: every result file carries them."""
    import torch

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
    }
    for pkg in ("transformers", "triton"):
        try:
            meta[pkg] = __import__(pkg).__version__
        except ImportError:
            meta[pkg] = None
    return meta



# exit_config of each mode on the command line (bench, demo, generate), by layer count: skipdecode ends at 3/4 of the
# stack; confidence tests every third layer from the middle (each test runs the full LM head, about six layers'
# worth on the default model, so its tests are spaced out)
DEFAULT_CONFIGS = {
    "full": lambda L: None,
    "skipdecode": lambda L: dict(min_layers=(3 * L) // 4),
    "confidence": lambda L: dict(thresholds=0.95, layers=list(range(L // 2, L - 1, 3))),
    "early_exit": lambda L: None,
    "self_speculative": lambda L: None,
}


class TimingStreamer(BaseStreamer):
    """Records when tokens arrive and how many per put (a speculative round emits several); the first
    put is transformers' prompt."""

    def __init__(self, batch_size):
        self.batch_size = batch_size
        self.times, self.counts, self.prompt_seen = [], [], False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.counts.append(max(1, value.numel() // self.batch_size))  # tokens per row in this put

    def per_token_latencies(self):
        """Seconds per token between consecutive puts, spread over the tokens a put delivered."""
        return [(b - a) / n for a, b, n in zip(self.times, self.times[1:], self.counts[1:])]

    def end(self):
        pass


@dataclass
class MethodStats:
    tokens: int = 0
    seconds: float = 0.0
    agree: int = 0
    compared: int = 0
    exact: int = 0
    rows: int = 0
    ttft: list = field(default_factory=list)
    latencies: list = field(default_factory=list)
    exit_layers: list = field(default_factory=list)
    by_category: dict = field(default_factory=dict)

    def summary(self, num_layers):
        lat = torch.tensor(self.latencies or [float("nan")], dtype=torch.float64) * 1e3
        q = torch.quantile(lat, torch.tensor([0.5, 0.95, 0.99], dtype=torch.float64)).tolist()
        hist = torch.bincount(torch.tensor(self.exit_layers or [0]), minlength=num_layers + 1).tolist()
        return dict(tokens_per_s=self.tokens / self.seconds, tokens=self.tokens,
                    token_agreement=self.agree / max(1, self.compared), exact_match=self.exact / max(1, self.rows),
                    latency_ms=dict(mean=float(lat.mean()), p50=q[0], p95=q[1], p99=q[2]),
                    ttft_ms=sum(self.ttft) / len(self.ttft) * 1e3 if self.ttft else None,
                    mean_exit_layer=sum(self.exit_layers) / len(self.exit_layers) if self.exit_layers else num_layers,
                    exit_histogram=hist,
                    tokens_per_s_by_category={k: n / t for k, (n, t) in self.by_category.items()})


PEERS = ("llama_cpp", "hf_compile")


def hf_static_compiled(model, max_cache_len=None, mode=None, fullgraph=True):
    """HF ``generate`` with a static KV cache and ``torch.compile`` of the decode step: the baseline a user
    already has. Returns ``fn(input_ids, attention_mask=None, **generate_kwargs)`` (what ``model.generate``
    returns).

    transformers compiles only on accelerators unless told otherwise; ``_compile_all_devices`` opts the
    CPU in. The first call compiles (about 2 minutes on a CPU for the default model). With
    ``max_cache_len`` one ``StaticCache`` per batch size is reused (reset between calls), so prompts of
    different lengths share one graph; without it transformers sizes a cache per call (a new graph per
    prompt + new-token length, up to the recompile limit).
    """
    from transformers import CompileConfig, StaticCache

    cuda = next(model.parameters()).is_cuda
    config = CompileConfig(fullgraph=fullgraph, dynamic=False, mode=mode or ("reduce-overhead" if cuda else "default"))
    config._compile_all_devices = True  # a class flag, not an __init__ argument
    caches = {}

    def fn(input_ids, attention_mask=None, **kw):
        if max_cache_len is None:
            return model.generate(input_ids, attention_mask=attention_mask, cache_implementation="static",
                                  compile_config=config, **kw)
        B = input_ids.shape[0]
        if input_ids.shape[1] + kw.get("max_new_tokens", 0) > max_cache_len:
            raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens exceeds max_cache_len={max_cache_len}")
        cache = caches.get(B)
        if cache is None:
            cache = caches[B] = StaticCache(config=model.config, max_cache_len=max_cache_len)
        else:
            cache.reset()
        return model.generate(input_ids, attention_mask=attention_mask, past_key_values=cache,
                              compile_config=config, **kw)

    fn.compile_config = config
    return fn


def llama_cpp_greedy(threads=None, n_ctx=2048, path=None):
    """llama.cpp (llama-cpp-python) greedy decode on the default model's GGUF (the file transformers
    de-quantizes), with ``threads`` threads. Returns ``fn(token_ids, max_new_tokens, on_token=None) -> ids``.

    Raises ImportError when llama-cpp-python is missing."""
    import llama_cpp

    from .default_model import gguf_path

    threads = threads or torch.get_num_threads()
    llm = llama_cpp.Llama(model_path=str(path or gguf_path()), n_threads=threads, n_threads_batch=threads,
                          n_ctx=n_ctx, verbose=False)
    eos = llm.token_eos()

    def fn(token_ids, max_new_tokens, on_token=None):
        out = []
        if max_new_tokens <= 0:
            return out
        for t in llm.generate(list(token_ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                              reset=True):
            out.append(int(t))
            if on_token is not None:
                on_token(t)
            if t == eos or len(out) >= max_new_tokens:
                break
        return out

    fn.llm, fn.threads = llm, threads
    return fn


def make_peers(model, tokenizer, names, max_cache_len, default_model=True):
    """The requested peers that can run here, and a reason for each that cannot."""
    peers, skipped = {}, {}
    for name in names:
        if name not in PEERS:
            skipped[name] = f"unknown peer; choose from {', '.join(PEERS)}"
        elif name == "hf_compile":
            peers[name] = hf_static_compiled(model, max_cache_len=max_cache_len)
        elif next(model.parameters()).is_cuda:
            skipped[name] = "llama.cpp is the CPU peer (the same GGUF and thread count); on a GPU use hf_compile"
        elif not default_model:
            skipped[name] = "llama.cpp runs the default model's GGUF; this run uses another model"
        else:
            try:
                fn = llama_cpp_greedy(torch.get_num_threads())
            except ImportError:
                skipped[name] = "llama-cpp-python is not installed (pip install 'specee[peers]')"
                continue
            except (FileNotFoundError, ModuleNotFoundError, ValueError, RuntimeError) as e:
                skipped[name] = f"llama.cpp could not load the GGUF: {e}"
                continue
            probe = "Hello, how are you? Translate: Pfandhäuser boomen."
            fn.tokenizer_match = (fn.llm.tokenize(probe.encode(), add_bos=False, special=False)
                                  == tokenizer(probe, add_special_tokens=False)["input_ids"])
            peers[name] = fn
    for name, why in skipped.items():
        print(f"specee bench: skipping peer {name}: {why}")
    return peers, skipped


def _decode(model, ids, mask, method, cfg, n, stream, peer=None, compile=None):
    streamer = TimingStreamer(ids.shape[0]) if stream else None
    kw = dict(max_new_tokens=n, do_sample=False, streamer=streamer)
    synchronize(ids.device)
    t0 = time.perf_counter()
    if method == "llama_cpp":
        if streamer is not None:
            streamer.put(ids)  # the prompt, as transformers streams it
        rows = []
        for b in range(ids.shape[0]):  # llama.cpp decodes one sequence at a time here
            on_token = (lambda t: streamer.put(torch.tensor([t]))) if streamer is not None else None
            rows.append(peer(ids[b][mask[b].bool()].tolist(), n, on_token))
        fill = peer.llm.token_eos()
        seq = torch.full((ids.shape[0], ids.shape[1] + n), fill, dtype=ids.dtype)
        seq[:, : ids.shape[1]] = ids
        for b, r in enumerate(rows):
            seq[b, ids.shape[1]: ids.shape[1] + len(r)] = torch.tensor(r, dtype=ids.dtype)
        seq, exits = seq, None
    elif method == "hf_compile":
        seq, exits = peer(ids, mask, **kw), None
    elif method == "hf":
        seq, exits = model.generate(ids, attention_mask=mask, **kw), None
    else:
        out = generate(model, ids, mask, mode=method, exit_config=cfg, return_dict_in_generate=True, compile=compile,
                       **kw)
        seq, exits = out.sequences, out.exit_layers
    synchronize(ids.device)
    return seq, exits, t0, time.perf_counter() - t0, streamer


@torch.no_grad()
def oracle_exits(model, seq, prompt_len):
    """Oracle exit layer (layers run, 1-based) of each generated token of ``seq`` [1, T], teacher-forced."""
    a = DecoderAdapter(model)
    hs = model(seq, output_hidden_states=True).hidden_states  # L+1 states [1, T, d]
    pos = slice(prompt_len - 1, seq.shape[1] - 1)  # the states that predicted each generated token
    final = a.logits(hs[-1][:, pos]).argmax(-1)
    oracle = torch.full_like(final, a.num_layers)
    for l in range(a.num_layers, 0, -1):  # walking down, the smallest agreeing layer wins (SpecEE's labels)
        oracle = torch.where(a.logits(hs[l][:, pos]).argmax(-1) == final, torch.full_like(oracle, l), oracle)
    return oracle[0]


def _plain(cfg):
    """An exit config as JSON can hold it: objects (a predictor bank) by their repr."""
    if cfg is None:
        return None
    plain = (bool, int, float, str, list, tuple, type(None))
    return {k: v if isinstance(v, plain) else repr(v) for k, v in cfg.items()}


def oracle_bound(mean_exit: float, num_layers: int, step_ms: float, head_ms: float) -> float:
    """Speedup over ``full`` if every token left at its oracle layer (``mean_exit`` layers run on average), with a
    full step of ``step_ms`` split into ``num_layers`` equal layers and the head's ``head_ms``."""
    layer_ms = (step_ms - head_ms) / num_layers
    return (num_layers * layer_ms + head_ms) / (mean_exit * layer_ms + head_ms)


@torch.no_grad()
def head_cost_ms(model, reps=30):
    """Measured ms of the final norm + LM head at batch 1."""
    a = DecoderAdapter(model)
    h = torch.randn(1, 1, a.shape.hidden_size, device=a.device, dtype=a.dtype)
    for _ in range(3):
        a.logits(h)
    synchronize(h.device)
    t = time.perf_counter()
    for _ in range(reps):
        a.logits(h)
    synchronize(h.device)
    return (time.perf_counter() - t) / reps * 1e3


def run_bench(model, tokenizer, prompts, modes=("full", "skipdecode", "confidence"), batch_sizes=(1,),
              max_new_tokens=64, exit_configs=None, progress=True, peers=(), default_model=False, compile=None):
    """Decode ``prompts`` with HF generate, every mode and the requested ``peers`` (see ``PEERS``);
    returns the results dict (see module docstring). A peer that cannot run here is skipped, with its
    reason under ``peers_skipped``. ``compile`` runs specee's modes compiled (see :func:`specee.generate`); the
    warm-up then compiles every graph for every batch size, and its seconds are reported apart."""
    from tqdm.auto import tqdm

    L, dev = model.config.num_hidden_layers, next(model.parameters()).device
    methods = ["hf"] + [m for m in ("full", *modes) if m not in ("hf",)]
    methods = list(dict.fromkeys(methods))
    configs = {m: (exit_configs or {}).get(m, DEFAULT_CONFIGS[m](L) if m in DEFAULT_CONFIGS else None)
               for m in methods}
    longest = max(encode(tokenizer, [p.text])[0].shape[1] for p in prompts)
    peer_fns, skipped = make_peers(model, tokenizer, list(peers), -(-(longest + max_new_tokens + 8) // 64) * 64,
                                   default_model)
    methods += list(peer_fns)
    ids, mask = encode(tokenizer, [prompts[0].text], device=dev)
    for m in methods:  # warm-up, not timed
        if m != "hf_compile":
            _decode(model, ids, mask, m, configs.get(m), 4, False, peer_fns.get(m), compile)
    compile_info = None
    if compile:
        from . import compiled

        t = time.perf_counter()
        for m in methods:
            if m in MODES:
                compiled.warmup(model, mode=m, exit_config=configs.get(m), batch_sizes=batch_sizes, compile=compile)
        compile_info = dict(compile=compile, warmup_s=time.perf_counter() - t, **compiled.compile_stats())
    results, oracle, peer_info = {}, [], {}
    for bs in batch_sizes:
        stats = {m: MethodStats() for m in methods}
        groups = list(batches(prompts, bs))
        if "hf_compile" in peer_fns:  # compiles for this batch size (minutes on a CPU); timed apart
            w_ids, w_mask = encode(tokenizer, [p.text for p in groups[0]], device=dev)
            t = time.perf_counter()
            _decode(model, w_ids, w_mask, "hf_compile", None, 4, False, peer_fns["hf_compile"])
            _decode(model, w_ids, w_mask, "hf_compile", None, 4, False, peer_fns["hf_compile"])
            peer_info.setdefault("hf_compile", {})[f"warmup_s_batch_{bs}"] = time.perf_counter() - t
        for group in tqdm(groups, desc=f"specee bench (batch {bs})", disable=not progress):
            ids, mask = encode(tokenizer, [p.text for p in group], device=dev)
            P = ids.shape[1]
            rows = {}
            for m in methods:
                stream = not (m == "self_speculative" and bs > 1)  # speculative rows emit unevenly
                seq, exits, t0, dt, streamer = _decode(model, ids, mask, m, configs.get(m), max_new_tokens, stream,
                                                       peer_fns.get(m), compile)
                rows[m] = new_tokens(seq, P, tokenizer.eos_token_id)
                s = stats[m]
                s.tokens += sum(map(len, rows[m]))
                s.seconds += dt
                s.rows += len(group)
                if streamer is not None and streamer.times:
                    s.ttft.append(streamer.times[0] - t0)
                    s.latencies += streamer.per_token_latencies()
                for b, r in enumerate(rows[m]):
                    s.exit_layers += exits[b, : len(r)].tolist() if exits is not None else [L] * len(r)
                if bs == 1:
                    c = s.by_category.setdefault(group[0].category, [0, 0.0])
                    c[0] += len(rows[m][0])
                    c[1] += dt
            for m in methods:
                s = stats[m]
                for r, ref in zip(rows[m], rows["full"]):
                    s.agree += sum(x == y for x, y in zip(r, ref))
                    s.compared += len(ref)
                    s.exact += int(r == ref)
            if bs == batch_sizes[0]:
                for b, ref in enumerate(rows["full"]):
                    row_ids = ids[b][mask[b].bool()]
                    seq = torch.cat([row_ids, torch.tensor(ref, dtype=torch.long, device=ids.device)])[None]
                    oracle.append(oracle_exits(model, seq, len(row_ids)))
        hf_tps = stats["hf"].tokens / stats["hf"].seconds
        results[f"batch_{bs}"] = {m: dict(s.summary(L), speedup_vs_hf=(s.tokens / s.seconds) / hf_tps,
                                          exit_config=_plain(configs.get(m))) for m, s in stats.items()}
    full = results[f"batch_{batch_sizes[0]}"]["full"]
    head_ms = head_cost_ms(model)
    step_ms = full["latency_ms"]["mean"]  # a decode step, without the prefill that tokens/s includes
    if step_ms != step_ms:  # NaN: no streamed latencies
        step_ms = 1e3 / full["tokens_per_s"]
    o = torch.cat(oracle).float()
    layer_ms, bound = (step_ms - head_ms) / L, oracle_bound(o.mean().item(), L, step_ms, head_ms)
    if "llama_cpp" in peer_fns:
        f = peer_fns["llama_cpp"]
        if not f.tokenizer_match:  # token ids of different vocabularies cannot be compared
            for rows in results.values():
                rows["llama_cpp"].update(token_agreement=None, exact_match=None)
        peer_info["llama_cpp"] = dict(threads=f.threads, tokenizer_match=f.tokenizer_match, weights="Q4_1 GGUF",
                                      version=getattr(__import__("llama_cpp"), "__version__", None),
                                      note="the same GGUF file de-quantized to fp32 for the others; rows of a batch "
                                           "decode one after another")
    if "hf_compile" in peer_fns:
        c = peer_fns["hf_compile"].compile_config
        peer_info["hf_compile"].update(cache="static", compile_mode=c.mode, fullgraph=c.fullgraph)
    return dict(results=results, num_layers=L, max_new_tokens=max_new_tokens, num_prompts=len(prompts),
                peers=peer_info, peers_skipped=skipped, compile=compile_info,
                oracle=dict(mean_exit_layer=o.mean().item(), layer_ms=layer_ms, head_ms=head_ms,
                            speedup_bound_vs_full=bound,
                            histogram=torch.bincount(o.long(), minlength=L + 1).tolist()))


def plot_bench(doc, out_dir):
    """PNG plots of a run_bench result: speedup per mode and category, latency, exit histograms, batch scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, L = doc["results"], doc["num_layers"]
    first = res[next(iter(res))]
    paths = []
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.2))
    cats = sorted({c for r in first.values() for c in r["tokens_per_s_by_category"]})
    hf = first["hf"]["tokens_per_s_by_category"]
    w = 0.8 / max(1, len(first))
    for i, (m, r) in enumerate(first.items()):
        axes[0].bar([j + i * w for j in range(len(cats))],
                    [r["tokens_per_s_by_category"].get(c, 0) / hf.get(c, 1) for c in cats], w, label=m)
    axes[0].set_xticks([j + 0.4 for j in range(len(cats))], cats, rotation=45, ha="right", fontsize=7)
    axes[0].axhline(1, c="gray", lw=1, ls="--")
    axes[0].set_ylabel("speedup over HF generate")
    axes[0].legend(fontsize=7)
    names = list(first)
    for k, key in enumerate(("p50", "p95", "p99")):
        axes[1].bar([j + k * 0.27 for j in range(len(names))], [first[m]["latency_ms"][key] for m in names], 0.27,
                    label=key)
    axes[1].set_xticks([j + 0.27 for j in range(len(names))], names, rotation=30, ha="right", fontsize=8)
    axes[1].set_ylabel("per-token latency (ms)")
    axes[1].legend(fontsize=7)
    for m, r in first.items():
        if m != "hf":
            axes[2].plot(range(L + 1), [c / max(1, sum(r["exit_histogram"])) for c in r["exit_histogram"]], label=m)
    oh = doc["oracle"]["histogram"]
    axes[2].plot(range(L + 1), [c / max(1, sum(oh)) for c in oh], "k--", label="oracle")
    axes[2].set_xlabel("exit layer (layers run)")
    axes[2].set_ylabel("fraction of tokens")
    axes[2].legend(fontsize=7)
    for m, r in first.items():  # the trade-off: speedup against fidelity, beside the oracle bound
        full_tps = first["full"]["tokens_per_s"]
        if r["token_agreement"] is None:
            continue
        axes[3].scatter(r["token_agreement"], r["tokens_per_s"] / full_tps)
        axes[3].annotate(m, (r["token_agreement"], r["tokens_per_s"] / full_tps), fontsize=7,
                         textcoords="offset points", xytext=(4, 3))
    axes[3].axhline(doc["oracle"]["speedup_bound_vs_full"], c="gray", ls="--", lw=1, label="oracle bound")
    axes[3].set_xlabel("token agreement with full (greedy)")
    axes[3].set_ylabel("speedup over specee full")
    axes[3].set_xlim(0, 1.05)
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    p = out_dir / "bench_modes.png"
    fig.savefig(p, dpi=110)
    paths.append(p)
    plt.close(fig)
    if len(res) > 1:
        fig, ax = plt.subplots(figsize=(5, 4))
        bss = [int(k.split("_")[1]) for k in res]
        for m in first:
            ax.plot(bss, [res[f"batch_{b}"][m]["tokens_per_s"] for b in bss], "o-", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / "bench_batch.png"
        fig.savefig(p, dpi=110)
        paths.append(p)
        plt.close(fig)
    return paths


def main_bench(args):
    """`specee bench`: run, write <out>/bench.json and plots, print a summary table."""
    import json

    from .demo import load_model_from_args
    from .prompts import load_prompts

    if getattr(args, "replay", None):
        from .replay import main_replay

        return main_replay(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, tok = load_model_from_args(args)
    prompts = load_prompts(args.prompts, args.num_prompts)
    modes, configs, skipped = bench_modes(args, model)
    doc = run_bench(model, tok, prompts, modes=modes, batch_sizes=args.batch_sizes, exit_configs=configs,
                    max_new_tokens=args.max_new_tokens, peers=getattr(args, "peers", None) or (),
                    default_model=args.model is None, compile=getattr(args, "compile", None) or None)
    doc = dict(meta=run_metadata(), benchmark="specee_bench", model=args.model or "SmolLM2-135M-Instruct",
               prompts=args.prompts or "specee/data/demo_prompts.jsonl", modes_skipped=skipped, **doc)
    import sys

    doc["run"] = dict(command=" ".join(["specee", *sys.argv[1:]]) if sys.argv else "specee bench",
                      wall_s=time.perf_counter() - t_start, note="wall time from model load to the results, "
                      "before the plots")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(doc, indent=2) + "\n")
    plots = plot_bench(doc, out)
    print(summary_table(doc))
    print(f"wrote {out / 'bench.json'} and {', '.join(str(p) for p in plots)}")


def bench_modes(args, model):
    """(modes, exit configs, modes skipped with the reason) for ``specee bench``: ``--modes``, or all of them, where
    ``early_exit`` runs with the ``--predictors`` bank (the shipped one for the default model) and is left out, with
    the reason, when no bank fits the model and the modes were not named."""
    from .demo import predictor_bank
    from .policies import MODES

    modes, configs, skipped = list(args.modes or MODES), {}, {}
    if "early_exit" in modes:
        try:
            configs["early_exit"] = dict(predictor=predictor_bank(getattr(args, "predictors", None), model))
        except ValueError as e:
            if args.modes:
                raise
            modes.remove("early_exit")
            skipped["early_exit"] = str(e)
            print(f"specee bench: early_exit left out: {e}")
    return modes, configs, skipped


def summary_table(doc):
    lines = []
    for bs, rows in doc["results"].items():
        lines.append(f"{bs}: {'method':<18}{'tok/s':>8}{'vs hf':>7}{'agree':>8}{'exact':>7}{'p50 ms':>8}"
                     f"{'p99 ms':>8}{'ttft ms':>8}{'exit':>6}")
        for m, r in rows.items():
            ttft = f"{r['ttft_ms']:8.1f}" if r["ttft_ms"] is not None else f"{'—':>8}"
            agree = f"{r['token_agreement']:8.1%}{r['exact_match']:7.0%}" if r["token_agreement"] is not None \
                else f"{'—':>8}{'—':>7}"
            lines.append(f"{'':{len(bs) + 2}}{m:<18}{r['tokens_per_s']:8.1f}{r['speedup_vs_hf']:7.2f}"
                         f"{agree}{r['latency_ms']['p50']:8.1f}"
                         f"{r['latency_ms']['p99']:8.1f}{ttft}{r['mean_exit_layer']:6.1f}")
    for name, why in doc.get("peers_skipped", {}).items():
        lines.append(f"peer {name} skipped: {why}")
    o = doc["oracle"]
    lines.append(f"oracle: mean exit layer {o['mean_exit_layer']:.1f}/{doc['num_layers']}, layer skipping can buy at "
                 f"most {o['speedup_bound_vs_full']:.2f}x over full (layer {o['layer_ms']:.2f} ms, head "
                 f"{o['head_ms']:.2f} ms)")
    return "\n".join(lines)
