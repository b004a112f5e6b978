"""specee: early-exit and self-speculative decoding for Llama-family models."""
