"""Per-call cost of the dispatch layers of a specee op (STYLE.md §3: custom-op wrappers on small hot ops must
have a measured cost; FlashInfer PR #709 turned theirs off for that reason).

On tiny inputs (verify_greedy, B=1, K=1, V=8), so the time is the overhead, not the kernel:
  public      specee.ops.verify_greedy: input checks + bound-backend lookup + the op
  overload    torch.ops.specee.verify_greedy.default: the dispatcher + the C++ kernel
  packet      torch.ops.specee.verify_greedy: overload resolution + the above
  triton_op   torch.ops.specee.verify_greedy_triton.default (Library-registered Python impl), when available
  reference   specee.reference.verify_greedy (eager torch)
  checks      the public wrapper's input checks alone
    python bench/bench_dispatch.py --json                # -> bench/results/dispatch_<device>.json
    python -m pytest bench/bench_dispatch.py --benchmark-only
"""
import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import op_bench  # noqa: E402
from bench.common import write_json  # noqa: E402
from specee import ops, reference  # noqa: E402


def tiny_args(device="cpu"):
    logits = torch.randn(1, 2, 8, device=device)
    return logits.argmax(-1)[:, :1].contiguous(), torch.ones(1, dtype=torch.int64, device=device), logits


def layers(device_type="cpu"):
    out = {"public": ops.verify_greedy, "reference": reference.verify_greedy,
           "checks": lambda *a: ops._check_verify(*a)}
    native = "cuda" if device_type == "cuda" else "cpu"
    if native in ops.available_backends(device_type, "verify_greedy"):
        out["overload"] = torch.ops.specee.verify_greedy.default
        out["packet"] = torch.ops.specee.verify_greedy
    if "triton" in ops.available_backends(device_type, "verify_greedy"):
        out["triton_op"] = ops.get_impl("verify_greedy", "triton")
    return out


@pytest.mark.parametrize("layer", ["public", "overload", "packet", "reference", "checks"])
def test_dispatch(benchmark, layer):
    fns = layers("cpu")
    if layer not in fns:
        pytest.skip(f"{layer} unavailable")
    benchmark.group = "dispatch verify_greedy B=1 K=1 V=8"
    benchmark(fns[layer], *tiny_args())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", nargs="?", const="", default=None)
    args = parser.parse_args(argv)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name, fn in layers(device_type).items():
        # NOTE: host time (perf_counter) on every device: dispatch cost is paid on the host, kernels are async.
        t = op_bench.time_cpu(fn, tiny_args(device_type), runs=2000, min_seconds=1.0)
        rows.append({"layer": name, **t})
        print(f"{name:10s} {t['median_us']:8.2f} us  (p20 {t['p20_us']:.2f}, p80 {t['p80_us']:.2f})")
    if args.json is not None:
        print("wrote", write_json(args.json or f"dispatch_{device_type}.json", {"rows": rows}))


if __name__ == "__main__":
    main()
