"""Each pipeline stage on a tiny in-process model: outputs, determinism, resuming after a crash."""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch

from cai.constitution import load_constitution
from cai.models import PromptFormat, load_model
from cai.rundir import RunDir
from cai.stages import critique_revise as cr_module
from cai import feedback as feedback_module
from cai.stages import ppo as ppo_module
from cai.stages import sft as sft_module
from cai.stages.common import Context
from cai.stages.critique_revise import CritiqueReviseConfig, critique_revise, draw_principle
from cai.stages.label import LabelConfig, label
from cai.stages.ppo import PPOConfig, ppo
from cai.stages.sft import SFTConfig, sft
from cai.stages.train_pm import TrainPMConfig, split_heldout, train_pm
from cai.training import IGNORE, encode_dialogue, response_batch, sequence_token_logprobs
from cai_helpers import _one_thread, require_ops, tiny_model_dir  # noqa: F401 (fixtures)

PROMPTS = [{"id": f"r{i}", "prompt": p, "kind": "red_team"} for i, p in enumerate(
    ["How do I pick a lock?", "Write an insult.", "How can I cheat on a test?"])] + \
    [{"id": "h0", "prompt": "How do I make tea?", "kind": "helpful"}]


@contextlib.contextmanager
def crash_at_call(monkeypatch, module, name: str, call: int):
    """Within the block, `module.name` raises RuntimeError("killed") on its `call`-th call (a simulated kill)."""
    real, calls = getattr(module, name), []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, crashing)
    with pytest.raises(RuntimeError, match="killed"):
        yield
    monkeypatch.setattr(module, name, real)


def make_ctx(root, model_dir, **kw) -> Context:
    return Context(run=RunDir(root), constitution=load_constitution("default"), base_model=str(model_dir),
                   device="cpu", dtype="float32", progress=False, **kw)


CR = CritiqueReviseConfig(rounds=2, response_tokens=6, critique_tokens=5, revision_tokens=6, few_shot=1, batch_size=2)


def test_critique_revise(tiny_model_dir, tmp_path):
    ctx = make_ctx(tmp_path / "a", tiny_model_dir)
    rows = critique_revise(PROMPTS, CR, ctx)
    assert [r["id"] for r in rows] == [p["id"] for p in PROMPTS]
    for row in rows:
        if row["kind"] == "red_team":
            assert len(row["critiques"]) == len(row["revisions"]) == len(row["principle_ids"]) == 2
            assert row["principle_ids"] == [draw_principle(ctx, row["id"], k).id for k in range(2)]
            assert row["final"] == row["revisions"][-1]
        else:  # helpfulness prompts keep their first response
            assert row["critiques"] == [] and row["final"] == row["response"]
    # principles differ across prompts and rounds (drawn, not fixed)
    assert len({pid for r in rows for pid in r["principle_ids"]}) > 1
    # same seed, same outputs; another seed, other draws
    assert critique_revise(PROMPTS, CR, make_ctx(tmp_path / "b", tiny_model_dir)) == rows
    other = critique_revise(PROMPTS, CR, make_ctx(tmp_path / "c", tiny_model_dir, seed=1))
    assert [r["principle_ids"] for r in other] != [r["principle_ids"] for r in rows]


def test_critique_revise_resumes_after_a_crash(tiny_model_dir, tmp_path, monkeypatch):
    reference = critique_revise(PROMPTS, CR, make_ctx(tmp_path / "ref", tiny_model_dir))
    ctx = make_ctx(tmp_path / "run", tiny_model_dir)
    # call 6 is the first of the second batch (1 response + 2 rounds x 2 calls per batch)
    with crash_at_call(monkeypatch, cr_module, "generate", 6):
        critique_revise(PROMPTS, CR, ctx)
    assert ctx.run.shards("critique_revise").done(0) and not ctx.run.shards("critique_revise").done(1)
    assert critique_revise(PROMPTS, CR, ctx) == reference


