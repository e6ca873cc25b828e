"""LayerNorm over the last dimension, forward and backward in Triton: one program normalises a row in one pass
over it, in float32 whatever the input's dtype; the backward's weight and bias gradients are summed per program and
then across programs, so no atomics and the same bits every run.

Under autocast it writes the autocast dtype: what follows a LayerNorm in a transformer is a matmul, which would
cast the float32 output PyTorch's LayerNorm gives to that dtype anyway, at the cost of one more pass over the
activations (same numbers either way; the gradient flows back in float32).

Written here rather than taken from a package: the issue this answers asks for the GPT-2 fusions as our own
kernels, beside their references, and Apex's fused LayerNorm (what the paper's runs used) needs a CUDA build.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import INTERPRET, KeptLaunches, cdiv, check_tensors, launch, next_pow2, sm_count
from .torch_op import differentiable, kernel_op

MAX_FEATURES = 16384  # a row is held in registers at once
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _layer_norm_fwd(X, W, B, Y, Mean, Rstd, stride_x, stride_y, n, eps, HAS_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < n
    x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / n
    centred = tl.where(inside, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / n + eps)
    y = centred * rstd
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=inside)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_bwd(X, W, DY, DX, Mean, Rstd, DW, DB, stride_x, stride_dy, stride_dx, n, rows, rows_per_program,
                    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK], 1.0, tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    first = program.to(tl.int64) * rows_per_program  # 64-bit row offsets: activations may exceed 2^31 values
    for r in range(first, tl.minimum(first + rows_per_program, rows)):
        x = tl.load(X + r * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * stride_dy + cols, mask=inside, other=0.0).to(tl.float32)
        x_hat = tl.where(inside, (x - tl.load(Mean + r)) * tl.load(Rstd + r), 0.0)
        w_dy = w * dy
        dx = (w_dy - x_hat * (tl.sum(x_hat * w_dy, 0) / n) - tl.sum(w_dy, 0) / n) * tl.load(Rstd + r)
        tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=inside)
        dw += dy * x_hat
        db += dy
    tl.store(DW + program * n + cols, dw, mask=inside)
    tl.store(DB + program * n + cols, db, mask=inside)


_kept = KeptLaunches()  # a training loop repeats each call's shapes: launched directly from the second call on


def _warps(block: int) -> int:
    return min(max(block // 256, 1), 8)  # a warp per 256 features of a row, up to 8


def _shape(t: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def _check(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, out_dtype: torch.dtype) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in DTYPES:
            raise ValueError(f"layer_norm takes {[str(d) for d in DTYPES]}, not {name} of {t.dtype}")
    if out_dtype not in DTYPES:
        raise ValueError(f"layer_norm writes {[str(d) for d in DTYPES]}, not out_dtype={out_dtype}")
    n = x.shape[-1] if x.dim() else 0  # a 0-dim x has no features to normalise
    if not 0 < n <= MAX_FEATURES or any(t is not None and t.shape != (n,) for t in (weight, bias)):
        raise ValueError(f"layer_norm normalises x's last dimension, of 1 up to {MAX_FEATURES} features, with a "
                         f"weight and a bias of that many (or None); got x of shape {tuple(x.shape)}, a weight of "
                         f"shape {_shape(weight)} and a bias of shape {_shape(bias)}")
    check_tensors("layer_norm", True, x=x, weight=weight, bias=bias)


def _layer_norm_fake(x, weight, bias, eps, out_dtype):
    rows = x.numel() // x.shape[-1]
    # contiguous, as the kernel writes them, whatever x's layout
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(rows, dtype=torch.float32),
            x.new_empty(rows, dtype=torch.float32))


@kernel_op("layer_norm", fake=_layer_norm_fake)
def _layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty_like(rows, dtype=out_dtype)
    mean = torch.empty(rows.shape[0], device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block = next_pow2(rows.shape[1])
    # a missing weight or bias is a constexpr flag; the kernel never reads the rows given in its place
    w, b = (rows if t is None else t for t in (weight, bias))
    launch(_layer_norm_fwd, (rows.shape[0],), (rows, w, b, y, mean, rstd, rows.stride(0), y.stride(0),
                                               rows.shape[1], eps),
           dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK=block, num_warps=_warps(block)),
           _kept((rows, w, b, y)), "forward")
    return y.view(x.shape), mean, rstd


def _layer_norm_backward_fake(dy, x, weight, mean, rstd):
    n = x.shape[-1]
    return x.new_empty(x.shape), x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


# the weight and bias gradients in float32, whether or not there are a weight and a bias: the autograd rule casts
# those there are to their dtypes
@kernel_op("layer_norm_backward", fake=_layer_norm_backward_fake)
def _layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                         rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, dy = x.reshape(-1, x.shape[-1]).contiguous(), dy.reshape(-1, x.shape[-1]).contiguous()
    n_rows, n = rows.shape
    # enough programs to fill a GPU (each sums its rows' weight gradients), few in the interpreter
    programs = max(1, min(n_rows, 8 if INTERPRET else 4 * sm_count(rows.device)))
    dx = torch.empty_like(rows)
    dw = torch.empty((programs, n), device=rows.device, dtype=torch.float32)
    db = torch.empty_like(dw)
    block = next_pow2(n)
    w = rows if weight is None else weight  # not read without a weight
    launch(_layer_norm_bwd, (programs,), (rows, w, dy, dx, mean, rstd, dw, db, rows.stride(0), dy.stride(0),
                                          dx.stride(0), n, n_rows, cdiv(n_rows, programs)),
           dict(HAS_WEIGHT=weight is not None, BLOCK=block, num_warps=_warps(block)), _kept((rows, w, dy, dx, dw)),
           "backward")
    return dx.view(x.shape), dw.sum(0), db.sum(0)


def _save_for_backward(ctx, inputs, output):
    x, weight, bias, *_ = inputs
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, *output[1:])


def _gradients(ctx, dy, dmean, drstd):
    saved = ctx.saved_tensors  # read once: non-reentrant checkpointing refuses a second unpacking
    weight = saved[1]
    dx, dw, db = _layer_norm_backward(dy, *saved)
    dw = None if weight is None else dw.to(weight.dtype)
    db = None if ctx.bias_dtype is None else db.to(ctx.bias_dtype)
    return dx, dw, db, None, None


_layer_norm_function = differentiable(_layer_norm, _save_for_backward, _gradients)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)` in `out_dtype`: by default the
    autocast dtype under autocast, else x's. Without a weight or a bias (None), the normalised rows are not scaled
    or not shifted."""
    if out_dtype is None:
        device = x.device.type
        # meta tensors (shapes alone) have no autocast, and asking about it is an error
        autocast = device != "meta" and torch.is_autocast_enabled(device)
        out_dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    _check(x, weight, bias, out_dtype)
    # the kernels read weight and bias as dense vectors (a view with a stride, of a packed parameter, is copied)
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    return _layer_norm_function(x, weight, bias, float(eps), out_dtype)[0]


class LayerNorm(torch.nn.LayerNorm):
    """`torch.nn.LayerNorm` over the last dimension, through the kernels above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)
