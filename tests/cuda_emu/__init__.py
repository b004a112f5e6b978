"""specee's CUDA kernels run on the CPU by a SIMT emulator (include/specee_emu.h), for the op tests' `emu`
backend: the kernel source of csrc/cuda/*.cuh is compiled by the host compiler against shim CUDA headers, with
each `kernel<<<grid, block, smem, stream>>>(args);` rewritten into an emulated launch. This checks the kernels'
logic (indexing, reductions, tie-breaking, barriers, the sampling passes) where no GPU is lent; it is not a
substitute for running them on one (bench/GPU_OWED.md still owes that).

The functions below mirror the torch bindings of csrc/cuda/ops_cuda.cu on CPU tensors: same outputs, the
launch the binding makes. Outputs start filled with garbage so that an element the kernel does not write fails
the comparison with the reference.
"""
import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CUDA_SRC = HERE.parents[1] / "csrc" / "cuda"
HEADERS = ("common.cuh", "exit_predict.cuh", "lm_head_argmax.cuh", "verify_greedy.cuh", "verify_sample.cuh")
CXX_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared")
# SPECEE_EMU_ASAN=1: build with AddressSanitizer, so that a kernel's read or write outside a tensor is reported
# (the run needs the runtime preloaded: LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0).
if os.environ.get("SPECEE_EMU_ASAN") == "1":
    CXX_FLAGS += ("-fsanitize=address", "-fno-omit-frame-pointer")

_LAUNCH = re.compile(r"^(?P<indent>[ \t]*)(?P<kernel>[^\n;{}]+?)<<<(?P<config>[^>]*)>>>\(", re.M)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(\w+)\s+(\w+)\[\];")
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # specee::cuda::DType
_ORDERS = ("forward", "reverse", "shuffle")


class EmulatorUnavailable(RuntimeError):
    pass


class LaunchError(RuntimeError):
    pass


def rewrite(source, name="source"):
    """CUDA source -> host C++ for the emulator: launches become specee_emu::Launch calls and dynamic shared
    arrays pointers into the emulator's buffer. Fails on a launch it cannot parse rather than skipping it."""
    out, pos, launches = [], 0, 0
    for m in _LAUNCH.finditer(source):
        depth, i = 0, m.end() - 1
        while True:
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
            if depth == 0:
                break
        if source[i] != ";":
            raise ValueError(f"{name}: launch of {m['kernel'].strip()} is not a statement of its own")
        kernel, args = m["kernel"].strip(), source[m.end():i - 1]
        out.append(source[pos:m.start()])
        out.append(f"{m['indent']}::specee_emu::Launch({kernel}, {m['config']}, [&] {{ {kernel}({args}); }})")
        pos, launches = i, launches + 1
    out.append(source[pos:])
    if launches != source.count("<<<"):
        raise ValueError(f"{name}: found {source.count('<<<')} '<<<' but rewrote {launches} launches")
    return _EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::specee_emu::DynamicShared());", "".join(out))


def _compiler():
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise EmulatorUnavailable("no C++ compiler (set CXX or install g++)")
    return cxx


def build(patch=None):
    """Compiles the emulated kernels into a shared library (cached by the hash of every input); returns its path.
    patch: {header name: [(old, new), ...]} edits applied first (each `old` must occur exactly once), for tests
    that plant a bug and check that it is caught."""
    cxx = _compiler()
    texts = {name: (CUDA_SRC / name).read_text() for name in HEADERS}
    for name, edits in (patch or {}).items():
        for old, new in edits:
            if texts[name].count(old) != 1:
                raise ValueError(f"patch: {old!r} occurs {texts[name].count(old)} times in {name}, expected once")
            texts[name] = texts[name].replace(old, new)
    sources = {name: rewrite(text, name) for name, text in texts.items()}
    sources["harness.cpp"] = rewrite((HERE / "harness.cpp").read_text(), "harness.cpp")
    shims = {p.name: p.read_text() for p in sorted((HERE / "include").iterdir())}
    key = hashlib.sha256(repr((cxx, CXX_FLAGS, sources, shims)).encode()).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / f"specee_cuda_emu_{key}"
    lib = out_dir / "libspecee_cuda_emu.so"
    if lib.exists():
        return lib
    work = Path(tempfile.mkdtemp(prefix="specee_cuda_emu_build_"))
    try:
        for name, text in sources.items():
            (work / name).write_text(text)
        cmd = [cxx, *CXX_FLAGS, f"-I{HERE / 'include'}", f"-I{work}", str(work / "harness.cpp"), "-o",
               str(work / lib.name)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the CUDA emulator failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
        out_dir.mkdir(parents=True, exist_ok=True)
        os.replace(work / lib.name, lib)  # atomic: a concurrent build never sees half a library
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


def load(path):
    """The library at `path` (from build()) with its C signatures declared."""
    lib = ctypes.CDLL(str(path))
    lib.emu_message.restype = ctypes.c_char_p
    lib.emu_set_order.argtypes = (ctypes.c_int, ctypes.c_uint64)
    lib.emu_lm_head_argmax_workspace_bytes.restype = ctypes.c_size_t
    lib.emu_exit_predict.argtypes = (
        [ctypes.c_void_p, ctypes.c_int] * 2 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        + [ctypes.c_void_p, ctypes.c_int] * 5 + [ctypes.c_float] + [ctypes.c_int] * 5 + [ctypes.c_void_p] * 3)
    return lib


_LIB = None


def library():
    """The emulated kernels as they are in csrc/cuda (built on first use)."""
    global _LIB
    if _LIB is None:
        _LIB = load(build())
    return _LIB


@contextlib.contextmanager
def using(lib):
    """Run the ops below on `lib` (e.g. a build() with a planted bug) inside the block."""
    global _LIB
    saved, _LIB = _LIB, lib
    try:
        yield lib
    finally:
        _LIB = saved


def set_order(order="forward", seed=0):
    """The order threads run in between barriers: forward, reverse, or shuffled (per pass, with `seed`)."""
    library().emu_set_order(_ORDERS.index(order), seed)


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def _code(t):
    return _DTYPE_CODE[t.dtype]


def _garbage(shape, dtype):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, dtype=torch.bool)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.full(shape, -123456789, dtype=dtype)


