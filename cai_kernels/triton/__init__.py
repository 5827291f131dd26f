"""Triton kernels, grouped by family. The same source runs on a GPU and, with TRITON_INTERPRET=1,
on CPU tensors through Triton's interpreter (how the test suite runs them on a CPU-only machine).

Nothing here imports triton at package import: ``available()`` says whether it can be used.
"""

from __future__ import annotations

import functools
import importlib.util
import os


# The raw variable as the mapping behind os.environ holds it (what os.environ[...] = / del update): a dict
# lookup (~0.1 us) where os.environ.get costs ~0.5 us, on launchers' host path.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("TRITON_INTERPRET") if hasattr(os.environ, "encodekey") else None
_INTERPRETING: dict = {}


def interpreting() -> bool:
    """True when Triton kernels run through the interpreter (on CPU tensors)."""
    raw = _ENV_DATA.get(_ENV_KEY) if _ENV_DATA is not None and _ENV_KEY is not None else \
        os.environ.get("TRITON_INTERPRET")
    found = _INTERPRETING.get(raw)
    if found is None:
        found = _INTERPRETING[raw] = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
    return found


@functools.cache
def installed() -> tuple[bool, str]:
    """Whether triton can be imported, and if not, why."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
    except Exception as error:  # noqa: BLE001 - a broken install must not break the library
        return False, f"importing triton failed: {error}"
    return True, f"triton {triton.__version__}"


def available_for(device_type: str) -> tuple[bool, str]:
    """Whether Triton kernels can run on tensors of this device type, and why (not)."""
    ok, why = installed()
    if not ok:
        return False, why
    if device_type == "cuda":
        return True, why + " on CUDA"
    if device_type == "cpu":
        if interpreting():
            return True, why + " through the interpreter (TRITON_INTERPRET=1)"
        return False, "Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1"
    return False, f"Triton kernels are not built for {device_type} tensors"
