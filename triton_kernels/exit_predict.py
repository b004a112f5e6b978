"""Triton exit_predict: the early-exit predictor fused into one launch per batch row (docs/ops.md 1).

RMSNorm -> logits of the k candidate rows of the head -> softmax -> MLP over
[logits, probs, probs - prev_probs] -> sigmoid -> exit = score > threshold, all in fp32.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _exit_predict_kernel(
    hidden_ptr,  # [B, d]
    norm_w_ptr,  # [d]
    head_ptr,  # [V, d]
    cand_ptr,  # [B, k] int64
    prev_ptr,  # [B, k] fp32
    w1_ptr,  # [H, 3k]
    b1_ptr,  # [H]
    w2_ptr,  # [H]
    b2_ptr,  # [1]
    score_ptr,  # [B] fp32
    probs_ptr,  # [B, k] fp32
    exit_ptr,  # [B] bool
    eps,
    threshold,
    d,
    k,
    H,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_k = offs_k < k
    cand = tl.load(cand_ptr + b * k + offs_k, mask=mask_k, other=0)
    w_rows = head_ptr + cand[:, None] * d

    # One pass over d: sum(x^2) and the k dots with x * norm_weight; rstd is factored out.
    sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    dots = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + offs_d
        mask_d = cols < d
        x = tl.load(hidden_ptr + b * d + cols, mask=mask_d, other=0.0).to(tl.float32)
        nw = tl.load(norm_w_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        sq += x * x
        dots += w.to(tl.float32) * (x * nw)[None, :]
    rstd = 1.0 / tl.sqrt(tl.sum(sq, 0) / d + eps)
    logits = tl.sum(dots, 1) * rstd

    lm = tl.where(mask_k, logits, -float("inf"))
    e = tl.exp(lm - tl.max(lm, 0))
    probs = e / tl.sum(e, 0)
    prev = tl.load(prev_ptr + b * k + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    delta = probs - prev
    logits = tl.where(mask_k, logits, 0.0)
    tl.store(probs_ptr + b * k + offs_k, probs, mask=mask_k)

    # h = relu(W1 @ [logits, probs, delta] + b1); score = sigmoid(w2 . h + b2), in BLOCK_H chunks.
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        rows = start + offs_h
        mask_h = rows < H
        m2 = mask_h[:, None] & mask_k[None, :]
        w1 = w1_ptr + rows.to(tl.int64)[:, None] * (3 * k) + offs_k[None, :]
        h = tl.sum(tl.load(w1, mask=m2, other=0.0).to(tl.float32) * logits[None, :], 1)
        h += tl.sum(tl.load(w1 + k, mask=m2, other=0.0).to(tl.float32) * probs[None, :], 1)
        h += tl.sum(tl.load(w1 + 2 * k, mask=m2, other=0.0).to(tl.float32) * delta[None, :], 1)
        h += tl.load(b1_ptr + rows, mask=mask_h, other=0.0).to(tl.float32)
        h = tl.maximum(h, 0.0)
        acc += h * tl.load(w2_ptr + rows, mask=mask_h, other=0.0).to(tl.float32)
    z = tl.sum(acc, 0) + tl.load(b2_ptr).to(tl.float32)
    score = 1.0 / (1.0 + tl.exp(-z))
    tl.store(score_ptr + b, score)
    tl.store(exit_ptr + b, score > threshold)


def exit_predict(hidden, norm_weight, eps, lm_head, cand_ids, prev_probs, w1, b1, w2, b2, threshold):
    """Early-exit score of each row from its k candidate tokens (fp32 throughout).

    Shape: hidden [B, d], norm_weight [d], lm_head [V, d], cand_ids [B, k] int64,
    prev_probs [B, k] fp32, w1 [H, 3k], b1 [H], w2 [H], b2 [1]
    -> score [B] fp32, probs [B, k] fp32, exit [B] bool.
    """
    B, d = hidden.shape
    k = cand_ids.shape[1]
    H = w1.shape[0]
    dev = hidden.device
    score = torch.empty(B, dtype=torch.float32, device=dev)
    probs = torch.empty(B, k, dtype=torch.float32, device=dev)
    exit_ = torch.empty(B, dtype=torch.bool, device=dev)
    BLOCK_K = triton.next_power_of_2(k)
    _exit_predict_kernel[(B,)](
        hidden.contiguous(), norm_weight.contiguous(), lm_head.contiguous(), cand_ids.contiguous(),
        prev_probs.contiguous(), w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.reshape(-1),
        score, probs, exit_, float(eps), float(threshold), d, k, H,
        BLOCK_K=BLOCK_K, BLOCK_D=min(triton.next_power_of_2(d), max(32, 2048 // BLOCK_K)),
        BLOCK_H=min(triton.next_power_of_2(H), max(16, 1024 // BLOCK_K)), num_warps=4)
    return score, probs, exit_
