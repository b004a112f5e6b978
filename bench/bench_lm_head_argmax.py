"""lm_head_argmax microbenchmark: eager and compiled reference vs the specee backends (see bench/op_bench.py).

Bytes model: the whole head [V, d] once, plus hidden [B, d] and the outputs: the [B, V] logits are never
written. The bf16 Llama-3-8B head alone is 1.05 GB, so no kernel beats 1.05 GB / measured copy bandwidth.
    python bench/bench_lm_head_argmax.py --json          # -> bench/results/lm_head_argmax_<device>.json
    python -m pytest bench/bench_lm_head_argmax.py --benchmark-only
"""
import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import op_bench  # noqa: E402

OP = "lm_head_argmax"
BYTES_MODEL = "V*d*s(head) + B*d*s(hidden) + B*k*8 + B*9"
MODELS = {"smollm2-135m": (576, 49152), "llama-2-7b": (4096, 32000), "llama-3-8b": (4096, 128256)}


@functools.lru_cache(maxsize=2)
def _head(V, d, dtype, device):
    return (torch.randn(V, d, device=device) / d ** 0.5).to(dtype)


def make_args(model, B, dtype=torch.bfloat16, device="cpu"):
    d, V = MODELS[model]
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, d, generator=g).to(device=device, dtype=dtype), _head(V, d, dtype, device),
            torch.randint(V, (B, 8), generator=g).to(device))


def bytes_model(args):
    hidden, head, cand_ids = args
    return op_bench.nbytes(hidden, head, cand_ids) + hidden.shape[0] * 9


def cases(device_type):
    if device_type == "cuda":
        grid = [(m, B, dt) for m in MODELS for B in (1, 8, 32, 128) for dt in (torch.bfloat16,)]
    else:
        grid = ([("smollm2-135m", B, torch.bfloat16) for B in (1, 8, 32, 128)]
                + [("smollm2-135m", B, torch.float32) for B in (1, 32)]
                + [("llama-2-7b", B, torch.bfloat16) for B in (1, 8)])
    return [(f"{m} B={B} {str(dt)[6:]}", functools.partial(make_args, m, B, dt, device_type), bytes_model)
            for m, B, dt in grid]


@pytest.mark.parametrize("B", [1, 32])
@pytest.mark.parametrize("provider", ["eager", "compiled", "cpu"])
def test_lm_head_argmax(benchmark, provider, B):
    fns = op_bench.providers(OP, "cpu")
    if provider not in fns:
        pytest.skip(f"{provider} unavailable")
    benchmark.group = f"{OP} smollm2 B={B} bf16"
    benchmark(fns[provider], *make_args("smollm2-135m", B))


if __name__ == "__main__":
    op_bench.main([OP])
