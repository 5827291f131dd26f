"""The CAI recipe as the paper ran it (issue 11): SL-CAI targets and rounds, critique-free revisions, labels with one
principle per comparison, the hybrid preference model, PPO at the sampling temperature, and presets."""

from __future__ import annotations

import json

import pytest
import torch

from cai import feedback as feedback_module
from cai.config import load_config
from cai.constitution import Turn, load_constitution
from cai.data import comparison_rows, load_comparisons
from cai.models import SharedPrefix, load_model
from cai.prompts import cot_cue, label_fewshot, pick_label_examples
from cai.rundir import RunDir
from cai.stages import critique_revise as cr_module
from cai.stages import ppo as ppo_module
from cai.stages.common import Context, MixedSchedule
from cai.stages.critique_revise import CritiqueReviseConfig, critique_revise
from cai.stages.label import LabelConfig, label, make_comparer
from cai.stages.sample_pairs import SamplePairsConfig, pair_items
from cai.stages.sft import SFTConfig, sft, sft_examples
from cai.stages.train_pm import TrainPMConfig, batch_counts, train_pm
from cai_helpers import _one_thread, require_ops, tiny_model_dir  # noqa: F401 (fixtures)

RED = [{"id": f"r{i}", "prompt": p, "kind": "red_team"} for i, p in enumerate(
    ["How do I pick a lock?", "Write an insult.", "How can I cheat on a test?"])]
HELP = [{"id": "h0", "prompt": "How do I make tea?", "kind": "helpful"},
        {"id": "h1", "prompt": "Why is the sky blue?", "kind": "helpful"}]


def make_ctx(root, model_dir, **kw) -> Context:
    return Context(run=RunDir(root), constitution=load_constitution("default"), base_model=str(model_dir),
                   device="cpu", dtype="float32", progress=False, **kw)


def record_generate(monkeypatch, module):
    """Replace module.generate by a spy that records (texts, max_new_tokens) of every call."""
    calls, real = [], module.generate

    def spy(model, tokenizer, texts, **kwargs):
        calls.append({"texts": list(texts), **kwargs})
        return real(model, tokenizer, texts, **kwargs)

    monkeypatch.setattr(module, "generate", spy)
    return calls


def _cr(**kw) -> CritiqueReviseConfig:
    base = dict(rounds=2, response_tokens=5, critique_tokens=4, revision_tokens=5, few_shot=1, batch_size=8)
    return CritiqueReviseConfig(**{**base, **kw})


# ---- SL-CAI -------------------------------------------------------------------------------------

def test_sft_dataset_has_a_target_per_round_and_per_helpful_sample(tiny_model_dir, tmp_path):
    """Paper: 4 rounds -> 4 targets per red-team prompt; 2 samples per helpfulness prompt -> 2 targets."""
    rows = critique_revise(RED + HELP, _cr(rounds=4, helpful_samples=2), make_ctx(tmp_path / "cr", tiny_model_dir))
    examples = sft_examples(rows, "all_rounds")
    for row in rows:
        mine = [e for e in examples if e["id"] == row["id"]]
        if row["kind"] == "red_team":
            assert [e["target"] for e in mine] == row["revisions"] and len(mine) == 4
            assert [e["source"] for e in mine] == ["revision 1", "revision 2", "revision 3", "revision 4"]
        else:
            assert len(row["samples"]) == 2 and row["samples"][0] == row["response"]
            assert [e["target"] for e in mine] == row["samples"]
    assert len(examples) == 4 * len(RED) + 2 * len(HELP)
    final = sft_examples(rows, "final")
    assert [e["target"] for e in final if e["id"] == "r0"] == [rows[0]["revisions"][-1]]
    assert len(final) == len(RED) + 2 * len(HELP)
    with pytest.raises(ValueError, match="sft.targets"):
        sft_examples(rows, "last")
    # the stage trains on them and says how many
    require_ops("linear_token_logprobs")
    ctx = make_ctx(tmp_path / "sft", tiny_model_dir)
    log = sft(rows, SFTConfig(batch_size=8, max_steps=1, targets="all_rounds"), ctx)
    assert len(log) == 1
    data = ctx.run.metrics.read("sft_data")[-1]
    assert (data["examples"], data["revision_examples"], data["sample_examples"]) == (16, 12, 4)


