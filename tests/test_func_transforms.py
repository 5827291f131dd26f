"""torch.func transforms on the compiled backends: torch.func.grad / vjp on every differentiable op, torch.vmap on
the row-wise ops (kl_penalty, token_logprobs, gae), and a clear NotImplementedError naming the op for the rest
(forward mode, vmap over a gradient, gradients of gradients, vmap of ops that couple the rows)."""

from __future__ import annotations

import pytest
import torch

import cai_kernels as ck
from benchmarks import host_time
from tests._backends import assert_close, compiled_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = compiled_backends("kl_penalty", DEVICE)
DIFFERENTIABLE = [c.op for c in host_time.cases() if c.differentiable]


def _first(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", DIFFERENTIABLE)
def test_func_grad_equals_autograd(op, backend):
    case = next(c for c in host_time.cases(DEVICE) if c.op == op)
    fn, leaves = case.make(backend, True)
    out = _first(fn(*leaves))
    torch.autograd.backward(out.sum())
    expected = [leaf.grad for leaf in leaves]
    grads = torch.func.grad(lambda *xs: _first(fn(*xs)).sum(), argnums=tuple(range(len(leaves))))(
        *(leaf.detach() for leaf in leaves))
    for got, want in zip(grads, expected):
        assert_close(got, want, rtol=1e-5, atol=1e-6, msg=op)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vjp_of_kl_penalty(backend):
    x, y = torch.randn(3, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE)
    out, vjp = torch.func.vjp(lambda a: ck.kl_penalty(a, y, "k3", backend=backend), x)
    cotangent = torch.randn_like(out)
    (grad,) = vjp(cotangent)
    leaf = x.clone().requires_grad_()
    ck.kl_penalty(leaf, y, "k3", backend=backend).backward(cotangent)
    assert_close(grad, leaf.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_of_the_row_wise_ops(backend):
    batch = torch.randn(4, 3, 5, device=DEVICE)
    ref = torch.randn(3, 5, device=DEVICE)
    got = torch.vmap(lambda a: ck.kl_penalty(a, ref, "k3", backend=backend))(batch)
    assert_close(got, torch.stack([ck.kl_penalty(b, ref, "k3", backend=backend) for b in batch]))

    logits, targets = torch.randn(4, 6, 11, device=DEVICE), torch.randint(0, 11, (4, 6), device=DEVICE)
    got = torch.vmap(lambda lg, t: ck.token_logprobs(lg, t, backend=backend))(logits, targets)
    assert_close(got, torch.stack([ck.token_logprobs(lg, t, backend=backend) for lg, t in zip(logits, targets)]))

    rewards, values = torch.randn(4, 3, 7, device=DEVICE), torch.randn(4, 3, 7, device=DEVICE)
    mask = torch.rand(3, 7, device=DEVICE) < 0.7
    adv, ret = torch.vmap(lambda r, v: ck.gae(r, v, mask, backend=backend))(rewards, values)
    for i in range(4):
        a, r = ck.gae(rewards[i], values[i], mask, backend=backend)
        assert_close(adv[i], a)
        assert_close(ret[i], r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_transforms_say_so(backend):
    x, y = torch.randn(3, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE)
    mask = torch.rand(3, 5, device=DEVICE) < 0.7
    kl = lambda a: ck.kl_penalty(a, y, "k3", backend=backend)  # noqa: E731
    with pytest.raises(NotImplementedError, match="cai_kernels.kl_penalty does not support forward-mode AD"):
        torch.func.jacfwd(kl)(x)
    with pytest.raises(NotImplementedError, match="cai_kernels.kl_penalty's backward does not support torch.vmap"):
        torch.func.jacrev(kl)(x)
    with pytest.raises(NotImplementedError, match="cai_kernels.kl_penalty supports first-order gradients only"):
        torch.func.grad(lambda a: torch.func.grad(lambda b: kl(b).sum())(a).sum())(x)
    with pytest.raises(NotImplementedError, match="cai_kernels.ppo_policy_loss does not support torch.vmap"):
        torch.vmap(lambda a: ck.ppo_policy_loss(a, y, y, mask, backend=backend)[0])(torch.randn(2, 3, 5, device=DEVICE))
    with pytest.raises(NotImplementedError, match="cai_kernels.masked_whiten does not support torch.vmap"):
        torch.vmap(lambda a: ck.masked_whiten(a, mask, backend=backend))(torch.randn(2, 3, 5, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_tensors_under_a_transform_stay_constants(backend):
    """An op on tensors the transform does not track (a constant reward model under grad) runs as usual."""
    x, y, z = (torch.randn(3, 5, device=DEVICE) for _ in range(3))

    def f(a):
        constant = ck.kl_penalty(y, z, "k1", backend=backend)  # not a function of a
        return (ck.kl_penalty(a, y, "k1", backend=backend) * constant).sum()

    assert_close(torch.func.grad(f)(x), ck.kl_penalty(y, z, "k1", backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [c.op for c in host_time.cases()])
def test_compile_with_dynamic_shapes_traces_every_op(op, backend):
    """torch.compile(dynamic=True, fullgraph=True): symbolic sizes reach the argument checks and the fake
    implementations (aot_eager: the trace without inductor's code generation, which is what can fail here)."""
    torch._dynamo.reset()
    case = next(c for c in host_time.cases(DEVICE) if c.op == op)
    fn, leaves = case.make(backend, False)
    want = fn(*leaves)  # eager first: the Triton module is imported outside the trace (dynamo skips importlib)
    compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves)
    flat = lambda out: [t for t in (out if isinstance(out, (tuple, list)) else (out,))  # noqa: E731
                        if isinstance(t, torch.Tensor)]
    for g, w in zip(flat(got), flat(want)):
        assert_close(g, w, rtol=1e-5, atol=1e-6, msg=op)
