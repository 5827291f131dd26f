"""Test setup: Triton kernels run through the interpreter on this CPU-only machine.

TRITON_INTERPRET must be set before triton is first imported (it decides at @triton.jit time), so
it is set here, at collection, unless a GPU is present.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")
    config.addinivalue_line("filterwarnings", "ignore:TRITON_DEFAULT_FP_FUSION:UserWarning")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    """Tests run on CUDA when present (the GPU run of the suite), else on CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def rows():
    """(3, 5) log-probs: the small (B, T) input of the PPO ops' bad-input tests."""
    from tests._ppo_inputs import logprobs
    return logprobs(3, 5)


@pytest.fixture
def rows_mask():
    """A (3, 5) response mask with holes, for ``rows``."""
    from tests._ppo_inputs import response_mask
    return response_mask(3, 5)
