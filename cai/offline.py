"""Offline means offline: no request to the Hugging Face Hub unless downloads are allowed.

transformers, datasets and huggingface_hub read their offline switches (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE,
TRANSFORMERS_OFFLINE) from the environment when they are imported, and then send HEAD requests even for files
in the local cache. So the `cai` command sets the switches first thing, before any of them is imported, when
`allow_download` is false (`go_offline`). Library callers get `hub_offline()`, which also flips the flags of
those libraries when they are already imported, and puts everything back on exit.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# (module, attribute) of the flags the libraries read at request time, once imported
_FLAGS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
          ("datasets.config", "HF_DATASETS_OFFLINE"))


def _set_flags(values: dict) -> None:
    for (module, name), value in values.items():
        if module in sys.modules:
            setattr(sys.modules[module], name, value)


def _env_offline() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ENV)


def go_offline() -> None:
    """Switch the hub libraries offline for the rest of the process (call before importing them)."""
    for name in ENV:
        os.environ[name] = "1"
    _set_flags({flag: True for flag in _FLAGS})


@contextmanager
def hub_offline(enabled: bool = True):
    """Within the block, the hub libraries send no request (when `enabled`); restored afterwards."""
    if not enabled:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in ENV}
    saved_flags = {(m, n): getattr(sys.modules[m], n) for m, n in _FLAGS if m in sys.modules}
    go_offline()
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        # a library imported inside the block read the offline environment: give it the restored one
        restored = {flag: _env_offline() for flag in _FLAGS}
        restored.update(saved_flags)
        _set_flags(restored)