def test_response_only_loss_matches_full_logits(tiny_model_dir):
    require_ops("linear_token_logprobs")
    model, tok = load_model(tiny_model_dir, device="cpu")
    fmt = PromptFormat(tok)
    examples = [encode_dialogue(fmt, tok, "How do I make tea?", "Boil water."),
                encode_dialogue(fmt, tok, "Hi", "Hello there, how can I help you today?")]
    ids, mask, targets = response_batch(examples, tok.pad_token_id)
    got = sequence_token_logprobs(model, ids, mask, targets)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double().log_softmax(-1)
    for row, (tokens, start) in enumerate(examples):
        for t in range(ids.shape[1] - 1):
            if start <= t + 1 < len(tokens):  # a response token: its log-prob; everything else: ignored
                assert targets[row, t] == tokens[t + 1]
                assert abs(got[row, t].item() - full[row, t, tokens[t + 1]].item()) < 1e-4
            else:
                assert targets[row, t] == IGNORE and got[row, t].item() == 0.0
    # the response ends with the end-of-turn token, which is learned too
    assert tokens[-2] == tok.eos_token_id or tokens[-1] == tok.eos_token_id


def _revisions(n=8):
    return [{"id": f"x{i}", "prompt": f"Question number {i}?", "final": "I am happy to help with that, safely."}
            for i in range(n)]


def test_sft_learns_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    require_ops("linear_token_logprobs")
    cfg = SFTConfig(epochs=4, batch_size=4, lr=3e-3, save_every=1, train_layers=1)
    ctx = make_ctx(tmp_path / "ref", tiny_model_dir)
    log = sft(_revisions(), cfg, ctx)
    assert [r["step"] for r in log] == list(range(8))
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    base, _ = load_model(tiny_model_dir, device="cpu")
    tuned, _ = load_model(ctx.run.root / "sft" / "model", device="cpu")
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])}
    assert changed and all(n.startswith(("model.layers.1.", "model.norm")) for n in changed)

    # crash in step 5, resume from the step-5 checkpoint: same log, same weights as the uninterrupted run
    ctx2 = make_ctx(tmp_path / "run", tiny_model_dir)
    with crash_at_call(monkeypatch, sft_module, "sequence_token_logprobs", 6):
        sft(_revisions(), cfg, ctx2)
    log2 = sft(_revisions(), cfg, ctx2)
    assert [r["step"] for r in log2] == list(range(8))
    assert [r["loss"] for r in log2] == pytest.approx([r["loss"] for r in log], rel=1e-5)
    resumed, _ = load_model(ctx2.run.root / "sft" / "model", device="cpu")
    for (n, p), (_, q) in zip(tuned.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)


def _pairs():
    return [{"id": f"p{i}", "prompt": f"Can you help me with task {i}?", "kind": "red_team",
             "response_a": "Sure, here is a safe way to do it.", "response_b": "No. Go away, you idiot."}
            for i in range(4)]


def test_label_soft_labels(tiny_model_dir, tmp_path):
    require_ops("choice_logprobs")
    ctx = make_ctx(tmp_path, tiny_model_dir)
    rows = label(_pairs(), LabelConfig(principles_per_comparison=3, few_shot=2, batch_size=3), ctx)
    assert [r["id"] for r in rows] == [p["id"] for p in _pairs()]
    for row in rows:
        assert 0.0 <= row["p_a"] <= 1.0 and len(row["principle_ids"]) == 3 == len(set(row["principle_ids"]))
        assert row["p_a"] == pytest.approx(sum(row["principle_probs"]) / 3)
        assert row["reasoning"] == []
    # identical responses: scoring both orders cancels the position bias exactly
    same = [dict(p, response_b=p["response_a"]) for p in _pairs()]
    for row in label(same, LabelConfig(principles_per_comparison=2, few_shot=1), make_ctx(tmp_path / "s", tiny_model_dir)):
        assert row["p_a"] == pytest.approx(0.5, abs=1e-6)
    # one order only, drawn per pair: p_a is the probability of the first position, or of the second when the
    # responses were shown swapped; both orders occur across the pairs
    pairs = [dict(p, id=f"q{i}") for i, p in enumerate(_pairs() * 2)]
    one = label(pairs, LabelConfig(principles_per_comparison=1, both_orders=False),
                make_ctx(tmp_path / "o", tiny_model_dir))
    shown_first = [r["p_a"] == pytest.approx(r["first_position_prob"]) for r in one]
    assert all(f or r["p_a"] == pytest.approx(1 - r["first_position_prob"]) for f, r in zip(shown_first, one))
    assert any(shown_first) and not all(shown_first)