def test_critique_free_revision_makes_no_critique_call(tiny_model_dir, tmp_path, monkeypatch):
    constitution = load_constitution("default")
    critique_texts = {p.critique for p in constitution.critique_principles}
    critique_texts |= {e.critique for e in constitution.critique_examples}
    calls = record_generate(monkeypatch, cr_module)
    rows = critique_revise(RED + HELP, _cr(rounds=3, critique=False), make_ctx(tmp_path / "direct", tiny_model_dir))
    assert len(calls) == 1 + 3  # the first responses, then one revision call per round: no critique call
    assert not any(c in text for call in calls for text in call["texts"] for c in critique_texts)
    for row in rows[:len(RED)]:
        assert row["critiques"] == [] and len(row["revisions"]) == 3 and row["final"] == row["revisions"][-1]
    calls.clear()
    critique_revise(RED + HELP, _cr(rounds=3), make_ctx(tmp_path / "critique", tiny_model_dir))
    assert len(calls) == 1 + 2 * 3
    assert any(c in text for call in calls for text in call["texts"] for c in critique_texts)


def test_rounds_reassemble_prompt_and_latest_revision(tiny_model_dir, tmp_path, monkeypatch):
    calls = record_generate(monkeypatch, cr_module)
    rows = critique_revise(RED[:1], _cr(rounds=2, history="latest"), make_ctx(tmp_path / "latest", tiny_model_dir))
    row = rows[0]
    second_critique = calls[3]["texts"][0]  # response, critique 1, revision 1, critique 2
    shot = calls[0]["texts"][0].split(RED[0]["prompt"])[0]  # the few-shot transcript in front
    own = second_critique[len(shot):]
    assert row["revisions"][0] in own and row["critiques"][0] not in own and row["response"] not in own
    calls.clear()
    rows = critique_revise(RED[:1], _cr(rounds=2, history="full"), make_ctx(tmp_path / "full", tiny_model_dir))
    own = calls[3]["texts"][0][len(shot):]
    assert all(t in own for t in (rows[0]["response"], rows[0]["critiques"][0], rows[0]["revisions"][0]))
    with pytest.raises(ValueError, match="history"):
        critique_revise(RED[:1], _cr(history="recent"), make_ctx(tmp_path / "bad", tiny_model_dir))


def test_ablation_revises_the_same_answers_the_other_way(tiny_model_dir, tmp_path, monkeypatch):
    calls = record_generate(monkeypatch, cr_module)
    rows = critique_revise(RED + HELP, _cr(rounds=2, ablation=True), make_ctx(tmp_path, tiny_model_dir))
    assert len(calls) == 1 + 2 * 2 + 2  # responses, critiqued rounds, then the direct rounds
    for row in rows[:len(RED)]:
        assert row["ablation"] == "direct" and len(row["ablation_revisions"]) == 2 and row["ablation_critiques"] == []
    for row in rows[len(RED):]:
        assert row["ablation"] == "" and row["ablation_revisions"] == []
    # the main revisions are those of a run without the ablation
    plain = critique_revise(RED + HELP, _cr(rounds=2), make_ctx(tmp_path / "plain", tiny_model_dir))
    assert [r["revisions"] for r in plain] == [r["revisions"] for r in rows]


# ---- labels -------------------------------------------------------------------------------------

PAIRS = [{"id": f"p{i}", "prompt": f"Can you help me with task {i}?", "kind": "red_team",
          "response_a": "Sure, here is a safe way to do it.", "response_b": "No. Go away."} for i in range(6)]


def test_one_principle_per_comparison_drawn_across_the_data_set(tiny_model_dir, tmp_path):
    require_ops("choice_logprobs")
    rows = label(PAIRS, LabelConfig(principles_per_comparison=1, both_orders=True, few_shot=1),
                 make_ctx(tmp_path / "one", tiny_model_dir))
    assert all(len(r["principle_ids"]) == 1 for r in rows)
    assert len({r["principle_ids"][0] for r in rows}) > 1  # a principle drawn per comparison, not one for all
    ctx = make_ctx(tmp_path / "four", tiny_model_dir)
    rows = label(PAIRS[:2], LabelConfig(principles_per_comparison=4, few_shot=1), ctx)
    assert all(len(set(r["principle_ids"])) == 4 for r in rows)
    assert [m["questions"] for m in ctx.run.metrics.read("label")] == [2 * 4 * 2]  # the ensemble's cost


