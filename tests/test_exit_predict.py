"""exit_predict: every backend against the reference (scores/probs within score_tol, exits exact off-threshold)."""
import pytest
import torch

from specee import ops, reference
from tests.tolerances import score_tol
from tests.utils import (BACKENDS, DTYPES, KERNEL_BACKENDS, NoHostSync, assert_close, assert_equal, impl_or_skip,
                         interpreted, maybe_compile)

OP = "exit_predict"
EPS = 1e-6


def make_args(B, d, k, H, V, dtype, seed=0, device="cpu"):
    """Positional args of exit_predict (threshold = median reference score, so both decisions occur)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)                              # noqa: E731
    args = [3 * r(B, d), 1 + 0.1 * r(d), EPS, r(V, d) / d ** 0.5 * 4, torch.randint(V, (B, k), generator=g),
            torch.softmax(r(B, k), -1), r(H, 3 * k) / (3 * k) ** 0.5, 0.1 * r(H), r(H) / H ** 0.5, r(1), 0.5]
    for i in (0, 1, 3, 6, 7, 8, 9):
        args[i] = args[i].to(dtype)
    args[10] = float(reference.exit_predict(*args)[0].median())
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def check(outputs, args, dtype, d):
    args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    score, probs, ex = (o.cpu() for o in outputs)
    ref_score, ref_probs, ref_exit = reference.exit_predict(*args)
    atol, rtol = score_tol(dtype, d)
    assert score.dtype == probs.dtype == torch.float32 and ex.dtype == torch.bool
    assert_close(score, ref_score, atol, rtol, "score")
    assert_close(probs, ref_probs, atol, rtol, "probs")
    decided = (ref_score - args[10]).abs() >= atol                            # exact off the threshold
    assert_equal(ex[decided], ref_exit[decided], "exit")
    assert_equal(ex, score > args[10], "exit vs own score")


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("d", [576, 4096])
@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)   # the reference is the expectation itself
def test_matches_reference(backend, dtype, B, d, k, H=64):
    fn, device = impl_or_skip(OP, backend)
    if interpreted(backend) and (B > 3 or d == 4096):
        pytest.skip("Triton interpreter: small shapes only")
    args = make_args(B, d, k, H, 256, dtype, seed=B + d + k + H, device=device)
    with NoHostSync(device):
        outputs = maybe_compile(fn)(*args)
    check(outputs, args, dtype, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_sizes(backend):
    fn, device = impl_or_skip(OP, backend)
    for B, d, k, H in [(5, 123, 3, 37), (2, 7, 5, 1), (1, 1000, 2, 129)]:
        args = make_args(B, d, k, H, 300, torch.float32, seed=d, device=device)
        check(fn(*args), args, torch.float32, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab_reads_candidate_rows(backend):
    fn, device = impl_or_skip(OP, backend)
    args = make_args(3, 64, 4, 64, 128256, torch.bfloat16, seed=1, device=device)
    args[4][:, 0] = 128255                                                   # last row of the head
    check(fn(*args), args, torch.bfloat16, 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_extremes(backend):
    fn, device = impl_or_skip(OP, backend)
    args = make_args(5, 576, 4, 64, 500, torch.float32, device=device)
    args[10] = 1.0
    assert not fn(*args)[2].any(), "score <= 1 never exceeds threshold 1"
    args[10] = -1.0
    assert fn(*args)[2].all(), "every score exceeds threshold -1"


def test_public_wrapper_dispatches_and_checks():
    args = make_args(3, 64, 4, 16, 100, torch.float32)
    check(ops.exit_predict(*args), args, torch.float32, 64)
    bad = list(args)
    bad[4] = args[4].int()
    with pytest.raises(TypeError, match="cand_ids"):
        ops.exit_predict(*bad)
    bad = list(args)
    bad[6] = args[6][:, :5]
    with pytest.raises(ValueError, match="w1"):
        ops.exit_predict(*bad)
    bad = list(args)
    bad[1] = args[1][:10]
    with pytest.raises(ValueError, match="norm_weight"):
        ops.exit_predict(*bad)


def test_cpu_kernel_checks_name_the_argument():
    fn, _ = impl_or_skip(OP, "cpu")
    args = make_args(3, 64, 4, 16, 100, torch.float32)
    bad = list(args)
    bad[4] = args[4].clone()
    bad[4][1, 2] = 100
    with pytest.raises(RuntimeError, match=r"cand_ids\[1, 2\]"):
        fn(*bad)
    bad = list(args)
    bad[8] = args[8][:3]
    with pytest.raises(RuntimeError, match="w2"):
        fn(*bad)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_opcheck(backend):
    fn, device = impl_or_skip(OP, backend)
    torch.library.opcheck(fn, tuple(make_args(3, 64, 4, 16, 100, torch.float32, device=device)))


def test_compiles_fullgraph():
    args = make_args(3, 64, 4, 16, 100, torch.float32)
    check(torch.compile(ops.exit_predict, fullgraph=True)(*args), args, torch.float32, 64)
