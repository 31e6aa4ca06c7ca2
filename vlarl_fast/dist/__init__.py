"""Data-parallel RL over several processes, GPUs and nodes (docs/distributed.md)."""
from .comm import SINGLE, Comm

__all__ = ["SINGLE", "Comm"]
