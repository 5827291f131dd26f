"""One kernel entry point of an op: called directly in eager mode, as a torch.library custom op when traced.

``KernelOp("gae", kernel="gae_fwd", args="Tensor rewards, Tensor values, Tensor mask", params=GaeParams,
returns="(Tensor, Tensor)")`` defines the custom op ``cai_kernels::gae`` with the schema
``(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam, str backend) -> (Tensor, Tensor)``:
the leading arguments, the fields of the op's parameter bundle (``cai_kernels/_params.py``, a NamedTuple:
``*params`` is its flat form) and the backend. The kernel is the backend's (found through
``_registry.kernels``): the Triton launcher ``cai_kernels/triton/gae.py:gae_fwd(rewards, values, mask, params)``
with the bundle, or the C++ kernel ``torch.ops.cai_kernels_cpu.gae_fwd(rewards, values, mask, gamma, lam)``
with its fields.

Calling a KernelOp (``op(*args, params=..., backend=...)``) takes one of four paths:

  traced     torch.compile is tracing, or a dispatch mode (fake tensors, FlopCounter, ...) is active: the
             custom op, whose fake implementation and autograd formula torch.compile needs.
  eager      no gradient needed: the kernel itself (``run``): no dispatcher round trip (~40 us on this CPU),
             no autograd node.
  autograd   a differentiable input requires grad: a ``torch.autograd.Function`` built from the same
             ``setup_context`` / ``backward`` formulas as the custom op's autograd, running the kernels directly.
  torch.func a functorch transform is active (``torch.func.grad``, ``vjp``, ``vmap``): the same
             autograd.Function in the form functorch requires (a ``setup_context`` staticmethod); its backward
             runs the kernels on the plain tensors under the transform's wrappers. First-order reverse mode only:
             ``vmap`` where the KernelOp has a ``vmap`` rule, a clear NotImplementedError otherwise, and for
             forward mode (``jvp``, ``jacfwd``), a vmap over the backward (``jacrev``, ``hessian``) and
             higher-order gradients.

Fake implementations and autograd formulas see the bundle, never its flat fields: ``fake(*args, params)``,
``setup_context(ctx, args, params, backend, output)``, and ``backward(ctx, *grads)`` returning the gradients
of the leading arguments only. A gradient of an output that nothing used arrives as None (eager and torch.func;
the custom op's autograd hands over zeros): formulas handle both.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import _registry
from .._params import schema

_functorch = torch._C._functorch
_unwrap_if_dead = _functorch.unwrap_if_dead


def traced() -> bool:
    """torch.compile is tracing, or a dispatch mode is active: tensors may have no data (fake, meta)."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


class KernelOp:
    instances: list[KernelOp] = []  # every one defined, for the schema checks of tests/test_registry.py

    def __init__(self, name: str, *, op: str, kernel: str, args: str, params: type | None, returns: str,
                 at_run=None, vmap=None):
        """``at_run(params, backend) -> params``: settles what depends on the machine at run time (not while
        torch.compile traces), e.g. a block size from the thread count. ``vmap(in_dims, *args, params, backend)
        -> (outputs, out_dims)``: the op under ``torch.vmap`` with the batch dimensions of its leading arguments
        (None: not batched), for ops whose math allows it (rows that are independent)."""
        self.name, self.op, self.kernel, self.params, self.at_run = name, op, kernel, params, at_run
        self.vmap_rule = vmap
        self._kernels: dict[str, object] = {}  # backend -> the kernel function, found through _registry.kernels
        KernelOp.instances.append(self)
        self.n_args = len(args.split(","))
        fields = f", {schema(params)}" if params is not None else ""
        self.n_flat = self.n_args + (len(params._fields) if params is not None else 0) + 1
        self.custom_op = torch.library.custom_op(f"cai_kernels::{name}", self._dispatched, mutates_args=(),
                                                 schema=f"({args}{fields}, str backend) -> {returns}")
        self._overload = getattr(torch.ops.cai_kernels, name).default  # what custom_op's __call__ calls
        self._autograd = None       # autograd.Function of eager calls that need gradients (register_autograd)
        self._transformable = _transformable_function(self, None, None)  # torch.func's form of it

    # ---- the kernel --------------------------------------------------------------------------------

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
            return _unaliased(self._kernel_for("cpu")(*flat[:-1]), flat)
        args, params, backend = self._unpack(flat)
        return _unaliased(self.run(*args, params=params, backend=backend), flat)

    def run(self, *args, params, backend: str):
        """The kernel itself: no custom op, no autograd."""
        kernel = self._kernels.get(backend) or self._kernel_for(backend)
        if params is None:
            return kernel(*args)
        if self.at_run is not None:
            params = self.at_run(params, backend)
        # the C++ kernels take the bundle's fields (m.def schemas name them), the Triton launchers the bundle
        return kernel(*args, *params) if backend == "cpu" else kernel(*args, params)

    # ---- a call: the four paths of the module docstring --------------------------------------------

    def __call__(self, *args, params, backend: str):
        if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
            return self._overload(*args, backend) if params is None else self._overload(*args, *params, backend)
        if torch._C._are_functorch_transforms_active():
            for arg in args:
                if isinstance(arg, torch.Tensor) and _functorch.is_functorch_wrapped_tensor(arg):
                    return self._transformable.apply(*args, params, backend)
            with torch._C._DisableFuncTorch():  # plain tensors (in our backward, or constants): plain outputs
                return self.run(*args, params=params, backend=backend)
        if self._autograd is not None and torch.is_grad_enabled():
            for arg in args:
                if arg is not None and arg.requires_grad:
                    # Function.apply without its Python prologue (~3 us): with no functorch transform active and
                    # no setup_context staticmethod it unwraps dead functorch wrappers and calls the C++ apply
                    args = tuple(_unwrap_if_dead(a) if isinstance(a, torch.Tensor) else a for a in args)
                    return self._autograd_apply(*args, params, backend)
        return self.run(*args, params=params, backend=backend)

    # ---- registration ------------------------------------------------------------------------------

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
        self._autograd = _autograd_function(self, backward, setup_context)
        self._autograd_apply = super(torch.autograd.Function, self._autograd).apply  # torch._C._FunctionBase's
        self._transformable = _transformable_function(self, backward, setup_context)


