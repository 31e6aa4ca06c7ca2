"""iRe-VLA's online data: the successful episodes the policy itself produced during RL.

Each environment slot of the rollout keeps its current episode (image, proprio state, the 7
sampled action tokens, instruction); when the episode ends in success it joins the dataset,
otherwise it is dropped. The dataset is bounded in steps: the oldest episodes leave first, so
the supervised stage learns from what the recent policy can do.
"""
from __future__ import annotations

from collections import deque

import numpy as np


class SuccessfulEpisodes:
    def __init__(self, num_envs: int, capacity_steps: int = 30_000):
        if capacity_steps <= 0:
            raise ValueError(f"capacity_steps must be > 0; got {capacity_steps}")
        self.capacity_steps = capacity_steps
        self._open: list[list[tuple]] = [[] for _ in range(num_envs)]
        self.episodes: deque[dict] = deque()
        self.steps = 0
        self.kept = 0        # successful episodes ever kept (including ones since evicted)

    def record(self, images: np.ndarray, states: np.ndarray, tokens: np.ndarray, instructions: list[str],
               slots=None) -> None:
        """One rollout step of every slot (or of ``slots``, the envs that stepped): the observation the action
        was chosen from, and its tokens."""
        slots = range(len(self._open)) if slots is None else [int(i) for i in slots]
        if len(instructions) != len(slots):
            raise ValueError(f"expected {len(slots)} slots, got {len(instructions)}")
        # one copy per step: the vector env may reuse its observation buffers
        images, states, tokens = np.array(images), np.array(states), np.array(tokens)
        for j, i in enumerate(slots):
            self._open[i].append((images[j], states[j], tokens[j], instructions[j]))

    def end(self, slot: int, success: bool) -> None:
        """The episode in ``slot`` finished (its last step was recorded already)."""
        steps, self._open[slot] = self._open[slot], []
        if not success or not steps:
            return
        self.add({
            "images": np.stack([s[0] for s in steps]), "states": np.stack([s[1] for s in steps]).astype(np.float32),
            "tokens": np.stack([s[2] for s in steps]).astype(np.int64), "instruction": steps[0][3]})

    def add(self, episode: dict) -> None:
        """Keep a finished successful episode (this rank's, or another rank's in a data-parallel run)."""
        self.episodes.append(episode)
        self.steps += len(episode["tokens"])
        self.kept += 1
        while self.steps > self.capacity_steps and len(self.episodes) > 1:
            self.steps -= len(self.episodes.popleft()["tokens"])

    def state_dict(self) -> dict:
        return {"open": [list(slot) for slot in self._open], "episodes": list(self.episodes), "steps": self.steps,
                "kept": self.kept}

    def load_state_dict(self, state: dict) -> None:
        if len(state["open"]) != len(self._open):
            raise ValueError(f"saved episodes of {len(state['open'])} env slots for {len(self._open)}")
        self._open = [list(slot) for slot in state["open"]]
        self.episodes = deque(state["episodes"])
        self.steps, self.kept = state["steps"], state["kept"]

    def arrays(self) -> dict | None:
        """Flat per-step arrays (images, states, tokens, instructions), or None while empty."""
        if not self.episodes:
            return None
        eps = list(self.episodes)
        return {"images": np.concatenate([e["images"] for e in eps]),
                "states": np.concatenate([e["states"] for e in eps]),
                "tokens": np.concatenate([e["tokens"] for e in eps]),
                "instructions": [e["instruction"] for e in eps for _ in range(len(e["tokens"]))]}
