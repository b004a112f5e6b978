"""compile=True: the functional layer against transformers' layer, compiled decoding against eager specee and
model.generate for every mode, and recompiles counted with dynamo's counters.

Most cases compile with the ``aot_eager`` backend (dynamo + AOTAutograd, no code generation: seconds); one
runs inductor end to end, the default of ``compile=True``."""
import pytest
import torch
from torch._dynamo.utils import counters

import specee
from specee import compiled
from specee.cache import KVCache
from specee.models import DecoderAdapter

from conftest import ScheduledScript, ScriptedPredictor, left_padded_batch, make_tiny

BACKEND = "aot_eager"


def graphs():
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("B,q", [(1, 1), (3, 1), (2, 5), (1, 7)])
@torch.no_grad()
def test_layer_step_matches_transformers_layer(family, B, q):
    """The uncompiled functional layer equals the model's own decoder layer over a cache with history."""
    model = make_tiny(family, seed=3, attention_bias=True) if family == "llama" else make_tiny(family, seed=3)
    a = DecoderAdapter(model)
    ca = compiled.CompiledAdapter(model, BACKEND)
    S, past = 24, 9
    torch.manual_seed(0)
    x = torch.randn(B, q, a.shape.hidden_size)
    pos = torch.arange(past, past + q).expand(B, q)
    rope = a.rope(x, pos)
    slots = torch.arange(past, past + q)
    caches = []
    for static in (False, True):
        c = KVCache(a.shape, B, S, a.dtype, "cpu", static=static)
        c.append(torch.ones(B, past + q, dtype=torch.bool), torch.arange(past + q).expand(B, -1))
        torch.manual_seed(1)
        for kv in (c.k_layers, c.v_layers):
            for t in kv:
                t[:, :, :past] = torch.randn_like(t[:, :, :past])
        caches.append(c)
    ref = a.layer(1, x, caches[0].mask(None, slots, a.dtype, False), pos, rope,
                  caches[0].view(slots, slice(past, past + q)))
    c = caches[1]
    got = compiled.layer_step(x, ca.weights[1], c.k_layers[1], c.v_layers[1], slots, *rope,
                              c.mask(None, slots, a.dtype, False), **ca.static_args)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.k_layers[1][:, :, : past + q], caches[0].k[1, :, :, : past + q])
    torch.testing.assert_close(c.v_layers[1][:, :, : past + q], caches[0].v[1, :, :, : past + q])
    torch.testing.assert_close(ca.logits(ref[:, -1]), a.logits(ref[:, -1]), rtol=1e-5, atol=1e-5)


def test_inductor_full_matches_generate():
    """compile=True (inductor) is token-identical to model.generate and to eager specee, batch 1 and a padded batch."""
    model = make_tiny("llama")
    for lengths in ([5, 3, 7], [4]):
        ids, mask = left_padded_batch(lengths)
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        eager = specee.generate(model, ids, mask, max_new_tokens=12, do_sample=False)
        got = specee.generate(model, ids, mask, max_new_tokens=12, do_sample=False, compile=True)
        assert torch.equal(eager, ref)
        assert torch.equal(got, ref)


CASES = [
    ("full", None),
    ("skipdecode", dict(min_layers=2)),
    ("confidence", dict(thresholds=0.1)),
    ("confidence", dict(thresholds=0.1, kv_policy="propagate")),
    ("confidence", dict(thresholds=0.1, kv_policy="skip")),
    ("early_exit", "scripted"),
    ("early_exit", "scripted-monotone"),
    ("early_exit", "scheduled"),
    ("early_exit", "scheduled-skip"),
    ("self_speculative", dict(exit_layer=2, num_draft=3, adaptive_k=False)),
    ("self_speculative", dict(verify_cost=1.0)),  # adaptive e and K, priced as on a GPU: drafts from round one
]


def _config(cfg):
    if cfg == "scripted":
        return {"predictor": ScriptedPredictor([2, 1, 3, 4, 2, 3, 1], range(4))}
    if isinstance(cfg, str) and cfg.startswith("scheduled"):  # tests only where this step's rows exit: spans over earlier holes
        script = [[2, 4, 3], [4, 1, 4], [3, 3, 3], [1, 4, 2], [4, 4, 4], [2, 3, 1], [3, 1, 4]]  # per row (3 rows)
        return {"predictor": ScheduledScript(script, range(4)), "kv_policy": "skip" if "skip" in cfg else "deferred"}
    if cfg == "scripted-monotone":
        return {"predictor": ScriptedPredictor([3, 3, 2, 2, 1], range(4)), "kv_policy": "monotone"}
    return cfg


