"""`specee bench` end to end on a tiny random model: schema, plots, finite numbers, fidelity of full."""
import json
import math

import pytest
import torch

from specee import cli


def test_specee_bench_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w1 w2 w3", "category": "a"}\n{"turns": ["w4 w5 w6 w7"], "category": "b"}\n')
    out = tmp_path / "out"
    assert cli.main(["bench", "--model", tiny_model_dir, "--prompts", str(prompts), "--modes", "full", "skipdecode",
                     "confidence", "self_speculative", "--batch-sizes", "1", "2", "--max-new-tokens", "6",
                     "--out", str(out)]) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert {"torch", "transformers", "commit", "date", "device"} <= set(doc["meta"])
    assert set(doc["results"]) == {"batch_1", "batch_2"}
    for rows in doc["results"].values():
        assert set(rows) == {"hf", "full", "skipdecode", "confidence", "self_speculative"}
        assert rows["full"]["token_agreement"] == 1.0 and rows["full"]["exact_match"] == 1.0
        assert rows["hf"]["token_agreement"] == 1.0, "full is token-identical to HF generate"
        assert rows["self_speculative"]["exact_match"] == 1.0, "greedy self-speculation is exact"
        for r in rows.values():
            assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
            assert sum(r["exit_histogram"]) == r["tokens"]
            assert 0 < r["mean_exit_layer"] <= doc["num_layers"]
    b1 = doc["results"]["batch_1"]
    assert set(b1["full"]["tokens_per_s_by_category"]) == {"a", "b"}
    assert b1["full"]["latency_ms"]["p50"] <= b1["full"]["latency_ms"]["p99"]
    assert b1["full"]["ttft_ms"] > 0
    assert 1 <= doc["oracle"]["mean_exit_layer"] <= doc["num_layers"]
    assert (out / "bench_modes.png").stat().st_size > 0 and (out / "bench_batch.png").stat().st_size > 0
    assert "oracle" in capsys.readouterr().out


def test_specee_bench_runs_every_mode_and_early_exit_with_a_bank(tiny_model_dir, tmp_path, capsys):
    """By default `specee bench` runs every mode; early_exit needs a bank for the model: --predictors gives one,
    without it early_exit is left out with the reason (and asking for it by name is an error that says why)."""
    from transformers import AutoModelForCausalLM

    from specee.drafts import NGramSource
    from specee.predictors import PredictorBank, _head_sample, model_fingerprint

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w1 w2 w3", "category": "a"}\n')
    common = ["bench", "--model", tiny_model_dir, "--prompts", str(prompts), "--max-new-tokens", "5"]
    assert cli.main([*common, "--out", str(tmp_path / "all")]) == 0
    doc = json.loads((tmp_path / "all" / "bench.json").read_text())
    assert set(doc["results"]["batch_1"]) == {"hf", "full", "skipdecode", "confidence", "self_speculative"}
    assert "specee train" in doc["modes_skipped"]["early_exit"]
    assert cli.main([*common, "--modes", "early_exit", "--out", str(tmp_path / "x")]) == 2
    assert "--mode that needs no predictors" in capsys.readouterr().err

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    L, k, hidden = model.config.num_hidden_layers, 4, 16
    weights = {l: (torch.zeros(hidden, 3 * k), torch.zeros(hidden), torch.zeros(hidden), torch.zeros(1))
               for l in range(1, L - 1)}  # score 0.5 everywhere: never above threshold 0.9, so early_exit == full
    PredictorBank(weights, 0.9, NGramSource(k), fingerprint=model_fingerprint(model),
                  head_sample=_head_sample(model)).save(tmp_path / "bank")
    assert cli.main([*common, "--modes", "early_exit", "--predictors", str(tmp_path / "bank"),
                     "--out", str(tmp_path / "ee")]) == 0
    row = json.loads((tmp_path / "ee" / "bench.json").read_text())["results"]["batch_1"]["early_exit"]
    assert row["exact_match"] == 1.0 and row["exit_config"]["predictor"].startswith("PredictorBank(")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
@pytest.mark.parametrize("command", ["bench", "generate", "demo"])
def test_device_without_cuda_is_refused_with_the_fix(tiny_model_dir, command, capsys):
    args = ["--prompt", "w1"] if command == "generate" else []
    assert cli.main([command, "--model", tiny_model_dir, "--device", "cuda", "--max-new-tokens", "2", *args]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (bench/GPU_OWED.md E4)"))])
def test_cli_decodes_on_the_device_and_dtype_asked(tiny_model_dir, tmp_path, device, capsys):
    """--device/--dtype move the model (and the prompts) for generate, demo and bench; full stays exact there."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w1 w2 w3", "category": "a"}\n')
    common = ["--model", tiny_model_dir, "--device", device, "--dtype", "bfloat16", "--max-new-tokens", "4"]
    assert cli.main(["generate", *common, "--prompt", "w1 w2", "--no-chat", "--mode", "skipdecode"]) == 0
    assert cli.main(["demo", *common, "--prompts", str(prompts), "--mode", "confidence"]) == 0
    from specee.demo import load_model

    model = load_model(tiny_model_dir, device, "bfloat16")[0]
    assert model.dtype == torch.bfloat16 and model.device.type == device
    out = tmp_path / "out"
    fp32 = [a if a != "bfloat16" else "float32" for a in common]
    assert cli.main(["bench", *fp32, "--prompts", str(prompts), "--modes", "full", "--out", str(out)]) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert doc["results"]["batch_1"]["hf"]["token_agreement"] == 1.0, "full equals HF generate on the device"
    if device == "cuda":
        assert "CPU" not in doc["meta"]["device"]
        assert cli.main(["generate", *common, "--prompt", "w1 w2", "--no-chat", "--cuda-graphs"]) == 0


def test_missing_peers_are_skipped_with_a_reason(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w1 w2 w3", "category": "a"}\n')
    out = tmp_path / "out"
    assert cli.main(["bench", "--model", tiny_model_dir, "--prompts", str(prompts), "--modes", "full",
                     "--max-new-tokens", "4", "--peers", "llama_cpp", "--out", str(out)]) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert "default model" in doc["peers_skipped"]["llama_cpp"], "llama.cpp runs only the default model's GGUF"
    assert set(doc["results"]["batch_1"]) == {"hf", "full"}
    assert "skipping peer llama_cpp" in capsys.readouterr().out


@pytest.mark.slow
def test_hf_static_compiled_equals_generate_and_shares_one_graph(tiny_llama):
    """transformers' compiled static-cache decode (a peer) is token-identical to eager generate; compiles once
    (minutes on a loaded CPU, hence slow)."""
    from specee.bench import hf_static_compiled

    tiny_llama.generation_config.pad_token_id = 0
    fn = hf_static_compiled(tiny_llama, max_cache_len=64)
    for P in (5, 9):
        ids = torch.randint(3, 211, (1, P), generator=torch.Generator().manual_seed(P))
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        assert torch.equal(fn(ids, **kw), tiny_llama.generate(ids, **kw))


def test_report_renders_every_result_file():
    """bench/report.py turns every committed bench/results/*.json into a table (or a pointer), without errors."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "bench"
    spec = importlib.util.spec_from_file_location("bench_report", root / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    text = report.render()
    for path in (root / "results").glob("*.json"):
        assert path.name in text
    for heading in ("### bench_cpu.json", "### replay_smollm2_spec_bench", "### predictors_cpu.json"):
        assert heading in text, "rendered as a table, not only listed"
