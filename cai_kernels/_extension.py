"""Loads the C++ CPU kernels built for the widest SIMD capability the running CPU supports.

``setup.py`` compiles the same sources once per capability (``_C_avx512``, ``_C_avx2``,
``_C_default``). Importing one registers its kernels as ``torch.ops.cai_kernels_cpu.*``. Only one is
ever imported: a module built with ``-mavx512f`` may run AVX-512 instructions in its static
initializers, so it must not even be loaded on a CPU without them.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass

import torch

# torch's own answer to "what may this CPU run" (it honours ATEN_CPU_CAPABILITY), widest first.
_MODULES_FOR_CAPABILITY = {
    "AVX512": ("avx512", "avx2", "default"),
    "AVX2": ("avx2", "default"),
}


@dataclass(frozen=True)
class ExtensionStatus:
    """Which C++ build is live. ``capability`` is None when none could be loaded; ``reason`` says why."""

    capability: str | None
    reason: str

    @property
    def loaded(self) -> bool:
        return self.capability is not None


def _candidate_modules() -> tuple[str, ...]:
    forced = os.environ.get("CAI_KERNELS_CPU_CAPABILITY")
    if forced:
        return (forced.lower(),)
    return _MODULES_FOR_CAPABILITY.get(torch.backends.cpu.get_cpu_capability(), ("default",))


@functools.cache
def status() -> ExtensionStatus:
    """Imports the best C++ build once and reports the outcome."""
    errors = []
    for name in _candidate_modules():
        try:
            importlib.import_module(f"cai_kernels._C_{name}")
        except ImportError as error:
            errors.append(f"_C_{name}: {error}")
            continue
        return ExtensionStatus(name, f"C++ kernels built for {name.upper()} "
                                     f"(torch reports CPU capability {torch.backends.cpu.get_cpu_capability()})")
    reason = ("the C++ extension is not built or failed to load ("
              + "; ".join(errors) + "); reinstall with `pip install --no-build-isolation .`")
    return ExtensionStatus(None, reason)


# The C++ kernels report a bad argument value as a RuntimeError with this prefix (csrc/cpu/errors.h).
VALUE_ERROR_PREFIX = "ValueError: "


class _CpuKernels:
    """``torch.ops.cai_kernels_cpu`` whose kernels raise ``ValueError`` for a bad argument value."""

    def __getattr__(self, name: str):
        kernel = getattr(torch.ops.cai_kernels_cpu, name)

        def call(*args):
            try:
                return kernel(*args)
            except RuntimeError as error:
                message = str(error)
                if message.startswith(VALUE_ERROR_PREFIX):
                    raise ValueError(message[len(VALUE_ERROR_PREFIX):]) from None
                raise

        call.__name__ = name
        setattr(self, name, call)  # later lookups skip __getattr__
        return call


cpu_kernels = _CpuKernels()


@functools.cache
def warn_fallback_once(device_type: str, reason: str) -> None:
    """Says once per device type and reason that an op runs on the slower reference implementation."""
    warnings.warn(f"cai_kernels: no compiled kernels for {device_type} tensors ({reason}); "
                  "using the reference PyTorch implementation", RuntimeWarning, stacklevel=4)
