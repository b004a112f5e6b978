"""Shared machinery of the op microbenchmarks (bench/bench_<op>.py): providers, timers, bytes models, JSON.

Providers: `eager` (specee.reference), `compiled` (torch.compile of the reference), and the backends of
specee.ops (`cpu`, `cuda`, `triton`). CPU timing: perf_counter around the op alone, after warm-up, median/p20/p80
over >= `runs` calls. CUDA timing: CUDA events after warm-up, >= 100 runs, L2 flushed before each run (cold L2),
GB/s against the op's bytes model and the fraction of a measured 1 GiB device copy (STYLE.md §8).

    python bench/op_bench.py --json ops_cpu.json          # every op's cases into bench/results/
    python bench/bench_lm_head_argmax.py --json           # one op
    python -m pytest bench/bench_verify_greedy.py --benchmark-only   # pytest-benchmark (CPU providers)
"""
import argparse
import functools
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import write_json  # noqa: E402
from specee import ops, reference  # noqa: E402

OPS = ("exit_predict", "lm_head_argmax", "verify_greedy", "verify_sample")


@functools.lru_cache(maxsize=None)
def compiled_reference(op):
    torch._dynamo.config.recompile_limit = 64  # one static-shape graph per benchmark case, on purpose
    return torch.compile(getattr(reference, op), fullgraph=True, dynamic=False)


def providers(op, device_type):
    """{name: callable} of what can run `op` on `device_type` here."""
    out = {"eager": getattr(reference, op)}
    # NOTE: verify_sample's reference runs a Python loop over the vocabulary (the sequential fp32 inverse
    # CDF); compiling it would unroll V steps, so it has no compiled provider.
    if op != "verify_sample":
        out["compiled"] = compiled_reference(op)
    for backend in ops.available_backends(device_type, op):
        if backend != "reference":
            out[backend] = ops.get_impl(op, backend)
    return out


def time_cpu(fn, args, runs=20, min_seconds=0.5, warmup=2):
    """Median/p20/p80 microseconds of fn(*args) on the CPU."""
    for _ in range(warmup):
        fn(*args)
    samples = []
    start = time.perf_counter()
    while len(samples) < runs or (time.perf_counter() - start < min_seconds and len(samples) < 10 * runs):
        t0 = time.perf_counter()
        fn(*args)
        samples.append((time.perf_counter() - t0) * 1e6)
    return _summary(samples)


def time_cuda(fn, args, runs=100, warmup=10):
    """Median/p20/p80 microseconds by CUDA events, L2 flushed (a 256 MiB memset) before every run."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn(*args)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn(*args)
        e.record()
    torch.cuda.synchronize()
    return _summary([s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)])


def _summary(samples):
    q = statistics.quantiles(samples, n=10)
    return {"median_us": statistics.median(samples), "p20_us": q[1], "p80_us": q[7], "runs": len(samples)}


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbs(device_type):
    """Measured copy bandwidth (read + write bytes / s): 1 GiB on a GPU, 256 MiB on the CPU."""
    n = (1 << 30) if device_type == "cuda" else (256 << 20)
    src = torch.ones(n, dtype=torch.uint8, device=device_type)
    dst = torch.empty_like(src)
    timer = time_cuda if device_type == "cuda" else time_cpu
    t = timer(dst.copy_, (src,), runs=10)["median_us"]
    return 2 * n / t / 1e3


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def run_cases(op, cases, device_type, only=None):
    """Time every provider on every case; rows carry GB/s (bytes model) and speedups over the references.

    cases: list of (label, make_args() -> args, bytes_model(args) -> int).
    """
    rows = []
    peak = copy_bandwidth_gbs(device_type)
    timer = time_cuda if device_type == "cuda" else time_cpu
    for label, make_args, bytes_model in cases:
        args = make_args()
        moved = bytes_model(args)
        timings = {}
        for name, fn in providers(op, device_type).items():
            if only and name not in only:
                continue
            timings[name] = timer(fn, args)
        for name, t in timings.items():
            gbs = moved / t["median_us"] / 1e3
            row = {"op": op, "case": label, "provider": name, **t, "bytes": moved, "GB_s": gbs,
                   "frac_copy_bw": gbs / peak}
            for ref in ("eager", "compiled"):
                if ref in timings:
                    row[f"speedup_vs_{ref}"] = timings[ref]["median_us"] / t["median_us"]
            rows.append(row)
            print(f"{op:15s} {label:38s} {name:9s} {t['median_us']:11.1f} us  {gbs:7.2f} GB/s"
                  + (f"  x{row['speedup_vs_eager']:.2f} vs eager" if "speedup_vs_eager" in row else ""),
                  flush=True)
        del args
    return rows


def main(op_names, argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", nargs="?", const="", default=None,
                        help="write bench/results/<name> (default: <op>_<device>.json or ops_<device>.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    parser.add_argument("--providers", nargs="*", default=None, help="subset of eager compiled cpu cuda triton")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for op in op_names:
        mod = importlib.import_module(f"bench.bench_{op}")
        rows += run_cases(op, mod.cases(device_type), device_type, args.providers)
    if args.json is not None:
        name = args.json or (f"{op_names[0]}_{device_type}.json" if len(op_names) == 1 else f"ops_{device_type}.json")
        bytes_models = {op: importlib.import_module(f"bench.bench_{op}").BYTES_MODEL for op in op_names}
        path = write_json(name, {"copy_bandwidth_GB_s": copy_bandwidth_gbs(device_type),
                                 "bytes_models": bytes_models, "rows": rows})
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main(list(OPS))
