"""The robotic process reward model: a VLA backbone asked "The task is {instruction}, is it completed?".

Any backbone the policy runs on serves (the tiny VLA, OpenVLA, a transformers VLM): the question is laid out
as that model lays out a prompt (image and proprio in place), and the classifier is the backbone's scalar
head (the one a critic uses) on the hidden state of the question's last token, read as the logit of "yes".
A saved reward model is a policy checkpoint plus ``reward_model.json`` (the question and the metrics).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..policy import VLAPolicy
from ..policy.critic import pool_prompt

QUESTION = "The task is {instruction}, is it completed?"
META = "reward_model.json"
MODEL_DIR = "reward_model"


def question_text(instruction: str, question: str = QUESTION) -> str:
    return question.format(instruction=instruction.strip().lower().rstrip("."))


def _head_trains_backbone(model) -> None:
    """The critic's head keeps its gradients out of a shared backbone; the reward model's head is the task."""
    if hasattr(model, "value_detach"):
        model.value_detach = False
    if hasattr(getattr(model, "config", None), "value_detach"):
        model.config.value_detach = False


class RewardModel:
    def __init__(self, policy: VLAPolicy, question: str = QUESTION, meta: dict | None = None):
        if "{instruction}" not in question:
            raise ValueError(f"the reward model's question must contain '{{instruction}}'; got {question!r}")
        self.policy, self.question = policy, question
        self.meta = dict(meta or {})
        _head_trains_backbone(policy.model)
        self._ids: dict[str, list[int]] = {}
        # the model's own framing: OpenVLA and transformers VLMs start a prompt with BOS, the tiny VLA adds its own
        tok = policy.tokenizer
        probe = list(policy.model.prompt_ids(tok, "x"))
        self._bos = [tok.bos_token_id] if tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id] else []
        self.score_seconds = 0.0
        self.scored = 0

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def question_ids(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from ..policy.protocol import left_pad
        rows = []
        for ins in instructions:
            ids = self._ids.get(ins)
            if ids is None:
                text = question_text(ins, self.question)
                text_ids = self.policy.tokenizer(text, add_special_tokens=False)["input_ids"]
                ids = self._ids[ins] = self._bos + list(text_ids)
            rows.append(ids)
        ids, mask = left_pad(rows, pad_id=self.policy.tokenizer.pad_token_id or 0)
        return ids.to(self.device), mask.to(self.device)

    def logits(self, images, states, instructions: list[str]) -> torch.Tensor:
        """Logits [B] of "completed" (with gradients where the model trains)."""
        pol = self.policy
        if len(instructions) != len(images):
            raise ValueError(f"{len(images)} frames but {len(instructions)} instructions: give one each")
        imgs, st = pol.to_tensor_obs(images, states)
        model = pol.model
        feats = model.encode_images(model.preprocess_images(imgs))
        ids, mask = self.question_ids(list(instructions))
        embeds, m, pos = model.prompt_embeds(feats, st, ids, mask)
        hidden = model.decoder(inputs_embeds=embeds, attention_mask=m, position_ids=pos).last_hidden_state
        return model.value_from_hidden(pool_prompt(hidden, m, "last")).float()

    @torch.no_grad()
    def score(self, images, states, instructions: list[str], batch_size: int = 256) -> np.ndarray:
        """P(completed) [B] float32, in batches; the time it takes is counted in ``score_seconds``."""
        t0 = time.perf_counter()
        was_training = self.policy.model.training
        self.policy.model.eval()
        out = [torch.sigmoid(self.logits(images[i:i + batch_size], None if states is None else states[i:i + batch_size],
                                         instructions[i:i + batch_size])).cpu()
               for i in range(0, len(images), batch_size)]
        self.policy.model.train(was_training)
        self.score_seconds += time.perf_counter() - t0
        self.scored += len(images)
        return torch.cat(out).numpy().astype(np.float32) if out else np.zeros(0, np.float32)

    # ---- files ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from ..policy import save_policy
        path = Path(path)
        save_policy(self.policy, path, extra={"role": "reward_model"})
        (path / META).write_text(json.dumps({"question": self.question, **self.meta}, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path, device="cpu", dtype: str = "auto") -> "RewardModel":
        """A reward model directory, or the output directory of `vlarl-fast prm` that holds one."""
        from ..policy import make_policy
        path = Path(path)
        if (path / MODEL_DIR / META).is_file():
            path = path / MODEL_DIR
        if not (path / META).is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a reward model: no {META} in it (write one with "
                                    f"`vlarl-fast prm --output-dir DIR`, then pass DIR)")
        meta = json.loads((path / META).read_text())
        policy = make_policy(str(path), device=device, dtype=dtype)
        return cls(policy, meta.pop("question", QUESTION), meta)
