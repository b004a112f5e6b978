"""compile=dict(graphs=...): compiled layers replayed as captured graphs over persistent buffers.

On the CPU ``graphs="host"`` replays the captured closures instead of CUDA graphs: what it checks is the
discipline a CUDA graph depends on (every input reaches the captured code through the persistent buffers, the
KV cache keeps its addresses across generations, outputs survive later replays). Every mode must produce the
tokens and exit layers of eager specee and of compiled specee without graphs."""
import pytest
import torch
from torch._dynamo.utils import counters

import specee
from specee import compiled, graphs

from conftest import left_padded_batch, make_tiny
from test_compile import CASES, _config

HOST = dict(backend="aot_eager", graphs="host")


def _generate(model, ids, mask, compile, mode="full", cfg=None, n=14, do_sample=False):
    torch.manual_seed(0)
    return specee.generate(model, ids, mask, mode=mode, exit_config=_config(cfg), compile=compile, max_new_tokens=n,
                           do_sample=do_sample, return_dict_in_generate=True)


@pytest.mark.parametrize("mode,cfg", CASES, ids=[f"{m}-{c if isinstance(c, str) else i}" for i, (m, c) in enumerate(CASES)])
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sample"])
def test_modes_graphed_match_eager_and_compiled(mode, cfg, do_sample):
    model = make_tiny("llama")
    ids, mask = left_padded_batch([5, 3, 7])
    eager, comp, graphed = (_generate(model, ids, mask, c, mode, cfg, do_sample=do_sample)
                            for c in (None, "aot_eager", HOST))
    assert torch.equal(graphed.sequences, eager.sequences)
    assert torch.equal(graphed.sequences, comp.sequences)
    assert torch.equal(graphed.exit_layers, eager.exit_layers)
    stats = graphs.graph_stats(model)
    assert stats["captures"] > 0 and stats["replays"] > stats["captures"]
    if not do_sample and mode in ("full", "self_speculative"):
        assert torch.equal(graphed.sequences, model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False))


def test_persistent_buffers_and_graphs_are_reused():
    """Generations that fit the slot bucket reuse the cache buffers and every graph; a new batch size or a longer
    generation replaces them, and decoding stays exact."""
    model = make_tiny("llama")
    first = _generate(model, *left_padded_batch([5, 3, 7]), HOST)
    p = model._specee_graphs
    captured = graphs.graph_stats(model)["captures"]
    for lengths, n in (([2, 6, 4], 9), ([8, 1, 3], 20)):
        ids, mask = left_padded_batch(lengths, seed=len(lengths) + n)
        out = _generate(model, ids, mask, HOST, n=n)
        assert torch.equal(out.sequences, model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False))
    assert model._specee_graphs is p and graphs.graph_stats(model)["captures"] == captured
    assert first.sequences.shape[0] == 3
    for lengths, n in (([4], 10), ([4], graphs.SLOT_BUCKET)):  # a new batch size; then a longer cache
        ids, mask = left_padded_batch(lengths)
        out = _generate(model, ids, mask, HOST, n=n)
        assert torch.equal(out.sequences, model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False))
        stats = graphs.graph_stats(model)
        assert stats["batch"] == 1 and stats["slots"] == graphs.SLOT_BUCKET * (1 + (n > 10)) + graphs.MAX_GRAPH_QUERIES
    graphs.release(model)
    assert graphs.graph_stats(model)["captures"] == 0


def test_stale_buffers_are_caught():
    """The host replay really reads the buffers: a fill that skips re-copies (a CUDA-graph bug) changes the output."""
    model = make_tiny("llama")
    ids, mask = left_padded_batch([5, 3, 7])
    ref = _generate(model, ids, mask, None).sequences

    def copy_once(self, **inputs):
        for name, t in inputs.items():
            if name not in self.sources:
                getattr(self, name).copy_(t)
                compiled.changed(self.sources, name, t)

    mp = pytest.MonkeyPatch()
    mp.setattr(graphs._Step, "fill", copy_once)
    try:
        assert not torch.equal(_generate(model, ids, mask, HOST).sequences, ref)
    finally:
        mp.undo()
    assert torch.equal(_generate(model, ids, mask, HOST).sequences, ref)


