"""`specee bench --replay`: the shipped traces, rescaling, and a tiny random model whose exits follow a trace exactly."""
import json
import math

import pytest
import torch

from specee import cli
from specee.replay import (SHAPES, TRACES, TracePolicy, build_model, load_trace, replay_decode, rescale,
                           shape_parameters, synthetic_trace, trace_stats)


def test_synthetic_trace_has_specees_published_statistics():
    exits = synthetic_trace(2048, seed=0)
    s = trace_stats(exits, 32)
    assert abs(s["exit_fraction"] - 0.66) < 1e-3
    assert abs(s["mean_exit_layer"] - 25.3) < 1e-3
    assert min(exits) >= 8 and max(exits) == 32
    assert synthetic_trace(2048, seed=0) == exits and synthetic_trace(2048, seed=1) != exits


def test_shipped_traces():
    syn = load_trace("specee_synthetic")
    assert syn["exit_layers"] == synthetic_trace(len(syn["exit_layers"]), seed=syn["source"]["seed"]), \
        "the shipped synthetic trace is what its documented command writes"
    rec = load_trace("smollm2_spec_bench")
    assert rec["num_layers"] == 30 and len(rec["exit_layers"]) >= 256
    assert {"prompts", "prompt_lines", "commit", "max_new_tokens"} <= set(rec["source"])
    assert rec["mean_exit_layer"] == pytest.approx(sum(rec["exit_layers"]) / len(rec["exit_layers"]))
    assert set(TRACES) == {"smollm2_spec_bench", "specee_synthetic"}


def test_rescale_is_proportional_and_keeps_no_exit():
    assert rescale([32, 16, 1, 31], 32, 8) == [8, 4, 1, 8]
    assert rescale([30, 15, 3], 30, 32) == [32, 16, 3]
    assert rescale([5, 6], 8, 8) == [5, 6]
    assert all(1 <= e <= 4 for e in rescale(list(range(1, 33)), 32, 4))


def test_trace_policy_rejects_bad_input():
    with pytest.raises(ValueError, match="schedule"):
        TracePolicy(8, [3], "sometimes")
    with pytest.raises(ValueError, match="1..8"):
        TracePolicy(8, [9], "all")
    with pytest.raises(ValueError, match="shape"):
        build_model("llama-1t")
    assert {"llama2-7b", "tiny"} <= set(SHAPES)


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", "cpu")


@pytest.mark.parametrize("schedule", ["planned", "exit", "all"])
def test_engine_exits_follow_the_trace_exactly(tiny, schedule):
    L = tiny.config.num_hidden_layers
    trace = [5, 8, 2, 7, 8, 3, 6, 1, 4, 8, 7]
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    policy = TracePolicy(L, trace, schedule)
    res, _, _ = replay_decode(tiny, ids, len(trace) + 1, policy)
    assert res.exit_layers[0, 0] == L, "the prefill's token runs every layer"
    assert res.exit_layers[0, 1:].tolist() == trace
    steps = res.stats["steps"]
    # Read-backs: one per token, plus one per tested layer until the exit.
    tested = {"planned": 0, "exit": sum(e < L for e in trace),
              "all": sum(len([l for l in policy.layers if l < e]) for e in trace)}[schedule]
    assert res.stats["host_syncs"] == steps + tested


@pytest.mark.parametrize("schedule", ["exit", "all"])
def test_batch_rows_follow_their_own_part_of_the_trace(tiny, schedule):
    L, T = tiny.config.num_hidden_layers, 7
    trace = [3, 8, 5, 2, 6, 4, 7, 1, 8, 2, 5, 6, 3, 4]
    policy = TracePolicy(L, trace, schedule)
    res, _, _ = replay_decode(tiny, torch.randint(0, 256, (2, 5)), T, policy)
    # row b starts at entry b * max_new_tokens; decode step s is token s + 1
    assert res.exit_layers[0, 1:].tolist() == trace[: T - 1]
    assert res.exit_layers[1, 1:].tolist() == trace[T: 2 * T - 1]


@pytest.mark.parametrize("shape", ["tiny", "host32", "smollm2-135m"])
def test_shape_parameters_count_the_built_model(shape):
    model = build_model(shape, "cpu")
    assert shape_parameters(shape) == sum(p.numel() for p in model.parameters())


def test_bench_replay_says_what_it_builds_before_building(monkeypatch, capsys):
    """A 7B shape on the CPU would build and decode for long in silence: the size and the CPU shapes come first."""
    from specee import replay

    class Built(Exception):
        pass

    def stop(*args, **kwargs):
        raise Built

    monkeypatch.setattr(replay, "build_model", stop)
    with pytest.raises(Built):
        cli.main(["bench", "--replay", "specee_synthetic", "--device", "cpu"])  # default shape: llama2-7b
    out = capsys.readouterr().out
    assert "llama2-7b (6.74B parameters, bfloat16) on cpu" in out and "host32 suit a CPU" in out


def test_bench_replay_cli_on_a_tiny_shape(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["bench", "--replay", "specee_synthetic", "--shape", "tiny", "--device", "cpu",
                     "--max-new-tokens", "8", "--reps", "1", "--out", str(out)]) == 0
    doc = json.loads((out / "replay_specee_synthetic_tiny.json").read_text())
    assert {"torch", "transformers", "commit", "date", "device"} <= set(doc["meta"])
    assert doc["num_layers"] == 8 and doc["trace"]["source_layers"] == 32 and doc["shape"] == "tiny"
    assert set(doc["results"]) == {"full", "planned", "exit", "all"}
    for name, r in doc["results"].items():
        assert r["trace_followed"] is True
        # Timings of an 8-token decode of a tiny model on a shared CPU are noise-sized (a per-token time is a
        # difference of two runs and can come out negative): only finite is asserted of them.
        for k in ("ms_per_token", "speedup_vs_full", "ideal_speedup", "fraction_of_ideal"):
            assert math.isfinite(r[k]), (name, k)
        assert r["host_syncs_per_token"] > 0
        assert 1 <= r["mean_exit_layer"] <= 8
        if doc["layer_ms"] > 0:
            assert r["ideal_speedup"] >= 1.0
    assert doc["results"]["full"]["ideal_speedup"] == 1.0
    assert doc["results"]["planned"]["host_syncs_per_token"] == 1.0, "a planned depth reads back once per token"
    assert doc["results"]["planned"]["layer_syncs_per_token"] == 0.0
    assert doc["results"]["all"]["host_syncs_per_token"] > doc["results"]["exit"]["host_syncs_per_token"]
    assert math.isfinite(doc["layer_ms"]) and doc["head_ms"] > 0
    assert "schedule" in capsys.readouterr().out


def test_replay_needs_an_existing_trace(tmp_path):
    assert cli.main(["bench", "--replay", str(tmp_path / "nope.json"), "--shape", "tiny", "--device", "cpu"]) == 2


def test_replay_with_lookahead_follows_the_trace():
    from specee.replay import TracePolicy, build_model, replay_decode

    model = build_model("tiny", "cpu")
    L, trace = model.config.num_hidden_layers, [5, 8, 2, 7, 8, 3, 6, 1, 4]
    res, _, _ = replay_decode(model, torch.randint(0, 256, (1, 6)), len(trace) + 1, TracePolicy(L, trace, "all"),
                              lookahead=True)
    assert res.exit_layers[0, 1:].tolist() == trace
    assert res.stats["lookahead_layers"] == sum(e < L for e in trace)  # one extra layer per early exit
