"""Scissorhands' pivotal-token counts, updated for one decode step by one kernel.

Per query head and cached slot: `count`, how many of the last `window` queries gave the slot's token more than
1/t of their attention (t: the tokens the query saw, the first `n_visible` slots), and `history`, those queries'
bits in a ring of ceil(window / 8) bytes, so that the window slides exactly: this step's bit replaces the one
`window` steps old, and the count gains the new bit and loses the old. In PyTorch that is a dozen launches and
passes over the statistics per layer and step, several times the decode attention it follows; here it is one
read of the probabilities (or of the scores that the decode kernel stored, with their log-sum-exp: no pass that
makes probabilities first) and one of the count and of the ring's byte.

The ring may be laid out byte-plane by byte-plane (`ring_history`: a step's bytes of all slots contiguous), which
is what makes that last read cheap: slot by slot (contiguous), each step touches one byte in 32 of every sector it
reads. The kernel takes either.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import cdiv, check_tensors

BLOCK = 256
LOG2E = tl.constexpr(1.4426950408889634)


def check_window(window) -> None:
    """ValueError unless `window` (w: the queries a count covers, and the ring's bits) is an integer >= 1."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window={window!r} (w, the queries whose pivotal bits the ring keeps) must be an "
                         "integer >= 1")


def ring_history(batch: int, heads: int, slots: int, window: int, device) -> torch.Tensor:
    """A zero ring of (batch, heads, slots, ceil(window / 8)) bytes, stored byte-plane by byte-plane."""
    check_window(window)
    return torch.zeros(batch, heads, -(-window // 8), slots, dtype=torch.uint8, device=device).transpose(2, 3)


@triton.jit
def _update(Weights, LSE, Count, History, slots, n_visible, threshold, byte, bit, stride_weights, stride_h_row,
            stride_h_slot, stride_h_byte, FROM_SCORES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = slot < slots
    p = tl.load(Weights + row * stride_weights + slot, mask=inside & (slot < n_visible), other=0.0)
    if FROM_SCORES:  # past n_visible the scores are undefined: masked above, and not pivotal below
        p = tl.math.exp2((p - tl.load(LSE + row)) * LOG2E)
    pivotal = ((p > threshold) & (slot < n_visible)).to(tl.int32)
    ring = History + row * stride_h_row + slot.to(tl.int64) * stride_h_slot + byte * stride_h_byte
    old = tl.load(ring, mask=inside, other=0).to(tl.int32)
    count = Count + row * slots + slot
    tl.store(count, tl.load(count, mask=inside, other=0) + pivotal - ((old >> bit) & 1), mask=inside)
    tl.store(ring, ((old & (255 ^ (1 << bit))) | (pivotal << bit)).to(tl.uint8), mask=inside)


def update_pivotal_counts(probs: torch.Tensor, count: torch.Tensor, history: torch.Tensor, n_visible: int,
                          step: int, window: int, lse: torch.Tensor | None = None) -> None:
    """In place, for the query at position `step`: probs float32 (batch, heads, slots), count int32 (batch, heads,
    slots) contiguous, history uint8 (batch, heads, slots, ceil(window / 8)), contiguous or from `ring_history`.
    With `lse` (float32 (batch, heads), contiguous), `probs` holds scores instead, as `decode_attention(...,
    return_lse=True, return_scores=True)` returns them: a key's probability is exp(score − lse)."""
    check_window(window)
    b, heads, slots = probs.shape
    if lse is not None and (lse.shape != (b, heads) or lse.dtype != torch.float32 or not lse.is_contiguous()):
        raise ValueError(f"update_pivotal_counts takes lse float32 (batch, heads) = {(b, heads)}, contiguous; got "
                         f"{lse.dtype} {tuple(lse.shape)}")
    ring_bytes = -(-window // 8)
    if (count.shape != probs.shape or history.shape != (b, heads, slots, ring_bytes) or probs.dtype != torch.float32
            or count.dtype != torch.int32 or history.dtype != torch.uint8):
        raise ValueError(f"update_pivotal_counts takes probs float32 (b, h, s), count int32 (b, h, s) and history "
                         f"uint8 (b, h, s, ceil(window/8) = {ring_bytes}); got {probs.dtype} {tuple(probs.shape)}, "
                         f"{count.dtype} {tuple(count.shape)}, {history.dtype} {tuple(history.shape)}")
    if not count.is_contiguous() or probs.stride(-1) != 1 or probs.stride(0) != heads * probs.stride(1) or \
            history.stride(0) != heads * history.stride(1):
        raise ValueError("update_pivotal_counts needs count contiguous, and the rows of probs and of history (batch "
                         "and heads) evenly strided")
    check_tensors("update_pivotal_counts", probs=probs, count=count, history=history, lse=lse)
    if not 1 <= n_visible <= slots:
        raise ValueError(f"n_visible={n_visible} must be between 1 and the {slots} slots")
    byte, bit = divmod(step % window, 8)
    threshold = (torch.ones((), dtype=torch.float32) / n_visible).item()  # 1/t rounded as float32 divides it
    _update[(b * heads, cdiv(slots, BLOCK))](probs, probs if lse is None else lse, count, history, slots,
                                                    n_visible, threshold, byte, bit, probs.stride(1),
                                                    *history.stride()[1:], FROM_SCORES=lse is not None, BLOCK=BLOCK)
