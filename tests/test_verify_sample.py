"""verify_sample: the statistical recipe of STYLE.md §7, planted bugs the checker must reject, injected uniforms,
Philox reproducibility and row independence, and token-for-token agreement of every backend with the reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from specee import ops, reference
from tests.tolerances import (CHI2_MIN_EXPECTED, CHI2_MIN_P, COUNT_LAW_SIGMAS, SAMPLE_BOUNDARY_RTOL,
                              SAMPLE_DRAFT_MIX, SAMPLE_K, SAMPLE_ROWS_CPU, SAMPLE_ROWS_GPU, SAMPLE_VOCAB,
                              SAMPLE_ZERO_TOKENS, SEED_REPEATS)
from tests.utils import (BACKENDS, DTYPES, KERNEL_BACKENDS, RUN_SLOW, NoHostSync, assert_equal, impl_or_skip,
                         interpreted, maybe_compile, param)

OP = "verify_sample"
PH = reference.PLACEHOLDER_TOKEN_ID


def seed_offset(seed, offset=0, device="cpu"):
    return (torch.tensor(seed, dtype=torch.int64, device=device),
            torch.tensor(offset, dtype=torch.int64, device=device))


# --------------------------------------------------------------------------------------- statistical checker
def recipe_problem(seed=0, V=SAMPLE_VOCAB, K=SAMPLE_K, zeros=SAMPLE_ZERO_TOKENS):
    """target [K+1, V] with `zeros` tokens at 0 per position; draft [K, V] = normalize(0.7 target + 0.3 random)."""
    g = torch.Generator().manual_seed(seed)
    target = (1.5 * torch.randn(K + 1, V, generator=g)).exp()
    for j in range(K + 1):
        target[j, torch.randperm(V, generator=g)[:zeros]] = 0
    target /= target.sum(-1, keepdim=True)
    rand = torch.rand(K, V, generator=g)
    draft = SAMPLE_DRAFT_MIX * target[:K] + (1 - SAMPLE_DRAFT_MIX) * rand / rand.sum(-1, keepdim=True)
    return target, draft / draft.sum(-1, keepdim=True)


def run_sampler(sampler, target, draft_dist, N, seed, one_hot=False, device="cpu"):
    """Draw drafts per row from draft_dist, run the sampler on N identical rows; returns (out, num_emitted, p)."""
    K1, V = target.shape
    K = K1 - 1
    g = torch.Generator().manual_seed(seed + 1)
    draft = torch.multinomial(draft_dist, N, replacement=True, generator=g).T.contiguous() if K else \
        torch.zeros(N, 0, dtype=torch.int64)
    logits = target.log().expand(N, K1, V).contiguous()                       # log 0 = -inf: exact zeros
    draft_probs = None if one_hot else draft_dist.expand(N, K, V).contiguous()
    args = [draft, torch.full((N,), K), draft_probs, logits, torch.ones(N), *seed_offset(seed)]
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    out, n_emit = sampler(*args)
    p = reference.target_probs_from_logits(logits[:1], torch.ones(1))[0].double()  # what every sampler sees
    return out.cpu(), n_emit.cpu(), p


def check_sampler(sampler, target, draft_dist, N, seed=0, one_hot=False, device="cpu"):
    """Failures (strings) of the §7 checks: zero-probability tokens, accepted-count law, token law per position."""
    out, n_emit, p = run_sampler(sampler, target, draft_dist, N, seed, one_hot, device)
    K1, V = p.shape
    K = K1 - 1
    q = draft_dist.double()
    dp = torch.ones_like(q) if one_hot else q
    alpha = (q * torch.minimum(torch.ones_like(q), p[:K] / dp)).sum(-1)       # P(accept) at each position
    failures = []
    valid = torch.arange(K1) < n_emit[:, None]
    if ((out < 0) & valid).any() or ((out >= 0) & ~valid).any():
        failures.append("out has -1 inside or a token past num_emitted")
    zero_hit = valid & (p[torch.arange(K1), out.clamp(0)] == 0)
    if zero_hit.any():
        failures.append(f"{int(zero_hit.sum())} zero-probability tokens emitted")
    law = torch.tensor([math.prod(alpha[:j].tolist()) * ((1 - alpha[j]).item() if j < K else 1)
                        for j in range(K1)], dtype=torch.float64)
    freq = torch.bincount(n_emit - 1, minlength=K1)[:K1].double() / N
    sigma = (law * (1 - law) / N).sqrt()
    off = (freq - law).abs() > COUNT_LAW_SIGMAS * sigma + 1e-12
    if off.any():
        failures.append(f"accepted-count law off at n={off.nonzero()[:, 0].tolist()}: freq {freq.tolist()} "
                        f"vs {law.tolist()}")
    for j in range(K1):
        rows = n_emit > j
        count = torch.bincount(out[rows, j], minlength=V).double()
        expected = p[j] * rows.sum()
        small = expected < CHI2_MIN_EXPECTED
        o = torch.cat([count[~small], count[small].sum()[None]])
        e = torch.cat([expected[~small], expected[small].sum()[None]])
        if e[-1] < CHI2_MIN_EXPECTED:                                           # pooled bin still small: drop it
            o, e = o[:-1], e[:-1]
            e = e * o.sum() / e.sum()
        if len(e) < 2:                                                          # no row reached j
            continue
        chi2 = ((o - e) ** 2 / e).sum()
        pval = torch.special.gammaincc(torch.tensor((len(e) - 1) / 2, dtype=torch.float64), chi2 / 2).item()
        if pval <= CHI2_MIN_P:
            failures.append(f"token law at position {j}: chi2 {chi2:.1f} over {len(e)} bins, p = {pval:.2e}")
    return failures


# ------------------------------------------------------------------------- a compact sampler with planted bugs
BUGS = ("resample_from_target", "inverted_ratio", "bonus_from_previous", "reuse_accept_uniform",
        "residual_from_next_position")


def planted_sampler(bug):
    """Vectorized speculative sampler in torch (torch.cumsum inverse CDF) with one of BUGS planted (or None)."""
    def sample(w, u):
        cdf = w.cumsum(-1)
        return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=w.shape[-1] - 1)

    def sampler(draft, num_draft, draft_probs, target_logits, temperature, seed, offset):
        B, K = draft.shape
        V = target_logits.shape[-1]
        p = reference.target_probs_from_logits(target_logits, temperature)
        d = F.one_hot(draft, V).float() if draft_probs is None else draft_probs.float()
        ua, us = reference.philox_uniforms(seed, offset, B, K + 1)
        px, dx = p[:, :K].gather(-1, draft[..., None])[..., 0], d.gather(-1, draft[..., None])[..., 0]
        accept = ua[:, :K] * px < dx if bug == "inverted_ratio" else ua[:, :K] * dx < px
        n = (accept & (torch.arange(K) < num_draft[:, None])).cumprod(-1).sum(-1)
        rows = torch.arange(B)
        nxt = (n + 1).clamp(max=K) if bug == "residual_from_next_position" else n
        residual = (p[rows, nxt] - d[rows, nxt.clamp(max=K - 1)]).clamp_min(0)
        if bug == "resample_from_target":
            residual = p[rows, n]
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[rows, n])
        bonus = p[rows, n - 1] if bug == "bonus_from_previous" else p[rows, n]
        is_bonus = n == num_draft
        w = torch.where(is_bonus[:, None], bonus, residual)
        u = us[rows, n]
        if bug == "reuse_accept_uniform":
            u = torch.where(is_bonus, u, ua[rows, n])
        out = torch.where(torch.arange(K + 1) < n[:, None], F.pad(draft, (0, 1)), PH)
        return out.scatter(1, n[:, None], sample(w, u)[:, None]), n + 1
    return sampler


def _stat_rows(backend):
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return SAMPLE_ROWS_GPU
    return SAMPLE_ROWS_CPU


def _skip_interpreted_stats(backend):
    if interpreted(backend) and not RUN_SLOW:
        pytest.skip("statistics in the Triton interpreter: run with SPECEE_SLOW=1 (token agreement covers it)")
    if backend == "emu" and not RUN_SLOW:  # 65536 rows = 65536 emulated blocks of 1024 threads
        pytest.skip("statistics in the CUDA emulator: run with SPECEE_SLOW=1 (token agreement covers it)")


@pytest.mark.parametrize("one_hot", [False, True], ids=["draft_probs", "one_hot"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics(backend, one_hot):
    fn, device = impl_or_skip(OP, backend)
    _skip_interpreted_stats(backend)
    target, draft = recipe_problem(seed=0)
    alpha = torch.minimum(target[:SAMPLE_K], draft).sum(-1)
    assert ((alpha > 0.75) & (alpha < 0.85)).all(), f"recipe acceptance out of range: {alpha}"
    failures = check_sampler(fn, target, draft, _stat_rows(backend), seed=11, one_hot=one_hot, device=device)
    assert not failures, failures


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_supports_always_resample(backend):
    fn, device = impl_or_skip(OP, backend)
    _skip_interpreted_stats(backend)
    target, _ = recipe_problem(seed=2)
    draft = torch.zeros(SAMPLE_K, SAMPLE_VOCAB)
    for j in range(SAMPLE_K):                                                  # draft lives on target's zeros
        draft[j, target[j] == 0] = 1.0 / SAMPLE_ZERO_TOKENS
    failures = check_sampler(fn, target, draft, _stat_rows(backend), seed=3, device=device)
    assert not failures, failures
    _, n_emit, _ = run_sampler(fn, target, draft, 1000, seed=3, device=device)
    assert (n_emit == 1).all()


@pytest.mark.parametrize("bug", BUGS)
def test_checker_rejects_planted_bugs(bug):
    target, draft = recipe_problem(seed=0)
    assert check_sampler(planted_sampler(bug), target, draft, SAMPLE_ROWS_CPU, seed=11), f"{bug} not caught"


def test_checker_accepts_the_bug_free_planted_sampler():
    target, draft = recipe_problem(seed=0)
    assert not check_sampler(planted_sampler(None), target, draft, SAMPLE_ROWS_CPU, seed=11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_draft_equal_to_target_accepts_all(backend):
    """Uniform target over 12 tokens: softmax gives fl(1/12) in any backend; draft_probs are those same values."""
    fn, device = impl_or_skip(OP, backend)
    N, K, V = (8, 4, 16) if interpreted(backend) else (64, 8, 16) if backend == "emu" else (4096, 8, 16)
    logits = torch.full((N, K + 1, V), float("-inf"))
    logits[..., :12] = 0.0
    draft_probs = reference.target_probs_from_logits(logits, torch.ones(N))[:, :K].contiguous()
    draft = torch.randint(12, (N, K))
    out, n_emit = fn(draft.to(device), torch.full((N,), K, device=device), draft_probs.to(device),
                     logits.to(device), torch.ones(N, device=device), *seed_offset(5, device=device))
    assert_equal(n_emit, torch.full((N,), K + 1), "num_emitted")
    assert_equal(out[:, :K], draft, "accepted drafts")
    assert ((out[:, K] >= 0) & (out[:, K] < 12)).all()


# ------------------------------------------------------------------------------------------ injected uniforms
def _inject(draft, num_draft, draft_probs, logits, temperature, accept_u, sample_u):
    B, K1 = logits.shape[:2]
    ua = torch.full((B, K1), 0.5) if accept_u is None else accept_u
    us = torch.full((B, K1), 0.5) if sample_u is None else sample_u
    return reference.verify_sample(draft, num_draft, draft_probs, logits, temperature, *seed_offset(0),
                                   uniforms=(ua, us))


def test_injected_uniform_edges():
    V = 8
    # Support {1, 3, 5, 6}: softmax of 0 / -inf gives exactly 0.25 on it.
    logits = torch.full((1, 2, V), float("-inf"))
    logits[..., [1, 3, 5, 6]] = 0.0
    one = torch.ones(1)
    # u = 0 accepts any token of positive target probability, never a zero one.
    out, n = _inject(torch.tensor([[3]]), torch.tensor([1]), None, logits, one, torch.zeros(1, 2), None)
    assert out.tolist() == [[3, 5]] and n.tolist() == [2]            # bonus: u=0.5 -> cdf 0.25,0.5,0.75 > 0.5
    out, n = _inject(torch.tensor([[2]]), torch.tensor([1]), None, logits, one, torch.zeros(1, 2), torch.zeros(1, 2))
    assert out.tolist() == [[1, PH]] and n.tolist() == [1]           # rejected; u=0 samples the first positive
    # u * draft == target rejects; one ulp below accepts.
    dp = torch.full((1, 1, V), 0.0)
    dp[0, 0, 3] = 0.5
    dp[0, 0, 0] = 0.5
    u_eq = torch.tensor([[0.5, 0.5]])
    out, n = _inject(torch.tensor([[3]]), torch.tensor([1]), dp, logits, one, u_eq, torch.ones(1, 2))
    assert n.tolist() == [1] and out[0, 0].item() == 6               # residual {1,5,6} (3 -> 0); u=1 -> last positive
    u_below = torch.tensor([[torch.nextafter(torch.tensor(0.5), torch.tensor(0.0)).item(), 0.5]])
    out, n = _inject(torch.tensor([[3]]), torch.tensor([1]), dp, logits, one, u_below, None)
    assert n.tolist() == [2] and out[0, 0].item() == 3
    # u = 1 with one-hot drafts: 1 * 1 < p(x) never holds, the residual is empty and falls back to the target.
    greedy = torch.zeros(1)
    t = torch.randn(1, 2, V)
    x = t.argmax(-1)[:, :1]
    out, n = _inject(x, torch.tensor([1]), None, t, greedy, torch.ones(1, 2), torch.ones(1, 2))
    assert out.tolist() == [[x.item(), PH]] and n.tolist() == [1]


def test_injected_sample_rounding_falls_back_to_last_positive():
    V = 5
    logits = torch.tensor([[[0.0, float("-inf"), 1.0, 2.0, float("-inf")]]])
    for u, tok in [(0.0, 0), (1.0, 3), (0.999999, 3)]:
        out, _ = _inject(torch.zeros(1, 0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), None, logits,
                         torch.ones(1), None, torch.tensor([[u]]))
        assert out.tolist() == [[tok]], (u, out)


def test_philox_known_answers():
    """Random123 known-answer vectors of Philox4x32-10."""
    t = lambda *v: [torch.tensor(x, dtype=torch.int64) for x in v]            # noqa: E731
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        assert [int(w) for w in reference.philox4x32_10(*t(*ctr), *t(*key))] == list(want)
    ua, us = reference.philox_uniforms(torch.tensor(-3), torch.tensor(2 ** 40 + 7), 64, 9)
    assert ((ua > 0) & (ua <= 1) & (us > 0) & (us <= 1)).all() and not torch.equal(ua, us)


# ------------------------------------------------------------------------------- agreement with the reference
def make_case(B, K, V, dtype, with_probs, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, K + 1, V, generator=g)).to(dtype)
    temperature = 0.5 + torch.rand(B, generator=g)
    temperature[::4] = 0.0                                                      # greedy rows
    dprobs = torch.softmax(torch.randn(B, K, V, generator=g) + logits[:, :K].float(), -1)
    draft = torch.multinomial(dprobs.reshape(-1, V), 1, generator=g).reshape(B, K)
    num_draft = torch.randint(K + 1, (B,), generator=g)
    num_draft[0] = K
    draft = torch.where(torch.arange(K) < num_draft[:, None], draft, PH)
    args = [draft, num_draft, dprobs.to(dtype) if with_probs else None, logits, temperature,
            *seed_offset(seed * 31 + 7)]
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def near_boundary_rows(args):
    """Rows whose reference path passes a decision within SAMPLE_BOUNDARY_RTOL of flipping (softmax rounding
    of other backends may flip those), or samples a token other than the exact-arithmetic one."""
    draft, num_draft, dprobs, logits, temperature, seed, offset = [a.cpu() if isinstance(a, torch.Tensor) else a
                                                                   for a in args]
    B, K = draft.shape
    V = logits.shape[-1]
    out, n_emit = reference.verify_sample(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    p = reference.target_probs_from_logits(logits, temperature).double()
    d = F.one_hot(draft.clamp(0), V).double() if dprobs is None else dprobs.double()
    ua, us = reference.philox_uniforms(seed, offset, B, K + 1)
    near = torch.zeros(B, dtype=torch.bool)
    for b in range(B):
        n = int(n_emit[b]) - 1
        for j in range(min(n + 1, int(num_draft[b].clamp(0, K)))):
            x = int(draft[b, j])
            lhs, rhs = ua[b, j].double() * d[b, j, x], p[b, j, x]
            near[b] |= bool((lhs - rhs).abs() <= SAMPLE_BOUNDARY_RTOL * max(rhs, 1e-30))
        w = p[b, n] if n >= min(int(num_draft[b]), K) else (p[b, n] - d[b, n]).clamp_min(0)
        if w.sum() <= 0:
            w = p[b, n]
        cdf = w.cumsum(0)
        threshold = us[b, n].double() * cdf[-1]
        near[b] |= bool(((cdf - threshold).abs() <= SAMPLE_BOUNDARY_RTOL * cdf[-1]).any())
        # The reference sums its cdf in fp32, in order: at a large V that drifts from the exact sum by more than
        # the rtol (2.8e-5 relative after 67590 terms, seen at V = 128256), and a backend that sums in a tree,
        # more accurately, lands on the exact token instead.
        exact = ((cdf > threshold) & (w > 0)).nonzero()
        near[b] |= len(exact) > 0 and int(exact[0]) != int(out[b, n])
    return near


def assert_matches_reference(out, n_emit, args, exact):
    ref_out, ref_n = reference.verify_sample(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    if exact:
        assert_equal(out, ref_out, "out")
        assert_equal(n_emit, ref_n, "num_emitted")
        return
    differ = (out.cpu() != ref_out).any(-1) | (n_emit.cpu() != ref_n)
    unexplained = differ & ~near_boundary_rows(args)
    assert not unexplained.any(), f"rows {unexplained.nonzero()[:5, 0].tolist()} differ away from any boundary"


VOCABS = [param(111), param(1025), param(49152, big=True), param(128256, big=True)]  # 1024: the Triton BLOCK


@pytest.mark.parametrize("with_probs", [True, False], ids=["draft_probs", "one_hot"])
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("K", [1, 4, 8])
@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_matches_reference(backend, dtype, B, K, V, with_probs):
    fn, device = impl_or_skip(OP, backend)
    if interpreted(backend) and (B > 3 or K > 4 or V > 1025 or dtype != torch.float32):
        pytest.skip("Triton interpreter: small shapes only")
    if dtype != torch.float32 and K != 4:
        pytest.skip("fp16/bf16 logits: K = 4 only (the dtype only changes the logits' conversion)")
    args = make_case(B, K, V, dtype, with_probs, seed=B + K + V, device=device)
    with NoHostSync(device):
        out, n_emit = maybe_compile(fn)(*args)
    assert_matches_reference(out, n_emit, args, exact=backend == "cpu")


@pytest.mark.parametrize("with_probs", [True, False], ids=["draft_probs", "one_hot"])
@pytest.mark.parametrize("V", [1023, 1024])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_matches_reference_at_tile_edges(backend, V, with_probs):
    fn, device = impl_or_skip(OP, backend)
    args = make_case(3, 4, V, torch.float32, with_probs, seed=V, device=device)
    out, n_emit = fn(*args)
    assert_matches_reference(out, n_emit, args, exact=backend == "cpu")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_matches_reference_32k(backend):
    fn, device = impl_or_skip(OP, backend)
    if interpreted(backend) and not RUN_SLOW:
        pytest.skip("Triton interpreter: run with SPECEE_SLOW=1")
    args = make_case(4, 4, 32000, torch.bfloat16, True, seed=9, device=device)
    out, n_emit = fn(*args)
    assert_matches_reference(out, n_emit, args, exact=backend == "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_rows_match_verify_greedy(backend):
    fn, device = impl_or_skip(OP, backend)
    B, K, V = 16, 4, 300
    args = make_case(B, K, V, torch.float32, False, seed=4, device=device)
    args[4] = torch.zeros(B, device=device)
    args[0] = torch.where(args[0] >= 0, args[3].argmax(-1)[:, :K], args[0])    # drafts = target argmax ...
    args[0][1::3, 1] = (args[0][1::3, 1] + 1) % V                               # ... with some mismatches
    out, n_emit = fn(*args)
    ref = reference.verify_greedy(args[0].cpu(), args[1].cpu(), args[3].cpu())
    assert_equal(out, ref[0], "out")
    assert_equal(n_emit, ref[1], "num_emitted")


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_reproducible_and_sensitive(backend):
    fn, device = impl_or_skip(OP, backend)
    slow = interpreted(backend)
    args = make_case(4 if slow else 32, 4, 111, torch.float32, True, seed=6, device=device)
    first = fn(*args)
    for _ in range(2 if slow else SEED_REPEATS):
        again = fn(*args)
        assert_equal(again[0], first[0], "out (same seed)")
    other_seed = fn(*args[:5], *seed_offset(12345, 0, device))
    other_offset = fn(*args[:5], args[5], args[6] + 1)
    assert not torch.equal(other_seed[0], first[0]), "a different seed must change the output"
    assert not torch.equal(other_offset[0], first[0]), "a different offset must change the output"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_are_independent(backend):
    fn, device = impl_or_skip(OP, backend)
    args = make_case(8, 4, 111, torch.float32, True, seed=8, device=device)
    out, n_emit = fn(*args)
    changed = make_case(8, 4, 111, torch.float32, True, seed=99, device=device)
    b = 5
    for i in range(5):                                                          # keep row b, change the others
        changed[i][b] = args[i][b]
    changed[5:] = args[5:]                                                      # same (seed, offset)
    out2, n_emit2 = fn(*changed)
    assert_equal(out2[b], out[b], f"row {b} out")
    assert_equal(n_emit2[b], n_emit[b], f"row {b} num_emitted")


def test_public_wrapper_dispatches_and_checks():
    args = make_case(3, 4, 50, torch.float32, True)
    out, n_emit = ops.verify_sample(*args)
    assert_matches_reference(out, n_emit, args, exact=ops.backend_of(OP, "cpu") in ("cpu", "reference"))
    with pytest.raises(TypeError, match="seed"):
        ops.verify_sample(*args[:5], 3, args[6])
    with pytest.raises(TypeError, match="offset"):
        ops.verify_sample(*args[:6], torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="draft_probs"):
        ops.verify_sample(args[0], args[1], args[2][:, :2], *args[3:])
    with pytest.raises(ValueError, match="temperature"):
        ops.verify_sample(*args[:4], torch.ones(2), *args[5:])


def test_cpu_kernel_checks_name_the_argument():
    fn, _ = impl_or_skip(OP, "cpu")
    args = make_case(3, 4, 50, torch.float32, True)
    bad = list(args)
    bad[0] = args[0].clone()
    bad[0][0, 1] = 50
    with pytest.raises(RuntimeError, match=r"draft\[0, 1\]"):
        fn(*bad)
    with pytest.raises(RuntimeError, match="seed"):
        fn(*args[:5], torch.zeros(2, dtype=torch.int64), args[6])


@pytest.mark.parametrize("with_probs", [True, False])
@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_opcheck(backend, with_probs):
    fn, device = impl_or_skip(OP, backend)
    torch.library.opcheck(fn, tuple(make_case(3, 4, 50, torch.float32, with_probs, device=device)))


def test_compiles_fullgraph():
    args = make_case(3, 4, 50, torch.float32, True)
    out, n_emit = torch.compile(ops.verify_sample, fullgraph=True)(*args)
    assert_matches_reference(out, n_emit, args, exact=ops.backend_of(OP, "cpu") in ("cpu", "reference"))
