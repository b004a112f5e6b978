"""Public entry points of the specee ops, and the choice of backend.

`specee.ops.<op>` checks its inputs, then calls the backend bound at import for the tensors' device type:
CUDA tensors use cuda > triton > reference, CPU tensors cpu (C++) > reference. `SPECEE_BACKEND=reference|
triton|cuda|cpu` forces one backend. The contract is docs/ops.md; the specification is specee/reference.py.

Backends, as callables with the reference's positional signature (tests reach them via `get_impl`):
    reference  specee.reference.<op>                      any device
    cpu        torch.ops.specee.<op> (csrc/cpu/<op>.h)    CPU tensors, needs specee._C
    cuda       torch.ops.specee.<op> (csrc/cuda/<op>.cuh) CUDA tensors, needs specee._C built with CUDA
    triton     torch.ops.specee.<op>_triton               CUDA tensors; CPU ones under TRITON_INTERPRET=1
"""
import importlib
import os
import warnings

import torch

from specee import reference

OPS = ("exit_predict", "lm_head_argmax", "verify_greedy", "verify_sample")
BACKENDS = ("reference", "cpu", "cuda", "triton")
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

# Argument lists of the schemas in csrc/ops.cpp; the Triton ops `specee::<op>_triton` reuse them.
_SCHEMA_ARGS = {
    "exit_predict": "(Tensor hidden, Tensor norm_weight, float eps, Tensor lm_head, Tensor cand_ids, "
                    "Tensor prev_probs, Tensor w1, Tensor b1, Tensor w2, Tensor b2, float threshold) "
                    "-> (Tensor score, Tensor probs, Tensor exit)",
    "lm_head_argmax": "(Tensor hidden, Tensor lm_head, Tensor? cand_ids) -> (Tensor token, Tensor in_candidates)",
    "verify_greedy": "(Tensor draft, Tensor num_draft, Tensor target_logits) -> (Tensor out, Tensor num_emitted)",
    "verify_sample": "(Tensor draft, Tensor num_draft, Tensor? draft_probs, Tensor target_logits, "
                     "Tensor temperature, Tensor seed, Tensor offset) -> (Tensor out, Tensor num_emitted)",
}


