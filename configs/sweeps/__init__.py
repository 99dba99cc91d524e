"""Sweep files for `python -m parcae_jax.commands.sweep` (parcae_jax/science/grid.py)."""