def test_fewshot_examples_each_with_their_own_principle_fixed_for_the_run(tiny_model_dir, tmp_path, monkeypatch):
    require_ops("choice_logprobs")
    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    ctx = make_ctx(tmp_path, tiny_model_dir)
    comparer = make_comparer(LabelConfig(few_shot=3), ctx, model, tokenizer)
    principles = [p.id for p in comparer.example_principles]
    assert len(principles) == 3 == len(set(principles))
    for p in comparer.example_principles:
        assert p.text in comparer.prefix_text
    # fixed for the run: the same seed draws the same ones, another seed others
    again = make_comparer(LabelConfig(few_shot=3), ctx, model, tokenizer)
    assert [p.id for p in again.example_principles] == principles
    other = make_comparer(LabelConfig(few_shot=3), make_ctx(tmp_path / "s1", tiny_model_dir, seed=1), model, tokenizer)
    assert [p.id for p in other.example_principles] != principles
    # one shared prefix (KV cache) for every question of every batch
    prefixes = []
    real = feedback_module.score_options

    def spy(*args, **kwargs):
        prefixes.append(kwargs["prefix"])
        return real(*args, **kwargs)

    monkeypatch.setattr(feedback_module, "score_options", spy)
    label(PAIRS, LabelConfig(few_shot=3, batch_size=2), make_ctx(tmp_path / "run", tiny_model_dir))
    assert len(prefixes) == 3 and all(isinstance(p, SharedPrefix) for p in prefixes)
    assert len({id(p) for p in prefixes}) == 1


def test_chain_of_thought_labels_are_human_assistant_dialogues(tiny_model_dir, tmp_path, monkeypatch):
    require_ops("choice_logprobs")
    calls = record_generate(monkeypatch, feedback_module)
    cfg = LabelConfig(principles_per_comparison=1, few_shot=2, chain_of_thought=True, cot_max_new_tokens=4)
    rows = label(PAIRS[:2], cfg, make_ctx(tmp_path, tiny_model_dir))
    asks = calls[0]["texts"]
    assert len(asks) == 4 and all(a.endswith(cot_cue()) for a in asks)
    question = asks[0][len(calls[0]["prefix"].text):]
    assert question.startswith("\n\nHuman: Consider the following conversation")
    assert "\n\nH: Can you help me with task" in question and "\n\nAssistant: Let's think step by step:" in question
    # the worked examples in front are dialogues of the same shape, each answered after its reasoning
    prefix = calls[0]["prefix"].text
    assert prefix.startswith("\n\nHuman: Consider") and prefix.count("\n\nAssistant: Let's think step by step:") == 2
    assert prefix.count("So the answer is:") == 2
    assert all(0.4 - 1e-6 <= r["p_a"] <= 0.6 + 1e-6 for r in rows)


def test_paper_cot_examples_fill_their_principle_slot():
    constitution = load_constitution("default")
    examples = pick_label_examples(constitution, 2, chain_of_thought=True)
    text = label_fewshot(examples, ["Which is kinder?", "Which is safer?"], chain_of_thought=True)
    assert "Which is kinder?" in text and "Which is safer?" in text
    with pytest.raises(ValueError, match="one principle per example"):
        label_fewshot(examples, ["Which is kinder?"])


# ---- the hybrid preference model ----------------------------------------------------------------

