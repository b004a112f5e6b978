"""Self-speculative decoding: exact (greedy), lossless (sampling), rollback leaves a full run's KV."""
import math

import pytest
import torch

import specee
from conftest import PAD, left_padded_batch, make_tiny
from specee.speculative import DraftController, SelfSpeculativeDecoder, SpecConfig


def damped(family="llama", from_layer=1, scale=0.1, **kw):
    """A tiny model whose layers >= from_layer barely change the residual stream: shallow drafts are
    mostly right, so rounds both accept and reject (random weights alone accept almost nothing)."""
    model = make_tiny(family, **kw)
    with torch.no_grad():
        for layer in model.model.layers[from_layer:]:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("lengths", [[9], [7, 3, 11]])
@pytest.mark.parametrize("cfg", [
    dict(exit_layer=1, num_draft=1, adaptive_k=False),
    dict(exit_layer=2, num_draft=4, adaptive_k=False),
    dict(exit_layer=3, num_draft=8, adaptive_k=False),   # e = L - 1
    dict(exit_layer=1, num_draft=4, draft_stop=0.5),     # Kangaroo's double exit
    None,                                                # adaptive e and K (priced for this CPU: few drafts)
    dict(verify_cost=1.0),                               # adaptive, priced as on a GPU: drafts from round one
])
def test_greedy_equals_model_generate(family, lengths, cfg):
    model = damped(family)
    ids, mask = left_padded_batch(lengths)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    out = specee.generate(model, ids, mask, mode="self_speculative", exit_config=cfg, max_new_tokens=24,
                          do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    if cfg is not None and cfg.get("exit_layer", 1) == 1 and not cfg.get("draft_stop"):
        hist = out.stats["accepted_histogram"]
        assert sum(hist[1:]) > 0, "drafts get accepted (rejections: see the rollback test)"


def test_greedy_with_eos_and_batch_rows_finishing_apart():
    model = damped()
    ids, mask = left_padded_batch([6, 9, 4])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    eos = int(ref[1, 9 + 5])
    kw = dict(max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    ref = model.generate(ids, attention_mask=mask, **kw)
    out = specee.generate(model, ids, mask, mode="self_speculative",
                          exit_config=dict(exit_layer=1, num_draft=4), **kw)
    assert torch.equal(out, ref)


def test_custom_stopping_criteria_and_host_check():
    """EOS and max-length stops are decided on host ids (no read-back per token); a custom criterion falls back
    to a call per emitted token. Both stop where model.generate stops, mid-round included."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    from specee.speculative import host_stopper

    stop = host_stopper([MaxLengthCriteria(12), EosTokenCriteria([5, 7])])
    assert [stop(3, 5), stop(3, 7), stop(3, 6), stop(12, 6)] == [True, True, False, True]

    class StopAfter(StoppingCriteria):
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == self.token

    assert host_stopper([MaxLengthCriteria(12), StopAfter(3)]) is None
    model = damped()
    ids, mask = left_padded_batch([6, 9, 4])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=PAD)
    token = int(ref[0, 9 + 6])  # row 0's 7th new token: rows stop at different steps
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=PAD)
    ref = model.generate(ids, attention_mask=mask, stopping_criteria=StoppingCriteriaList([StopAfter(token)]), **kw)
    out = specee.generate(model, ids, mask, mode="self_speculative", exit_config=dict(exit_layer=1, num_draft=4),
                          stopping_criteria=StoppingCriteriaList([StopAfter(token)]), **kw)
    assert torch.equal(out, ref)
    assert (ref[:, 9:] == token).any(1).sum() >= 1


@pytest.mark.parametrize("lengths", [[5, 8], [7]])
def test_rollback_leaves_the_kv_of_a_full_run(lengths):
    model = damped(scale=0.5)
    ids, mask = left_padded_batch(lengths)
    dec = SelfSpeculativeDecoder(model, dict(exit_layer=1, num_draft=4, adaptive_k=False))
    from test_engine import _decode  # the engine tests' harness: max-length stop, greedy

    res = _decode(model, dec, ids, mask, 14)
    assert sum(res.stats["accepted_histogram"][:4]) > 0, "some drafts were rejected and rolled back"
    cache = dec.engine.cache
    if len(lengths) == 1:  # one row hands every rejected slot back: the cache holds the fed tokens and nothing else
        assert cache.length == res.sequences.shape[1] - 1 and cache.token_valid[0, : cache.length].all()
        assert cache.max_len <= res.sequences.shape[1] + 4 + 2
    for b in range(len(lengths)):
        seq = res.sequences[b][mask[b].bool().tolist() + [True] * (res.sequences.shape[1] - mask.shape[1])][:-1]
        kv = model(seq[None], use_cache=True).past_key_values
        slots = cache.token_valid[b, : cache.length].nonzero()[:, 0]
        assert len(slots) == len(seq), "exactly the accepted tokens stay in the cache"
        for l, layer in enumerate(kv.layers):
            torch.testing.assert_close(cache.k[l, b][:, slots], layer.keys[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache.v[l, b][:, slots], layer.values[0], rtol=1e-5, atol=1e-5)


def _exact_joint(model, prompt, n):
    """P(first n generated tokens) of plain sampling from the full model, by enumeration."""
    V = model.config.vocab_size
    joint = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for prefix, p in joint.items():
            seq = torch.cat([prompt, torch.tensor(prefix, dtype=torch.long)])[None]
            with torch.no_grad():
                probs = torch.softmax(model(seq).logits[0, -1].double(), -1)
            for t in range(V):
                nxt[prefix + (t,)] = p * float(probs[t])
        joint = nxt
    return joint


def _chi2_pvalue(samples, joint, n):
    counts = {}
    for row in samples.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    keys = sorted(joint, key=lambda k: -joint[k])
    N = samples.shape[0]
    stat, dof, pool_e, pool_o = 0.0, 0, 0.0, 0
    for k in keys:
        e, o = joint[k] * N, counts.get(k, 0)
        if e >= 5:
            stat += (o - e) ** 2 / e
            dof += 1
        else:
            pool_e += e
            pool_o += o
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / pool_e
        dof += 1
    return float(torch.special.gammaincc(torch.tensor((dof - 1) / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _sample_many(model, prompt, N, n, cfg, seed=0):
    ids = prompt[None].expand(N, -1).contiguous()
    torch.manual_seed(seed)
    out = specee.generate(model, ids, mode="self_speculative", exit_config=cfg, max_new_tokens=n,
                          do_sample=True, temperature=1.0, top_k=0, top_p=1.0, return_dict_in_generate=True)
    return out.sequences[:, -n:], out.stats


@pytest.fixture(scope="module")
def small_vocab_model():
    model = damped(vocab_size=8, from_layer=1, scale=0.5, eos_token_id=None)  # no EOS: 3 free tokens
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("extra", [{}, dict(draft_vocab=[0, 2, 3, 6])])  # a draft support smaller than the target's
def test_sampling_matches_the_full_models_distribution(small_vocab_model, extra):
    model = small_vocab_model
    prompt = torch.tensor([3, 5, 2, 7])
    joint = _exact_joint(model, prompt, 3)
    samples, stats = _sample_many(model, prompt, 20000, 3, dict(exit_layer=1, num_draft=2, adaptive_k=False, **extra))
    assert stats["accepted_histogram"][1] > 0 and stats["accepted_histogram"][0] > 0
    assert _chi2_pvalue(samples, joint, 3) > 1e-4


def test_sampling_check_catches_a_biased_verifier(small_vocab_model, monkeypatch):
    """Accepting every draft outputs the draft's distribution, not the target's: the test must see it."""
    from specee import ops

    def accept_all(draft, num_draft, draft_probs, target_logits, temperature, seed, offset):
        B, K = draft.shape
        bonus = torch.multinomial(torch.softmax(target_logits[torch.arange(B), num_draft], -1), 1)
        out = torch.full((B, K + 1), -1, dtype=torch.long)
        for b in range(B):
            n = int(num_draft[b])
            out[b, :n] = draft[b, :n]
            out[b, n] = bonus[b, 0]
        return out, num_draft + 1

    monkeypatch.setattr(ops, "verify_sample", accept_all)
    model = small_vocab_model
    prompt = torch.tensor([3, 5, 2, 7])
    joint = _exact_joint(model, prompt, 3)
    samples, _ = _sample_many(model, prompt, 20000, 3, dict(exit_layer=1, num_draft=2, adaptive_k=False))
    assert _chi2_pvalue(samples, joint, 3) < 1e-4


def test_seeded_sampling_is_reproducible():
    model = damped()
    ids, mask = left_padded_batch([5, 8])
    kw = dict(mode="self_speculative", exit_config=dict(exit_layer=1, num_draft=3), max_new_tokens=12,
              do_sample=True, top_p=0.9)
    torch.manual_seed(4)
    a = specee.generate(model, ids, mask, **kw)
    torch.manual_seed(4)
    b = specee.generate(model, ids, mask, **kw)
    assert torch.equal(a, b)


def test_controller_prefers_drafting_when_acceptance_is_high_and_falls_back_when_low():
    ctl = DraftController(30, SpecConfig(num_draft=6), head_cost=4.5)
    for e in ctl.candidates:
        ctl.accept[e] = 0.95
    e, k = ctl.choose()
    assert k >= 3 and e == min(ctl.candidates)
    for e in ctl.candidates:
        ctl.accept[e] = 0.05
    picks = [ctl.choose() for _ in range(200)]
    probes = [p for p in picks if p[1] > 0]
    assert picks[0] == (30, 0), "plain decoding when drafts do not pay"
    assert 1 <= len(probes) <= 6, "probes back off exponentially"
    # nothing accepted: two shallow feeds, one draft head, one verify pass and head, for one token
    assert math.isclose(ctl.expected_cost(15, 1, 0.0), 2 * 15 + 4.5 + 15 + 4.5)


def test_controller_prices_the_verification_pass_by_its_positions(tiny_llama):
    """Where K+1 positions cost more than one (a CPU), drafting must be accepted more often to pay."""
    free, dear = (DraftController(30, SpecConfig(), head_cost=4.5, verify_cost=v) for v in (1.0, 2.0))
    assert math.isclose(dear.expected_cost(15, 1, 0.0), 2 * 15 + 4.5 + 2 * (15 + 4.5))
    assert free.choose()[1] > 0 and dear.choose() == (30, 0), "the 0.5 prior pays only where verifying is free"
    for ctl in (free, dear):
        for e in ctl.candidates:
            ctl.accept[e] = 0.97
    assert dear.choose()[1] >= 3, "high acceptance pays even for a dear verification"
    cpu = SelfSpeculativeDecoder(tiny_llama).controller
    assert cpu.v == specee.speculative.CPU_VERIFY_COST
    assert SelfSpeculativeDecoder(tiny_llama, dict(verify_cost=1.0)).controller.v == 1.0


@pytest.mark.parametrize("cfg, match", [
    (dict(exit_layer=0), "exit_layer must lie"),
    (dict(exit_layer=4), "exit_layer must lie"),
    (dict(num_draft=0), "num_draft"),
    (dict(draft_stop=2.0), "outside"),
    (dict(verify_cost=0.5), "verify_cost must be >= 1"),
    (dict(speed=3), "unknown self_speculative options"),
])
def test_bad_speculative_options(tiny_llama, cfg, match):
    with pytest.raises(ValueError, match=match):
        specee.generate(tiny_llama, torch.tensor([[5, 6]]), mode="self_speculative", exit_config=cfg,
                        max_new_tokens=2)


@pytest.mark.parametrize("draft_vocab", [50, [5, 9, 17, 100, 3, 200]])
def test_reduced_draft_vocabulary_stays_exact(draft_vocab):
    model = damped()
    ids, mask = left_padded_batch([6, 9])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    out = specee.generate(model, ids, mask, mode="self_speculative", max_new_tokens=16, do_sample=False,
                          exit_config=dict(exit_layer=1, num_draft=3, draft_vocab=draft_vocab))
    assert torch.equal(out, ref)


def test_reduced_draft_vocabulary_never_proposes_outside_it():
    model = damped()
    dec = SelfSpeculativeDecoder(model, dict(exit_layer=1, draft_vocab=[5, 9, 17]))
    logits = dec._draft_logits(torch.randn(4, model.config.hidden_size))
    assert set(logits.argmax(-1).tolist()) <= {5, 9, 17}
    assert torch.isinf(logits).sum() == 4 * (model.config.vocab_size - 3)
    with pytest.raises(ValueError, match="draft_vocab"):
        SelfSpeculativeDecoder(model, dict(draft_vocab=[1, 10_000]))