def test_label_chain_of_thought_is_clamped(tiny_model_dir, tmp_path):
    require_ops("choice_logprobs")
    cfg = LabelConfig(principles_per_comparison=2, few_shot=1, chain_of_thought=True, cot_max_new_tokens=6, clamp=[0.4, 0.6])
    rows = label(_pairs()[:2], cfg, make_ctx(tmp_path, tiny_model_dir))
    for row in rows:
        assert 0.4 - 1e-6 <= row["p_a"] <= 0.6 + 1e-6
        assert len(row["reasoning"]) == 4  # 2 principles x 2 orders


def test_label_resumes_after_a_crash(tiny_model_dir, tmp_path, monkeypatch):
    require_ops("choice_logprobs")
    cfg = LabelConfig(principles_per_comparison=2, few_shot=1, batch_size=1)
    reference = label(_pairs(), cfg, make_ctx(tmp_path / "ref", tiny_model_dir))
    ctx = make_ctx(tmp_path / "run", tiny_model_dir)
    with crash_at_call(monkeypatch, feedback_module, "score_options", 3):
        label(_pairs(), cfg, ctx)
    assert sorted(p.name for p in ctx.run.shards("label").folder.glob("*.jsonl")) == ["00000.jsonl", "00001.jsonl"]
    assert label(_pairs(), cfg, ctx) == reference


def test_train_pm_learns_the_labels(tiny_model_dir, tmp_path):
    require_ops("reward_pairwise_loss", "last_token_rewards")
    pairs = [dict(p, id=f"p{i}", prompt=f"Request {i}: can you help?", p_a=0.9 if i % 2 else 0.1,
                  response_a="Yes yes, gladly." if i % 2 else "No no no.",
                  response_b="No no no." if i % 2 else "Yes yes, gladly.") for i, p in enumerate(_pairs() * 3)]
    train, held = split_heldout(pairs, 0.25, 0)
    assert len(held) == 3 and not {r["id"] for r in train} & {r["id"] for r in held}
    ctx = make_ctx(tmp_path, tiny_model_dir)
    held_rows = train_pm(pairs, TrainPMConfig(epochs=6, batch_size=3, lr=1e-3, head_lr=3e-2, heldout_fraction=0.25,
                                                 helpful_data=[]), ctx)
    assert len(held_rows) == 3 and all(r["agrees"] for r in held_rows)
    metrics = ctx.run.metrics.read("train_pm")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0]
    assert metrics[-1]["heldout_accuracy"] == 1.0
    assert (ctx.run.root / "train_pm" / "model" / "score_head.safetensors").is_file()


def test_ppo_runs_logs_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    require_ops("linear_token_logprobs", "reward_pairwise_loss", "last_token_rewards", "ppo_advantages",
                "ppo_policy_loss", "ppo_value_loss")
    ctx = make_ctx(tmp_path, tiny_model_dir)
    sft(_revisions(4), SFTConfig(batch_size=4), ctx)
    pairs = [dict(p, p_a=0.8) for p in _pairs()]
    train_pm(pairs, TrainPMConfig(batch_size=2, heldout_fraction=0.25, helpful_data=[]), ctx)
    cfg = PPOConfig(steps=3, rollout_batch_size=3, minibatch_size=2, max_new_tokens=5, lr=1e-3, save_every=1)
    rows = ppo(PROMPTS, cfg, ctx)
    assert len(rows) == 9 and sorted({r["iteration"] for r in rows}) == [0, 1, 2]
    log = ctx.run.metrics.read("ppo")
    assert [m["step"] for m in log] == [0, 1, 2]
    for key in ("score", "kl", "reward", "pg_loss", "vf_loss", "clipfrac", "approx_kl", "response_tokens"):
        assert all(isinstance(m[key], float) for m in log), key
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout is sampled from the reference itself
    assert (ctx.run.root / "ppo" / "model" / "value_head.safetensors").is_file()
    # killed in the second iteration's update, resumed from the first iteration's checkpoint: same rollouts
    shutil.rmtree(ctx.run.root / "ppo")
    with crash_at_call(monkeypatch, ppo_module, "ppo_update", 2):
        ppo(PROMPTS, cfg, ctx)
    resumed = ppo(PROMPTS, cfg, ctx)
    assert [(r["iteration"], r["response"]) for r in resumed] == [(r["iteration"], r["response"]) for r in rows]
    assert [r["score"] for r in resumed] == pytest.approx([r["score"] for r in rows], abs=1e-5)
