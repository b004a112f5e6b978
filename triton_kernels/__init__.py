"""Triton kernels of specee, installed as specee.triton_kernels."""
