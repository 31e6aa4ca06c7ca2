"""Fused kernels of the PPO update, installed as ``vlarl_fast.kernels``.

``action_logprobs`` and ``gae`` keep the public contracts their docstrings state; each has a readable
reference beside it that the tests compare against. Both pick their implementation by device:
Triton kernels for CUDA tensors, chunked / scanned torch code on the CPU; ``backend=`` forces one.
Triton is imported only when a Triton path is used, so ``TRITON_INTERPRET=1`` can still be set
after ``import vlarl_fast.kernels`` and before the first Triton call.
"""
from ._errors import NonFiniteError
from .action_logprobs import action_logprobs, action_logprobs_naive, action_logprobs_reference
from .gae import gae, gae_reference, gae_stepwise

__all__ = ["NonFiniteError", "action_logprobs", "action_logprobs_reference", "action_logprobs_naive",
           "gae", "gae_reference", "gae_stepwise"]
