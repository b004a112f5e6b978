"""The one table of acceptance criteria of the op tests (STYLE.md §6 and §7). Tests import from here only."""
import torch

# Scores and probabilities: (atol, rtol) by input dtype.
SCORE_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}
SCORE_TOL_FP32_LONG_REDUCTION = (1e-4, 1e-4)  # fp32 after reducing over d >= LONG_REDUCTION
LONG_REDUCTION = 4096


def score_tol(dtype, reduced_dim=0):
    """(atol, rtol) for scores/probabilities computed from `dtype` inputs, reducing over `reduced_dim`."""
    if dtype == torch.float32 and reduced_dim >= LONG_REDUCTION:
        return SCORE_TOL_FP32_LONG_REDUCTION
    return SCORE_TOL[dtype]


# Ids, accept counts, KV lengths: exact. Greedy verification: exact, logits built from +-GREEDY_LOGIT.
GREEDY_LOGIT = 100.0

# Argmax: exact where the fp32 reference's top-two gap exceeds the score tolerance, else the chosen token's
# reference logit must be within the tolerance of the max. Ties (duplicated rows) go to the lowest index.
# Exit decisions: exact unless |score - threshold| < atol of score_tol.

# verify_sample statistics (STYLE.md §7).
SAMPLE_VOCAB, SAMPLE_ZERO_TOKENS, SAMPLE_K = 16, 4, 4
SAMPLE_DRAFT_MIX = 0.7            # draft = normalize(0.7 * target + 0.3 * random)
SAMPLE_ROWS_CPU = 65_536
SAMPLE_ROWS_GPU = 2 ** 20
CHI2_MIN_EXPECTED = 5.0           # bins with a smaller expected count are pooled
CHI2_MIN_P = 1e-4                 # per position j <= K
COUNT_LAW_SIGMAS = 5.0            # each bin of the accepted-count law within 5 sigma
SEED_REPEATS = 20                 # same (seed, offset) reproduces over 20 runs
# Backends whose softmax is not ATen's (triton, cuda, emu) may differ from the reference only on decisions
# within this relative distance of a boundary (u * draft vs target, u * total vs a cdf step).
SAMPLE_BOUNDARY_RTOL = 1e-5
