"""Cross-entropy of a linear layer's logits (a language model's head over its vocabulary) without materialising
the logits of every token: the tokens go through in chunks; a chunk's logits are one matmul in the input's dtype,
a Triton kernel turns each row into its loss and overwrites it with its gradient (softmax minus one-hot, times
GRADIENT_SCALE), and two more matmuls give the chunk's input gradient and add its share of the float32 weight
gradient. So the forward computes the gradients too, and the backward only scales them, in float32, by the loss's
incoming gradient, 1/GRADIENT_SCALE and the mean's 1/count: the loss must be the end of the graph or be scaled
linearly after it (as a training loss is). Scaling in the kernel instead rounded the gradients in the logits'
dtype first: in fp16, at GPT-2's 16K tokens, softmax/count rounds to 0 wherever the probability is under 5e-4 (all
but at most 2000 of a row's 50257 logits), and a GradScaler's 2^16 is inf. Where no gradient is wanted (under
torch.no_grad, or neither h nor weight requiring one, as in evaluation), a chunk is its logits' matmul and the loss
alone: no gradient buffers, no gradient matmuls.

At GPT-2's vocabulary of 50257 and 16K tokens, the logits are 1.6 GB in bf16 and twice that in float32, and the
unfused loss keeps both; here a chunk's 256 MB is all (512 MB in float32). Each chunk also reads and writes the
float32 weight gradient once (154 MB at GPT-2's head), so chunks far smaller cost more in that than they save in
memory; that gradient is kept in float32 until the backward (twice the bytes of a bf16 one). Under autocast the
matmuls run in the autocast dtype, as the unfused head's would: the wrapper casts both inputs, because inside
torch.compile's graphs an operator runs with autocast off.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import INTERPRET, check_tensors
from .torch_op import differentiable, kernel_op

CHUNK_ELEMENTS = 1 << 27  # logits per chunk (256 MB in bf16)
# A power of two (exact in any dtype): fp16 probabilities down to 2e-7 stay normal numbers (fp16's start at 6e-5),
# and a row's gradient sums to at most 2 * GRADIENT_SCALE in absolute value, so the input gradient, at most
# 512 max|weight|, stays finite in fp16 for weights under 128.
GRADIENT_SCALE = 256.0
BLOCK = 256 if INTERPRET else 4096


@triton.jit
def _loss_and_gradient(Logits, stride, Targets, Loss, vocab, ignore_index, SCALE: tl.constexpr,
                       GRADIENT: tl.constexpr, BLOCK: tl.constexpr):
    """Row r of Logits: Loss[r] = logsumexp - logit[target] (0 for an ignored row); with GRADIENT, the row becomes
    (softmax - one_hot(target)) · SCALE, the gradient of the row's loss times SCALE (0 for an ignored row)."""
    row = tl.program_id(0).to(tl.int64)
    logits = Logits + row * stride
    target = tl.load(Targets + row)
    largest = tl.zeros([], dtype=tl.float32) - float("inf")
    total = tl.zeros([], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):  # one pass: the running maximum rescales the running sum
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(logits + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32)
        new_largest = tl.maximum(largest, tl.max(x, 0))
        total = total * tl.exp(largest - new_largest) + tl.sum(tl.exp(x - new_largest), 0)
        largest = new_largest
    lse = largest + tl.log(total)
    kept = target != ignore_index
    picked = tl.load(logits + tl.where(kept, target, 0)).to(tl.float32)
    tl.store(Loss + row, tl.where(kept, lse - picked, 0.0))
    if GRADIENT:
        scale = tl.where(kept, SCALE, 0.0)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(logits + cols, mask=cols < vocab, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) * scale - tl.where(cols == target, scale, 0.0)
            tl.store(logits + cols, grad.to(Logits.dtype.element_ty), mask=cols < vocab)


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for a float32 acc: on a GPU, cuBLAS adds the product of bf16/fp16 inputs into acc in place,
    one read and one write of it. The product as a tensor, made float32 and then added, moves 2.5 times the bytes,
    about 0.8 GB a chunk at GPT-2's head (effrepro_kernels/NOTES.md, "The host cost of our attention: kept
    launches")."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
    else:  # the CPU has no mixed-precision addmm
        acc += (a @ b).float()


