"""Fused CPU kernels, compiled on first use for the CPU at hand into one library (library.py).

attention.cc: causal softmax attention, forward and backward, as XLA FFI custom calls;
attention.py: the JAX wrapper (custom VJP, mesh handling) behind model.attention_impl="cpu".
transpose.cc / transpose.py: the bf16 copies matmul.py's weight gradients read.
head_xent.cc / head_xent.py: the LM head's softmax cross-entropy and its logits' gradient,
behind model.loss_impl="cpu" (model/xent.py).
adamw.cc: AdamW's update with the train step's non-finite guard (training/fused_adamw.py
holds its wrapper: the optimizer is training's, the build is here with the other kernels).
"""
