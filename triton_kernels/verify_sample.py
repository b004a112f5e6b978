"""Triton verify_sample: lossless speculative sampling, one program per row (docs/ops.md section 4).

Randomness is Philox4x32-10 keyed by (seed, offset) tensors loaded in the kernel (no host sync, graph-
capturable), bit-identical to specee.reference.philox_uniforms: key = (seed_lo, seed_hi),
counter = (j, b, offset_lo, offset_hi); x0 -> accept coin, x1 -> resample. Accept decisions match the
reference; a resampled token can differ where the reference's sequential fp32 cdf and this kernel's
chunked scan round differently right at u * total (see _sample).
"""
import torch
import triton
import triton.language as tl

PLACEHOLDER_TOKEN_ID = tl.constexpr(-1)


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    # Philox4x32-10 (Salmon et al. 2011): c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0) per round.
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = a2 * 0xCD9E8D57
        c3 = a0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _uniform(x):
    # U(x) = ((x >> 8) + 0.5) * 2^-24 in fp32, as the reference: in (0, 1] (the top value rounds to 1).
    return ((x >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08


@triton.jit
def _row_stats(lg_ptr, V, t, BLOCK: tl.constexpr):
    # Online softmax stats of z = logits / t over V: (max, sum exp(z - max), first argmax).
    offs = tl.arange(0, BLOCK)
    m = -float("inf")
    s = 0.0
    am = 0
    for start in range(0, V, BLOCK):
        idx = start + offs
        z = tl.load(lg_ptr + idx, mask=idx < V, other=-float("inf")).to(tl.float32) / t
        cm = tl.max(z, 0)
        ci = tl.min(tl.where(z == cm, idx, V), 0)
        m_new = tl.maximum(m, cm)
        am = tl.where(cm > m, ci, am)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    return m, s, am


@triton.jit
def _target_probs(lg_ptr, idx, mask, t, m, s, am, greedy):
    # target_probs at idx: softmax(logits / t), or one_hot(argmax) for a greedy row; 0 where masked.
    z = tl.load(lg_ptr + idx, mask=mask, other=-float("inf")).to(tl.float32) / t
    soft = tl.exp(z - m) / s
    hard = tl.where(idx == am, 1.0, 0.0)
    return tl.where(mask, tl.where(greedy, hard, soft), 0.0)


@triton.jit
def _draft_probs(dp_ptr, idx, dp_len, x, HAS_DRAFT_PROBS: tl.constexpr):
    # draft_probs at idx (one_hot(x) when None); dp_len = 0 at the bonus position (no draft row).
    mask = idx < dp_len
    if HAS_DRAFT_PROBS:
        dp = tl.load(dp_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        dp = tl.where(mask & (idx == x), 1.0, 0.0)
    return dp


@triton.jit
def _cdf_chunk(w, carry, offs, BLOCK: tl.constexpr):
    # Prefix sums of one chunk continued from the running carry; returns (cdf, carry for the next chunk).
    c = tl.cumsum(w, 0) + carry
    return c, tl.sum(tl.where(offs == BLOCK - 1, c, 0.0), 0)


@triton.jit
def _sample(lg_ptr, dp_ptr, V, t, m, s, am, greedy, x, is_draft, u,
            HAS_DRAFT_PROBS: tl.constexpr, BLOCK: tl.constexpr):
    # Inverse CDF of w = relu(target - draft) (on reject; target if that has no mass) or w = target
    # (bonus): first i with cdf(w)_i > u * total, else the last i with w_i > 0. total = cdf at V - 1.
    # NOTE: the cdf is a chunked fp32 scan with a running carry, not the reference's strictly sequential
    # sum: the two can differ by a few ulps, which moves a token only when u * total lands that close to
    # a cdf step. Pass 2 repeats pass 1's arithmetic exactly, so u = 1 gives the last positive token.
    offs = tl.arange(0, BLOCK)
    dp_len = tl.where(is_draft, V, 0)
    res_total = 0.0
    tgt_total = 0.0
    for start in range(0, V, BLOCK):
        idx = start + offs
        mask = idx < V
        tp = _target_probs(lg_ptr, idx, mask, t, m, s, am, greedy)
        dp = _draft_probs(dp_ptr, idx, dp_len, x, HAS_DRAFT_PROBS)
        _, res_total = _cdf_chunk(tl.maximum(tp - dp, 0.0), res_total, offs, BLOCK)
        _, tgt_total = _cdf_chunk(tp, tgt_total, offs, BLOCK)
    use_res = is_draft & (res_total > 0.0)
    thr = u * tl.where(use_res, res_total, tgt_total)
    carry = 0.0
    found = V
    last = -1
    for start in range(0, V, BLOCK):
        if found == V:  # NOTE: skip reading the rest of the row once the token is found
            idx = start + offs
            mask = idx < V
            tp = _target_probs(lg_ptr, idx, mask, t, m, s, am, greedy)
            dp = _draft_probs(dp_ptr, idx, dp_len, x, HAS_DRAFT_PROBS)
            w = tl.where(use_res, tl.maximum(tp - dp, 0.0), tp)
            c, carry = _cdf_chunk(w, carry, offs, BLOCK)
            found = tl.min(tl.where((c > thr) & mask, idx, V), 0)
            last = tl.maximum(last, tl.max(tl.where(w > 0.0, idx, -1), 0))
    return tl.where(found < V, found, last)


# NOTE: V stays specialized (fixed per model): its divisibility by 16 lets the row loads vectorize.
@triton.jit(do_not_specialize=["K"])
def _verify_sample_kernel(
    draft_ptr,  # [B, K] int64
    num_draft_ptr,  # [B] int64
    draft_probs_ptr,  # [B, K, V] (unused when HAS_DRAFT_PROBS is False)
    logits_ptr,  # [B, K + 1, V]
    temp_ptr,  # [B] fp32
    seed_ptr,  # [1] int64
    offset_ptr,  # [1] int64
    out_ptr,  # [B, K + 1] int64
    num_emitted_ptr,  # [B] int64
    K,
    V,
    HAS_DRAFT_PROBS: tl.constexpr,
    KP: tl.constexpr,  # next power of two >= K + 1
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    n_draft = tl.minimum(tl.maximum(tl.load(num_draft_ptr + b), 0), K)  # clamped to [0, K]
    t_raw = tl.load(temp_ptr + b).to(tl.float32)
    greedy = t_raw <= 0.0
    t = tl.where(greedy, 1.0, t_raw)

    # Both uniforms for every position of this row: counter (j, b, offset_lo, offset_hi).
    seed = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
    offset = tl.load(offset_ptr).to(tl.uint64, bitcast=True)
    pos = tl.arange(0, KP)
    zero = tl.zeros([KP], dtype=tl.uint32)
    x0, x1, _, _ = _philox(pos.to(tl.uint32), zero + b.to(tl.uint32), zero + offset.to(tl.uint32),
                           zero + (offset >> 32).to(tl.uint32), zero + seed.to(tl.uint32),
                           zero + (seed >> 32).to(tl.uint32))
    u_accept = _uniform(x0)
    u_sample = _uniform(x1)

    row = tl.full([KP], PLACEHOLDER_TOKEN_ID, tl.int64)
    n_emit = 0
    done = 0
    for j in range(0, K + 1):
        if done == 0:
            lg_ptr = logits_ptr + (b64 * (K + 1) + j) * V
            dp_ptr = draft_probs_ptr + (b64 * K + j) * V
            m, s, am = _row_stats(lg_ptr, V, t, BLOCK)
            is_draft = j < n_draft
            x_raw = tl.load(draft_ptr + b64 * K + j, mask=is_draft, other=0)
            x = tl.minimum(tl.maximum(x_raw, 0), V - 1)  # gathers use ids clamped to [0, V), as the reference
            z_x = tl.load(lg_ptr + x, mask=is_draft, other=0.0).to(tl.float32) / t
            tp_x = tl.where(greedy, tl.where(x == am, 1.0, 0.0), tl.exp(z_x - m) / s)
            if HAS_DRAFT_PROBS:
                dp_x = tl.load(dp_ptr + x, mask=is_draft, other=0.0).to(tl.float32)
            else:
                dp_x = 1.0
            u_a = tl.sum(tl.where(pos == j, u_accept, 0.0), 0)
            accept = is_draft & (u_a * dp_x < tp_x)
            if accept:
                tok = x_raw
            else:
                u_s = tl.sum(tl.where(pos == j, u_sample, 0.0), 0)
                tok = _sample(lg_ptr, dp_ptr, V, t, m, s, am, greedy, x, is_draft, u_s,
                              HAS_DRAFT_PROBS, BLOCK).to(tl.int64)
                done = 1
            row = tl.where(pos == j, tok, row)
            n_emit += 1
    tl.store(out_ptr + b64 * (K + 1) + pos, row, mask=pos < K + 1)
    tl.store(num_emitted_ptr + b, n_emit.to(tl.int64))


def verify_sample(draft, num_draft, draft_probs, target_logits, temperature, seed, offset):
    """Lossless speculative sampling (Leviathan et al. 2023, arXiv 2211.17192), one program per row.

    Shape: draft [B, K] int64, num_draft [B] int64, draft_probs [B, K, V] or None,
    target_logits [B, K + 1, V], temperature [B] fp32, seed and offset int64 tensors (0-d or [1])
    -> out [B, K + 1] int64 (-1 pads), num_emitted [B] int64.
    """
    B, K = draft.shape
    V = target_logits.shape[-1]
    draft = draft.contiguous()
    target_logits = target_logits.contiguous()
    has_dp = draft_probs is not None
    draft_probs = draft_probs.contiguous() if has_dp else target_logits
    out = torch.empty(B, K + 1, dtype=torch.int64, device=draft.device)
    num_emitted = torch.empty(B, dtype=torch.int64, device=draft.device)
    _verify_sample_kernel[(B,)](
        draft, num_draft.contiguous(), draft_probs, target_logits, temperature.contiguous(),
        seed.reshape(1), offset.reshape(1), out, num_emitted, K, V,
        HAS_DRAFT_PROBS=has_dp, KP=triton.next_power_of_2(K + 1),
        BLOCK=min(1024, triton.next_power_of_2(V)), num_warps=4)
    return out, num_emitted
