"""OpenVLA's action-token layout: 7 dimensions x 256 uniform bins on [-1, 1].

Bins are the 256 edges ``linspace(-1, 1, 256)``; an action value is discretised with
``digitize`` to 1..256 and becomes token ``vocab_size - digitized``, i.e. the last 256 ids of the
vocabulary. Decoding reads the 255 bin centres, clamping index 255 to the last centre. This is
exactly OpenVLA's ``ActionTokenizer`` (including its 255-centre quirk), so checkpoints trained
with it decode identically here.

Normalised actions in [-1, 1] are mapped to the environment's units with per-dimension q01/q99
statistics (``NormStats``), as OpenVLA's ``unnormalize_actions`` does; dimensions whose
``mask`` is False (the gripper) pass through unchanged. The policy's action convention
(``action_convention.py``) then maps them to the env's own (OpenVLA-LIBERO's gripper, for one).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

N_BINS = 256
ACTION_DIM = 7


class ActionTokenizer:
    def __init__(self, vocab_size: int, n_bins: int = N_BINS, min_action: float = -1.0, max_action: float = 1.0):
        if vocab_size <= n_bins:
            raise ValueError(f"vocab_size ({vocab_size}) must exceed the number of action bins ({n_bins})")
        self.vocab_size = vocab_size
        self.n_bins = n_bins
        self.bins = np.linspace(min_action, max_action, n_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0
        self._centers_t: dict[torch.device, torch.Tensor] = {}

    @property
    def vocab_start(self) -> int:
        """First id of the action slice (the slice is [vocab_start, vocab_size))."""
        return self.vocab_size - self.n_bins

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """Normalised actions [..., D] in [-1, 1] -> token ids [..., D] (int64)."""
        a = np.clip(np.asarray(actions, dtype=np.float64), self.bins[0], self.bins[-1])
        return (self.vocab_size - np.digitize(a, self.bins)).astype(np.int64)

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        idx = np.clip(self.vocab_size - np.asarray(token_ids) - 1, 0, self.bin_centers.shape[0] - 1)
        return self.bin_centers[idx].astype(np.float32)

    def decode_torch(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Batched decode on the tokens' device (no host round trip)."""
        dev = token_ids.device
        if dev not in self._centers_t:
            self._centers_t[dev] = torch.as_tensor(self.bin_centers, dtype=torch.float32, device=dev)
        centers = self._centers_t[dev]
        idx = (self.vocab_size - token_ids.long() - 1).clamp(0, centers.shape[0] - 1)
        return centers[idx]


@dataclass
class NormStats:
    """Per-dimension q01/q99 action statistics (OpenVLA's dataset_statistics 'action' entry)."""

    q01: list[float]
    q99: list[float]
    mask: list[bool] = field(default_factory=lambda: [True] * (ACTION_DIM - 1) + [False])
    mean: list[float] | None = None
    std: list[float] | None = None

    @classmethod
    def from_actions(cls, actions: np.ndarray) -> "NormStats":
        actions = np.asarray(actions, dtype=np.float64).reshape(-1, ACTION_DIM)
        if len(actions) == 0:
            raise ValueError("cannot compute action statistics from zero actions")
        q01 = np.quantile(actions, 0.01, axis=0)
        q99 = np.quantile(actions, 0.99, axis=0)
        # A constant dimension (e.g. unused roll) would divide by zero when normalising.
        span = q99 - q01
        q99 = np.where(span < 1e-6, q01 + 1e-6, q99)
        mask = [True] * (ACTION_DIM - 1) + [False]
        return cls(q01=q01.tolist(), q99=q99.tolist(), mask=mask,
                   mean=actions.mean(0).tolist(), std=actions.std(0).tolist())

    @classmethod
    def identity(cls) -> "NormStats":
        """Statistics that leave actions as they are (q01 = -1, q99 = 1): for envs whose action space is
        already [-1, 1] and a policy that has seen no demonstrations."""
        return cls(q01=[-1.0] * ACTION_DIM, q99=[1.0] * ACTION_DIM)

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        a = np.asarray(actions, dtype=np.float64)
        q01, q99, mask = np.array(self.q01), np.array(self.q99), np.array(self.mask)
        norm = np.clip(2.0 * (a - q01) / (q99 - q01) - 1.0, -1.0, 1.0)
        return np.where(mask, norm, np.clip(a, -1.0, 1.0)).astype(np.float32)

    def unnormalize(self, actions):
        """[-1, 1] -> env units; works on numpy arrays and torch tensors."""
        if isinstance(actions, torch.Tensor):
            kw = dict(dtype=actions.dtype, device=actions.device)
            q01, q99 = torch.tensor(self.q01, **kw), torch.tensor(self.q99, **kw)
            mask = torch.tensor(self.mask, device=actions.device)
            return torch.where(mask, 0.5 * (actions + 1.0) * (q99 - q01) + q01, actions)
        a = np.asarray(actions, dtype=np.float64)
        q01, q99, mask = np.array(self.q01), np.array(self.q99), np.array(self.mask)
        return np.where(mask, 0.5 * (a + 1.0) * (q99 - q01) + q01, a).astype(np.float32)

    def save(self, path: Path, dataset: str = "tabletop") -> None:
        # OpenVLA's dataset_statistics.json shape: {dataset: {"action": {...}}}
        Path(path).write_text(json.dumps({dataset: {"action": asdict(self)}}, indent=2))

    @classmethod
    def load(cls, path: Path, dataset: str | None = None) -> "NormStats":
        data = json.loads(Path(path).read_text())
        if dataset is None:
            if len(data) != 1:
                raise ValueError(f"{path} holds statistics for {sorted(data)}; choose one with unnorm_key")
            dataset = next(iter(data))
        if dataset not in data:
            raise ValueError(f"no statistics for {dataset!r} in {path}; available: {sorted(data)}")
        a = data[dataset]["action"]
        return cls(q01=a["q01"], q99=a["q99"], mask=a.get("mask", [True] * (ACTION_DIM - 1) + [False]),
                   mean=a.get("mean"), std=a.get("std"))
