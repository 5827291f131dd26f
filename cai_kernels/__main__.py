"""``python -m cai_kernels info``: versions, and per op which backends are live on this machine and why."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import __version__, _extension, _registry
from . import triton as triton_backend


def _device_types() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def info() -> str:
    lines = [
        f"cai_kernels {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"{triton_backend.installed()[1]}",
        f"CPU capability (torch): {torch.backends.cpu.get_cpu_capability()}; threads: {torch.get_num_threads()}",
        f"C++ extension: {_extension.status().reason}",
        f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}",
        f"TRITON_INTERPRET: {'1' if triton_backend.interpreting() else 'unset'}",
        "",
    ]
    for device_type in _device_types():
        lines.append(f"ops on {device_type} tensors (auto picks the first live of "
                     f"{'cpu' if device_type == 'cpu' else 'triton'}, reference):")
        for name in _registry.OPS:
            lines.append(f"  {name}")
            for backend, (live, why) in _registry.status(name, device_type).items():
                lines.append(f"    {backend:<9} {'live ' if live else 'off  '} {why}")
    return "\n".join(lines)


def demo() -> str:
    """A short look at the main kernel: per-token log-probs of a [2048, 49152] logits tensor."""
    import time

    from . import reference, token_logprobs

    def best_of(fn, repeat=3):
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    logits = torch.randn(2048, 49152)
    targets = torch.randint(0, 49152, (2048,))
    ours = token_logprobs(logits, targets)
    exact = reference.token_logprobs(logits.double(), targets)
    t_ours = best_of(lambda: token_logprobs(logits, targets))
    t_eager = best_of(lambda: logits.log_softmax(-1).gather(-1, targets[:, None]))
    return (f"token_logprobs on logits [2048, 49152] fp32 ({logits.numel() * 4 / 1e6:.0f} MB)\n"
            f"  max |error| vs float64 reference: {(ours.double() - exact).abs().max().item():.2e}\n"
            f"  cai_kernels ({_registry.select_backend('token_logprobs', logits.device)}): {t_ours * 1e3:.1f} ms, "
            f"{logits.numel() * 4 / t_ours / 1e9:.1f} GB/s\n"
            f"  eager log_softmax + gather: {t_eager * 1e3:.1f} ms ({t_eager / t_ours:.1f}x slower)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cai_kernels", description=__doc__)
    parser.add_argument("command", choices=["info", "demo"], help="info: what is live; demo: a quick kernel run")
    args = parser.parse_args(argv)
    print(info() if args.command == "info" else demo())
    return 0


if __name__ == "__main__":
    sys.exit(main())
