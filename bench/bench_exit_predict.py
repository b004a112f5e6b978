"""exit_predict microbenchmark: eager and compiled reference vs the specee backends (see bench/op_bench.py).

Bytes model: the least data the op must move: hidden [B, d], the k candidate rows of the head [B, k, d],
norm_weight [d], the MLP (w1 [H, 3k], b1, w2 [H]) and the outputs; the rest of the [V, d] head is never read.
    python bench/bench_exit_predict.py --json            # -> bench/results/exit_predict_<device>.json
    python -m pytest bench/bench_exit_predict.py --benchmark-only
"""
import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import op_bench  # noqa: E402

OP = "exit_predict"
BYTES_MODEL = "B*d*s(hidden) + B*k*d*s(head) + d*s + 4*(3k*H + 2H + 1) + B*k*(8 + 4) + B*9"
MODELS = {"smollm2-135m": (576, 49152), "llama-2-7b": (4096, 32000), "llama-3-8b": (4096, 128256)}
K_CAND, HIDDEN = 8, 512


@functools.lru_cache(maxsize=2)
def _head(V, d, dtype, device):
    return (torch.randn(V, d, device=device) / d ** 0.5).to(dtype)


def make_args(model, B, dtype=torch.bfloat16, device="cpu"):
    d, V = MODELS[model]
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device)                   # noqa: E731
    k, H = K_CAND, HIDDEN
    return (r(B, d).to(dtype), torch.ones(d, dtype=dtype, device=device), 1e-5, _head(V, d, dtype, device),
            torch.randint(V, (B, k), generator=g).to(device), torch.softmax(r(B, k), -1),
            (r(H, 3 * k) / (3 * k) ** 0.5).to(dtype), (0.1 * r(H)).to(dtype), (r(H) / H ** 0.5).to(dtype),
            r(1).to(dtype), 0.5)


def bytes_model(args):
    hidden, norm_weight, _, head, cand_ids, prev_probs, w1, b1, w2, b2, _ = args
    B, k = cand_ids.shape
    return (op_bench.nbytes(hidden, norm_weight, cand_ids, prev_probs, w1, b1, w2, b2)
            + B * k * head.shape[1] * head.element_size() + B * (4 + 4 * k + 1))


def cases(device_type):
    batches = [1, 8, 32, 128] if device_type == "cuda" else [1, 8, 32]
    models = list(MODELS) if device_type == "cuda" else ["smollm2-135m", "llama-2-7b"]
    return [(f"{m} B={B} k={K_CAND} H={HIDDEN} bf16", functools.partial(make_args, m, B, device=device_type),
             bytes_model) for m in models for B in batches]


@pytest.mark.parametrize("B", [1, 32])
@pytest.mark.parametrize("provider", ["eager", "compiled", "cpu"])
def test_exit_predict(benchmark, provider, B):
    fns = op_bench.providers(OP, "cpu")
    if provider not in fns:
        pytest.skip(f"{provider} unavailable")
    benchmark.group = f"{OP} smollm2 B={B}"
    benchmark(fns[provider], *make_args("smollm2-135m", B))


if __name__ == "__main__":
    op_bench.main([OP])
