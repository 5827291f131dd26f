"""The preference model (PM): a language-model backbone + a scalar head on the last real token.

reward(prompt, response) = hidden state at the last real token of the rendered dialogue . w + b. Saved as
an HF model folder (safetensors) plus score_head.safetensors holding w (H,) and b ().
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import cai_kernels

from .models import PromptFormat, context_length, load_model, pad_rows
from .training import encode_dialogue, save_pretrained, trunk_hidden

HEAD_FILE = "score_head.safetensors"


class ScalarHead(nn.Module):
    """w (H,), b (): a scalar read off hidden states, hidden . w + b (the PM's reward head, PPO's value head)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float() @ self.weight.float() + self.bias.float()


class RewardModel(nn.Module):
    def __init__(self, lm, tokenizer, head: ScalarHead | None = None, prompt_format: str = "auto"):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.head = head if head is not None else ScalarHead(lm.config.hidden_size).to(lm.device)
        self.format = PromptFormat(tokenizer, prompt_format)

    @property
    def device(self):
        return self.lm.device

    def encode(self, prompts: list[str], responses: list[str], max_length: int | None = None):
        """(input_ids, attention_mask), right-padded, of the rendered (prompt, response) dialogues, each at most
        `max_length` tokens and never longer than the model's context (cut as cai.training.encode_dialogue does)."""
        context = context_length(self.lm)
        if context is not None:
            max_length = context if max_length is None else min(max_length, context)
        rows = [encode_dialogue(self.format, self.tokenizer, p, r, max_length)[0] for p, r in zip(prompts, responses)]
        ids, mask = pad_rows(rows, self.tokenizer.pad_token_id, left=False)
        return ids.to(self.device), mask.to(self.device)

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return trunk_hidden(self.lm, ids, mask)

    def rewards(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) fp32 rewards."""
        return cai_kernels.last_token_rewards(self.hidden(ids, mask), mask, self.head.weight, self.head.bias)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], *, batch_size: int = 8,
              max_length: int | None = 1024) -> list[float]:
        scores = []
        for start in range(0, len(prompts), batch_size):
            ids, mask = self.encode(prompts[start:start + batch_size], responses[start:start + batch_size], max_length)
            scores.extend(self.rewards(ids, mask).tolist())
        return scores

    def save(self, target: Path) -> None:
        save_pretrained(self.lm, self.tokenizer, target,
                        extra={"weight": self.head.weight, "bias": self.head.bias}, extra_name=HEAD_FILE)


def load_reward_model(path: str | Path, *, device="auto", dtype="auto", prompt_format: str = "auto") -> RewardModel:
    from safetensors.torch import load_file

    lm, tokenizer = load_model(str(path), device=device, dtype=dtype)
    head_path = Path(path) / HEAD_FILE
    if not head_path.is_file():
        raise FileNotFoundError(f"{head_path}: not a preference model folder (no score head)")
    tensors = load_file(str(head_path))
    head = ScalarHead(tensors["weight"].numel()).to(lm.device)
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        head.bias.copy_(tensors["bias"])
    return RewardModel(lm, tokenizer, head, prompt_format).eval()
