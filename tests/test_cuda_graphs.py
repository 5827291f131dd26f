"""Every op (but choice_logprobs, whose output width is read from the data) is capturable in a CUDA graph:
captured forward (and forward + backward), replayed on new input values, equal to eager calls. GPU only."""

from __future__ import annotations

import pytest
import torch

from benchmarks import host_time
from tests._backends import assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

NOT_CAPTURABLE = {"choice_logprobs": "K = max(num_options) sizes its outputs: read on the host (documented)"}
CASES = [(c.op, mode) for c in host_time.cases() for mode in (("fwd", "fwd+bwd") if c.differentiable else ("fwd",))
         if c.op not in NOT_CAPTURABLE]


def _tensors(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)] + \
        [t for o in (out if isinstance(out, (tuple, list)) else ()) if isinstance(o, dict) for t in o.values()]


@pytest.mark.parametrize("op,mode", CASES)
def test_capture_and_replay(op, mode):
    case = next(c for c in host_time.cases("cuda") if c.op == op)
    fn, leaves = case.make(None, mode == "fwd+bwd")
    seed = None

    def call():
        return fn(*leaves)

    def step():
        nonlocal seed
        if mode == "fwd":
            with torch.no_grad():
                return _tensors(call())
        out = call()
        first = out[0] if isinstance(out, (tuple, list)) else out
        seed = torch.ones_like(first) if seed is None else seed
        torch.autograd.backward(first, seed)
        return [leaf.grad for leaf in leaves]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles) off the capture stream
        for _ in range(3):
            for leaf in leaves:
                leaf.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for leaf in leaves:
        leaf.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    with torch.no_grad():
        for leaf in leaves:  # new values in the same memory: the graph must read them
            leaf.copy_(torch.randn_like(leaf))
    graph.replay()
    torch.cuda.synchronize()
    replayed = [t.clone() for t in captured]
    for leaf in leaves:
        leaf.grad = None
    eager = step()
    assert len(replayed) == len(eager)
    for r, e in zip(replayed, eager):
        assert_close(r, e, rtol=1e-5, atol=1e-6, msg=f"{op} {mode}")
