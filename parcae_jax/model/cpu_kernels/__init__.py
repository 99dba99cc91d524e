"""Fused CPU kernels, compiled on first use for the CPU at hand (see library.py).

attention.cc: causal softmax attention, forward and backward, as XLA FFI custom calls;
attention.py: the JAX wrapper (custom VJP, mesh handling) behind model.attention_impl="cpu".
"""