def _load_extension():
    """Import specee._C (it registers torch.ops.specee.*); on failure warn once and return False."""
    try:
        importlib.import_module("specee._C")
    except ImportError as err:
        warnings.warn(f"specee._C is not importable ({err}); specee ops use the torch reference. Build it with "
                      "`pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=3)
        return False
    for op in OPS:
        torch.library.register_fake(f"specee::{op}", getattr(reference, f"{op}_fake"))
    return True


def _load_triton():
    """Define `specee::<op>_triton` for every Triton kernel file that imports; returns ({op: callable}, Library)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return {}, None
    lib = torch.library.Library("specee", "FRAGMENT")
    found = {}
    for op in OPS:
        try:
            launcher = getattr(importlib.import_module(f"specee.triton_kernels.{op}"), op)
        except ModuleNotFoundError as err:
            if err.name not in ("specee.triton_kernels", f"specee.triton_kernels.{op}"):
                warnings.warn(f"specee.triton_kernels.{op} failed to import ({err}); its Triton backend is off.",
                              RuntimeWarning, stacklevel=3)
            continue
        except (ImportError, AttributeError, SyntaxError) as err:
            warnings.warn(f"specee.triton_kernels.{op} is unusable ({err}); its Triton backend is off.",
                          RuntimeWarning, stacklevel=3)
            continue
        name = f"{op}_triton"
        lib.define(name + _SCHEMA_ARGS[op])
        # NOTE: CPU too, so that the kernels run on CPU tensors under TRITON_INTERPRET=1 (tests).
        lib.impl(name, launcher, "CPU")
        lib.impl(name, launcher, "CUDA")
        torch.library.register_fake(f"specee::{name}", getattr(reference, f"{op}_fake"), lib=lib)
        found[op] = getattr(torch.ops.specee, name).default
    return found, lib


_HAS_C = _load_extension()
_TRITON_OPS, _TRITON_LIB = _load_triton()  # the Library object must stay alive for the definitions to last
_TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"


def _has_kernel(op, key):
    return _HAS_C and torch._C._dispatch_has_kernel_for_dispatch_key(f"specee::{op}", key)


def _available(op, backend, device_type):
    if backend == "reference":
        return True
    if backend == "cpu":
        return device_type == "cpu" and _has_kernel(op, "CPU")
    if backend == "cuda":
        return device_type == "cuda" and torch.cuda.is_available() and _has_kernel(op, "CUDA")
    if backend == "triton":
        return op in _TRITON_OPS and ((device_type == "cuda" and torch.cuda.is_available())
                                      or (device_type == "cpu" and _TRITON_ON_CPU))
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def available_backends(device_type, op_name=None):
    """Backends that can run `op_name` (every op when None) on tensors of `device_type` ("cpu", "cuda").

    In the default order of preference; "triton" is listed for "cpu" only under TRITON_INTERPRET=1 and is
    never chosen by default there.
    """
    ops = OPS if op_name is None else (op_name,)
    order = _PREFERENCE.get(device_type, ("reference",)) + tuple(b for b in BACKENDS
                                                                 if b not in _PREFERENCE.get(device_type, ()))
    return [b for b in order if all(_available(op, b, device_type) for op in ops)]


def get_impl(op_name, backend):
    """The callable of `backend` for `op_name`, with the reference's positional signature (no checks)."""
    if op_name not in OPS:
        raise ValueError(f"unknown op {op_name!r}; expected one of {OPS}")
    if backend == "reference":
        return getattr(reference, op_name)
    if backend in ("cpu", "cuda"):
        if not _HAS_C:
            raise RuntimeError(f"backend {backend!r} needs specee._C, which did not import; rebuild with "
                               "`pip install --no-build-isolation -e .`")
        if not _has_kernel(op_name, backend.upper()):
            raise RuntimeError(f"specee._C has no {backend.upper()} kernel for {op_name}"
                               + (" (built without CUDA: needs a CUDA torch and nvcc)" if backend == "cuda" else ""))
        return getattr(torch.ops.specee, op_name).default
    if backend == "triton":
        if op_name not in _TRITON_OPS:
            raise RuntimeError(f"no Triton kernel for {op_name}: needs triton and triton_kernels/{op_name}.py")
        return _TRITON_OPS[op_name]
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _unavailable(op, backend, device_type):
    def fail(*args, **kwargs):
        raise RuntimeError(f"SPECEE_BACKEND={backend} cannot run specee.ops.{op} on {device_type} tensors; "
                           f"unset SPECEE_BACKEND or use one of {available_backends(device_type, op)}")
    return fail


def _bind():
    """{device_type: {op: callable}}, fixed at import so that a call costs one dict lookup."""
    forced = os.environ.get("SPECEE_BACKEND") or None
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"SPECEE_BACKEND={forced!r} is not a backend; use one of {BACKENDS} or unset it")
    bound = {}
    for device_type in ("cpu", "cuda"):
        table = {}
        for op in OPS:
            if forced is None:
                backend = next(b for b in _PREFERENCE[device_type] if _available(op, b, device_type))
                table[op] = get_impl(op, backend)
            elif _available(op, forced, device_type):
                table[op] = get_impl(op, forced)
            else:
                table[op] = _unavailable(op, forced, device_type)
        bound[device_type] = table
    if forced is not None and not any(_available(op, forced, d) for op in OPS for d in ("cpu", "cuda")):
        why = {"cpu": "specee._C did not import", "cuda": "no CUDA device or specee._C built without CUDA",
               "triton": "triton or specee.triton_kernels is missing, or no CUDA device (or TRITON_INTERPRET=1)"}
        raise RuntimeError(f"SPECEE_BACKEND={forced} is unavailable here: {why[forced]}; unset SPECEE_BACKEND")
    return bound


_BOUND = _bind()
_FALLBACK = {op: getattr(reference, op) for op in OPS}  # devices other than cpu/cuda


def backend_of(op_name, device_type):
    """Name of the backend bound for `op_name` on `device_type` (for logs and reports)."""
    fn = _BOUND.get(device_type, _FALLBACK)[op_name]
    for b in BACKENDS:
        try:
            if get_impl(op_name, b) is fn:
                return b
        except RuntimeError:
            continue
    return "unavailable"


# --------------------------------------------------------------------------------------------- input checks
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _tensor(name, t, dim, dtypes=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}; convert with .to()")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}; move it with .to()")


def _shape(name, t, expected):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def _scalar_int64(name, t):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() > 1 or t.numel() != 1:
        got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be an int64 tensor of shape () or (1,), got {got}; pass "
                        f"torch.tensor({name}, dtype=torch.int64) (a tensor keeps CUDA graphs capturable)")


