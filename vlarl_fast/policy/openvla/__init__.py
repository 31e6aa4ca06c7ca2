"""OpenVLA checkpoints without remote code: the model from transformers' own classes (config, vision,
model), its checkpoint-name mapping (names), OpenVLA's image preprocessing and prompt, a reader and
writer for its checkpoint directory (loader, writer), and a random tiny model (tiny). See docs/openvla.md."""
from .config import OpenVLAConfig, ViTSpec
from .loader import OpenVLABundle, OpenVLACheckpointError, is_openvla_checkpoint, load_openvla
from .model import OpenVLAModel
from .preprocess import ImageProcessor
from .prompt import build_llama_tokenizer, prompt_ids, prompt_text
from .tiny import random_openvla, random_tiny_openvla
from .writer import save_openvla

__all__ = ["OpenVLAConfig", "ViTSpec", "OpenVLABundle", "OpenVLACheckpointError", "is_openvla_checkpoint",
           "load_openvla", "OpenVLAModel", "ImageProcessor", "build_llama_tokenizer", "prompt_ids", "prompt_text",
           "random_openvla", "random_tiny_openvla", "save_openvla"]
