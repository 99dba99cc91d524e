"""Benchmarks, each printing one JSON object: the train step (`--mode=bench`, step.py), the
input pipeline (`python -m parcae_jax.commands.bench_data`, data.py), decoding (decode.py),
the lm-eval adapter (harness.py) and the memory table (memory_table.py). They sit above the
trainer and the data package. Nothing is imported here: the data benchmark's worker
processes re-import their command, and must not pay for JAX and the trainer."""