def _unaliased(output, inputs: tuple):
    """``output`` with each tensor that shares memory with an input or an earlier output cloned: a custom op's
    outputs may alias nothing (torch.library's rule). Only the traced path pays for it; eager calls keep the
    views (e.g. a head's weight and bias gradients as two views of one table the kernel wrote at once)."""
    if isinstance(output, torch.Tensor):
        seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel()}
        return output.clone() if output.numel() and output.untyped_storage().data_ptr() in seen else output
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel()}
    fixed = []
    for t in output:
        if isinstance(t, torch.Tensor) and t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        fixed.append(t)
    return tuple(fixed)


def _autograd_function(kernel_op: KernelOp, backward, setup_context) -> type:
    """The eager autograd.Function of ``kernel_op``: ``apply(*args, params, backend)``.

    Its forward takes ``ctx`` (no ``setup_context`` staticmethod): ``Function.apply`` then skips binding the
    arguments to the signature with ``inspect`` (~10 us a call)."""
    run, n_args = kernel_op.run, kernel_op.n_args

    def forward(ctx, *inputs):
        args, params, backend = inputs[:n_args], inputs[n_args], inputs[n_args + 1]
        ctx.set_materialize_grads(False)
        output = run(*args, params=params, backend=backend)
        setup_context(ctx, args, params, backend, output)
        return output

    @once_differentiable
    def backward_once(ctx, *grads):
        return (*backward(ctx, *grads), None, None)

    def backward_(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph=True: once_differentiable's guard against a double backward
            return backward_once(ctx, *grads)
        # what once_differentiable does with grad mode off (a plain backward), without its no_grad context
        return (*backward(ctx, *grads), None, None)

    return type(f"{kernel_op.name}_autograd", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward_)})


def _transformable_function(kernel_op: KernelOp, backward, setup_context) -> type:
    """The torch.func form: ``forward`` without ctx plus ``setup_context``; ``backward`` runs the kernels on the
    plain tensors of the current grad level; ``vmap`` from the KernelOp's rule; ``jvp`` says it is not supported."""
    name, n_args = kernel_op.op, kernel_op.n_args

    def forward(*inputs):
        return kernel_op.run(*inputs[:n_args], params=inputs[n_args], backend=inputs[n_args + 1])

    def setup_context_(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        if setup_context is not None:
            setup_context(ctx, inputs[:n_args], inputs[n_args], inputs[n_args + 1], output)

    def backward_(ctx, *grads):
        if backward is None:
            raise NotImplementedError(f"cai_kernels.{name} is not differentiable")
        grads = tuple(_plain(g, name) for g in grads)
        with torch._C._DisableFuncTorch():
            return (*backward(_PlainContext(ctx, name), *grads), None, None)

    def vmap(info, in_dims, *inputs):
        if kernel_op.vmap_rule is None:
            raise NotImplementedError(
                f"cai_kernels.{name} does not support torch.vmap: its kernels reduce over or couple the rows of "
                "the batch; call it once per slice (or on the whole batch) instead")
        return kernel_op.vmap_rule(in_dims[:n_args], *inputs[:n_args], params=inputs[n_args],
                                   backend=inputs[n_args + 1])

    def jvp(ctx, *tangents):
        raise NotImplementedError(f"cai_kernels.{name} does not support forward-mode AD (torch.func.jvp, jacfwd); "
                                  "use reverse mode: torch.func.grad, vjp, or torch.autograd")

    return type(f"{kernel_op.name}_transformable", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "setup_context": staticmethod(setup_context_),
                 "backward": staticmethod(backward_), "vmap": staticmethod(vmap), "jvp": staticmethod(jvp)})


def _plain(t, name: str):
    """A tensor of the innermost torch.func.grad level as the plain tensor it wraps (None and non-tensors as
    they are). The kernels read memory, so a vmapped gradient (jacrev, hessian) or a second grad level
    (a gradient of a gradient) cannot reach them: clear errors."""
    if not isinstance(t, torch.Tensor):
        return t
    if _functorch.is_gradtrackingtensor(t):
        t = _functorch.get_unwrapped(t)
    if _functorch.is_batchedtensor(t):
        raise NotImplementedError(
            f"cai_kernels.{name}'s backward does not support torch.vmap (torch.func.jacrev, hessian, vmap over "
            "grad or vjp); use torch.func.grad / vjp per sample, or torch.autograd")
    if _functorch.is_functorch_wrapped_tensor(t):
        raise NotImplementedError(f"cai_kernels.{name} supports first-order gradients only: its backward is a "
                                  "kernel, not differentiable again (no gradient of a gradient)")
    return t


class _PlainContext:
    """The autograd ctx as the backward formulas read it, with the saved tensors unwrapped (``_plain``)."""

    def __init__(self, ctx, name: str):
        self._ctx = ctx
        self.saved_tensors = tuple(_plain(t, name) for t in ctx.saved_tensors)

    def __getattr__(self, attr):
        return getattr(self._ctx, attr)
