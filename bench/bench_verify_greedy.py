"""verify_greedy microbenchmark: eager and compiled reference vs the specee backends (see bench/op_bench.py).

Bytes model: the logits of the positions a row must examine, (accepted + 1) * V per row (taken from the
reference's result, outside the timed region), plus drafts and outputs. Drafts match the target argmax up
to a first mismatch drawn uniformly from 0..K (K: all accepted), so about half the drafts are accepted.
    python bench/bench_verify_greedy.py --json           # -> bench/results/verify_greedy_<device>.json
    python -m pytest bench/bench_verify_greedy.py --benchmark-only
"""
import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import op_bench  # noqa: E402
from specee import reference  # noqa: E402

OP = "verify_greedy"
BYTES_MODEL = "sum_b (accepted_b + 1) * V * s(logits) + B*K*8 + B*8 + B*(K+1)*8 + B*8"
VOCABS = {"smollm2-135m": 49152, "llama-2-7b": 32000, "llama-3-8b": 128256}


def make_args(model, B, K, dtype=torch.bfloat16, device="cpu"):
    V = VOCABS[model]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, K + 1, V, generator=g).to(dtype)
    draft = logits.float().argmax(-1)[:, :K].clone()
    first_miss = torch.randint(K + 1, (B,), generator=g)
    rows = torch.nonzero(first_miss < K)[:, 0]
    draft[rows, first_miss[rows]] = (draft[rows, first_miss[rows]] + 1) % V
    return draft.to(device), torch.full((B,), K, device=device), logits.to(device)


def bytes_model(args):
    draft, num_draft, logits = args
    _, n_emit = reference.verify_greedy(*args)
    V = logits.shape[-1]
    return int(n_emit.sum()) * V * logits.element_size() + op_bench.nbytes(draft, num_draft) * 2 + draft.shape[0] * 8


def cases(device_type):
    batches = (1, 8, 32, 128) if device_type == "cuda" else (1, 8, 32)
    models = list(VOCABS) if device_type == "cuda" else ["smollm2-135m", "llama-2-7b"]
    grid = [(m, B, K, torch.bfloat16) for m in models for B in batches for K in (1, 4, 8)]
    # NOTE: torch's CPU argmax is much slower on bf16 than on fp32, so fp32 rows show the fair comparison.
    grid += [(m, B, 4, torch.float32) for m in models for B in (1, 32)] if device_type == "cpu" else []
    return [(f"{m} B={B} K={K} {str(dt)[6:]}", functools.partial(make_args, m, B, K, dt, device_type), bytes_model)
            for m, B, K, dt in grid]


@pytest.mark.parametrize("B", [1, 32])
@pytest.mark.parametrize("provider", ["eager", "compiled", "cpu"])
def test_verify_greedy(benchmark, provider, B):
    fns = op_bench.providers(OP, "cpu")
    if provider not in fns:
        pytest.skip(f"{provider} unavailable")
    benchmark.group = f"{OP} V=49152 B={B} K=4 bf16"
    benchmark(fns[provider], *make_args("smollm2-135m", B, 4))


if __name__ == "__main__":
    op_bench.main([OP])