@pytest.mark.parametrize("mode,cfg", CASES, ids=[f"{m}-{c if isinstance(c, str) else i}" for i, (m, c) in enumerate(CASES)])
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sample"])
def test_modes_compiled_match_eager(mode, cfg, do_sample):
    model = make_tiny("llama")
    ids, mask = left_padded_batch([5, 3, 7])
    outs = []
    for compile in (None, BACKEND):
        torch.manual_seed(0)
        outs.append(specee.generate(model, ids, mask, mode=mode, exit_config=_config(cfg), compile=compile,
                                    max_new_tokens=14, do_sample=do_sample, return_dict_in_generate=True))
    eager, comp = outs
    assert torch.equal(comp.sequences, eager.sequences)
    assert torch.equal(comp.exit_layers, eager.exit_layers)
    if mode in ("confidence", "early_exit", "skipdecode") and not do_sample:
        assert comp.exit_layers[comp.exit_layers > 0].float().mean() < model.config.num_hidden_layers  # exits happened
    if not do_sample and mode in ("full", "self_speculative"):  # exact modes
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False)
        assert torch.equal(comp.sequences, ref)


def test_qwen2_biases_and_tied_head_compiled():
    model = make_tiny("qwen2")
    ids, mask = left_padded_batch([6, 2])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    got = specee.generate(model, ids, mask, max_new_tokens=10, do_sample=False, compile=BACKEND)
    assert torch.equal(got, ref)


def test_no_recompiles_after_warmup():
    """A warm-up whose predictor never exits compiles every graph a generation can call, so later generations whose
    exits change every step (deferred fills of varying size, spans of varying length between exit tests), new
    prompt lengths, cache lengths, batch sizes seen before (batch 2 with 2-query fills included: no duck-sized
    guard) and speculative rounds compile nothing. The layer graph serves all layers, a chunk graph all spans."""
    # a shape no other test uses (intermediate_size), so no graph of it exists before this test, in any order
    model = make_tiny("llama", num_hidden_layers=6, intermediate_size=136)
    script = [3, 1, 6, 2, 5, 4, 1, 6, 2, 3]
    never = ScriptedPredictor([7], range(6))  # exit "after layer 7" of 6: never, so no fill during warm-up
    before = graphs()
    compiled.warmup(model, mode="early_exit", exit_config={"predictor": never}, batch_sizes=(1, 3), compile=BACKEND)
    compiled.warmup(model, mode="full", batch_sizes=(1, 3), compile=BACKEND)
    compiled.warmup(model, mode="self_speculative", batch_sizes=(1, 3), compile=BACKEND)
    # per batch class (1, > 1): the layer and the 2- and 4-layer chunks for one query and for several, the whole
    # stack for one; the head for one row and for several (batch > 1 shares that graph): not one per layer
    assert 0 < graphs() - before <= 2 * 7 + 2  # (16 with torch 2.13; another torch may merge some)
    after_warmup = graphs()
    spec = dict(exit_layer=2, num_draft=3, adaptive_k=False)
    for lengths, n in (([5, 3, 7], 17), ([9], 11), ([2, 6], 13), ([2, 6, 4], 9)):
        ids, mask = left_padded_batch(lengths)
        for predictor in (ScriptedPredictor(script, range(6)), ScheduledScript(script, range(6))):
            out = specee.generate(model, ids, mask, mode="early_exit", compile=BACKEND, max_new_tokens=n,
                                  do_sample=False, exit_config={"predictor": predictor}, return_dict_in_generate=True)
            assert len(set(out.exit_layers[0].tolist())) > 3  # the exit layer really changed from step to step
        specee.generate(model, ids, mask, compile=BACKEND, max_new_tokens=n, do_sample=False)
        out = specee.generate(model, ids, mask, mode="self_speculative", exit_config=spec, compile=BACKEND,
                              max_new_tokens=n, do_sample=False, return_dict_in_generate=True)
        assert out.stats["acceptance"]  # drafts were made and verified: several queries per call
    assert graphs() == after_warmup


