"""Sweep files for `python -m parcae_jax.science.sweep` (parcae_jax/science/grid.py)."""
