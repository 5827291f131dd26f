"""torch.compile(fullgraph=True) traces a PPO training step that calls every PPO op, and matches eager."""

import pytest
import torch

import cai_kernels
from tests._backends import assert_close, compiled_backends
from tests._ppo_inputs import DEVICE, logprobs, normal, response_mask


class TinyPPOStep(torch.nn.Module):
    """Policy and value heads over hidden states, then the post-rollout step and both PPO losses."""

    def __init__(self, backend):
        super().__init__()
        self.policy_head = torch.nn.Linear(8, 11)
        self.value_head = torch.nn.Linear(8, 1)
        self.backend = backend

    def forward(self, hidden, targets, old_logprobs, ref_logprobs, old_values, scores, mask):
        ops = dict(backend=self.backend)
        logits = self.policy_head(hidden).log_softmax(-1)
        logprobs = logits.gather(-1, targets[..., None]).squeeze(-1)
        values = self.value_head(hidden).squeeze(-1)
        with torch.no_grad():
            advantages, returns, rewards, _ = cai_kernels.ppo_advantages(
                scores, old_logprobs, ref_logprobs, old_values, mask, kl_coef=0.05, estimator="k3", **ops)
            raw_advantages, _ = cai_kernels.gae(rewards, old_values, mask, gamma=0.99, **ops)
            whitened = cai_kernels.masked_whiten(raw_advantages, mask, **ops)
        policy_loss, stats = cai_kernels.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, dual_clip=3.0,
                                                         agg="seq-mean-token-mean", **ops)
        value_loss, clipfrac = cai_kernels.ppo_value_loss(values, old_values, returns, mask, clip=0.2, **ops)
        kl = cai_kernels.kl_penalty(logprobs, ref_logprobs, "low_var_kl", **ops)
        kl_loss = torch.where(mask, kl, 0.0).sum() / mask.sum()
        total = policy_loss + 0.5 * value_loss + 0.01 * kl_loss + 1e-3 * whitened.square().sum()
        return total, stats["clipfrac"] + stats["approx_kl"] + clipfrac


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference")]
                         + compiled_backends("ppo_policy_loss", DEVICE))
def test_compiled_ppo_step_has_no_graph_break_and_matches_eager(backend):
    torch._dynamo.reset()
    model = TinyPPOStep(backend).to(DEVICE)
    B, T = 3, 9
    inputs = (normal(B, T * 8).view(B, T, 8), torch.randint(0, 11, (B, T), device=DEVICE), logprobs(B, T),
              logprobs(B, T), normal(B, T), normal(1, B)[0], response_mask(B, T, "holes"))

    eager_total, eager_stats = model(*inputs)
    eager_total.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break raises
    total, stats = compiled(*inputs)
    total.backward()
    assert_close(total, eager_total, rtol=1e-5, atol=1e-5)
    assert_close(stats, eager_stats, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
