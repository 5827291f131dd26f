"""The cai-kernels benchmark suite (pytest-benchmark): see README.md, section Benchmarks."""