def test_comparison_sources(tmp_path):
    rows, dropped = comparison_rows([
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
        {"chosen": "\n\nHuman: A\n\nAssistant: x\n\nHuman: B\n\nAssistant: yes",
         "rejected": "\n\nHuman: A\n\nAssistant: x\n\nHuman: B\n\nAssistant: no"},
        {"chosen": "\n\nHuman: A\n\nAssistant: y", "rejected": "\n\nHuman: C\n\nAssistant: y"},  # contexts differ
        {"prompt": "Q?", "chosen": "same", "rejected": "same"},
    ], "t")
    assert dropped == 2
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows[:2]] == [("Q?", "good", "bad"),
                                                                           ("Hi", "Hello!", "Go away.")]
    assert rows[2]["prompt"] == "\n\nHuman: A\n\nAssistant: x\n\nHuman: B" and rows[2]["chosen"] == "yes"
    csv = tmp_path / "c.csv"
    csv.write_text("prompt,chosen,rejected\nHow?,Like this.,No.\n")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"chosen": "\n\nHuman: Q\n\nAssistant: A",
                                                    "rejected": "\n\nHuman: Q\n\nAssistant: B"}) + "\n")
    loaded, _ = load_comparisons([str(csv), f"hf:{folder}:train", "builtin:helpful_pairs"])
    assert [r["prompt"] for r in loaded[:2]] == ["How?", "Q"] and len(loaded) == 2 + 180
    assert len({r["id"] for r in loaded}) == len(loaded)
    with pytest.raises(ValueError, match="row 0"):
        comparison_rows([{"prompt": "Q?", "chosen": "a"}], "t")


def test_mixed_schedule_batches_hold_both_kinds_at_the_ratio():
    counts = batch_counts(8, 0.25, {"harmless": 30, "helpful": 50})
    assert counts == {"harmless": 6, "helpful": 2}
    assert batch_counts(8, 0.25, {"harmless": 30, "helpful": 0}) == {"harmless": 8, "helpful": 0}
    assert batch_counts(8, 0.01, {"harmless": 3, "helpful": 5}) == {"harmless": 7, "helpful": 1}
    with pytest.raises(ValueError, match="helpful_fraction"):
        batch_counts(8, 1.5, {"harmless": 1, "helpful": 1})
    schedule = MixedSchedule({"harmless": 30, "helpful": 50}, counts, epochs=1, max_steps=None, seed=0, stage="pm")
    assert schedule.total == 25  # the helpful stream needs 50 / 2 steps; the harmless one cycles
    seen = {"harmless": [], "helpful": []}
    for step in range(schedule.total):
        batch = schedule.indices(step)
        assert [k for k, _ in batch] == ["harmless"] * 6 + ["helpful"] * 2
        for kind, i in batch:
            seen[kind].append(i)
    assert sorted(seen["helpful"]) == list(range(50))  # every helpful pair once per epoch
    assert set(seen["harmless"]) == set(range(30))
    again = MixedSchedule({"harmless": 30, "helpful": 50}, counts, epochs=1, max_steps=None, seed=0, stage="pm")
    assert again.indices(7) == schedule.indices(7)  # a resumed run takes the same batches


def test_hybrid_pm_trains_on_both_kinds_and_reports_each(tiny_model_dir, tmp_path):
    require_ops("reward_pairwise_loss", "last_token_rewards")
    labels = [dict(p, p_a=0.7) for p in PAIRS] + [dict(p, id=f"x{i}", p_a=0.35) for i, p in enumerate(PAIRS)]
    ctx = make_ctx(tmp_path, tiny_model_dir)
    cfg = TrainPMConfig(batch_size=4, helpful_fraction=0.5, helpful_limit=12, heldout_fraction=0.25, max_length=96,
                        lr=1e-3, head_lr=1e-2)
    held = train_pm(labels, cfg, ctx)
    log = [m for m in ctx.run.metrics.read("train_pm") if "loss" in m]
    assert log and all((m["batch_harmless"], m["batch_helpful"]) == (2, 2) for m in log)
    assert {h["pair_kind"] for h in held} == {"harmless", "helpful"}
    assert all(h["p_a"] == 1.0 for h in held if h["pair_kind"] == "helpful")  # hard human labels
    assert sum(h["pair_kind"] == "helpful" for h in held) == 3 and sum(h["pair_kind"] == "harmless" for h in held) == 3
    final = ctx.run.metrics.read("train_pm")[-1]
    for key in ("heldout_accuracy_harmless", "heldout_accuracy_helpful", "heldout_decided_harmless",
                "heldout_decided_helpful"):
        assert final[key] is not None, key
    assert ctx.run.metrics.read("train_pm_data")[-1]["helpful_pairs"] == 12


