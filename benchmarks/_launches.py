"""Counting (or skipping) the device work of one op call, without a GPU.

A GPU user waits, at small sizes, for the host: Python, the dispatcher, and one Triton / CUDA launch per
kernel. Two tools measure that here, on CPU tensors:

``triton_launches(run=True)``: replaces every Triton kernel of ``cai_kernels.triton`` (each module global named
``*_kernel`` that is a ``triton.runtime.KernelInterface``: the launched ``@triton.jit`` / autotuned kernels, in
every module that imported them; the helpers they call stay) by a recorder that lists the kernels launched and
runs them (``run=True``) or skips them (``run=False``: outputs uninitialized, for timing the host alone).

``torch_launches()``: lists, through the PyTorch profiler, the PyTorch ops that would each be a device kernel on
CUDA: the innermost arithmetic, copy, fill and reduction ops (``aten::zeros`` counts as its ``fill_``), and each
C++ kernel of ``torch.ops.cai_kernels_cpu`` as one; not views, ``empty`` or other metadata-only ops, nor what the
Triton interpreter runs. A profiler, not a dispatch mode: an active ``TorchDispatchMode`` would send the ops down
their traced path (the custom ops), which is not what an eager call runs.

``launches(run=...)`` is both, with ``counter.triton`` / ``counter.torch`` / ``counter.total``.

On a GPU, ``torch.profiler`` with CUDA activity counts the real kernels (``tests/test_launches.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil

import torch

# Outputs that the host reads back as indices after a launch (choice_logprobs' backward gathers through the option
# slots): with the launch skipped they are zero-filled, so that the timed call stays valid.
ZERO_WHEN_SKIPPED = {"option_scores_kernel": ("option_slot_ptr",)}

# aten ops that launch nothing on a device: allocation, views, metadata, dtype arithmetic.
_NO_LAUNCH = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
    "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "expand", "squeeze", "unsqueeze", "select",
    "slice", "narrow", "t", "transpose", "permute", "movedim", "flatten", "unflatten", "unbind", "split", "chunk",
    "view_as", "expand_as", "diagonal", "unfold", "_local_scalar_dense", "item", "is_same_size", "resize_",
    "promote_types", "result_type", "size", "stride", "numel", "dim", "is_contiguous", "contiguous", "to",
    "_to_copy_noop", "type_as", "set_", "is_nonzero", "lift", "zeros_like_noop", "sym_size", "sym_stride",
}
_TRITON_RANGE = "cai_kernels::triton_launch"


def triton_modules() -> list:
    """Every module of ``cai_kernels.triton``, imported."""
    import cai_kernels.triton as package

    names = [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    return [importlib.import_module(name) for name in names if not name.endswith("._aot")]


class _Recorder:
    """Stands in for one Triton kernel: ``kernel[grid](*args)`` records, then runs it (``run``) or nothing."""

    def __init__(self, name: str, kernel, counter: LaunchCounter):
        self.name, self.kernel, self.counter = name, kernel, counter

    def _skip(self, *args, **kwargs):
        self.counter.triton.append(self.name)

    def __getitem__(self, grid):
        if not self.counter.run and self.name not in ZERO_WHEN_SKIPPED:
            return self._skip  # the cheapest stand-in: the host time measured is the op's, not the stub's
        launch = self.kernel[grid] if self.counter.run else None

        def call(*args, **kwargs):
            args = [a.kernel if isinstance(a, _Recorder) else a for a in args]
            kwargs = {k: v.kernel if isinstance(v, _Recorder) else v for k, v in kwargs.items()}
            self.counter.triton.append(self.name)
            if launch is None:
                for arg in ZERO_WHEN_SKIPPED.get(self.name, ()):
                    args[self.kernel.arg_names.index(arg)].zero_()
                return None
            with torch.profiler.record_function(_TRITON_RANGE):  # the interpreter's own tensor copies are not device work
                return launch(*args, **kwargs)
        return call

    def __getattr__(self, name):  # constexpr reads, .fn, ...: the kernel's own
        return getattr(self.kernel, name)


class LaunchCounter:
    def __init__(self, run: bool):
        self.run = run
        self.triton: list[str] = []
        self.torch: list[str] = []

    @property
    def total(self) -> int:
        return len(self.triton) + len(self.torch)

    def reset(self) -> None:
        self.triton.clear()
        self.torch.clear()


@contextlib.contextmanager
def triton_launches(*, run: bool = True, counter: LaunchCounter | None = None):
    """Records (and runs, or skips) every Triton launch of ``cai_kernels`` in its body."""
    from triton.runtime.jit import KernelInterface

    counter = counter or LaunchCounter(run)
    patched = []
    for module in triton_modules():
        for name, value in list(vars(module).items()):
            if name.endswith("_kernel") and isinstance(value, KernelInterface):
                patched.append((module, name, value))
                setattr(module, name, _Recorder(name, value, counter))
    try:
        yield counter
    finally:
        for module, name, value in patched:
            setattr(module, name, value)


def _launching(event) -> bool:
    name = event.name
    if name.startswith("cai_kernels_cpu::"):
        return True
    if not name.startswith("aten::"):
        return False
    return name[len("aten::"):] not in _NO_LAUNCH


def _count(events, out: list[str]) -> None:
    """The launching ops among ``events`` (a profiler's top-level events), innermost first: an op counts when
    nothing inside it launches (aten::zeros counts as its aten::fill_); a C++ kernel of ours counts once."""
    for event in events:
        if event.name == _TRITON_RANGE:
            continue
        if event.name.startswith("cai_kernels_cpu::"):
            out.append(event.name)
            continue
        inner: list[str] = []
        _count(event.cpu_children, inner)
        if inner:
            out.extend(inner)
        elif _launching(event):
            out.append(event.name[len("aten::"):])


@contextlib.contextmanager
def torch_launches(counter: LaunchCounter | None = None):
    """Lists in ``counter.torch`` the PyTorch ops of its body that would launch a device kernel (see module doc)."""
    counter = counter or LaunchCounter(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        yield counter
    top = [e for e in profile.events() if e.cpu_parent is None]
    _count(top, counter.torch)


@contextlib.contextmanager
def launches(*, run: bool = True):
    """Both counts over its body: ``counter.triton`` (Triton launches, run or skipped) and ``counter.torch``."""
    with triton_launches(run=run) as counter, torch_launches(counter):
        yield counter
