"""Shared fixtures for the cai pipeline tests: tiny in-process models, run configs, missing-op checks."""

from __future__ import annotations

import pytest
import torch

import cai_kernels

from tiny_model import build_tiny_model

# the branch that brings each kernel op the pipeline calls
OP_BRANCH = {"linear_token_logprobs": "linear-choice", "choice_logprobs": "linear-choice",
             "reward_pairwise_loss": "pairwise", "last_token_rewards": "pairwise", "ppo_advantages": "ppo",
             "ppo_policy_loss": "ppo", "ppo_value_loss": "ppo"}
PIPELINE_OPS = tuple(OP_BRANCH)


def require_ops(*names: str) -> None:
    """Fail (not skip) when a kernel op the code under test calls is not in cai_kernels yet."""
    missing = [n for n in names if not hasattr(cai_kernels, n)]
    if missing:
        branches = sorted({OP_BRANCH.get(n, "?") for n in missing})
        pytest.fail(f"cai_kernels is missing {', '.join(missing)}: merge branch(es) {', '.join(branches)} "
                    f"(signatures in notes/APIS.md)", pytrace=False)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread (no OpenMP hand-offs), and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + byte-level BPE tokenizer with a chat template, saved as an HF folder."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-chat") / "model")


@pytest.fixture(scope="session")
def tiny_raw_model_dir(tmp_path_factory):
    """The same, but its tokenizer has no chat template (the raw Human:/Assistant: format is used)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-raw") / "model", chat_template=False, seed=1)


def tiny_run_config(model_dir, **sections) -> dict:
    """A run config (as a dict) that takes seconds on the tiny model; `sections` override whole sections."""
    config = {
        "name": "test", "seed": 0, "model": str(model_dir), "device": "cpu", "dtype": "float32",
        "prompts": {"sources": ["builtin:red_team", "builtin:helpful"], "limit_per_source": 4},
        "critique_revise": {"rounds": 2, "response_tokens": 8, "critique_tokens": 6, "revision_tokens": 8,
                            "few_shot": 1, "batch_size": 4, "ablation": True},
        "sft": {"batch_size": 4, "lr": 1.0e-3, "save_every": 1, "max_length": 128},
        "sample_pairs": {"max_new_tokens": 8, "batch_size": 4},
        "label": {"principles_per_comparison": 2, "few_shot": 2, "batch_size": 2},
        "train_pm": {"batch_size": 4, "lr": 1.0e-3, "head_lr": 1.0e-2, "save_every": 1, "max_length": 128,
                     "helpful_limit": 6, "helpful_fraction": 0.5, "heldout_fraction": 0.34},
        "ppo": {"steps": 2, "rollout_batch_size": 4, "minibatch_size": 2, "max_new_tokens": 6, "lr": 1.0e-4,
                "snapshot_every": 1},
        "evaluate": {"limit_per_source": 2, "max_new_tokens": 6, "revision_limit": 2, "bootstrap": 50,
                     "mc_files": ["builtin:harmless_mc"], "mc_limit": 3, "mc_models": ["base", "ppo"],
                     "cot_models": [], "hhh_file": "builtin:harmless_mc"},
    }
    config.update(sections)
    return config
