"""Our kernels as PyTorch operators, cheap to call from eager PyTorch.

torch.compile needs an operator (torch.library) to trace a model that calls a Triton kernel without a graph break;
eager PyTorch does not, and pays for one on every call. Through `torch.library.custom_op` with
`register_autograd`, `flash_attn`'s Python side (all but the kernel launch) took 129 µs a call on this project's
CI machine, with inputs that require gradients; the dispatcher's hops through Python, its checks and its
autograd wrapper were 95 µs of it. On the H200 the `flash_kernel` forward never measured below about 230 µs a
call, whatever the size. So, as PyTorch's maintainers advise for low overhead (pytorch#139500, #176592):
- `kernel_op` defines the operator with `torch.library.define`/`impl` (no custom_op wrapper) and calls it only
  where something traces, fakes or watches the call; in eager, on plain tensors, the implementation is called
  directly;
- `differentiable` puts the autograd rule in a `torch.autograd.Function` around the calls in eager. While
  torch.compile traces, it calls the operator itself, with the same rule registered as its autograd formula
  (`torch.library.register_autograd`, the way PyTorch documents for Triton kernels): Dynamo's tracing of an
  autograd.Function differs between releases (torch 2.11 lost an input of the bias + GELU Function; 2.13 did not).
The same call now takes 34 µs there.
"""
from __future__ import annotations

from typing import Callable

import torch


# How many TorchDispatchModes are active (a mode must see the operator, not the implementation's raw launches).
# Private to PyTorch, in every release this project supports (a test makes sure); should one lack it, every call
# takes the operator: slower in eager, never unseen.
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)


def kernel_op(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Decorator: `impl` (type-annotated, returning new tensors) registered as the operator effrepro::`name`,
    with `fake` giving its outputs' shapes for the compiler; returns what callers call."""
    def register(impl: Callable) -> Callable:
        qualname = f"effrepro::{name}"
        torch.library.define(qualname, torch.library.infer_schema(impl, mutates_args=()))
        torch.library.impl(qualname, "default", impl)
        torch.library.register_fake(qualname, fake)
        op = getattr(torch.ops.effrepro, name).default

        def call(*args):
            # the operator wherever something traces, fakes or watches the call (torch.compile, FakeTensors and
            # other subclasses, meta tensors, a TorchDispatchMode such as make_fx's or selective checkpointing's,
            # torch.jit.trace); the implementation directly for plain tensors in eager
            first = args[0]
            if (torch.compiler.is_compiling() or type(first) is not torch.Tensor or first.is_meta
                    or _dispatch_modes() > 0 or torch.jit.is_tracing()):
                return op(*args)
            return impl(*args)
        call.__doc__, call.__name__ = impl.__doc__, impl.__name__
        call.op = op
        return call
    return register


def differentiable(forward: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """`forward(*inputs) -> outputs`, a `kernel_op`, with gradients from `backward(ctx, *output_grads) ->
    input_grads`, after `setup_context(ctx, inputs, outputs)` saved what it needs (the signatures of
    `register_autograd`). A gradient of an output that nothing used may arrive as None. Once differentiable: the
    backward has no derivative of its own."""
    op = forward.op

    def setup_operator_context(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)  # as the Function: no zeros made (and used) for an output nothing used
        ctx.list_lengths = [len(x) if isinstance(x, (list, tuple)) else None for x in inputs]

    @torch.autograd.function.once_differentiable  # as the Function's, for the operator called directly
    def operator_backward(ctx, *grads):
        # the operator's formula gives a list input a list of gradients; the Function gives it one None
        return tuple([None] * n if n is not None else g for g, n in zip(backward(ctx, *grads), ctx.list_lengths))
    torch.library.register_autograd(op, operator_backward, setup_context=setup_operator_context)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            outputs = forward(*inputs)
            setup_context(ctx, inputs, outputs)
            ctx.set_materialize_grads(False)
            return outputs

        @staticmethod
        @torch.autograd.function.once_differentiable  # a second derivative is an error, never a wrong zero
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Function.__name__ = Function.__qualname__ = f"{forward.__name__.strip('_')}_function"

    def apply(*inputs):
        return op(*inputs) if torch.compiler.is_compiling() else Function.apply(*inputs)
    return apply
