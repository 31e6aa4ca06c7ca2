"""OpenVLA checkpoints without remote code: the model from transformers' own classes (config, vision,
model), OpenVLA's image preprocessing and prompt. See docs/openvla.md."""
from .config import OpenVLAConfig, ViTSpec
from .model import OpenVLAModel
from .preprocess import ImageProcessor
from .prompt import build_llama_tokenizer, prompt_ids, prompt_text

__all__ = ["OpenVLAConfig", "ViTSpec", "OpenVLAModel", "ImageProcessor", "build_llama_tokenizer", "prompt_ids",
           "prompt_text"]
