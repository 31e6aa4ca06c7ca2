"""OpenVLA's prompt, and a Llama-style tokenizer small enough to train for tests and tiny presets.

OpenVLA (Llama-2 backbone, "pure" prompt builder) asks ``In: What action should the robot take to
{instruction}?\\nOut:`` with BOS in front and the lone SentencePiece space piece ``▁`` (id 29871 in
Llama-2) after ``Out:``: ``predict_action`` appends it when the prompt does not already end with it,
because fine-tuning saw it there. The 7 action tokens follow.
"""
from __future__ import annotations

import json

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer

SPACE_PIECE = "\u2581"  # SentencePiece's word-boundary marker; alone it is Llama-2's token 29871
PAD_TOKEN = "<PAD>"     # OpenVLA adds it right after the base vocabulary (id 32000)


def prompt_text(instruction: str) -> str:
    """OpenVLA's wording; instructions are lower-cased as its LIBERO/BridgeData evaluation scripts do."""
    return f"In: What action should the robot take to {instruction.strip().lower()}?\nOut:"


def space_token_id(tokenizer) -> int:
    tid = tokenizer.convert_tokens_to_ids(SPACE_PIECE)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {SPACE_PIECE!r} piece: not a Llama/SentencePiece-style tokenizer")
    return tid


def prompt_ids(tokenizer, instruction: str) -> list[int]:
    """Token ids of OpenVLA's prompt: BOS, the prompt, then the space piece the actions follow."""
    ids = tokenizer(prompt_text(instruction), add_special_tokens=True)["input_ids"]
    if not ids or ids[0] != tokenizer.bos_token_id:
        ids = [tokenizer.bos_token_id] + list(ids)
    space = space_token_id(tokenizer)
    return list(ids) if ids[-1] == space else list(ids) + [space]


_CORPUS = [
    prompt_text("pick up the black bowl and place it on the plate"),
    "put both the alphabet soup and the tomato sauce in the basket",
    "open the top drawer of the cabinet and put the bowl inside",
    "turn on the stove and put the moka pot on it",
    "push the red cube to the left of the green zone",
    "move the gripper to the yellow block then lift it",
    "place the mug on the right of the white plate",
]


def build_llama_tokenizer(texts: list[str] = (), vocab_size: int = 640) -> LlamaTokenizer:
    """A Llama-2-style tokenizer (SentencePiece-style BPE with byte fallback, ids <unk>=0 <s>=1 </s>=2, then
    the 256 byte pieces, then learned pieces) with exactly ``vocab_size`` base ids and ``<PAD>`` after them,
    like OpenVLA's. Trained on ``texts`` plus a few manipulation phrases."""
    specials = ["<unk>", "<s>", "</s>"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    n_learn = vocab_size - len(specials) - len(byte_pieces)
    if n_learn < 64:
        raise ValueError(f"vocab_size {vocab_size} leaves too few ids for learned pieces; use at least 384")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Split on spaces while training so that pieces never span a word boundary (as SentencePiece's).
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE_PIECE, prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=n_learn, special_tokens=[], show_progress=False,
                                  initial_alphabet=[SPACE_PIECE])
    tok.train_from_iterator(list(texts) + _CORPUS, trainer=trainer)
    learned = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    pieces = specials + byte_pieces + [p for p, _ in learned]
    # Unused pieces fill the base vocabulary to its exact size: the action bins count back from its end.
    pieces += [f"{SPACE_PIECE}<unused_{i}>" for i in range(vocab_size - len(pieces))]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in json.loads(tok.to_str())["model"]["merges"]]
    out = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    out.add_special_tokens({"pad_token": PAD_TOKEN})
    if len(out) != vocab_size + 1 or out.pad_token_id != vocab_size:
        raise RuntimeError(f"tokenizer has {len(out)} ids (pad {out.pad_token_id}); expected {vocab_size} + <PAD>")
    return out
