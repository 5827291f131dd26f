"""Training helpers shared by sft, train_pm and ppo: trainable subsets, resumable checkpoints, saving.

A checkpoint holds only what training changed (the trainable parameters, as safetensors), the optimizer
state, the step reached and the rows produced so far, all in one folder moved into place atomically with its
manifest (row count, file sizes and checksums: a damaged checkpoint is an error, not a silent restart or lost
rows). The frozen parameters come back from the model the stage started from.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from . import CaiWarning
from .rundir import DamagedRunError, check_manifest, replace_dir, staging_dir, write_manifest


def decoder_layers(model) -> nn.ModuleList:
    trunk = model.base_model
    for name in ("layers", "h", "blocks"):
        layers = getattr(trunk, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to train a subset of them")


def set_trainable(model, train_layers: int | None) -> list[nn.Parameter]:
    """All parameters (None), or only the last `train_layers` decoder blocks and the final norm.

    Training a top slice keeps the backward pass short on a CPU; the (tied) embeddings and LM head stay frozen.
    """
    if train_layers is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    layers = decoder_layers(model)
    if not 0 <= train_layers <= len(layers):
        raise ValueError(f"train_layers must be between 0 and the model's {len(layers)} decoder layers "
                         f"(or null for all parameters); got {train_layers}")
    modules = list(layers[len(layers) - train_layers:]) if train_layers > 0 else []
    norm = getattr(model.base_model, "norm", None) or getattr(model.base_model, "ln_f", None)
    if norm is not None and train_layers > 0:
        modules.append(norm)
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def _trainable_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": p.detach().contiguous().cpu()
            for prefix, module in modules.items() for name, p in module.named_parameters() if p.requires_grad}


class Checkpoint:
    """Resumable training state in <stage>/checkpoint/."""

    def __init__(self, stage_dir: Path):
        self.folder = Path(stage_dir) / "checkpoint"

    def save(self, step: int, modules: dict[str, nn.Module], optimizer, rows: list[dict], extra: dict | None = None):
        from safetensors.torch import save_file

        staging = staging_dir(self.folder)
        try:
            save_file(_trainable_state(modules), str(staging / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
            (staging / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            (staging / "state.json").write_text(json.dumps({"step": step, "extra": extra or {}}), encoding="utf-8")
            write_manifest(staging, len(rows))
            replace_dir(staging, self.folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def restore(self, modules: dict[str, nn.Module], optimizer, *,
                repair: bool = False) -> tuple[int, list[dict], dict]:
        """(step, rows, extra) of the saved state loaded into `modules` / `optimizer`; (0, [], {}) if none.

        A damaged checkpoint raises DamagedRunError; with `repair` it is discarded (the stage restarts from
        its first step) with a warning.
        """
        from safetensors.torch import load_file

        if not self.folder.is_dir():
            return 0, [], {}
        expected, problems = check_manifest(self.folder)
        rows = []
        if not problems:
            rows = [json.loads(line) for line in (self.folder / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
            if len(rows) != expected:
                problems = [(self.folder / "rows.jsonl", f"{len(rows)} rows, the manifest records {expected}")]
        if problems:
            if not repair:
                raise DamagedRunError(problems, "the checkpoint is damaged: re-run with --repair to discard it "
                                                "and restart this stage from its first step")
            self.clear()
            warnings.warn(f"{self.folder}: damaged checkpoint discarded (--repair); the stage restarts from its "
                          f"first step", CaiWarning, stacklevel=2)
            return 0, [], {}
        saved = load_file(str(self.folder / "trainable.safetensors"))
        for prefix, module in modules.items():
            params = dict(module.named_parameters())
            for key, value in saved.items():
                if key.startswith(prefix + "."):
                    with torch.no_grad():
                        params[key[len(prefix) + 1:]].copy_(value)
        optimizer.load_state_dict(torch.load(self.folder / "optimizer.pt", weights_only=True))
        state = json.loads((self.folder / "state.json").read_text(encoding="utf-8"))
        return state["step"], rows, state.get("extra", {})

    def clear(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def save_pretrained(model, tokenizer, target: Path, extra: dict[str, torch.Tensor] | None = None,
                    extra_name: str = "head.safetensors") -> None:
    """Save an HF model (safetensors) + tokenizer (+ extra tensors, e.g. a scalar head) atomically."""
    from safetensors.torch import save_file

    target = Path(target)
    staging = staging_dir(target)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if extra:
            save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(staging / extra_name))
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


def encode_dialogue(fmt, tokenizer, prompt: str, response: str, max_length: int | None = None
                    ) -> tuple[list[int], int]:
    """(token ids of prompt + response, index of the first response token) as the model reads them.

    `prompt` is one human turn, or a raw ``\n\nHuman: ...\n\nAssistant: ...`` transcript of earlier turns.
    Chat format: the template's rendering of [user prompt, assistant response] (the response's end-of-turn
    token included). Raw format: ``\\n\\nHuman: prompt\\n\\nAssistant: response`` + EOS. Longer than
    `max_length`: the prompt is cut from the left, then the response from the right.
    """
    from .constitution import Turn
    from .models import encode
    from .prompts import prompt_turns

    turns = prompt_turns(prompt)  # a plain prompt, or a raw multi-turn transcript (hh-rlhf, the HHH evals)
    context = fmt.render(turns, next_role="assistant")
    full = fmt.render(turns + [Turn("assistant", response)]) if fmt.chat else ""
    context_ids = encode(tokenizer, context)
    if fmt.chat and full.startswith(context):
        full_ids = encode(tokenizer, full)
        if full_ids[:len(context_ids)] != context_ids:  # a merge across the boundary: encode the parts
            full_ids = context_ids + encode(tokenizer, full[len(context):], special=False)
    else:
        full_ids = context_ids + encode(tokenizer, " " + response.strip(), special=False) + [tokenizer.eos_token_id]
    start = len(context_ids)
    if max_length is not None and len(full_ids) > max_length:
        cut = min(len(full_ids) - max_length, max(start - 1, 0))
        full_ids, start = full_ids[cut:], start - cut
        full_ids = full_ids[:max_length]
    return full_ids, start


def response_batch(examples: list[tuple[list[int], int]], pad: int):
    """(input_ids, attention_mask, targets) for next-token loss on response tokens only.

    Right-padded. targets (B, T-1): targets[:, t] is the token at t+1 where it belongs to the response,
    IGNORE elsewhere (prompt and padding).
    """
    from .models import pad_rows

    ids, mask = pad_rows([e[0] for e in examples], pad, left=False)
    labels = torch.full_like(ids, IGNORE)
    for row, (tokens, start) in enumerate(examples):
        labels[row, start:len(tokens)] = ids[row, start:len(tokens)]
    return ids, mask, labels[:, 1:]


def trunk_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) final hidden states (after the last norm), position ids counted over real tokens."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=positions).last_hidden_state


def sequence_token_logprobs(model, input_ids, attention_mask, targets, *, temperature: float = 1.0):
    """(B, T-1) fp32 log p(targets) from the final hidden states and the LM head, never building the logits.

    targets: (B, T-1) int64, IGNORE where there is no target (log-prob 0 there).
    """
    import cai_kernels

    from .models import lm_head

    hidden = trunk_hidden(model, input_ids, attention_mask)
    weight, bias = lm_head(model)
    return cai_kernels.linear_token_logprobs(hidden[:, :-1], weight, targets, bias=bias, temperature=temperature,
                                             ignore_index=IGNORE)
