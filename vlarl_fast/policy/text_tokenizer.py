"""A small byte-level BPE tokenizer, trained offline, with the action bins as the last 256 ids.

Byte-level BPE never produces an unknown token, so any instruction encodes. The vocabulary
is laid out as [specials | bytes + merges | 256 action tokens], which is OpenVLA's layout
(action bins at the end of the vocabulary) at a size a CPU can train.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .action_tokenizer import N_BINS

SPECIALS = ["<pad>", "<s>", "</s>"]

# A few generic manipulation phrases so merges are useful beyond the built-in suite.
_BASE_CORPUS = [
    "what action should the robot take to",
    "pick up the cube and place it in the zone",
    "put the bowl on the plate", "open the top drawer of the cabinet",
    "push the block to the left", "move the gripper to the object",
    "turn on the stove", "put both the alphabet soup and the tomato sauce in the basket",
    "red blue green yellow black white cube block bowl plate mug zone",
]


def build_tokenizer(texts: list[str], text_vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train the text part on ``texts`` (instructions); returns a tokenizer whose full
    vocabulary is ``text_vocab_size + 256``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=text_vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts) + _BASE_CORPUS, trainer=trainer)
    # Pad the text part to exactly text_vocab_size so the action slice starts at a fixed id.
    n = tok.get_vocab_size()
    filler = [f"<unused_{i}>" for i in range(text_vocab_size - n)]
    if filler:
        tok.add_special_tokens(filler)
    tok.add_special_tokens([f"<act_{i}>" for i in range(N_BINS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.padding_side = "left"
    if len(fast) != text_vocab_size + N_BINS:
        raise RuntimeError(f"tokenizer has {len(fast)} ids, expected {text_vocab_size + N_BINS}")
    return fast


def prompt_text(instruction: str, style: str = "openvla") -> str:
    """The text part of the prompt. 'openvla' is OpenVLA's wording; 'instruction' is the bare
    instruction (fewer tokens per step for small models trained from scratch)."""
    ins = instruction.strip().lower().rstrip(".")
    if style == "openvla":
        return f"what action should the robot take to {ins}?"
    if style == "instruction":
        return ins
    raise ValueError(f"unknown prompt style {style!r}; use 'openvla' or 'instruction'")
