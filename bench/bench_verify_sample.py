"""verify_sample microbenchmark: eager reference vs the specee backends (see bench/op_bench.py).

The reference's sequential fp32 inverse CDF is a Python loop over V, so it is slow by construction and is
not compiled; it is the specification, not a baseline to tune. Drafts are sampled from draft_probs =
softmax(target logits + noise), temperature 1.
Bytes model: per row, the target logits (and draft_probs) of the examined positions, (accepted + 1) * V
each (from the reference's result, outside the timed region), plus drafts and outputs.
    python bench/bench_verify_sample.py --json           # -> bench/results/verify_sample_<device>.json
    python -m pytest bench/bench_verify_sample.py --benchmark-only
"""
import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import op_bench  # noqa: E402
from specee import reference  # noqa: E402

OP = "verify_sample"
BYTES_MODEL = "sum_b (accepted_b + 1) * V * (s(logits) + s(draft_probs)) + B*K*8 + B*(K+1)*8 + B*12"
VOCABS = {"smollm2-135m": 49152, "llama-2-7b": 32000, "llama-3-8b": 128256}


def make_args(model, B, K, dtype=torch.bfloat16, device="cpu"):
    V = VOCABS[model]
    g = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(B, K + 1, V, generator=g)).to(dtype)
    draft_probs = torch.softmax(logits[:, :K].float() + 0.5 * torch.randn(B, K, V, generator=g), -1)
    draft = torch.multinomial(draft_probs.reshape(-1, V), 1, generator=g).reshape(B, K)
    to = dict(device=device)
    return (draft.to(**to), torch.full((B,), K, **to), draft_probs.to(dtype=dtype, **to), logits.to(**to),
            torch.ones(B, **to), torch.tensor(1, **to), torch.tensor(0, **to))


def bytes_model(args):
    draft, num_draft, draft_probs, logits = args[:4]
    _, n_emit = reference.verify_sample(*args)
    V = logits.shape[-1]
    per_pos = V * (logits.element_size() + draft_probs.element_size())
    return int(n_emit.sum()) * per_pos + op_bench.nbytes(draft, num_draft) * 2 + draft.shape[0] * 12


def cases(device_type):
    batches = (1, 8, 32, 128) if device_type == "cuda" else (1, 8, 32)
    models = list(VOCABS) if device_type == "cuda" else ["smollm2-135m", "llama-2-7b"]
    Ks = (1, 4, 8) if device_type == "cuda" else (4,)
    return [(f"{m} B={B} K={K} bf16", functools.partial(make_args, m, B, K, device=device_type), bytes_model)
            for m in models for B in batches for K in Ks]


@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("provider", ["eager", "cpu"])
def test_verify_sample(benchmark, provider, B):
    fns = op_bench.providers(OP, "cpu")
    if provider not in fns:
        pytest.skip(f"{provider} unavailable")
    benchmark.group = f"{OP} V=49152 B={B} K=4 bf16"
    benchmark(fns[provider], *make_args("smollm2-135m", B, 4))


if __name__ == "__main__":
    op_bench.main([OP])
