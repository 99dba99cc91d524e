"""ml_collections configs: each file's `get_config(arg)` starts from `parcae_jax.training.defaults`
(every key with its default) and changes what differs.

The package installs this folder as `parcae_jax.configs` (pyproject.toml), so `--config=NAME`
finds a shipped config from any folder; in a checkout, `--config=configs/NAME.py` is the file.
"""