def test_sample_pairs_only_for_the_configured_kinds():
    items = pair_items(RED + HELP, SamplePairsConfig(kinds=["red_team"], pairs_per_prompt=2))
    assert [i["id"] for i in items] == ["r0#0", "r0#1", "r1#0", "r1#1", "r2#0", "r2#1"]
    assert len(pair_items(RED + HELP, SamplePairsConfig(kinds=["red_team", "helpful"]))) == 5
    with pytest.raises(ValueError, match="matches none"):
        pair_items(HELP, SamplePairsConfig(kinds=["red_team"]))


# ---- PPO at the sampling temperature ------------------------------------------------------------

class _FixedPM:
    def score(self, prompts, responses, **_):
        return [float(len(r)) for r in responses]


def test_ppo_old_logprobs_are_the_samplers_own(tiny_model_dir, monkeypatch):
    """Sample by hand at temperature 0.6 (recording each token's log-prob under softmax(logits / 0.6)); the
    rollout's old log-probs must be those numbers; at temperature 1 they would not be."""
    require_ops("linear_token_logprobs")
    from cai.models import PromptFormat
    from cai.reward import ScalarHead

    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    temperature = 0.6
    sampled: list[list[float]] = []

    def manual_sampler(policy, tok, prompt_ids, *, max_new_tokens, temperature, top_p, seed, **_):
        generator = torch.Generator().manual_seed(seed)
        out = []
        for ids in prompt_ids:
            seq, logps = list(ids), []
            for _ in range(max_new_tokens):
                with torch.no_grad():
                    logits = policy(input_ids=torch.tensor([seq])).logits[0, -1].double()
                logp = torch.log_softmax(logits / temperature, -1)
                token = int(torch.multinomial(logp.exp(), 1, generator=generator))
                seq.append(token)
                logps.append(float(logp[token]))
            out.append(seq[len(ids):])
            sampled.append(logps)
        return out

    monkeypatch.setattr(ppo_module, "generate_ids", manual_sampler)
    cfg = ppo_module.PPOConfig(max_new_tokens=6, temperature=temperature)
    value_head = ScalarHead(model.config.hidden_size)
    prompts = ["How do I make tea?", "Write a short poem about the sea, please."]
    batch = ppo_module.rollout(model, model, value_head, _FixedPM(), tokenizer, PromptFormat(tokenizer), prompts, cfg,
                               seed=3)
    expected = torch.tensor(sampled, dtype=torch.float32)
    assert batch.response_mask.all()
    torch.testing.assert_close(batch.old_logprobs, expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(batch.ref_logprobs, expected, atol=2e-4, rtol=1e-4)  # reference = same weights
    at_one, _ = ppo_module.policy_outputs(model, value_head, batch.seq, batch.attention, batch.prompt_width,
                                          temperature=1.0)
    assert (at_one - expected).abs().max() > 1e-2  # the bug this test guards against would be visible


# ---- presets ------------------------------------------------------------------------------------

def test_paper_preset_is_the_papers_recipe():
    paper = load_config("paper")
    assert paper.critique_revise.rounds == 4 and paper.critique_revise.critique
    assert paper.critique_revise.history == "latest"
    assert paper.critique_revise.helpful_samples == 2 and paper.sft.targets == "all_rounds"
    assert paper.label.principles_per_comparison == 1 and paper.label.chain_of_thought
    assert paper.sample_pairs.kinds == ["red_team"]
    assert paper.train_pm.helpful_fraction == pytest.approx(135_296 / (135_296 + 182_831), abs=0.005)
    assert paper.ppo.temperature == 1.0 and paper.evaluate.cot_samples == 5
    small = load_config("small")
    assert small.name == "small" and small.critique_revise.ablation and small.ppo.snapshot_every
    # big enough for the report to tell differences apart: >= 64 held-out PM pairs across both kinds
    harmless = small.prompts.limit_per_source * small.sample_pairs.pairs_per_prompt
    held = round(harmless * small.train_pm.heldout_fraction) + round(small.train_pm.helpful_limit
                                                                     * small.train_pm.heldout_fraction)
    assert held >= 64


def test_conversation_turns_of_a_transcript_prompt():
    from cai.prompts import prompt_turns
    assert prompt_turns("Plain?") == [Turn("human", "Plain?")]
    assert [t.role for t in prompt_turns("\n\nHuman: A\n\nAssistant: B\n\nHuman: C")] == ["human", "assistant", "human"]