def test_no_recompiles_or_recaptures_after_warmup():
    """A warm-up whose predictor never exits compiles and captures every graph: later exits that change every step
    (deferred fills of every size), speculative rounds and new prompt lengths compile no graph and capture none."""
    from conftest import ScriptedPredictor

    model = make_tiny("llama", num_hidden_layers=6)
    script = [3, 1, 6, 2, 5, 4, 1, 6, 2, 3]

    def cfg(script):
        return {"predictor": ScriptedPredictor(script, range(6))}

    compiled.warmup(model, mode="early_exit", exit_config=cfg([7]), batch_sizes=(3,), compile=HOST, max_new_tokens=12)
    compiled.warmup(model, mode="full", batch_sizes=(3,), compile=HOST)
    stats = graphs.graph_stats(model)
    assert stats["queries"] == list(range(1, graphs.MAX_GRAPH_QUERIES + 1))  # captured though nothing exited
    before, captured = counters["stats"]["unique_graphs"], stats["captures"]
    for lengths, n in (([5, 3, 7], 17), ([2, 6, 4], 9)):
        ids, mask = left_padded_batch(lengths)
        torch.manual_seed(0)
        out = specee.generate(model, ids, mask, mode="early_exit", compile=HOST, max_new_tokens=n, do_sample=False,
                              exit_config=cfg(script), return_dict_in_generate=True)
        assert len(set(out.exit_layers[0].tolist())) > 3  # the exit layer really changed from step to step
        specee.generate(model, ids, mask, compile=HOST, max_new_tokens=n, do_sample=False)
        specee.generate(model, ids, mask, mode="self_speculative", compile=HOST, max_new_tokens=n, do_sample=False,
                        exit_config=dict(exit_layer=2, num_draft=3, adaptive_k=False))
    assert counters["stats"]["unique_graphs"] == before
    assert graphs.graph_stats(model)["captures"] == captured
    assert graphs.graph_stats(model)["replays"] > 0


def test_graph_option_errors():
    model = make_tiny("llama")
    ids, mask = left_padded_batch([3])
    with pytest.raises(ValueError, match="CUDA graphs, but the model is on cpu"):
        specee.generate(model, ids, mask, max_new_tokens=2, compile=dict(graphs=True))
    with pytest.raises(ValueError, match="graphs='yes'"):
        specee.generate(model, ids, mask, max_new_tokens=2, compile=dict(graphs="yes"))


def test_cli_cuda_graphs(tiny_model_dir, capsys):
    from specee import cli

    args = cli.build_parser().parse_args(["generate", "--prompt", "w1", "--cuda-graphs", "--compile", "aot_eager"])
    assert cli._compile_option(args) == dict(backend="aot_eager", graphs=True)
    args = cli.build_parser().parse_args(["bench", "--cuda-graphs"])
    assert cli._compile_option(args) == dict(backend="inductor", graphs=True)
    assert cli.main(["generate", "--model", tiny_model_dir, "--prompt", "w1 w2", "--no-chat", "--max-new-tokens", "3",
                     "--cuda-graphs"]) == 2
    assert "add --device cuda" in capsys.readouterr().err  # generate decodes on the CPU unless told otherwise
    if not torch.cuda.is_available():  # --replay defaults to cuda only where there is one
        assert cli.main(["bench", "--replay", "specee_synthetic", "--shape", "tiny", "--cuda-graphs"]) == 2
        assert "decodes on cpu: add --device cuda" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/GPU_OWED.md C4)")
@pytest.mark.parametrize("mode,cfg", [("full", None), ("early_exit", "scripted"), ("confidence", dict(thresholds=0.1)),
                                      ("self_speculative", None)])
def test_cuda_graphs_match_compiled(mode, cfg):
    model = make_tiny("llama").cuda()
    ids, mask = (t.cuda() for t in left_padded_batch([5, 3, 7]))
    comp = _generate(model, ids, mask, True, mode, cfg)
    for _ in range(2):  # the second generation replays the graphs captured by the first
        got = _generate(model, ids, mask, dict(graphs=True), mode, cfg)
        assert torch.equal(got.sequences, comp.sequences)
        assert torch.equal(got.exit_layers, comp.exit_layers)
    assert graphs.graph_stats(model)["replays"] > graphs.graph_stats(model)["captures"] > 0


def test_replay_follows_its_trace_through_graphs():
    """`specee bench --replay --cuda-graphs`'s engine: exits from a trace, every evaluated layer a graph replay."""
    from specee.replay import TracePolicy, build_model, replay_decode

    model = build_model("tiny", "cpu")
    L, trace = model.config.num_hidden_layers, [5, 8, 2, 7, 8, 3, 6, 1, 4]
    for schedule in ("planned", "all"):
        res, _, _ = replay_decode(model, torch.randint(0, 256, (1, 6)), len(trace) + 1,
                                  TracePolicy(L, trace, schedule), compile=HOST)
        assert res.exit_layers[0, 1:].tolist() == trace
    assert graphs.graph_stats(model)["replays"] > len(trace)


def test_warmup_captures_for_the_length_to_come():
    """warmup(max_length=...) sizes the persistent cache for later generations while decoding a few dummy tokens."""
    model = make_tiny("llama")
    compiled.warmup(model, mode="full", compile=HOST, max_length=300)
    stats = graphs.graph_stats(model)
    assert stats["slots"] == 2 * graphs.SLOT_BUCKET + graphs.MAX_GRAPH_QUERIES and stats["captures"] > 0
    ids, mask = left_padded_batch([6])
    out = _generate(model, ids, mask, HOST, n=280)
    assert graphs.graph_stats(model)["captures"] == stats["captures"]
    assert torch.equal(out.sequences, model.generate(ids, attention_mask=mask, max_new_tokens=280, do_sample=False))
