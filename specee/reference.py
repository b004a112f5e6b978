"""The specification of the specee ops: one plain-torch reference per op, with its fake (meta) impl.

Every backend (C++ `csrc/cpu/<op>.h`, CUDA `csrc/cuda/<op>.cuh`, Triton `triton_kernels/<op>.py`) is tested
against these functions; docs/ops.md states the contract in words. Reductions accumulate in fp32. The fakes
(`<op>_fake`) give output shapes and dtypes only; `specee.ops` registers them for torch.compile.
"""
import torch
import torch.nn.functional as F

PLACEHOLDER_TOKEN_ID = -1  # pads the unused slots of `out` (as in vLLM's rejection sampler)

# Philox4x32-10 constants (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3").
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------- exit_predict
def exit_predict(hidden, norm_weight, eps, lm_head, cand_ids, prev_probs, w1, b1, w2, b2, threshold):
    """SpecEE exit predictor: RMSNorm, logits of k candidate tokens, a 2-layer MLP on their features.

    Parameters
    ----------
    hidden : Tensor      # [batch, d], fp32/bf16/fp16, the layer's output (not normed)
    norm_weight : Tensor # [d], final RMSNorm weight
    eps : float          # RMSNorm epsilon
    lm_head : Tensor     # [vocab, d]
    cand_ids : Tensor    # [batch, k] int64, candidate tokens (from the draft)
    prev_probs : Tensor  # [batch, k] fp32, candidate probabilities at the previous exit point
    w1 : Tensor          # [H, 3k];  b1 : Tensor  # [H]
    w2 : Tensor          # [H];      b2 : Tensor  # [1]
    threshold : float    # exit when score > threshold

    Returns
    -------
    score : Tensor  # [batch] fp32, sigmoid output of the predictor
    probs : Tensor  # [batch, k] fp32, softmax over the k candidate logits
    exit : Tensor   # [batch] bool, score > threshold

    Shape: hidden [B, d], lm_head [V, d], cand_ids [B, k], w1 [H, 3k] -> ([B], [B, k], [B]).

    Features are cat([logits, probs, probs - prev_probs]) in this order. Only the k candidate rows of the
    head are read. Cites SpecEE (Xu et al. 2025, arXiv 2504.08850), section 4.

    Example
    -------
    >>> B, d, V, k, H = 2, 8, 32, 4, 16
    >>> score, probs, ex = exit_predict(torch.randn(B, d), torch.ones(d), 1e-6, torch.randn(V, d),
    ...     torch.randint(V, (B, k)), torch.full((B, k), 0.25), torch.randn(H, 3 * k), torch.zeros(H),
    ...     torch.randn(H), torch.zeros(1), 0.5)
    >>> probs.shape, ex.dtype
    (torch.Size([2, 4]), torch.bool)
    """
    x = hidden.float()                                                  # [B, d]
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    rows = lm_head[cand_ids].float()                                    # [B, k, d]
    logits = torch.bmm(rows, normed.unsqueeze(-1)).squeeze(-1)          # [B, k]
    probs = torch.softmax(logits, -1)
    feats = torch.cat([logits, probs, probs - prev_probs.float()], -1)  # [B, 3k]
    h = torch.relu(feats @ w1.float().T + b1.float())                   # [B, H]
    score = torch.sigmoid(h @ w2.float() + b2.float())                  # [B]
    return score, probs, score > threshold


