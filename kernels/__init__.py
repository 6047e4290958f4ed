"""Triton kernels for SLiM layers."""
