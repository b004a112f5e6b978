"""The decode engine against transformers' model.generate, and the exit/KV policies' invariants."""
import pytest
import torch

import specee
from conftest import FAMILIES, PAD, ScheduledScript, ScriptedPredictor, left_padded_batch, make_tiny
from specee.engine import Engine


def hf(model, ids, mask, **kw):
    return model.generate(ids, attention_mask=mask, **kw)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("lengths", [[9], [7, 3, 11]])
def test_full_equals_model_generate(family, lengths):
    model = make_tiny(family)
    ids, mask = left_padded_batch(lengths)
    kw = dict(max_new_tokens=20, do_sample=False)
    ref = hf(model, ids, mask, **kw)
    out = specee.generate(model, ids, mask, **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_each_row_equals_its_batch1_run(attn):
    model = make_tiny("llama", attn=attn)
    lengths = [5, 12, 8]
    ids, mask = left_padded_batch(lengths)
    batch = specee.generate(model, ids, mask, max_new_tokens=16, do_sample=False)
    for b, n in enumerate(lengths):
        one = specee.generate(model, ids[b:b + 1, -n:], mask[b:b + 1, -n:], max_new_tokens=16, do_sample=False)
        assert torch.equal(batch[b, -16:], one[0, -16:]), f"row {b} differs from its batch-1 run"


def test_per_row_eos_pads_finished_rows():
    model = make_tiny("llama")
    ids, mask = left_padded_batch([6, 6])
    ref = hf(model, ids, mask, max_new_tokens=12, do_sample=False)
    eos = int(ref[0, 6 + 3])  # make row 0's 4th generated token the EOS
    out = specee.generate(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                          pad_token_id=PAD, return_dict_in_generate=True)
    ref2 = hf(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(out.sequences, ref2)
    row0 = out.sequences[0, 6:]
    first = int((row0 == eos).nonzero()[0])
    assert (row0[first + 1:] == PAD).all()
    assert (out.exit_layers[0, first + 1:] == 0).all(), "finished rows report no layers"


def test_seeded_sampling_is_reproducible_and_matches_hf():
    model = make_tiny("llama")
    ids, mask = left_padded_batch([5, 9])
    kw = dict(max_new_tokens=15, do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    torch.manual_seed(123)
    a = specee.generate(model, ids, mask, **kw)
    torch.manual_seed(123)
    b = specee.generate(model, ids, mask, **kw)
    torch.manual_seed(123)
    ref = hf(model, ids, mask, **kw)
    assert torch.equal(a, b)
    assert torch.equal(a, ref), "full-mode sampling consumes the RNG exactly as transformers' _sample"
    torch.manual_seed(7)
    c = specee.generate(model, ids, mask, **kw)
    assert not torch.equal(a, c)


def _full_forward_kv(model, seq, mask):
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate computes them for left padding
    out = model(seq, attention_mask=mask, position_ids=pos, use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


@pytest.mark.parametrize("lengths", [[8], [4, 9]])
def test_deferred_kv_equals_full_forward(lengths):
    model = make_tiny("llama")
    ids, mask = left_padded_batch(lengths)
    # shallow, deeper, full, several shallow in a row, then full: every way a hole can be filled
    script = [1, 2, 4, 1, 1, 3, 2, 4, 1, 2, 1, 1, 4]
    pred = ScriptedPredictor(script, layers=[0, 1, 2])
    engine = Engine(model, "early_exit", dict(kv_policy="deferred", predictor=pred))
    res = _decode(model, engine, ids, mask, 14)
    assert res.exit_layers[0, 1:].tolist() == script
    engine.flush()
    seq = res.sequences[:, :-1]  # the last token was never fed back
    full_mask = torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    kv = _full_forward_kv(model, seq, full_mask)
    n = seq.shape[1]
    assert engine.cache.length == n
    valid = full_mask.bool()
    for l, (k, v) in enumerate(kv):
        assert engine.cache.present[l, :n].all()
        got_k = engine.cache.k[l, :, :, :n].transpose(1, 2)[valid]
        got_v = engine.cache.v[l, :, :, :n].transpose(1, 2)[valid]
        torch.testing.assert_close(got_k, k.transpose(1, 2)[valid], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_v, v.transpose(1, 2)[valid], rtol=1e-5, atol=1e-5)


def _decode(model, engine, ids, mask, new):
    from transformers import GenerationConfig
    from transformers.generation import LogitsProcessorList, MaxLengthCriteria, StoppingCriteriaList

    gc = GenerationConfig(max_length=ids.shape[1] + new, do_sample=False, pad_token_id=PAD)
    gc._pad_token_tensor = torch.tensor(PAD)
    return engine.decode(ids, mask, logits_processor=LogitsProcessorList(),
                         stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(ids.shape[1] + new)]),
                         generation_config=gc)


@pytest.mark.parametrize("kv_policy", ["skip", "propagate", "deferred", "monotone"])
def test_exit_policies_record_exit_layers(kv_policy):
    model = make_tiny("llama")
    ids, mask = left_padded_batch([6, 10])
    out = specee.generate(model, ids, mask, mode="confidence", max_new_tokens=12, return_dict_in_generate=True,
                          exit_config=dict(kv_policy=kv_policy, thresholds=0.3, layers=[1, 2]))
    ex = out.exit_layers
    assert ex.shape == (2, 12)
    assert ex[:, 0].eq(4).all(), "the first token comes from the prefill at full depth"
    assert ((ex >= 2) & (ex <= 4)).all()
    if kv_policy == "monotone":
        step = ex.max(dim=0).values  # the batch's exit point per step
        assert (step[1:] <= step[:-1]).all()


def test_threshold_one_never_exits_equals_full():
    model = make_tiny("llama")
    ids, mask = left_padded_batch([6, 10])
    ref = specee.generate(model, ids, mask, max_new_tokens=12)
    out = specee.generate(model, ids, mask, mode="confidence", exit_config=dict(thresholds=1.0),
                          max_new_tokens=12, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert out.exit_layers.eq(4).all()


def test_confidence_exit_emits_the_exit_layers_argmax():
    model = make_tiny("llama")
    ids, mask = left_padded_batch([7])
    out = specee.generate(model, ids, mask, mode="confidence", max_new_tokens=2, return_dict_in_generate=True,
                          exit_config=dict(thresholds=0.0, layers=[1]))
    assert out.exit_layers[0, 1] == 2
    # Recompute: run the model to layer 2 on the first emitted token and take the head's argmax.
    seq = out.sequences[:, :-1]
    hs = model(seq, output_hidden_states=True).hidden_states[2][:, -1]
    assert int(model.lm_head(model.model.norm(hs)).argmax(-1)) == int(out.sequences[0, -1])


def test_batch_shares_one_exit_point_per_step():
    model = make_tiny("llama")
    ids, mask = left_padded_batch([6, 10, 4])
    out = specee.generate(model, ids, mask, mode="confidence", max_new_tokens=10, return_dict_in_generate=True,
                          exit_config=dict(thresholds=0.5, layers=[0, 1, 2]))
    # rows exit at different layers, yet the step ran as deep as its deepest row: KV for rows above
    # their own exit exists up to the step's exit point, which is what the cache records.
    assert out.stats["steps"] == 10


def test_skipdecode_depth_is_monotone_and_bounded():
    model = make_tiny("llama", num_hidden_layers=6)
    ids, mask = left_padded_batch([5, 8])
    out = specee.generate(model, ids, mask, mode="skipdecode", max_new_tokens=20, return_dict_in_generate=True,
                          exit_config=dict(max_layers=6, min_layers=2, warmup_layers=1))
    depth = out.exit_layers[0]
    assert depth[0] == 6 and depth[-1] == 2
    assert (depth[1:] <= depth[:-1]).all()


def test_skipdecode_plan_keeps_warmup_and_top_layers():
    from specee.policies import ExitConfig, SkipDecodePolicy

    p = SkipDecodePolicy(10, ExitConfig(max_layers=10, min_layers=4, warmup_layers=2))
    p.reset(1, 7)
    assert p.plan(0, 10).layers == tuple(range(10))
    assert p.plan(6, 10).layers == (0, 1, 8, 9)
    depths = [len(p.plan(s, 10).layers) for s in range(7)]
    assert depths == sorted(depths, reverse=True)


def test_host_syncs_per_step_are_bounded():
    model = make_tiny("llama")
    ids, mask = left_padded_batch([6])
    out = specee.generate(model, ids, mask, max_new_tokens=10, return_dict_in_generate=True)
    assert out.stats["host_syncs"] == 10, "full mode reads back once per token (the stop check)"
    out = specee.generate(model, ids, mask, mode="confidence", max_new_tokens=10, return_dict_in_generate=True,
                          exit_config=dict(thresholds=1.0, layers=[1, 2]))
    assert out.stats["host_syncs"] == 10 + 9 * 2, "plus one per evaluated layer"


def test_propagate_fills_holes_with_projections_of_the_exit_state():
    model = make_tiny("llama")
    ids, mask = left_padded_batch([7])
    pred = ScriptedPredictor([2, 4, 4], layers=[0, 1, 2])
    engine = Engine(model, "early_exit", dict(kv_policy="propagate", predictor=pred))
    res = _decode(model, engine, ids, mask, 3)
    slot = 7  # decode step 0 fed the first generated token here and exited after 2 layers
    seq = res.sequences[:, : slot + 1]
    h2 = model(seq, output_hidden_states=True).hidden_states[2][:, slot:]  # exact: its context is full-depth
    rope = engine.adapter.rope(h2, torch.tensor([[slot]]))
    for l in (2, 3):
        k, v = engine.adapter.kv_projection(l, h2, rope)
        torch.testing.assert_close(engine.cache.k[l, :, :, slot:slot + 1], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(engine.cache.v[l, :, :, slot:slot + 1], v, rtol=1e-5, atol=1e-5)
    assert engine.cache.present[:, slot].all()


def test_skip_leaves_holes_that_later_tokens_do_not_see():
    model = make_tiny("llama")
    ids, mask = left_padded_batch([7])
    pred = ScriptedPredictor([2, 4, 4], layers=[0, 1, 2])
    engine = Engine(model, "early_exit", dict(kv_policy="skip", predictor=pred))
    res = _decode(model, engine, ids, mask, 3)
    slot = 7
    assert engine.cache.present[:2, slot].all() and not engine.cache.present[2:, slot].any()
    # The hole's buffer holds zeros; were it attended to, poisoning it would change the next tokens.
    engine2 = Engine(model, "early_exit", dict(kv_policy="skip", predictor=ScriptedPredictor([2, 4, 4], [0, 1, 2])))
    orig_update = engine2.__class__._fill_holes

    def poison(self, hidden, s, reached):
        orig_update(self, hidden, s, reached)
        if reached < 4:
            self.cache.k[reached:, :, :, s] = 1e4
            self.cache.v[reached:, :, :, s] = 1e4

    engine2._fill_holes = poison.__get__(engine2)
    res2 = _decode(model, engine2, ids, mask, 3)
    assert torch.equal(res.sequences, res2.sequences)


def test_skipdecode_needs_no_hole_mask():
    """Monotone depth: masking holes changes nothing, so the engine skips the mask."""
    model = make_tiny("llama", num_hidden_layers=6)
    ids, mask = left_padded_batch([5, 8])
    kw = dict(mode="skipdecode", max_new_tokens=14, exit_config=dict(min_layers=2))
    out = specee.generate(model, ids, mask, **kw)
    orig = Engine._fill_holes

    def masked(self, hidden, slot, reached):
        self.cache.has_holes = True  # force the per-layer presence masks
        orig(self, hidden, slot, reached)

    Engine._fill_holes = masked
    try:
        engine = Engine(model, "skipdecode", dict(min_layers=2))
        engine.mode = "skipdecode-masked"  # route through _fill_holes, which marks holes
        res = _decode(model, engine, ids, mask, 14)
    finally:
        Engine._fill_holes = orig
    assert engine.cache.has_holes
    assert torch.equal(res.sequences, out)


@pytest.mark.parametrize("compile", [None, "aot_eager", dict(backend="aot_eager", graphs="host")],
                         ids=["eager", "compiled", "graphs"])
@pytest.mark.parametrize("mode", ["confidence", "early_exit"])
def test_lookahead_changes_no_token(mode, compile):
    """lookahead=True queues the next layer before each exit read-back: same tokens and exit layers as without
    (deferred KV: the extra layer's KV is exact), and the extra layers are counted."""
    from conftest import ScriptedPredictor

    model = make_tiny("llama", num_hidden_layers=6)
    # the scripted exits are shared by the rows, so the batch stops together; confidence's rows exit apart
    ids, mask = left_padded_batch([5, 3, 7] if mode == "early_exit" else [6])
    outs = []
    for lookahead in (False, True):
        cfg = dict(thresholds=0.1) if mode == "confidence" else dict(
            predictor=ScriptedPredictor([3, 1, 6, 2, 5, 4, 1, 6, 2, 3], range(6)))
        torch.manual_seed(0)
        outs.append(specee.generate(model, ids, mask, mode=mode, exit_config=dict(cfg, lookahead=lookahead),
                                    compile=compile, max_new_tokens=14, do_sample=False, return_dict_in_generate=True))
    plain, ahead = outs
    assert torch.equal(ahead.sequences, plain.sequences)
    assert torch.equal(ahead.exit_layers, plain.exit_layers)
    assert plain.exit_layers[plain.exit_layers > 0].float().mean() < 6  # exits happened
    assert plain.stats["lookahead_layers"] == 0 < ahead.stats["lookahead_layers"]


def test_lookahead_layer_is_queued_between_copy_and_wait(read_log):
    """The read-back of each exit decision starts (its copy is queued) before the lookahead layer and is waited for
    after it: on a GPU the device runs that layer while the host waits for the copy alone."""
    model = make_tiny("llama", num_hidden_layers=6)
    ids, mask = left_padded_batch([5])
    eng = Engine(model, "early_exit", dict(predictor=ScriptedPredictor([3, 5, 6, 2], range(5)), lookahead=True))
    _decode(model, eng, ids, mask, 4)
    waits = [i for i, e in enumerate(read_log) if e == "wait"]
    assert waits and all(read_log[i - 2: i] == ["copy", "layer"] for i in waits)
    assert eng.lookahead_layers > 0


def test_lookahead_needs_deferred_kv():
    model = make_tiny("llama")
    ids, mask = left_padded_batch([4])
    with pytest.raises(ValueError, match="kv_policy='deferred'"):
        specee.generate(model, ids, mask, mode="confidence", max_new_tokens=2,
                        exit_config=dict(lookahead=True, kv_policy="skip"))


def _per_layer(engine):
    """Split every span the engine hands the adapter into single layers, each under the mask the cache gives for
    that layer; checks on the way that the span's own mask is that mask, at every layer of the span."""
    a, spans = engine.adapter, []
    seg = a.segment

    def split(start, n, hidden, mask, position_ids, rope, kv):
        spans.append((n, hidden.shape[1]))
        for l in range(start, start + n):
            layer_mask = mask
            if mask is not None:
                layer_mask = kv.cache.mask(l, kv.slots, a.dtype, mask.dtype != torch.bool)
                assert torch.equal(layer_mask, mask), f"a span from layer {start} shares a mask that layer {l} lacks"
            hidden = seg(l, 1, hidden, layer_mask, position_ids, rope, kv)
        return hidden

    a.segment = split
    return spans


@pytest.mark.parametrize("compile", [None, "aot_eager"], ids=["eager", "compiled"])
@pytest.mark.parametrize("kv_policy", ["skip", "propagate", "deferred", "monotone"])
def test_spans_between_exit_tests_equal_layer_by_layer(kv_policy, compile):
    """The layers between two exit tests run as one adapter call under one mask: the same tokens, exit layers and
    KV as layer by layer, and the shared mask is each layer's own, whatever holes the KV policy leaves."""
    model = make_tiny("llama", num_hidden_layers=8)
    ids, mask = left_padded_batch([6, 9])
    script = [[3, 3], [6, 8], [8, 8], [3, 6], [6, 6], [2, 8], [5, 5], [8, 3], [7, 7], [3, 3]]
    results, spans = [], None
    for split in (False, True):
        engine = Engine(model, "early_exit", dict(kv_policy=kv_policy, predictor=ScheduledScript(script, range(7))),
                        compile=compile)
        if split:
            spans = _per_layer(engine)
        results.append((_decode(model, engine, ids, mask, len(script) + 1), engine.cache))
    (spanned, c1), (layered, c2) = results
    assert torch.equal(spanned.sequences, layered.sequences)
    assert torch.equal(spanned.exit_layers, layered.exit_layers)
    assert spanned.stats["host_syncs"] == layered.stats["host_syncs"]
    assert max(n for n, q in spans) > 1, "some span covered several layers"
    if kv_policy == "deferred":
        assert any(n > 1 and q > 1 for n, q in spans), "a deferred slot rode along a span"
    for l in range(8):
        assert torch.equal(c1.present[l], c2.present[l])
        torch.testing.assert_close(c1.k_layers[l], c2.k_layers[l], rtol=0, atol=0)


@pytest.mark.parametrize("kv_policy", ["skip", "deferred"])
def test_one_mask_per_region_of_a_step(kv_policy, monkeypatch):
    """Spans between the same two mask boundaries (hole depths, deferred slots joining in) share one mask tensor,
    built once per step; once the deferred queue drains, steps share one mask again (no holes are left)."""
    from specee.cache import KVCache

    model = make_tiny("llama", num_hidden_layers=8)
    ids, mask = left_padded_batch([6, 9])
    script = [[3, 3], [6, 8], [8, 8], [3, 6], [6, 6], [2, 8], [5, 5], [8, 3], [7, 7], [3, 3]]
    engine = Engine(model, "early_exit", dict(kv_policy=kv_policy, predictor=ScriptedPredictor(script, range(7))))
    built, steps = [], []
    real_mask, real_run = KVCache.mask, engine._run

    def counted_mask(self, layer, *args, **kw):
        built.append(layer)
        return real_mask(self, layer, *args, **kw)

    def run(hidden, slots, plan, finished, spans=True):
        bounds, holes = engine.hole_depths | set(engine.pending.depth), engine.cache.has_holes
        before, masks = len(built), set()
        seg = engine.adapter.segment

        def segment(start, n, hidden, mask, *rest):
            masks.add(id(mask))
            return seg(start, n, hidden, mask, *rest)

        engine.adapter.segment = segment
        try:
            out = real_run(hidden, slots, plan, finished, spans)
        finally:
            engine.adapter.segment = seg
        steps.append((len(slots), bounds, len(built) - before, len(masks), holes))
        return out

    monkeypatch.setattr(KVCache, "mask", counted_mask)
    engine._run = run
    _decode(model, engine, ids, mask, len(script) + 1)
    decode_steps = [s for s in steps if s[0] == 1]
    assert len(decode_steps) == len(script)
    for _, bounds, n_built, n_masks, _ in decode_steps:
        regions = len({sum(b <= l for b in bounds) for l in range(8)})
        assert n_built <= regions and n_masks <= regions, (bounds, n_built, n_masks)
    assert any(n > 1 for _, _, _, n, _ in decode_steps), "some step crossed a boundary"
    holes = [h for *_, h in decode_steps]  # what each step found the cache holding
    # step 0 exits at layer 3; step 1 runs all 8 (its rows exit at 6 and 8), which fills that hole under deferred
    assert holes[:3] == [False, True, kv_policy == "skip"]
