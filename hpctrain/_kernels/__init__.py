"""Compiled Cython kernels (built by setup.py from the top-level kernels/ folder)."""
