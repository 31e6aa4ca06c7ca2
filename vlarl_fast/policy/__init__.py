"""VLA policies: the model API (protocol), the tiny built-in VLA, tokenizers, batched decoding and checkpoints."""
from .action_tokenizer import ACTION_DIM, N_BINS, ActionTokenizer, NormStats
from .checkpoint import CheckpointError, load_policy, make_policy, save_policy
from .model import TinyVLA, VLAConfig
from .policy import ActOutput, VLAPolicy
from .protocol import VLAModel

__all__ = ["ACTION_DIM", "N_BINS", "ActionTokenizer", "NormStats", "CheckpointError", "load_policy",
           "make_policy", "save_policy", "TinyVLA", "VLAConfig", "ActOutput", "VLAPolicy",
           "VLAModel"]
