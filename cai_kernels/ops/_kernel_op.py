"""One kernel entry point of an op as the torch.library custom op that autograd and torch.compile see.

``KernelOp("gae", kernel="gae_fwd", args="Tensor rewards, Tensor values, Tensor mask", params=GaeParams,
returns="(Tensor, Tensor)")`` defines the custom op ``cai_kernels::gae`` with the schema
``(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam, str backend) -> (Tensor, Tensor)``:
the leading arguments, the fields of the op's parameter bundle (``cai_kernels/_params.py``, a NamedTuple:
``*params`` is its flat form) and the backend. Its implementation calls the backend's kernel (found
through ``_registry.kernels``): the Triton launcher ``cai_kernels/triton/gae.py:gae_fwd(rewards, values,
mask, params)`` with the bundle rebuilt, or the C++ kernel ``torch.ops.cai_kernels_cpu.gae_fwd(rewards,
values, mask, gamma, lam)`` with its fields.

Fake implementations and autograd formulas are registered through the KernelOp, and see the bundle,
never its flat fields: ``fake(*args, params)``, ``setup_context(ctx, args, params, backend, output)``, and
``backward(ctx, *grads)`` returning the gradients of the leading arguments only.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._params import schema


class KernelOp:
    instances: list[KernelOp] = []  # every one defined, for the schema checks of tests/test_registry.py

    def __init__(self, name: str, *, op: str, kernel: str, args: str, params: type | None, returns: str,
                 at_run=None):
        """``at_run(params, backend) -> params``: settles what depends on the machine at run time (not while
        torch.compile traces), e.g. a block size from the thread count."""
        self.op, self.kernel, self.params, self.at_run = op, kernel, params, at_run
        self._kernels: dict[str, object] = {}  # backend -> the kernel function, found through _registry.kernels
        KernelOp.instances.append(self)
        self.n_args = len(args.split(","))
        fields = f", {schema(params)}" if params is not None else ""
        self.n_flat = self.n_args + (len(params._fields) if params is not None else 0) + 1
        self.custom_op = torch.library.custom_op(f"cai_kernels::{name}", self._dispatched, mutates_args=(),
                                                 schema=f"({args}{fields}, str backend) -> {returns}")
        self._overload = getattr(torch.ops.cai_kernels, name).default  # what custom_op's __call__ calls

    def _unpack(self, flat: tuple):
        """(leading args, bundle or None, backend) from the custom op's flat arguments."""
        n = self.n_args
        params = self.params(*flat[n:-1]) if self.params is not None else None
        return flat[:n], params, flat[-1]

    def _kernel_for(self, backend: str):
        kernel = self._kernels.get(backend)
        if kernel is None:
            kernel = self._kernels[backend] = getattr(_registry.kernels(self.op, backend), self.kernel)
        return kernel

    def _dispatched(self, *flat):
        if flat[-1] == "cpu" and self.at_run is None:
            # the C++ kernels take the bundle's fields flat, as the dispatcher hands them over
            return self._kernel_for("cpu")(*flat[:-1])
        args, params, backend = self._unpack(flat)
        return self.run(*args, params=params, backend=backend)

    def run(self, *args, params, backend: str):
        """The kernel itself, without the custom op's dispatcher round trip (see ``call_kernel_directly``)."""
        kernel = self._kernel_for(backend)
        if params is None:
            return kernel(*args)
        if self.at_run is not None:
            params = self.at_run(params, backend)
        # the C++ kernels take the bundle's fields (m.def schemas name them), the Triton launchers the bundle
        return kernel(*args, *params) if backend == "cpu" else kernel(*args, params)

    def __call__(self, *args, params, backend: str):
        if params is None:
            return self._overload(*args, backend)
        return self._overload(*args, *params, backend)

    def register_fake(self, fake):
        """``fake(*args, params)``: empty outputs of the right shapes and dtypes."""
        def flat_fake(*flat):
            args, params, _ = self._unpack(flat)
            return fake(*args, params)

        self.custom_op.register_fake(flat_fake)
        return fake

    def register_autograd(self, backward, *, setup_context):
        """``setup_context(ctx, args, params, backend, output)``; ``backward(ctx, *grads)`` returns one
        gradient (or None) per leading argument."""
        padding = (None,) * (self.n_flat - self.n_args)

        def flat_setup_context(ctx, inputs, output):
            args, params, backend = self._unpack(inputs)
            setup_context(ctx, args, params, backend, output)

        def flat_backward(ctx, *grads):
            return (*backward(ctx, *grads), *padding)

        self.custom_op.register_autograd(flat_backward, setup_context=flat_setup_context)


def call_kernel_directly(*differentiable: torch.Tensor) -> bool:
    """Whether a public op may call its kernel directly (``KernelOp.run``) rather than through its custom op.

    The custom op (what torch.compile traces, what autograd hooks into) costs a ~40 us dispatcher
    round trip per call, as much as gae's whole kernel on [256, 1024]. Plain eager calls that need
    no gradient skip it: not while tracing, under a dispatch mode (fake tensors) or a functorch
    transform, nor when one of ``differentiable`` needs a gradient.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or \
            torch._C._are_functorch_transforms_active():
        return False
    if torch.is_grad_enabled():
        for t in differentiable:
            if t.requires_grad:
                return False
    return True
