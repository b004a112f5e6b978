"""Draft sources: n-gram lookup, reduced-vocabulary probe, hybrid, EAGLE head; recall@k and cost."""
import pytest
import torch

from conftest import make_tiny
from specee.drafts import (EagleHead, EagleSource, HybridSource, NGramSource, ProbeSource, build_source,
                           frequent_tokens, merge_candidates, recall_at_k, source_cost_ms, successor_table)
from specee.models import DecoderAdapter


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_ngram_prompt_lookup_prefers_the_longest_most_recent_match():
    src = NGramSource(k=3, max_ngram=3, fallback=torch.tensor([90, 91, 92]))
    src.reset(2)
    src.feed(torch.tensor([[1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3],
                           [8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8]]))
    # row 0 ends in "7 2 3": that trigram is new; bigram "2 3" was followed by 5 (recent), then 4;
    # unigram "3" adds nothing new, so the lookup alone gives two
    assert src.lookup(0) == [5, 4]
    assert src.candidates(0) == [5, 4, 90]
    assert src.candidates(1) == [8, 90, 91], "only 8 ever follows 8; frequent tokens fill the rest"
    src.feed(torch.tensor([[5], [8]]))
    assert src.lookup(0)[0] == 7, "after '2 3 5' came 7"


def test_ngram_successor_table_and_fallback():
    seqs = [[1, 2, 1, 2, 1, 3], [1, 2, 4, 4]]
    vocab = torch.tensor([1, 2, 4])
    table = successor_table(seqs, vocab, k=2)
    assert table.tolist() == [[2, 3], [1, 4], [4, -1]]
    src = NGramSource(k=3, succ_ids=vocab, succ_table=table, fallback=torch.tensor([7, 8, 9]))
    src.reset(1)
    src.feed(torch.tensor([[5, 1]]))
    assert src.candidates(0) == [2, 3, 7], "no history match: successors of 1, then frequent tokens"


def test_frequent_tokens_order_and_ties():
    ids = torch.tensor([5, 5, 5, 2, 2, 9, 9, 1])
    assert frequent_tokens(ids, 12, 5).tolist() == [5, 2, 9, 1, 0]


def test_probe_is_topk_of_the_reduced_head_on_the_normed_state():
    model = make_tiny("llama")
    a = DecoderAdapter(model)
    h = torch.randn(3, a.shape.hidden_size)
    full = ProbeSource(1, 4).propose(h, a)
    assert torch.equal(full, a.logits(h).topk(4).indices)
    vocab = torch.tensor([7, 3, 100, 50, 9, 11])
    red = ProbeSource(1, 4, vocab).propose(h, a)
    want = vocab[a.logits(h)[:, vocab].topk(4).indices]
    assert torch.equal(red, want)


def test_hybrid_merges_ngram_hits_with_the_probes_top():
    fill = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]])
    got = merge_candidates([[1, 2, 3, 4], [], [11, 5]], fill, 4)
    assert got.tolist() == [[1, 2, 3, 10], [20, 21, 22, 23], [11, 5, 30, 31]]


def test_sources_rebuild_from_their_saved_form():
    model = make_tiny("llama")
    a = DecoderAdapter(model)
    ngram = NGramSource(4, 2, torch.arange(5), torch.tensor([1, 2]), torch.tensor([[3, 4, -1, -1], [5, 6, 7, -1]]))
    hybrid = HybridSource(ngram, ProbeSource(1, 4, torch.arange(40)))
    for src in (ngram, ProbeSource(2, 4, torch.arange(30)), hybrid):
        again = build_source(src.config(), src.tensors())
        assert again.config() == src.config()
        h = torch.randn(2, a.shape.hidden_size)
        for s in (src, again):
            s.reset(2)
            s.feed(torch.tensor([[1, 2, 1], [4, 2, 2]]))
        assert torch.equal(src.propose(h, a), again.propose(h, a))
    with pytest.raises(ValueError, match="unknown draft source"):
        build_source({"type": "oracle"}, {})


def test_eagle_head_is_causal_and_rebuilds():
    model = make_tiny("llama")
    a = DecoderAdapter(model)
    head = EagleHead(model.config)
    src = EagleSource(head, 4, torch.arange(60))
    h_prev = torch.randn(1, 6, a.shape.hidden_size)
    tok = torch.randint(3, 200, (1, 6))
    c1 = src.propose_sequence(h_prev, tok, a)
    h2, t2 = h_prev.clone(), tok.clone()
    h2[:, -1] += 1.0
    t2[:, -1] = 5
    c2 = src.propose_sequence(h2, t2, a)
    assert c1.shape == (1, 6, 4) and torch.equal(c1[:, :-1], c2[:, :-1]), "a position sees only its past"
    assert ((c1 >= 0) & (c1 < 60)).all()
    again = build_source(src.config(), src.tensors(), model.config)
    assert torch.equal(again.propose_sequence(h_prev, tok, a), c1)


def test_recall_and_cost():
    cands = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert recall_at_k(cands, torch.tensor([3, 9])) == 0.5
    a = DecoderAdapter(make_tiny("llama"))
    assert source_cost_ms(NGramSource(4), a, history=64, repeats=5) > 0
    assert source_cost_ms(ProbeSource(1, 4, torch.arange(64)), a, batch_size=2, repeats=5) > 0
