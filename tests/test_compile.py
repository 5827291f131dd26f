"""torch.compile traces models that call the ops, without graph breaks, and matches eager."""

import pytest
import torch

import cai_kernels
from tests._backends import assert_close, compiled_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TinyPolicyHead(torch.nn.Module):
    """An LM head followed by our per-token log-probs: the shape of a PPO log-prob pass."""

    def __init__(self, backend):
        super().__init__()
        self.head = torch.nn.Linear(16, 97)
        self.backend = backend

    def forward(self, hidden, targets):
        logits = self.head(hidden)
        logp, entropy = cai_kernels.token_logprobs(logits[:, :-1], targets, temperature=0.9, ignore_index=-100,
                                                   return_entropy=True, backend=self.backend)
        return logp.sum() - 0.01 * entropy.sum()


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference")]
                         + compiled_backends("token_logprobs", DEVICE))
def test_compiled_module_has_no_graph_break_and_matches_eager(backend):
    torch._dynamo.reset()
    model = TinyPolicyHead(backend).to(DEVICE)
    hidden = torch.randn(2, 6, 16, device=DEVICE)
    targets = torch.randint(0, 97, (2, 5), device=DEVICE)
    targets[0, -1] = -100

    eager_loss = model(hidden, targets)
    eager_loss.backward()
    eager_grad = model.head.weight.grad.clone()
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break raises
    compiled_loss = compiled(hidden, targets)
    compiled_loss.backward()
    assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert_close(model.head.weight.grad, eager_grad, rtol=1e-4, atol=1e-6)


class TinyFusedPolicyHead(torch.nn.Module):
    """The same pass with the LM head fused into the log-probs: the logits are never formed."""

    def __init__(self, backend):
        super().__init__()
        self.head = torch.nn.Linear(16, 97)
        self.backend = backend

    def forward(self, hidden, targets):
        logp, entropy = cai_kernels.linear_token_logprobs(hidden[:, :-1], self.head.weight, targets,
                                                          bias=self.head.bias, temperature=0.9, ignore_index=-100,
                                                          return_entropy=True, backend=self.backend)
        return logp.sum() - 0.01 * entropy.sum()


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference")]
                         + compiled_backends("linear_token_logprobs", DEVICE))
def test_compiled_fused_head_has_no_graph_break_and_matches_eager(backend):
    torch._dynamo.reset()
    model = TinyFusedPolicyHead(backend).to(DEVICE)
    hidden = torch.randn(2, 6, 16, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 97, (2, 5), device=DEVICE)
    targets[0, -1] = -100

    eager_loss = model(hidden, targets)
    eager_loss.backward()
    eager_grads = [model.head.weight.grad.clone(), model.head.bias.grad.clone(), hidden.grad.clone()]
    model.zero_grad()
    hidden.grad = None

    compiled = torch.compile(model, fullgraph=True)
    compiled_loss = compiled(hidden, targets)
    compiled_loss.backward()
    assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for got, expected in zip([model.head.weight.grad, model.head.bias.grad, hidden.grad], eager_grads):
        assert_close(got, expected, rtol=1e-4, atol=1e-6)


class TinyChoiceScorer(torch.nn.Module):
    """Multiple-choice scoring with the LM head applied at option tokens only (the feedback model's labels)."""

    def __init__(self, backend):
        super().__init__()
        self.head = torch.nn.Linear(16, 50)
        self.backend = backend

    def forward(self, hidden, targets, option_ids, num_options, labels):
        option_logprobs, probs = cai_kernels.choice_logprobs(targets, option_ids, num_options, hidden=hidden,
                                                             weight=self.head.weight, bias=self.head.bias,
                                                             clamp=(0.4, 0.6), backend=self.backend)
        # the probability of each question's labelled option; K is data-dependent under torch.compile, and
        # inductor (torch 2.13) cannot lower a column select probs[:, k] of such a tensor: gather / narrow work
        return probs.gather(1, labels[:, None]).sum() + 0.1 * option_logprobs.narrow(1, 0, 1).sum()


@pytest.mark.parametrize("backend", compiled_backends("choice_logprobs", DEVICE))
def test_compiled_choice_scorer_has_no_graph_break_and_matches_eager(backend):
    # K = max(num_options) is read from the data: the op's fake gives the output an unbacked size
    torch._dynamo.reset()
    model = TinyChoiceScorer(backend).to(DEVICE)
    num_options = torch.tensor([2, 9, 3], device=DEVICE)
    option_ids = torch.repeat_interleave(torch.arange(14, device=DEVICE), torch.tensor([1, 2, 3, 4] * 3 + [1, 2],
                                                                                       device=DEVICE))
    hidden = torch.randn(len(option_ids), 16, device=DEVICE)
    targets = torch.randint(0, 50, option_ids.shape, device=DEVICE)
    labels = torch.tensor([1, 7, 0], device=DEVICE)

    eager_loss = model(hidden, targets, option_ids, num_options, labels)
    eager_loss.backward()
    eager_grad = model.head.weight.grad.clone()
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True)
    compiled_loss = compiled(hidden, targets, option_ids, num_options, labels)
    compiled_loss.backward()
    assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert_close(model.head.weight.grad, eager_grad, rtol=1e-4, atol=1e-6)
