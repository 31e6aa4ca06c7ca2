"""The robotic process reward model (VLA-RL): segmentation, pseudo labels, the model, and its RL shaping."""
from .labels import IGNORE, NEGATIVE, POSITIVE, LabelConfig, pseudo_labels
from .model import RewardModel
from .segment import SegmentConfig, keyframes

__all__ = ["IGNORE", "NEGATIVE", "POSITIVE", "LabelConfig", "RewardModel", "SegmentConfig", "keyframes",
           "pseudo_labels"]