def _check(err, op):
    if err != 0:
        why = library().emu_message().decode()
        raise LaunchError(f"{op}: emulated CUDA launch failed (cudaError {err})" + (f": {why}" if why else ""))


def _contiguous(name, t):
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")  # as the binding: it does not copy the big operands
    return t


def exit_predict(hidden, norm_weight, eps, lm_head, cand_ids, prev_probs, w1, b1, w2, b2, threshold):
    B, d = hidden.shape
    V, k, H = lm_head.shape[0], cand_ids.shape[1], w1.shape[0]
    if k > 16:
        raise ValueError(f"at most 16 candidates per row, got cand_ids of shape {tuple(cand_ids.shape)}")
    x, nw, ids, pp, W1, B1, W2, B2 = (t.contiguous() for t in (hidden, norm_weight, cand_ids, prev_probs, w1, b1,
                                                                w2, b2))
    head = _contiguous("lm_head", lm_head)
    score, probs = _garbage((B,), torch.float32), _garbage((B, k), torch.float32)
    exit_flag = _garbage((B,), torch.bool)
    if B:
        _check(library().emu_exit_predict(
            _ptr(x), _code(x), _ptr(nw), _code(nw), float(eps), _ptr(head), _code(head), _ptr(ids), _ptr(pp),
            _code(pp), _ptr(W1), _code(W1), _ptr(B1), _code(B1), _ptr(W2), _code(W2), _ptr(B2), _code(B2),
            float(threshold), B, d, V, k, H, _ptr(score), _ptr(probs), _ptr(exit_flag)), "exit_predict")
    return score, probs, exit_flag


def lm_head_argmax(hidden, lm_head, cand_ids=None):
    B, d = hidden.shape
    V = lm_head.shape[0]
    x, head = hidden.contiguous(), _contiguous("lm_head", lm_head)
    ids = cand_ids.contiguous() if cand_ids is not None else None
    token, hit = _garbage((B,), torch.int64), _garbage((B,), torch.bool)
    if B:
        lib = library()
        workspace = torch.empty(lib.emu_lm_head_argmax_workspace_bytes(B, V), dtype=torch.uint8)
        _check(lib.emu_lm_head_argmax(_ptr(x), _code(x), _ptr(head), _code(head), _ptr(ids), B, d, V,
                                      0 if ids is None else ids.shape[1], _ptr(workspace), _ptr(token), _ptr(hit)),
               "lm_head_argmax")
    return token, hit


def verify_greedy(draft, num_draft, target_logits):
    B, K = draft.shape
    V = target_logits.shape[2]
    dr, nd, logits = draft.contiguous(), num_draft.contiguous(), _contiguous("target_logits", target_logits)
    out, num_emitted = _garbage((B, K + 1), torch.int64), _garbage((B,), torch.int64)
    if B:
        _check(library().emu_verify_greedy(_ptr(dr), _ptr(nd), _ptr(logits), _code(logits), B, K, V, _ptr(out),
                                           _ptr(num_emitted)), "verify_greedy")
    return out, num_emitted


def verify_sample(draft, num_draft, draft_probs, target_logits, temperature, seed, offset):
    """seed / offset of shape (1,) are read by the kernel through a pointer (the binding's path for device
    tensors, what CUDA graphs use); of shape () they are passed by value (its path for CPU tensors)."""
    B, K = draft.shape
    V = target_logits.shape[2]
    dr, nd, temp = draft.contiguous(), num_draft.contiguous(), temperature.contiguous()
    logits = _contiguous("target_logits", target_logits)
    dp = _contiguous("draft_probs", draft_probs) if draft_probs is not None else None
    out, num_emitted = _garbage((B, K + 1), torch.int64), _garbage((B,), torch.int64)

    def scalar(t):  # (pointer, value)
        return (_ptr(t), ctypes.c_int64(0)) if t.dim() == 1 else (ctypes.c_void_p(0), ctypes.c_int64(int(t)))

    if B:
        _check(library().emu_verify_sample(
            _ptr(dr), _ptr(nd), _ptr(dp), 0 if dp is None else _code(dp), _ptr(logits), _code(logits), _ptr(temp),
            _code(temp), *scalar(seed), *scalar(offset), B, K, V, _ptr(out), _ptr(num_emitted)), "verify_sample")
    return out, num_emitted


OPS = {"exit_predict": exit_predict, "lm_head_argmax": lm_head_argmax, "verify_greedy": verify_greedy,
       "verify_sample": verify_sample}
