"""Benchmark suite setup (pytest-benchmark). `make bench` runs it; `-m quick` is the short subset."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: the short subset run by `make bench-quick`")
