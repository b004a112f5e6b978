"""The CUDA emulator behind the op tests' `emu` backend (tests/cuda_emu): that it parses the launches, reports
the barrier bugs CUDA would hang on, gives the warp intrinsics CUDA's results, exposes a race through the order
threads run in, that bugs planted in the real kernels' source are caught, and that its AddressSanitizer build
reports an out-of-bounds read."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from specee import reference
from tests import cuda_emu
from tests.utils import assert_equal

try:
    cuda_emu.library()
except cuda_emu.EmulatorUnavailable as e:  # no C++ compiler: nothing here can run
    pytest.skip(f"CUDA emulator unavailable: {e}", allow_module_level=True)

DEADLOCK, BROKEN_SHUFFLE, RACY_BROADCAST, BROADCAST, WARP_OPS = range(5)


@pytest.fixture(autouse=True)
def forward_order():
    yield
    cuda_emu.set_order("forward")


def selftest(which, grid, block, out_len, lib=None):
    lib = lib or cuda_emu.library()
    out = torch.full((out_len,), -1, dtype=torch.int32)
    err = lib.emu_selftest(which, grid, block, cuda_emu._ptr(out))
    return err, lib.emu_message().decode(), out


def test_rewrite_turns_launches_into_calls():
    src = ("  Kern<T, 4><<<grid, 128, smem, stream>>>(a,\n      f(b, c));\n"
           "  extern __shared__ __align__(16) float s_buf[];\n")
    out = cuda_emu.rewrite(src)
    assert "::specee_emu::Launch(Kern<T, 4>, grid, 128, smem, stream, [&] { Kern<T, 4>(a,\n      f(b, c)); });" in out
    assert "float* s_buf = reinterpret_cast<float*>(::specee_emu::DynamicShared());" in out
    with pytest.raises(ValueError, match="not a statement"):
        cuda_emu.rewrite("  x = K<<<1, 32>>>(a) + 1;\n")
    with pytest.raises(ValueError, match="rewrote 0 launches"):
        cuda_emu.rewrite("  K<<<1, 32>>>;\n")


def test_every_kernel_header_is_rewritten():
    for name in cuda_emu.HEADERS:  # raises if a header holds a launch the rewriter cannot parse
        text = (cuda_emu.CUDA_SRC / name).read_text()
        assert "<<<" not in cuda_emu.rewrite(text, name)


@pytest.mark.parametrize("which, what", [(DEADLOCK, "wait at __syncthreads"),
                                         (BROKEN_SHUFFLE, "at a warp shuffle/vote")])
def test_barrier_not_reached_by_all_is_a_deadlock(which, what):
    err, msg, _ = selftest(which, 1, 64, 64)
    assert err != 0 and "deadlock" in msg and what in msg, msg


def test_invalid_launch_configuration_is_refused():
    err, msg, _ = selftest(BROADCAST, 1, 2048, 2048)
    assert err == 9 and "invalid launch configuration" in msg, (err, msg)


def test_warp_intrinsics_match_cuda_semantics():
    n = 256
    err, msg, out = selftest(WARP_OPS, 1, n, 4 * n)
    assert err == 0, msg
    t = torch.arange(n)
    v = (7919 * t) % 1000
    lane = t % 32
    assert_equal(out[:n].long(), v[t ^ 5], "__shfl_xor_sync")
    assert_equal(out[n:2 * n].long(), torch.where(lane >= 3, v[(t - 3).clamp(min=0)], v), "__shfl_up_sync")
    assert_equal(out[2 * n:3 * n].long(), v.view(-1, 32).amax(1).repeat_interleave(32), "__reduce_max_sync")
    assert_equal(out[3 * n:].long(), torch.full((n,), int(v.sum())), "BlockSum")


def test_thread_order_exposes_a_race():
    grid, block = 3, 64
    expected = torch.arange(1, grid + 1, dtype=torch.int32).repeat_interleave(block)
    results = {}
    for order in ("forward", "reverse"):
        cuda_emu.set_order(order)
        for which in (RACY_BROADCAST, BROADCAST):
            err, msg, out = selftest(which, grid, block, grid * block)
            assert err == 0, msg
            results[order, which] = out
    assert torch.equal(results["forward", BROADCAST], expected) and torch.equal(results["reverse", BROADCAST], expected)
    assert torch.equal(results["forward", RACY_BROADCAST], expected)  # thread 0 happens to write first
    assert not torch.equal(results["reverse", RACY_BROADCAST], expected), "the race went unnoticed"


def _op_cases():
    g = torch.Generator().manual_seed(0)
    B, K, V, d = 5, 4, 1000, 200
    logits = torch.randn(B, K + 1, V, generator=g)
    logits[:, :, 7] = logits.amax(-1) + 1  # ties: the argmax at 7 and at 911 (lowest index wins)
    logits[:, :, 911] = logits[:, :, 7]
    draft = torch.randint(V, (B, K), generator=g)
    draft[:2] = 7
    num_draft = torch.tensor([4, 2, 0, 4, 3])
    draft_probs = torch.softmax(torch.randn(B, K, V, generator=g), -1)
    temperature = torch.tensor([0.8, 1.0, 0.0, 1.3, 0.5])
    hidden, head = torch.randn(B, d, generator=g), torch.randn(V, d, generator=g)
    cand = torch.randint(V, (B, 4), generator=g)
    prev = torch.softmax(torch.randn(B, 4, generator=g), -1)
    w1, b1, w2, b2 = (torch.randn(*s, generator=g) * 0.1 for s in ((300, 12), (300,), (300,), (1,)))
    return {
        "verify_greedy": (draft, num_draft, logits),
        "verify_sample": (draft, num_draft, draft_probs, logits, temperature, torch.tensor([3]), torch.tensor(8)),
        "lm_head_argmax": (hidden, head, cand),
        "exit_predict": (hidden, torch.rand(d, generator=g) + 0.5, 1e-6, head, cand, prev, w1, b1, w2, b2, 0.5),
    }


@pytest.mark.parametrize("op", sorted(cuda_emu.OPS))
def test_results_do_not_depend_on_thread_order(op):
    """Every kernel's output bits are the same whatever order its threads run in between barriers: no race that
    the emulator can expose."""
    args = _op_cases()[op]
    results = []
    for order, seed in (("forward", 0), ("reverse", 0), ("shuffle", 1), ("shuffle", 2)):
        cuda_emu.set_order(order, seed)
        results.append(cuda_emu.OPS[op](*args))
    for (order, _), res in zip((("reverse", 0), ("shuffle", 1), ("shuffle", 2)), results[1:]):
        for a, b in zip(res, results[0]):
            assert torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                               b.view(torch.uint8) if b.is_floating_point() else b), f"{op}: {order} differs"


# Bugs planted in the real kernels' source; each must fail a check against the reference.
PLANTED = {
    "tie_to_highest_index": ("verify_greedy", {"common.cuh": [("(a == b && ia < ib)", "(a == b && ia > ib)")]}),
    "blocksum_reads_before_writes": ("exit_predict", {"common.cuh": [(
        "  if ((threadIdx.x & (kWarpSize - 1)) == 0) s_part[threadIdx.x / kWarpSize] = v;\n  __syncthreads();\n"
        "  float r = 0.f;",
        "  if ((threadIdx.x & (kWarpSize - 1)) == 0) s_part[threadIdx.x / kWarpSize] = v;\n  float r = 0.f;")]}),
    "cdf_pass_no_barrier_after_atomic": ("verify_sample", {"verify_sample.cuh": [(
        "      if (found != kEmptyIndex) atomicMin(&s_found, found);\n      __syncthreads();\n",
        "      if (found != kEmptyIndex) atomicMin(&s_found, found);\n")]}),
}


def _matches_reference(op, args):
    got = cuda_emu.OPS[op](*args)
    want = getattr(reference, op)(*args)
    if op == "exit_predict":
        return all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(got[:2], want[:2]))
    return all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_kernel_bug_is_caught(bug):
    op, patch = PLANTED[bug]
    args = _op_cases()[op]
    assert _matches_reference(op, args), f"{op}: the unpatched kernel must match the reference here"
    with cuda_emu.using(cuda_emu.load(cuda_emu.build(patch))):
        caught = []
        for order in ("forward", "reverse"):
            cuda_emu.set_order(order)
            try:
                caught.append(not _matches_reference(op, args))
            except cuda_emu.LaunchError:  # a deadlock is caught too
                caught.append(True)
    assert any(caught), f"planted bug {bug} in {op} went unnoticed"


ASAN_LIB = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip() \
    if shutil.which("gcc") else ""

OUT_OF_BOUNDS = """
import torch
from tests import cuda_emu
lib = cuda_emu.load(cuda_emu.build({"lm_head_argmax.cuh": [(
    "const int row_end = min(V, (slice + 1) * kLmHeadRowsPerBlock);",
    "const int row_end = (slice + 1) * kLmHeadRowsPerBlock;")]}))  # reads head rows past V
with cuda_emu.using(lib):
    cuda_emu.lm_head_argmax(torch.randn(2, 64), torch.randn(100, 64))
print("no report")
"""


@pytest.mark.skipif(not os.path.isabs(ASAN_LIB), reason="gcc's libasan not found")
def test_asan_build_reports_a_planted_out_of_bounds_read():
    """SPECEE_EMU_ASAN=1 (what .ci/run adds) turns a kernel's read past a tensor into a failing process."""
    env = dict(os.environ, SPECEE_EMU_ASAN="1", LD_PRELOAD=ASAN_LIB, ASAN_OPTIONS="detect_leaks=0",
               PYTHONPATH=str(cuda_emu.HERE.parents[1]))
    proc = subprocess.run([sys.executable, "-c", OUT_OF_BOUNDS], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "heap-buffer-overflow" in proc.stderr, (proc.returncode, proc.stdout,
                                                                           proc.stderr[-3000:])
    assert "LmHeadArgmaxKernel" in proc.stderr  # the report names the kernel