# ----------------------------------------------------------------------------------------------- public ops
def exit_predict(hidden, norm_weight, eps, lm_head, cand_ids, prev_probs, w1, b1, w2, b2, threshold):
    """SpecEE exit predictor; see specee.reference.exit_predict (the specification) and docs/ops.md.

    Shape: hidden [B, d], lm_head [V, d], cand_ids [B, k], prev_probs [B, k], w1 [H, 3k], b1 [H], w2 [H],
    b2 [1] -> (score [B] fp32, probs [B, k] fp32, exit [B] bool).
    """
    _tensor("hidden", hidden, 2, _FLOATS)
    dev = hidden.device
    B, d = hidden.shape
    _tensor("lm_head", lm_head, 2, _FLOATS, dev)
    _shape("lm_head", lm_head, (lm_head.shape[0], d))
    _tensor("cand_ids", cand_ids, 2, (torch.int64,), dev)
    k = cand_ids.shape[1]
    _shape("cand_ids", cand_ids, (B, k))
    _tensor("norm_weight", norm_weight, 1, _FLOATS, dev)
    _shape("norm_weight", norm_weight, (d,))
    _tensor("prev_probs", prev_probs, 2, _FLOATS, dev)
    _shape("prev_probs", prev_probs, (B, k))
    _tensor("w1", w1, 2, _FLOATS, dev)
    H = w1.shape[0]
    _shape("w1", w1, (H, 3 * k))
    _tensor("b1", b1, 1, _FLOATS, dev)
    _shape("b1", b1, (H,))
    _tensor("w2", w2, 1, _FLOATS, dev)
    _shape("w2", w2, (H,))
    _tensor("b2", b2, 1, _FLOATS, dev)
    _shape("b2", b2, (1,))
    return _BOUND.get(dev.type, _FALLBACK)["exit_predict"](
        hidden, norm_weight, float(eps), lm_head, cand_ids, prev_probs, w1, b1, w2, b2, float(threshold))


def lm_head_argmax(hidden, lm_head, cand_ids=None):
    """argmax over the vocabulary of hidden @ lm_head.T without writing the logits; see
    specee.reference.lm_head_argmax. Shape: hidden [B, d], lm_head [V, d], cand_ids [B, k] or None ->
    (token [B] int64, in_candidates [B] bool)."""
    _tensor("hidden", hidden, 2, _FLOATS)
    _tensor("lm_head", lm_head, 2, _FLOATS, hidden.device)
    if lm_head.shape[1] != hidden.shape[1]:
        raise ValueError(f"lm_head must be [vocab, d] with d = hidden.shape[1] = {hidden.shape[1]}, got "
                         f"{tuple(lm_head.shape)} (pass the head weight, not its transpose)")
    if cand_ids is not None:
        _tensor("cand_ids", cand_ids, 2, (torch.int64,), hidden.device)
        _shape("cand_ids", cand_ids, (hidden.shape[0], cand_ids.shape[1]))
    return _BOUND.get(hidden.device.type, _FALLBACK)["lm_head_argmax"](hidden, lm_head, cand_ids)


def _check_verify(draft, num_draft, target_logits):
    _tensor("draft", draft, 2, (torch.int64,))
    dev = draft.device
    B, K = draft.shape
    _tensor("num_draft", num_draft, 1, (torch.int64,), dev)
    _shape("num_draft", num_draft, (B,))
    _tensor("target_logits", target_logits, 3, _FLOATS, dev)
    _shape("target_logits", target_logits, (B, K + 1, target_logits.shape[2]))


def verify_greedy(draft, num_draft, target_logits):
    """Greedy speculative verification; see specee.reference.verify_greedy. Shape: draft [B, K],
    num_draft [B], target_logits [B, K+1, V] -> (out [B, K+1] int64, num_emitted [B] int64)."""
    _check_verify(draft, num_draft, target_logits)
    return _BOUND.get(draft.device.type, _FALLBACK)["verify_greedy"](draft, num_draft, target_logits)


def verify_sample(draft, num_draft, draft_probs, target_logits, temperature, seed, offset):
    """Lossless speculative sampling with Philox(seed, offset) randomness; see
    specee.reference.verify_sample. Shape: draft [B, K], num_draft [B], draft_probs [B, K, V] or None,
    target_logits [B, K+1, V], temperature [B], seed and offset int64 () or (1,) ->
    (out [B, K+1] int64, num_emitted [B] int64)."""
    _check_verify(draft, num_draft, target_logits)
    if draft_probs is not None:
        _tensor("draft_probs", draft_probs, 3, _FLOATS, draft.device)
        _shape("draft_probs", draft_probs, (draft.shape[0], draft.shape[1], target_logits.shape[2]))
    _tensor("temperature", temperature, 1, _FLOATS, draft.device)
    _shape("temperature", temperature, (draft.shape[0],))
    _scalar_int64("seed", seed)
    _scalar_int64("offset", offset)
    return _BOUND.get(draft.device.type, _FALLBACK)["verify_sample"](
        draft, num_draft, draft_probs, target_logits, temperature, seed, offset)
