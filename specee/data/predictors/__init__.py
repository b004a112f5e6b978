"""The predictor bank shipped for the default model (SmolLM2-135M-Instruct), loaded by
``specee.predictors.load_predictors(None, model)``. Reproduce it with the command in
``predictors.json`` ("metrics" -> "command")."""
