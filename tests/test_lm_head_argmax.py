"""lm_head_argmax: every backend against the fp32 reference logits (STYLE.md §6 argmax criterion)."""
import functools

import pytest
import torch

from specee import ops, reference
from tests.tolerances import score_tol
from tests.utils import (BACKENDS, DTYPES, KERNEL_BACKENDS, RUN_SLOW, NoHostSync, assert_equal, impl_or_skip,
                         interpreted, maybe_compile, param)

OP = "lm_head_argmax"
# 128: the Triton vocabulary tile (BLOCK_V); 512: the C++ GEMM block; 1024: the verify tiles.
SHAPES = [param(576, 111), param(576, 128), param(576, 129), param(576, 1025), param(4096, 129), param(576, 32000),
          param(576, 49152, big=True), param(4096, 32000, big=True), param(4096, 128256, big=True)]


@functools.lru_cache(maxsize=32)
def _head(V, d, dtype):
    g = torch.Generator().manual_seed(V * 7 + d)
    return (torch.randn(V, d, generator=g) / d ** 0.5).to(dtype)


def check_argmax(token, hidden, head, dtype, name="token"):
    """Exact where the fp32 reference's top-two gap exceeds the tolerance, else within tolerance of the max."""
    logits = hidden.float() @ head.float().T                                     # [B, V] fp32 reference
    top2 = logits.topk(2, -1).values if logits.shape[-1] > 1 else logits.repeat(1, 2)
    atol, rtol = score_tol(dtype, hidden.shape[-1])
    tol = atol + rtol * top2[:, 0].abs()
    ref = logits.argmax(-1)
    token = token.cpu()
    clear = (top2[:, 0] - top2[:, 1]) > tol
    chosen = logits.gather(-1, token.clamp(0, logits.shape[-1] - 1)[:, None])[:, 0]
    bad = (clear & (token != ref)) | (~clear & ((top2[:, 0] - chosen > tol) | (token < 0)
                                                  | (token >= logits.shape[-1])))
    if bad.any():
        rows = bad.nonzero()[:5, 0].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())}/{len(bad)} rows wrong; first (row, got, expected, gap): "
                             f"{[(r, int(token[r]), int(ref[r]), float(top2[r, 0] - top2[r, 1])) for r in rows]}")


@pytest.mark.parametrize("d, V", SHAPES)
@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)   # the reference is the expectation itself
def test_matches_reference(backend, dtype, B, d, V):
    fn, device = impl_or_skip(OP, backend)
    if interpreted(backend) and (B > 3 or V > 129 or (d > 576 and dtype != torch.float32)):
        pytest.skip("Triton interpreter: small shapes only")
    if backend == "emu" and B * V > 200_000 and not RUN_SLOW:  # ~1 min each in the CUDA emulator
        pytest.skip("CUDA emulator: B x V > 2e5 runs with SPECEE_SLOW=1")
    g = torch.Generator().manual_seed(B + d + V)
    head = _head(V, d, dtype)
    hidden = torch.randn(B, d, generator=g).to(dtype)
    cand_ids = torch.randint(V, (B, 4), generator=g)
    cand_ids[::2, 1] = reference.lm_head_argmax(hidden, head)[0][::2]           # half the rows hit
    with NoHostSync(device):
        token, in_cand = maybe_compile(fn)(hidden.to(device), head.to(device), cand_ids.to(device))
    check_argmax(token, hidden, head, dtype)
    assert_equal(in_cand, (cand_ids == token.cpu()[:, None]).any(-1), "in_candidates")
    token2, in_cand2 = fn(hidden.to(device), head.to(device), None)
    assert_equal(token2, token, "token without cand_ids")
    assert not in_cand2.any(), "in_candidates must be all False when cand_ids is None"


@pytest.mark.parametrize("B", [1, 3, 16])                      # 16: the C++ GEMM path
@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicated_rows_tie_to_lowest_index(backend, B):
    fn, device = impl_or_skip(OP, backend)
    V, d = 1100, 576
    pairs = [(0, V - 1), (3, 4), (127, 128), (255, 256), (511, 512), (100, 900), (1023, 1024)]
    if interpreted(backend):
        if B != 3:
            pytest.skip("Triton interpreter: one batch size")
        V, pairs = 260, [(0, 259), (127, 128), (100, 200)]
    g = torch.Generator().manual_seed(5)
    for i, j in pairs:
        head = torch.randn(V, d, generator=g) / d ** 0.5
        hidden = torch.randn(1, d, generator=g).expand(B, d).contiguous()
        head[j] = 3 * hidden[0] / hidden[0].norm()
        head[i] = head[j]
        token, _ = fn(hidden.to(device), head.to(device), None)
        assert_equal(token, torch.full((B,), i), f"tie between rows {i} and {j}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_equal_logits_give_index_0(backend):
    fn, device = impl_or_skip(OP, backend)
    token, _ = fn(torch.zeros(2, 64, device=device), torch.randn(300, 64, device=device), None)
    assert_equal(token, torch.zeros(2, dtype=torch.int64), "token")


def test_public_wrapper_dispatches_and_checks():
    hidden, head = torch.randn(3, 64), _head(500, 64, torch.float32)
    token, in_cand = ops.lm_head_argmax(hidden, head)
    check_argmax(token, hidden, head, torch.float32)
    with pytest.raises(ValueError, match="lm_head"):
        ops.lm_head_argmax(hidden, head.T.contiguous())
    with pytest.raises(TypeError, match="cand_ids"):
        ops.lm_head_argmax(hidden, head, torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="hidden"):
        ops.lm_head_argmax(hidden.double(), head)


def test_cpu_kernel_checks_name_the_argument():
    fn, _ = impl_or_skip(OP, "cpu")
    with pytest.raises(RuntimeError, match="lm_head"):
        fn(torch.randn(2, 8), torch.randn(10, 9), None)
    with pytest.raises(RuntimeError, match="cand_ids"):
        fn(torch.randn(2, 8), torch.randn(10, 8), torch.zeros(3, 1, dtype=torch.int64))


@pytest.mark.parametrize("with_cand", [True, False])
@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_opcheck(backend, with_cand):
    fn, device = impl_or_skip(OP, backend)
    hidden, head = torch.randn(3, 64, device=device), torch.randn(200, 64, device=device)
    cand = torch.randint(200, (3, 4), device=device) if with_cand else None
    torch.library.opcheck(fn, (hidden, head, cand))


def test_compiles_fullgraph():
    hidden, head = torch.randn(3, 64), _head(500, 64, torch.float32)
    token, _ = torch.compile(ops.lm_head_argmax, fullgraph=True)(hidden, head, torch.zeros(3, 2, dtype=torch.int64))
    check_argmax(token, hidden, head, torch.float32)
