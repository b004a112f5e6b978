"""Triton lm_head_argmax: argmax of hidden @ lm_head.T without writing the [B, V] logits (docs/ops.md 2).

Stage 1 splits the vocabulary over programs: each reads a [BLOCK_V, d] slice of the head once for
BLOCK_B rows of hidden (tl.dot, fp32 accumulation) and writes a partial (max, index) per row.
Stage 2 (one tiny program per row) reduces the partials, ties to the lowest index, and checks the
winner against cand_ids.
"""
import os

import torch
import triton
import triton.language as tl

# NOTE: the Triton interpreter multiplies bf16 tiles as their raw uint16 bits in tl.dot, so under
# TRITON_INTERPRET=1 bf16 heads take the fp32 path (bf16 products are exact in fp32: same result).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit(do_not_specialize=["B"])
def _lm_head_argmax_kernel(
    hidden_ptr,  # [B, d]
    head_ptr,  # [V, d]
    part_max_ptr,  # [B, NBLK] fp32
    part_idx_ptr,  # [B, NBLK] int32
    B,
    V,
    d,
    NBLK,
    DOT_FP32: tl.constexpr,  # fp32 inputs or mixed dtypes: exact fp32 products ("ieee")
    EVEN_D: tl.constexpr,  # d % BLOCK_D == 0: no masks in the loop
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    mask_b = offs_b < B
    mask_v = offs_v < V
    # NOTE: rows past B or V wrap around (% B, % V) so loads need no row mask; those results are dropped.
    h_ptrs = hidden_ptr + (offs_b % B).to(tl.int64)[:, None] * d + offs_d[None, :]
    w_ptrs = head_ptr + (offs_v % V).to(tl.int64)[None, :] * d + offs_d[:, None]  # tile [BLOCK_D, BLOCK_V]
    acc = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        if EVEN_D:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            h = tl.load(h_ptrs, mask=offs_d[None, :] < d - start, other=0.0)
            w = tl.load(w_ptrs, mask=offs_d[:, None] < d - start, other=0.0)
        if DOT_FP32:
            acc += tl.dot(h.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(h, w)
        h_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    acc = tl.where(mask_v[None, :], acc, -float("inf"))
    best = tl.max(acc, 1)
    # NOTE: explicit lowest index among the maxima rather than relying on argmax tie-breaking.
    best_idx = tl.min(tl.where(acc == best[:, None], offs_v[None, :], V), 1)
    out = offs_b.to(tl.int64) * NBLK + pid_v
    tl.store(part_max_ptr + out, best, mask=mask_b)
    tl.store(part_idx_ptr + out, best_idx, mask=mask_b)


@triton.jit
def _lm_head_argmax_reduce_kernel(
    part_max_ptr,  # [B, NBLK] fp32
    part_idx_ptr,  # [B, NBLK] int32
    cand_ptr,  # [B, k] int64 (unused when HAS_CAND is False)
    token_ptr,  # [B] int64
    in_cand_ptr,  # [B] bool
    NBLK,
    k,
    HAS_CAND: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_R)
    best = -float("inf")
    best_blk = 0
    for start in range(0, NBLK, BLOCK_R):
        blk = start + offs
        v = tl.load(part_max_ptr + b * NBLK + blk, mask=blk < NBLK, other=-float("inf"))
        cm = tl.max(v, 0)
        ci = tl.min(tl.where(v == cm, blk, NBLK), 0)
        best_blk = tl.where(cm > best, ci, best_blk)
        best = tl.maximum(best, cm)
    token = tl.load(part_idx_ptr + b * NBLK + best_blk).to(tl.int64)
    tl.store(token_ptr + b, token)
    if HAS_CAND:
        offs_k = tl.arange(0, BLOCK_K)
        cand = tl.load(cand_ptr + b * k + offs_k, mask=offs_k < k, other=-1)
        hit = tl.max((cand == token).to(tl.int32), 0)
    else:
        hit = 0
    tl.store(in_cand_ptr + b, hit != 0)


def lm_head_argmax(hidden, lm_head, cand_ids=None):
    """Greedy token of hidden @ lm_head.T (fp32 accumulation), ties to the lowest index.

    Shape: hidden [B, d] (already normed), lm_head [V, d], cand_ids [B, k] int64 or None
    -> token [B] int64, in_candidates [B] bool (all False when cand_ids is None).
    """
    B, d = hidden.shape
    V = lm_head.shape[0]
    hidden = hidden.contiguous()
    lm_head = lm_head.contiguous()
    dev = hidden.device
    BLOCK_V, BLOCK_D = 128, 64
    BLOCK_B = min(64, max(16, triton.next_power_of_2(B)))
    nblk = triton.cdiv(V, BLOCK_V)
    part_max = torch.empty(B, nblk, dtype=torch.float32, device=dev)
    part_idx = torch.empty(B, nblk, dtype=torch.int32, device=dev)
    dot_fp32 = (hidden.dtype != lm_head.dtype or lm_head.dtype == torch.float32
                or (_INTERPRET and lm_head.dtype == torch.bfloat16))
    _lm_head_argmax_kernel[(nblk, triton.cdiv(B, BLOCK_B))](
        hidden, lm_head, part_max, part_idx, B, V, d, nblk,
        DOT_FP32=dot_fp32, EVEN_D=d % BLOCK_D == 0, BLOCK_B=BLOCK_B, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D,
        num_warps=8, num_stages=3)  # NOTE: 4 warps need 255 registers and spill (ptxas, sm_90)
    token = torch.empty(B, dtype=torch.int64, device=dev)
    in_cand = torch.empty(B, dtype=torch.bool, device=dev)
    has_cand = cand_ids is not None
    k = cand_ids.shape[1] if has_cand else 1
    cand = cand_ids.contiguous() if has_cand else token
    _lm_head_argmax_reduce_kernel[(B,)](
        part_max, part_idx, cand, token, in_cand, nblk, k,
        HAS_CAND=has_cand, BLOCK_R=min(1024, triton.next_power_of_2(nblk)),
        BLOCK_K=triton.next_power_of_2(max(k, 1)), num_warps=1)
    return token, in_cand