def _fake(h, weight, targets, ignore_index, chunk_rows, gradients):
    return (h.new_empty((), dtype=torch.float32), torch.empty_like(h) if gradients else h.new_empty(0),
            weight.new_empty(weight.shape if gradients else 0, dtype=torch.float32),
            h.new_empty((), dtype=torch.float32))


# The operator returns the loss, the gradients times GRADIENT_SCALE (empty without `gradients`) and 1/count; the
# autograd rule scales them.
@kernel_op("linear_cross_entropy", fake=_fake)
def _linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                          chunk_rows: int, gradients: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n = h.shape[0]
    kept = (targets != ignore_index).sum()
    inv_count = 1.0 / kept.to(torch.float32)  # no host read: a mean over no token is nan, as in torch
    losses = torch.empty(n, device=h.device, dtype=torch.float32)
    grad_h = torch.empty_like(h) if gradients else h.new_empty(0)
    grad_w = torch.zeros(weight.shape if gradients else 0, device=weight.device, dtype=torch.float32)
    for start in range(0, n, chunk_rows):
        part = slice(start, min(start + chunk_rows, n))
        logits = h[part] @ weight.T
        _loss_and_gradient[(logits.shape[0],)](logits, logits.stride(0), targets[part], losses[part],
                                               logits.shape[1], ignore_index, SCALE=GRADIENT_SCALE,
                                               GRADIENT=gradients, BLOCK=BLOCK)
        if gradients:
            grad_h[part] = logits @ weight
            _add_product(grad_w, logits.T, h[part])
    return losses.sum() * inv_count, grad_h, grad_w, inv_count


def _save_for_backward(ctx, inputs, output):
    ctx.weight_dtype = inputs[1].dtype
    ctx.save_for_backward(*output[1:])


def _gradients(ctx, grad_loss, _grad_h, _grad_w, _inv_count):
    grad_h, grad_w, inv_count = ctx.saved_tensors
    factor = grad_loss.float() * inv_count / GRADIENT_SCALE  # in float32: in fp16, 1/count alone may be subnormal
    return (grad_h.float() * factor).to(grad_h.dtype), (grad_w * factor).to(ctx.weight_dtype), None, None, None, None


_linear_cross_entropy_function = differentiable(_linear_cross_entropy, _save_for_backward, _gradients)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """`F.cross_entropy(h @ weight.T, targets, ignore_index=ignore_index)` (mean over the targets kept) for h
    (tokens, hidden), weight (vocab, hidden), targets (tokens,). `chunk_rows`: tokens per chunk (default: as
    many as keep a chunk's logits within CHUNK_ELEMENTS)."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(f"linear_cross_entropy takes h (tokens, hidden), weight (vocab, hidden) and targets "
                         f"(tokens,); got {tuple(h.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if h.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"linear_cross_entropy takes float16, bfloat16 or float32, not {h.dtype}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy takes targets of torch.int64 or torch.int32 (class indices), not "
                         f"{targets.dtype}")
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy takes chunk_rows an integer >= 1, or None for the default; got "
                         f"chunk_rows={chunk_rows!r}")
    device = h.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        h, weight = h.to(dtype), weight.to(dtype)
    elif h.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy takes h and weight of one dtype outside autocast; got {h.dtype} "
                         f"and {weight.dtype}")
    check_tensors("linear_cross_entropy", True, h=h, weight=weight, targets=targets)
    # a target outside the vocabulary would be read out of bounds; checked on the device, so the host never waits
    # (an error at the next synchronisation, as F.cross_entropy's own check gives on a GPU)
    outside = ((targets >= weight.shape[0]) | (targets < 0)) & (targets != ignore_index)
    torch._assert_async(~outside.any(), f"linear_cross_entropy: a target is outside [0, {weight.shape[0]}) and is "
                        f"not ignore_index={ignore_index}")
    gradients = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _linear_cross_entropy_function(h, weight, targets.contiguous(), ignore_index, chunk_rows, gradients)[0]
