"""Inference: the per-recurrence KV cache layout (cache_slots.py); generation and the
evaluation adapter build on it."""
