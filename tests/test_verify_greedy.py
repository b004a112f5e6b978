"""verify_greedy: every backend against the expected tokens of +-100 logits and against the reference."""
import pytest
import torch

from specee import ops, reference
from tests.tolerances import GREEDY_LOGIT
from tests.utils import (BACKENDS, DTYPES, NoHostSync, assert_equal, impl_or_skip, interpreted, maybe_compile,
                         param)

OP = "verify_greedy"
VOCABS = [param(111), param(1023), param(1024), param(1025), param(32000),   # 1024: the Triton tile (BLOCK)
          param(49152, big=True), param(128256, big=True)]


def make_case(B, K, V, dtype, seed=0, device="cpu"):
    """+-100 logits with target tokens t, drafts that match t up to a random first mismatch, random num_draft."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(V, (B, K + 1), generator=g)
    logits = torch.full((B, K + 1, V), -GREEDY_LOGIT).scatter_(-1, t[..., None], GREEDY_LOGIT)
    draft = t[:, :K].clone()
    mismatch = torch.randint(K + 1, (B,), generator=g)        # K: no mismatch
    for b in range(B):
        if mismatch[b] < K:
            draft[b, mismatch[b]] = (t[b, mismatch[b]] + 1 + torch.randint(V - 1, (), generator=g)) % V
    num_draft = torch.randint(K + 1, (B,), generator=g)
    num_draft[0] = K                                           # at least one row may accept everything
    draft = torch.where(torch.arange(K) < num_draft[:, None], draft, reference.PLACEHOLDER_TOKEN_ID)
    to = dict(device=device)
    return draft.to(**to), num_draft.to(**to), logits.to(dtype=dtype, **to), t


def expected(t, draft, num_draft):
    """Row-by-row transcription of docs/ops.md §3 (independent of the reference)."""
    B, K = draft.shape
    out = torch.full((B, K + 1), reference.PLACEHOLDER_TOKEN_ID)
    n_emit = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        n = 0
        while n < min(int(num_draft[b]), K) and int(draft[b, n]) == int(t[b, n]):
            out[b, n] = draft[b, n]
            n += 1
        out[b, n] = t[b, n]
        n_emit[b] = n + 1
    return out, n_emit


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("K", [1, 4, 8])
@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_expected(backend, dtype, B, K, V):
    fn, device = impl_or_skip(OP, backend)
    if interpreted(backend) and (B > 3 or K > 4 or V > 1025):
        pytest.skip("Triton interpreter: small shapes only")
    draft, num_draft, logits, t = make_case(B, K, V, dtype, seed=B * 100 + K * 10 + V, device=device)
    with NoHostSync(device):
        out, n_emit = maybe_compile(fn)(draft, num_draft, logits)
    exp_out, exp_n = expected(t, draft.cpu(), num_draft.cpu())
    assert_equal(out, exp_out, "out")
    assert_equal(n_emit, exp_n, "num_emitted")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_logits_match_reference(backend, dtype):
    """Gaussian logits (argmax anywhere, close runners-up) with drafts taken from the reference's argmax."""
    fn, device = impl_or_skip(OP, backend)
    B, K, V = (3, 4, 1025) if interpreted(backend) else (16, 8, 4099)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, K + 1, V, generator=g).to(dtype)
    draft = logits.float().argmax(-1)[:, :K].clone()
    draft[::2, K // 2] = (draft[::2, K // 2] + 1) % V
    num_draft = torch.randint(K + 1, (B,), generator=g)
    exp = reference.verify_greedy(draft, num_draft, logits)
    out = fn(draft.to(device), num_draft.to(device), logits.to(device))
    assert_equal(out[0], exp[0], "out")
    assert_equal(out[1], exp[1], "num_emitted")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_lowest_index(backend):
    fn, device = impl_or_skip(OP, backend)
    V = 3000
    pairs = [(0, V - 1), (5, 6), (255, 256), (1023, 1024), (700, 2900)]   # across vector/block/tile edges
    logits = torch.randn(len(pairs), 2, V)
    for b, (i, j) in enumerate(pairs):
        logits[b, :, [i, j]] = 50.0
    draft = torch.tensor([[i] for i, _ in pairs])
    out, n_emit = fn(draft.to(device), torch.ones(len(pairs), dtype=torch.int64, device=device), logits.to(device))
    assert_equal(out[:, 0], draft[:, 0], "accepted lowest-index tie")
    assert_equal(out[:, 1], draft[:, 0], "bonus lowest-index tie")
    assert_equal(n_emit, torch.full((len(pairs),), 2), "num_emitted")


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_draft_edges(backend):
    """num_draft = 0 emits t_0; num_draft past K is clamped; negative counts as 0; -1 padding is ignored."""
    fn, device = impl_or_skip(OP, backend)
    B, K, V = 4, 3, 50
    draft, _, logits, t = make_case(B, K, V, torch.float32, seed=3)
    draft = t[:, :K].clone()
    num_draft = torch.tensor([0, K, K + 5, -2])
    out, n_emit = fn(draft.to(device), num_draft.to(device), logits.to(device))
    assert_equal(n_emit, torch.tensor([1, K + 1, K + 1, 1]), "num_emitted")
    assert_equal(out[0], torch.tensor([t[0, 0]] + [-1] * K), "out[0]")
    assert_equal(out[1], t[1], "out[1]")


def test_empty_draft_reference_and_cpu():
    draft, num_draft = torch.zeros(2, 0, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    logits = torch.randn(2, 1, 10)
    for backend in ("reference", "cpu"):
        fn, _ = impl_or_skip(OP, backend)
        out, n_emit = fn(draft, num_draft, logits)
        assert_equal(out[:, 0], logits.argmax(-1)[:, 0], backend)
        assert_equal(n_emit, torch.ones(2, dtype=torch.int64), backend)


def test_public_wrapper_dispatches_and_checks():
    draft, num_draft, logits, t = make_case(3, 4, 100, torch.float32)
    out, n_emit = ops.verify_greedy(draft, num_draft, logits)
    exp = expected(t, draft, num_draft)
    assert_equal(out, exp[0], "out")
    assert ops.backend_of(OP, "cpu") in ops.available_backends("cpu", OP)
    with pytest.raises(TypeError, match="draft"):
        ops.verify_greedy(draft.int(), num_draft, logits)
    with pytest.raises(ValueError, match="target_logits"):
        ops.verify_greedy(draft, num_draft, logits[:, :4])
    with pytest.raises(ValueError, match="num_draft"):
        ops.verify_greedy(draft, num_draft[:2], logits)


def test_cpu_kernel_checks_name_the_argument():
    fn, _ = impl_or_skip(OP, "cpu")
    draft, num_draft, logits, _ = make_case(2, 3, 20, torch.float32)
    with pytest.raises(RuntimeError, match="target_logits"):
        fn(draft, num_draft, logits[:, :2])
    with pytest.raises(RuntimeError, match="num_draft"):
        fn(draft, num_draft.int(), logits)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_opcheck(backend):
    fn, device = impl_or_skip(OP, backend)
    draft, num_draft, logits, _ = make_case(3, 4, 64, torch.float32, device=device)
    torch.library.opcheck(fn, (draft, num_draft, logits))


def test_compiles_fullgraph():
    draft, num_draft, logits, t = make_case(3, 4, 100, torch.float32)
    out, n_emit = torch.compile(ops.verify_greedy, fullgraph=True)(draft, num_draft, logits)
    assert_equal(out, expected(t, draft, num_draft)[0], "out")


def _run_python(code, **env):
    import os
    import subprocess
    import sys
    full_env = {k: v for k, v in os.environ.items() if k not in ("SPECEE_BACKEND", "TRITON_INTERPRET")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_specee_backend_forces_reference_and_rejects_bad_values():
    forced = _run_python("from specee import ops; print(ops.backend_of('verify_greedy', 'cpu'))",
                         SPECEE_BACKEND="reference")
    assert forced.returncode == 0 and forced.stdout.strip() == "reference", forced.stderr
    bad = _run_python("import specee.ops", SPECEE_BACKEND="fastest")
    assert bad.returncode != 0 and "SPECEE_BACKEND='fastest'" in bad.stderr
    if not torch.cuda.is_available():
        missing = _run_python("import specee.ops", SPECEE_BACKEND="cuda")
        assert missing.returncode != 0 and "SPECEE_BACKEND=cuda is unavailable" in missing.stderr


def test_missing_extension_falls_back_with_one_warning():
    code = ("import sys, warnings, torch\n"
            "sys.modules['specee._C'] = None\n"              # makes `import specee._C` raise ImportError
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    from specee import ops\n"
            "print(sum('specee._C' in str(x.message) for x in w), ops.backend_of('verify_greedy', 'cpu'))")
    result = _run_python(code)
    assert result.returncode == 0 and result.stdout.split() == ["1", "reference"], result.stdout + result.stderr
