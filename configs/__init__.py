"""ml_collections configs: each file's `get_config(arg)` builds on `configs/base.py`."""
