"""Configuration of `vlarl-fast prm` (tyro turns the field docstrings into its --help)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import EnvConfig
from .labels import LabelConfig
from .segment import SegmentConfig


@dataclass
class PRMDataConfig:
    expert_episodes: int = 60
    """Scripted-expert episodes per task (tabletop), failures kept, dealt over --data.expert-noise."""
    expert_noise: tuple[float, ...] = (0.1, 0.5, 1.0)
    """Motion noise levels of the expert's episodes: large noise makes it fail, which gives negatives that look
    like progress."""
    layouts: int = 300
    """The expert's episodes are dealt over the first N layouts of each task's training stream (its fixed
    initial states first; the held-out layouts never)."""
    policy: str | None = None
    """A policy checkpoint whose own rollouts (failures too) join the data: on the tabletop, one episode per layout
    of the open training stream; on LIBERO (where it is required), episodes dealt over the fixed initial states."""
    policy_episodes: int = 60
    """Rollouts of --data.policy per task."""
    temperature: float = 1.0
    """Sampling temperature of the --data.policy rollouts."""
    episodes: str | None = None
    """A directory of saved episode files (*.npz with images, states, actions, instruction, success; see
    vlarl_fast.prm.episodes) added to the rest."""
    val_fraction: float = 0.2
    """Share of episodes (of successes and of failures alike) held out to measure the reward model."""


@dataclass
class PRMModelConfig:
    backbone: str = "tiny"
    """The reward model's backbone: 'tiny' (a fresh tiny VLA), or a checkpoint directory (a vlarl-fast policy,
    such as a run's checkpoints/sft, an OpenVLA or a transformers VLM checkpoint) it starts from."""
    hidden_size: int = 64
    """LM width of a 'tiny' backbone."""
    num_layers: int = 2
    """LM depth of a 'tiny' backbone."""
    lora_rank: int = 0
    """Train LoRA adapters of this rank on the language model (and the head) instead of the whole backbone: for
    OpenVLA-sized checkpoints (0: train every weight)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' dtype of an OpenVLA or transformers backbone ('auto': bfloat16 on CUDA, float32 on the CPU)."""
    question: str = "The task is {instruction}, is it completed?"
    """The question asked of every frame (VLA-RL's wording)."""


@dataclass
class PRMTrainConfig:
    epochs: int = 4
    """Passes over the labelled training frames."""
    batch_size: int = 64
    """Frames per gradient step."""
    learning_rate: float = 1e-3
    """AdamW learning rate (after a linear warm-up, cosine decay to 10%)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""


@dataclass
class PRMConfig:
    """Train a robotic process reward model (VLA-RL): collect trajectories, segment them at gripper events and
    rest points, pseudo-label every frame, and fit a VLM to answer "is it completed?"; `vlarl-fast train
    --reward.prm OUTPUT_DIR` then uses it."""

    output_dir: str = "runs/prm"
    """Where episodes/, labels.json, plots/, reward_model/, summary.json and tb/ go."""
    seed: int = 0
    """Seed for every RNG."""
    device: str = "cpu"
    """Torch device."""
    threads: int = 0
    """Torch CPU threads (0: library default)."""
    config: str | None = None
    """JSON/YAML file of overrides applied before the command line."""
    preset: str | None = None
    """Named preset ('default', 'smoke')."""
    env: EnvConfig = field(default_factory=EnvConfig)
    data: PRMDataConfig = field(default_factory=PRMDataConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    model: PRMModelConfig = field(default_factory=PRMModelConfig)
    train: PRMTrainConfig = field(default_factory=PRMTrainConfig)
    plots: int = 6
    """Episodes drawn with their labels and scores in plots/ (0: none)."""
    save_episodes: bool = True
    """Keep the collected episodes in OUTPUT_DIR/episodes (reusable with --data.episodes)."""
    tensorboard: bool = True
    """Write TensorBoard event files to output_dir/tb."""
    progress: bool = True
    """Show progress bars."""


PRM_PRESETS: dict[str, dict] = {
    "default": {},
    # seconds: a few episodes of one task, one pass
    "smoke": {"env": {"num_envs": 4, "tasks": ["tabletop/reach_red"]},
              "data": {"expert_episodes": 6, "expert_noise": [0.1, 1.5], "layouts": 30, "policy": "tiny",
                       "policy_episodes": 3},
              "model": {"hidden_size": 32, "num_layers": 1},
              "train": {"epochs": 1, "batch_size": 16},
              "plots": 2},
}
