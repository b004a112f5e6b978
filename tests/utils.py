"""Test helpers: a verbose assert_close, backend parametrization and the case markers of the op tests."""
import os

import pytest
import torch

from specee import ops

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def assert_close(actual, expected, atol, rtol, name="tensor"):
    """torch.testing-like check that reports the mismatch count, the first 5 indices and NaN/inf apart."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    msgs = []
    for kind, fa, fe in (("NaN", a.isnan(), e.isnan()), ("+inf", a == float("inf"), e == float("inf")),
                         ("-inf", a == float("-inf"), e == float("-inf"))):
        bad = fa != fe
        if bad.any():
            idx = bad.nonzero()[:5].tolist()
            msgs.append(f"{kind} differs at {int(bad.sum())} places, first {idx}")
    finite = a.isfinite() & e.isfinite()
    diff = (a - e).abs()
    bad = finite & (diff > atol + rtol * e.abs())
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        pairs = [(tuple(i), a[tuple(i)].item(), e[tuple(i)].item()) for i in idx]
        msgs.append(f"{int(bad.sum())}/{a.numel()} elements exceed atol={atol} rtol={rtol}; max abs diff "
                    f"{diff[finite].max().item():.3g}; first (index, actual, expected): {pairs}")
    assert not msgs, f"{name}: " + "; ".join(msgs)


def assert_equal(actual, expected, name="tensor"):
    """Exact equality with the mismatch count and the first 5 indices."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = actual.cpu() != expected.cpu()
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        pairs = [(tuple(i), actual.cpu()[tuple(i)].item(), expected.cpu()[tuple(i)].item()) for i in idx]
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} differ; first (index, actual, expected): "
                             f"{pairs}")


def backend_device(backend):
    """Device the tests run `backend` on: cuda for cuda, and for triton when a GPU exists (else interpreted)."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def impl_or_skip(op, backend):
    """The backend's callable for `op`, or skip the test when that backend is missing here."""
    if backend == "emu":
        from tests import cuda_emu
        try:
            cuda_emu.library()  # a kernel that does not compile fails the test, it is not skipped
        except cuda_emu.EmulatorUnavailable as e:
            pytest.skip(f"emu backend unavailable: {e}")
        return cuda_emu.OPS[op], "cpu"
    device = backend_device(backend)
    if backend not in ops.available_backends(device, op):
        why = {"cpu": "specee._C not built", "cuda": "no CUDA device or CUDA kernels",
               "triton": "needs specee.triton_kernels and a GPU or TRITON_INTERPRET=1"}[backend]
        pytest.skip(f"{backend} backend unavailable for {op}: {why}")
    return ops.get_impl(op, backend), device


def interpreted(backend):
    """True when `backend` runs in the Triton interpreter (slow: tests use small shapes). The CUDA emulator
    (`emu`) runs the default grid: it is compiled code, a block of 1024 threads takes about a millisecond."""
    return backend == "triton" and not torch.cuda.is_available()


# emu: the CUDA kernels' source run on the CPU by a SIMT emulator (tests/cuda_emu); cuda runs them on a GPU. Not
# named cuda_*: the GPU checks select the real CUDA backend with `-k cuda`.
BACKENDS = ("reference", "cpu", "triton", "cuda", "emu")
KERNEL_BACKENDS = BACKENDS[1:]  # for tests whose expectation is the reference itself

# Large cases: marked slow, and run only with SPECEE_SLOW=1 (a 128256 x 4096 head is GBs on a CPU).
RUN_SLOW = os.environ.get("SPECEE_SLOW") == "1"
slow = [pytest.mark.slow, pytest.mark.skipif(not RUN_SLOW, reason="large case: run with SPECEE_SLOW=1")]


def param(*values, big=False, id=None):
    return pytest.param(*values, marks=slow if big else (), id=id)


def maybe_compile(fn):
    """`fn` under torch.compile(fullgraph=True) when SPECEE_TEST_COMPILE=1 (STYLE.md §12), else `fn`."""
    if os.environ.get("SPECEE_TEST_COMPILE") == "1":
        # NOTE: every shape of the grid compiles once (dynamic=False), so the per-code limit must be lifted.
        torch._dynamo.config.recompile_limit = 4096
        return torch.compile(lambda *args: fn(*args), fullgraph=True, dynamic=False)
    return fn


class NoHostSync:
    """Context manager: on CUDA, make any host synchronization raise (torch.cuda.set_sync_debug_mode)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        return False
