"""Benchmarks, each printing one JSON object: the train step (`--mode=bench`, step.py) and
the input pipeline (`python -m parcae_jax.commands.bench_data`, data.py). They sit above the trainer
and the data package, so both may be imported here without running against the layering."""

from parcae_jax.bench.step import bench, compile_only

__all__ = ["bench", "compile_only"]
