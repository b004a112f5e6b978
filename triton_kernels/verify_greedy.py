"""Triton verify_greedy: accept the longest draft prefix matching the target argmax (docs/ops.md section 3).

One program per row; positions are visited in order and the row stops at the first mismatch, so
only the target rows actually needed are read. Argmax runs over the vocabulary in BLOCK chunks in
fp32, ties to the lowest index (as torch.argmax).
"""
import torch
import triton
import triton.language as tl

PLACEHOLDER_TOKEN_ID = tl.constexpr(-1)


@triton.jit
def _row_argmax(lg_ptr, V, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    best = -float("inf")
    best_idx = 0
    for start in range(0, V, BLOCK):
        idx = start + offs
        v = tl.load(lg_ptr + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
        cm = tl.max(v, 0)
        ci = tl.min(tl.where(v == cm, idx, V), 0)
        # NOTE: strict > across chunks keeps the earlier (lower) index on ties.
        best_idx = tl.where(cm > best, ci, best_idx)
        best = tl.maximum(best, cm)
    return best_idx


# NOTE: V stays specialized (fixed per model): its divisibility by 16 lets the row loads vectorize.
@triton.jit(do_not_specialize=["K"])
def _verify_greedy_kernel(
    draft_ptr,  # [B, K] int64
    num_draft_ptr,  # [B] int64
    logits_ptr,  # [B, K + 1, V]
    out_ptr,  # [B, K + 1] int64
    num_emitted_ptr,  # [B] int64
    K,
    V,
    KP: tl.constexpr,  # next power of two >= K + 1
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    n_draft = tl.minimum(tl.maximum(tl.load(num_draft_ptr + b), 0), K)  # clamped to [0, K]
    pos = tl.arange(0, KP)
    row = tl.full([KP], PLACEHOLDER_TOKEN_ID, tl.int64)
    n_emit = 0
    done = 0
    for j in range(0, K + 1):
        if done == 0:
            t = _row_argmax(logits_ptr + (b64 * (K + 1) + j) * V, V, BLOCK).to(tl.int64)
            is_draft = j < n_draft
            x = tl.load(draft_ptr + b64 * K + j, mask=is_draft, other=-1)
            row = tl.where(pos == j, t, row)
            n_emit += 1
            if (x != t) | (j >= n_draft):
                done = 1
    tl.store(out_ptr + b64 * (K + 1) + pos, row, mask=pos < K + 1)
    tl.store(num_emitted_ptr + b, n_emit.to(tl.int64))


def verify_greedy(draft, num_draft, target_logits):
    """Greedy verification of draft tokens against the target argmax.

    Shape: draft [B, K] int64, num_draft [B] int64, target_logits [B, K + 1, V]
    -> out [B, K + 1] int64 (-1 pads), num_emitted [B] int64.
    """
    B, K = draft.shape
    V = target_logits.shape[-1]
    target_logits = target_logits.contiguous()
    out = torch.empty(B, K + 1, dtype=torch.int64, device=draft.device)
    num_emitted = torch.empty(B, dtype=torch.int64, device=draft.device)
    _verify_greedy_kernel[(B,)](
        draft.contiguous(), num_draft.contiguous(), target_logits, out, num_emitted, K, V,
        KP=triton.next_power_of_2(K + 1), BLOCK=min(1024, triton.next_power_of_2(V)), num_warps=4)
    return out, num_emitted