def exit_predict_fake(hidden, norm_weight, eps, lm_head, cand_ids, prev_probs, w1, b1, w2, b2, threshold):
    B, k = cand_ids.shape
    return (hidden.new_empty((B,), dtype=torch.float32), hidden.new_empty((B, k), dtype=torch.float32),
            hidden.new_empty((B,), dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- lm_head_argmax
def lm_head_argmax(hidden, lm_head, cand_ids=None):
    """Greedy token of the LM head: argmax over the vocabulary of hidden @ lm_head.T, in fp32.

    Parameters
    ----------
    hidden : Tensor    # [batch, d], already normed
    lm_head : Tensor   # [vocab, d]
    cand_ids : Tensor or None  # [batch, k] int64

    Returns
    -------
    token : Tensor          # [batch] int64, lowest index among ties (as torch.argmax)
    in_candidates : Tensor  # [batch] bool, token[b] in cand_ids[b]; all False when cand_ids is None

    Shape: hidden [B, d], lm_head [V, d] -> ([B], [B]).

    The reference writes the [B, V] logits; kernels must not (split V in blocks, reduce (max, index)).

    Example
    -------
    >>> head = torch.eye(4)
    >>> lm_head_argmax(torch.tensor([[0., 0., 3., 1.]]), head, torch.tensor([[2, 0]]))
    (tensor([2]), tensor([True]))
    """
    logits = hidden.float() @ lm_head.float().T                          # [B, V]
    token = logits.argmax(-1)
    if cand_ids is None:
        return token, torch.zeros_like(token, dtype=torch.bool)
    return token, (cand_ids == token[:, None]).any(-1)


def lm_head_argmax_fake(hidden, lm_head, cand_ids=None):
    B = hidden.shape[0]
    return hidden.new_empty((B,), dtype=torch.int64), hidden.new_empty((B,), dtype=torch.bool)


# ----------------------------------------------------------------------------------------------- verify_greedy
def verify_greedy(draft, num_draft, target_logits):
    """Greedy speculative verification: accept the longest draft prefix that matches the target argmax.

    Parameters
    ----------
    draft : Tensor          # [batch, K] int64, drafted tokens (slots past num_draft are ignored)
    num_draft : Tensor      # [batch] int64, drafts per row, clamped to [0, K]
    target_logits : Tensor  # [batch, K + 1, vocab]

    Returns
    -------
    out : Tensor          # [batch, K + 1] int64: n accepted drafts, then the target token t_n, then -1
    num_emitted : Tensor  # [batch] int64, n + 1

    Shape: draft [B, K], target_logits [B, K+1, V] -> ([B, K+1], [B]).

    t_j = argmax(target_logits[b, j]) (lowest index on ties); n is the largest n <= num_draft[b] with
    draft[b, i] == t_i for all i < n. Greedy decoding with drafts is lossless: the output equals what
    target-only greedy decoding emits (Leviathan et al. 2023, arXiv 2211.17192, section 2.3).

    Example
    -------
    >>> logits = torch.full((1, 3, 5), -100.0); logits[0, 0, 1] = logits[0, 1, 4] = logits[0, 2, 0] = 100
    >>> verify_greedy(torch.tensor([[1, 2]]), torch.tensor([2]), logits)
    (tensor([[ 1,  4, -1]]), tensor([2]))
    """
    B, K = draft.shape
    target_ids = target_logits.argmax(-1)                                # [B, K+1]
    num_draft = num_draft.clamp(0, K)
    pos = torch.arange(K + 1, device=draft.device)
    match = (draft == target_ids[:, :K]) & (pos[:K] < num_draft[:, None])  # [B, K]
    n = match.cumprod(-1).sum(-1)                                        # [B] accepted drafts
    out = torch.where(pos < n[:, None], F.pad(draft, (0, 1)), PLACEHOLDER_TOKEN_ID)
    out = torch.where(pos == n[:, None], target_ids, out)
    return out, n + 1


def verify_greedy_fake(draft, num_draft, target_logits):
    B, K = draft.shape
    return draft.new_empty((B, K + 1), dtype=torch.int64), draft.new_empty((B,), dtype=torch.int64)


# ----------------------------------------------------------------------------------------------- verify_sample
def _mulhilo32(a, c):
    """(hi, lo) 32-bit words of the 64-bit product a * c, for a Python int a and int64 tensor c < 2**32."""
    c_lo = c & 0xFFFF
    p_lo = a * c_lo                                  # < 2**48
    t = a * (c >> 16) + (p_lo >> 16)                 # a*c == t * 2**16 + (p_lo & 0xFFFF), t < 2**49
    return t >> 16, ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors holding uint32 words (broadcast); returns the 4 output words.

    Salmon et al. 2011 (Random123); the same generator as curand and tl.rand. Round:
    (hi0, lo0) = mulhilo(M0, c0); (hi1, lo1) = mulhilo(M1, c2); c = (hi1^c1^k0, lo1, hi0^c3^k1, lo0),
    with the key bumped by (W0, W1) between rounds.
    """
    for r in range(10):
        if r:
            k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _uniform_from_bits(x):
    # NOTE: ((x >> 8) + 0.5) * 2**-24 is evaluated in fp32 as in every backend; it rounds to nearest-even for
    # x >> 8 >= 2**23, so the top value is exactly 1.0: U lies in (0, 1], like curand_uniform.
    return ((x >> 8).to(torch.float32) + 0.5) * 2.0 ** -24


def philox_uniforms(seed, offset, B, K1):
    """The two uniform streams of verify_sample: (uniform_accept, uniform_sample), each [B, K1] fp32.

    Parameters
    ----------
    seed, offset : int or int64 Tensor (0-d or [1])
    B, K1 : int   # rows and positions (K + 1)

    Returns
    -------
    uniform_accept : Tensor  # [B, K1] fp32 in (0, 1], U(x0) of Philox4x32-10
    uniform_sample : Tensor  # [B, K1] fp32 in (0, 1], U(x1)

    key = (seed_lo, seed_hi), counter = (j, b, offset_lo, offset_hi), U(x) = ((x >> 8) + 0.5) * 2**-24.
    Each value depends only on (seed, offset, b, j), so rows are independent. See docs/ops.md.

    Example
    -------
    >>> ua, us = philox_uniforms(torch.tensor(0), torch.tensor(0), 2, 3)
    >>> ua.shape, bool(((ua > 0) & (ua <= 1)).all())
    (torch.Size([2, 3]), True)
    """
    device = seed.device if isinstance(seed, torch.Tensor) else None
    seed = torch.as_tensor(seed, dtype=torch.int64, device=device).reshape(())
    offset = torch.as_tensor(offset, dtype=torch.int64, device=seed.device).reshape(())
    c0 = torch.arange(K1, dtype=torch.int64, device=seed.device)[None, :]     # position j
    c1 = torch.arange(B, dtype=torch.int64, device=seed.device)[:, None]      # row b
    x0, x1, _, _ = philox4x32_10(c0, c1, offset & _MASK32, (offset >> 32) & _MASK32,
                                 seed & _MASK32, (seed >> 32) & _MASK32)
    return _uniform_from_bits(x0.expand(B, K1)), _uniform_from_bits(x1.expand(B, K1))


def target_probs_from_logits(target_logits, temperature):
    """softmax(target_logits.float() / temperature[b]) over the vocabulary; rows with temperature <= 0 get
    one_hot(argmax). Shape: [B, K+1, V], [B] -> [B, K+1, V] fp32."""
    logits = target_logits.float()
    temperature = temperature.float()
    greedy = temperature <= 0                                                 # [B]
    probs = torch.softmax(logits / torch.where(greedy, 1.0, temperature)[:, None, None], -1)
    one_hot = F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.where(greedy[:, None, None], one_hot, probs)


def cumsum_sequential(weights):
    """fp32 prefix sums over the last dim of [B, V], added strictly left to right (cdf_i = cdf_{i-1} + w_i).

    NOTE: torch.cumsum accumulates fp32 in double on CPU and in a tree on CUDA, so it does not give the
    sequential fp32 sums the contract specifies; this loop over V does (on [B] vectors at a time).
    """
    cols = weights.float().T.contiguous()                                   # [V, B]
    cdf = torch.empty_like(cols)
    w_rows, cdf_rows = cols.unbind(0), cdf.unbind(0)
    cdf_rows[0].copy_(w_rows[0])
    for i in range(1, len(w_rows)):
        torch.add(cdf_rows[i - 1], w_rows[i], out=cdf_rows[i])
    return cdf.T


def sample_inverse_cdf(weights, u):
    """sample(w, u) of docs/ops.md: the first i with cdf(w)_i > u * total, else the last i with w_i > 0.

    weights: [B, V] fp32 >= 0, u: [B] fp32 -> [B] int64. cdf is the sequential fp32 prefix sum and
    total = cdf[-1] (NOTE: the contract's sum(w) is read as this sequential total, so u = 1 picks the last
    positive token in every backend). A token with w_i == 0 is never returned.
    """
    cdf = cumsum_sequential(weights)                                        # [B, V]
    above = cdf > (u * cdf[:, -1])[:, None]
    first = above.to(torch.uint8).argmax(-1)
    idx = torch.arange(weights.shape[-1], device=weights.device)
    last_positive = torch.where(weights > 0, idx, PLACEHOLDER_TOKEN_ID).amax(-1)
    return torch.where(above.any(-1), first, last_positive)


def verify_sample(draft, num_draft, draft_probs, target_logits, temperature, seed, offset, *, uniforms=None):
    """Lossless speculative sampling: accept draft x with probability min(1, target_probs[x]/draft_probs[x]),
    on reject resample from normalize(max(0, target_probs - draft_probs)); a bonus token if all accepted.

    Parameters
    ----------
    draft : Tensor                 # [batch, K] int64 (slots past num_draft are ignored, may be -1)
    num_draft : Tensor             # [batch] int64, drafts per row, clamped to [0, K]
    draft_probs : Tensor or None   # [batch, K, vocab]; None: one_hot(draft) (deterministic drafts)
    target_logits : Tensor         # [batch, K + 1, vocab]
    temperature : Tensor           # [batch] fp32; <= 0 means greedy for that row
    seed, offset : Tensor          # int64, 0-d or [1]: the Philox key and counter words
    uniforms : (Tensor, Tensor)    # optional ([B, K+1], [B, K+1]) fp32 (accept, sample) replacing Philox

    Returns
    -------
    out : Tensor          # [batch, K + 1] int64: accepted drafts, the resampled or bonus token, then -1
    num_emitted : Tensor  # [batch] int64, accepted + 1

    Shape: draft [B, K], draft_probs [B, K, V], target_logits [B, K+1, V] -> ([B, K+1], [B]).

    Accept iff u * draft_probs[x] < target_probs[x] (fp32), so a token of target probability 0 is never
    accepted and draft_probs == target_probs accepts all (for u < 1). If the residual has no mass it is
    replaced by target_probs. Tokens come from sample_inverse_cdf. Leviathan et al. 2023 (arXiv 2211.17192),
    Algorithm 1; Chen et al. 2023 (arXiv 2302.01318), Algorithm 2. Randomness: philox_uniforms.

    Example
    -------
    >>> logits = torch.zeros(1, 2, 4)
    >>> out, n = verify_sample(torch.tensor([[2]]), torch.tensor([1]), None, logits, torch.ones(1),
    ...                        torch.tensor(0), torch.tensor(0), uniforms=(torch.zeros(1, 2), torch.zeros(1, 2)))
    >>> out, n
    (tensor([[2, 0]]), tensor([2]))
    """
    B, K = draft.shape
    V = target_logits.shape[-1]
    target_probs = target_probs_from_logits(target_logits, temperature)       # [B, K+1, V]
    if uniforms is None:
        uniform_accept, uniform_sample = philox_uniforms(seed, offset, B, K + 1)
    else:
        uniform_accept, uniform_sample = (u.to(torch.float32) for u in uniforms)
    num_draft = num_draft.clamp(0, K)
    draft_ids = draft.clamp(0, V - 1)  # NOTE: padding past num_draft is never used; the clamp keeps gathers valid
    if draft_probs is None:
        draft_probs = F.one_hot(draft_ids, V).float()                          # [B, K, V]
    else:
        draft_probs = draft_probs.float()
    target_x = target_probs[:, :K].gather(-1, draft_ids[..., None])[..., 0]   # [B, K]
    draft_x = draft_probs.gather(-1, draft_ids[..., None])[..., 0]           # [B, K]
    pos = torch.arange(K + 1, device=draft.device)
    accept = (uniform_accept[:, :K] * draft_x < target_x) & (pos[:K] < num_draft[:, None])
    n = accept.cumprod(-1).sum(-1)                                            # [B] accepted drafts
    rows = torch.arange(B, device=draft.device)
    target_n = target_probs[rows, n]                                          # [B, V]
    if K > 0:
        residual = (target_n - draft_probs[rows, n.clamp(max=K - 1)]).clamp_min(0)
        residual = torch.where((residual > 0).any(-1, keepdim=True), residual, target_n)
        weights = torch.where((n == num_draft)[:, None], target_n, residual)  # bonus row samples the target
    else:
        weights = target_n
    token = sample_inverse_cdf(weights, uniform_sample[rows, n])
    out = torch.where(pos < n[:, None], F.pad(draft, (0, 1)), PLACEHOLDER_TOKEN_ID)
    out = torch.where(pos == n[:, None], token[:, None], out)
    return out, n + 1


def verify_sample_fake(draft, num_draft, draft_probs, target_logits, temperature, seed, offset):
    B, K = draft.shape
    return draft.new_empty((B, K + 1), dtype=torch.int64), draft.new_empty((B,), dtype=torch.int64)