def test_compile_errors():
    model = make_tiny("llama")
    ids, mask = left_padded_batch([3])
    with pytest.raises(ValueError, match="unknown compile backend"):
        specee.generate(model, ids, mask, max_new_tokens=2, compile="tensorrt")
    with pytest.raises(ValueError, match="reduce-overhead"):
        specee.generate(model, ids, mask, max_new_tokens=2, compile=dict(mode="reduce-overhead"))
    with pytest.raises(TypeError, match="compile must be"):
        specee.generate(model, ids, mask, max_new_tokens=2, compile=3)
    with pytest.raises(ValueError, match="backend='inductor'"):
        specee.generate(model, ids, mask, max_new_tokens=2, compile=dict(backend=BACKEND, options={"cpp_wrapper": True}))
    odd = make_tiny("llama", hidden_act="gelu_new")
    with pytest.raises(ValueError, match="compile=False"):
        specee.generate(odd, ids, mask, max_new_tokens=2, compile=True)
    # the same model decodes eagerly
    assert specee.generate(odd, ids, mask, max_new_tokens=2).shape == (1, ids.shape[1] + 2)


def test_inductor_options_reach_inductor(monkeypatch):
    """compile=dict(options=...) patches inductor's config for specee's graphs (here recorded instead of compiled:
    a real cpp_wrapper build takes minutes), and graphs compiled with other options are kept apart."""
    import torch._inductor.compile_fx as cfx

    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.append(dict(config_patches or {}))
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    model = make_tiny("llama")
    ids, mask = left_padded_batch([4])
    ref = specee.generate(model, ids, mask, max_new_tokens=4, do_sample=False)
    opts = {"cpp_wrapper": True, "fx_graph_cache": False}  # a key no other test compiles with
    out = specee.generate(model, ids, mask, max_new_tokens=4, do_sample=False, compile=dict(options=opts))
    assert torch.equal(out, ref)
    assert seen and all(p == opts for p in seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/GPU_OWED.md C1)")
@pytest.mark.parametrize("mode,cfg", [("full", None), ("early_exit", "scripted"), ("self_speculative", None)])
def test_compiled_on_cuda(mode, cfg):
    model = make_tiny("llama").cuda()
    ids, mask = (t.cuda() for t in left_padded_batch([5, 3, 7]))
    eager = specee.generate(model, ids, mask, mode=mode, exit_config=_config(cfg), max_new_tokens=14, do_sample=False)
    got = specee.generate(model, ids, mask, mode=mode, exit_config=_config(cfg), max_new_tokens=14, do_sample=False,
                          compile=True)
    assert torch.equal(got, eager)


@pytest.mark.parametrize("command", ["demo", "generate"])
def test_cli_compile(command, tiny_model_dir, tmp_path, capsys):
    """--compile warms up first and prints the compile time apart from the decode timings."""
    from specee import cli

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w1 w2 w3", "category": "a"}\n')
    args = ["--prompts", str(prompts)] if command == "demo" else ["--prompt", "w1 w2", "--no-chat"]
    assert cli.main([command, "--model", tiny_model_dir, "--mode", "skipdecode", *args, "--max-new-tokens", "5",
                     "--compile", BACKEND]) == 0
    out = capsys.readouterr().out
    assert "[compile:" in out and "tok/s" in out


def test_bench_and_replay_compiled(tiny_model_dir, tmp_path):
    """`specee bench --compile` runs the modes compiled (fidelity unchanged) and reports the warm-up apart;
    the replay's engine follows its trace exactly when compiled."""
    import json

    from specee import cli
    from specee.replay import TracePolicy, build_model, replay_decode

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w1 w2 w3", "category": "a"}\n{"turns": ["w4 w5 w6 w7"], "category": "b"}\n')
    out = tmp_path / "out"
    assert cli.main(["bench", "--model", tiny_model_dir, "--prompts", str(prompts), "--modes", "full", "confidence",
                     "--max-new-tokens", "5", "--out", str(out), "--compile", BACKEND]) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert doc["compile"]["compile"] == BACKEND and doc["compile"]["warmup_s"] > 0
    assert doc["results"]["batch_1"]["full"]["token_agreement"] == 1.0
    assert doc["results"]["batch_1"]["hf"]["token_agreement"] == 1.0

    model = build_model("tiny", "cpu")
    L, trace = model.config.num_hidden_layers, [5, 8, 2, 7, 8, 3, 6, 1, 4]
    res, _, _ = replay_decode(model, torch.randint(0, 256, (1, 6)), len(trace) + 1, TracePolicy(L, trace, "exit"),
                              compile=BACKEND)
    assert res.exit_layers[0, 1:].tolist() == trace
