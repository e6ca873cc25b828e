"""GELU (the tanh approximation GPT-2 uses, transformers' "gelu_new") of x + bias, forward and backward in one
elementwise kernel each: the unfused module reads and writes the 4·hidden activations twice (bias add, then GELU)
and saves both for the backward; this reads x once, writes y once, and saves x alone.

0.5·z·(1 + tanh(u)) is computed as z·sigmoid(2u), the same function without a tanh (which Triton's interpreter
lacks), with u = sqrt(2/pi)·(z + 0.044715·z³).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .runtime import KeptLaunches, cdiv, check_tensors, launch
from .torch_op import differentiable, kernel_op

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK = 1024
SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


@triton.jit
def _bias_gelu_kernel(X, Bias, DY, Out, total, n, K: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    """Out = gelu(X + Bias) forward; Out = DY · gelu'(X + Bias) backward. X, DY, Out: contiguous (rows, n)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < total
    z = tl.load(X + offsets, mask=inside, other=0.0).to(tl.float32) + \
        tl.load(Bias + offsets % n, mask=inside, other=0.0).to(tl.float32)
    s = tl.sigmoid(2.0 * K * (z + 0.044715 * z * z * z))
    if BACKWARD:
        dy = tl.load(DY + offsets, mask=inside, other=0.0).to(tl.float32)
        out = dy * (s + z * 2.0 * s * (1.0 - s) * K * (1.0 + 3.0 * 0.044715 * z * z))
    else:
        out = z * s
    tl.store(Out + offsets, out.to(Out.dtype.element_ty), mask=inside)


_kept = KeptLaunches()  # a training loop repeats each call's shapes: launched directly from the second call on


def _launch(x: torch.Tensor, bias: torch.Tensor, dy: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty_like(x)
    backward = dy is not None
    dy = dy if backward else x  # read only by the backward
    launch(_bias_gelu_kernel, (cdiv(x.numel(), BLOCK),), (x, bias, dy, out, x.numel(), x.shape[-1]),
           dict(K=SQRT_2_OVER_PI, BACKWARD=backward, BLOCK=BLOCK), _kept((x, bias, dy, out), backward), "gelu")
    return out


# the fakes contiguous, as the kernel writes its outputs whatever x's layout
@kernel_op("bias_gelu", fake=lambda x, bias: x.new_empty(x.shape))
def _bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _launch(x.contiguous(), bias, None)


@kernel_op("bias_gelu_backward", fake=lambda dy, x, bias: (x.new_empty(x.shape), bias.new_empty(bias.shape)))
def _bias_gelu_backward(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dx = _launch(x.contiguous(), bias, dy.contiguous())
    return dx, dx.reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)


def _save_for_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gradients(ctx, dy):
    return _bias_gelu_backward(dy, *ctx.saved_tensors)


_bias_gelu_function = differentiable(_bias_gelu, _save_for_backward, _gradients)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation, of x + bias (bias over x's last dimension), in x's dtype."""
    n = x.shape[-1] if x.dim() else 0  # a 0-dim x has no features (its shape[-1:], (), is a 0-dim bias's shape)
    if x.dtype not in DTYPES or bias.dtype not in DTYPES or n == 0 or bias.shape != (n,):
        raise ValueError(f"bias_gelu takes x and a bias of its last dimension (at least 1), of "
                         f"{[str(d) for d in DTYPES]}; got x {x.dtype} {tuple(x.shape)}, bias {bias.dtype} "
                         f"{tuple(bias.shape)}")
    check_tensors("bias_gelu", True, x=x, bias=bias)
    return _bias_gelu_function(x, bias.contiguous())  # the kernels read it as a dense vector
