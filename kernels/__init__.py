"""Fused kernels of the PPO update, installed as ``vlarl_fast.kernels``.

``action_logprobs`` and ``gae`` keep the contracts of DESIGN.md §4; each has a readable
reference beside it that the tests compare against.
"""
from .action_logprobs import action_logprobs
from .gae import gae, gae_reference

__all__ = ["action_logprobs", "gae", "gae_reference"]
