"""torch.compile(fullgraph=True) traces a preference-model module calling every PM op, and matches eager."""

import pytest
import torch

import cai_kernels
from tests._backends import assert_close, compiled_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TinyPreferenceModel(torch.nn.Module):
    """A reward head over given hidden states, trained with every PM loss at once."""

    def __init__(self, hidden_size, backend):
        super().__init__()
        self.head = torch.nn.Linear(hidden_size, 1)
        self.backend = backend

    def forward(self, chosen_hidden, chosen_mask, rejected_hidden, rejected_mask, soft_labels, ranked_hidden,
                ranked_mask, num_valid):
        w, b, backend = self.head.weight, self.head.bias, self.backend
        loss, chosen_rewards, rejected_rewards = cai_kernels.reward_pairwise_loss(
            chosen_hidden, chosen_mask, rejected_hidden, rejected_mask, w, b, soft_labels=soft_labels, margin=0.1,
            backend=backend)
        summed = cai_kernels.pairwise_loss(chosen_rewards, rejected_rewards, soft_labels=soft_labels,
                                           reduction="sum", backend=backend)
        ranked, ranked_rewards = cai_kernels.reward_ranked_loss(ranked_hidden, ranked_mask, w, b,
                                                                num_valid=num_valid, backend=backend)
        per_row = cai_kernels.ranked_pairwise_loss(ranked_rewards, num_valid=num_valid, reduction="none",
                                                   backend=backend)
        scores = cai_kernels.last_token_rewards(chosen_hidden, chosen_mask, w, backend=backend)
        return loss + 0.5 * summed + ranked + per_row.sum() + 0.01 * scores.pow(2).sum()


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference")]
                         + compiled_backends("reward_pairwise_loss", DEVICE))
def test_compiled_module_has_no_graph_break_and_matches_eager(backend):
    torch._dynamo.reset()
    B, K, T, H = 3, 4, 6, 16
    model = TinyPreferenceModel(H, backend).to(DEVICE)
    chosen_hidden = torch.randn(B, T, H, device=DEVICE, requires_grad=True)
    rejected_hidden = torch.randn(B, T + 1, H, device=DEVICE)
    chosen_mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    chosen_mask[0, 4:] = 0
    rejected_mask = torch.ones(B, T + 1, dtype=torch.bool, device=DEVICE)
    rejected_mask[1, :2] = False
    num_valid = torch.tensor([4, 2, 3], device=DEVICE)
    ranked_mask = (torch.arange(K, device=DEVICE)[None, :, None] < num_valid[:, None, None]).expand(B, K, T)
    inputs = (chosen_hidden, chosen_mask, rejected_hidden, rejected_mask, torch.rand(B, device=DEVICE),
              torch.randn(B, K, T, H, device=DEVICE), ranked_mask, num_valid)

    eager_loss = model(*inputs)
    eager_loss.backward()
    eager_grads = (model.head.weight.grad.clone(), model.head.bias.grad.clone(), chosen_hidden.grad.clone())
    model.zero_grad()
    chosen_hidden.grad = None

    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break raises
    compiled_loss = compiled(*inputs)
    compiled_loss.backward()
    assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for grad, eager_grad in zip((model.head.weight.grad, model.head.bias.grad, chosen_hidden.grad), eager_grads):
        assert_close(grad, eager_grad, rtol=1e-4, atol=1e-6)
