"""Compressing one Linear layer, given its weight W (out, in) and the Hessian H = 2 X Xᵀ / N of the inputs X it
saw on the calibration data (the layer's squared output error ||WX - W'X||² is tr((W-W') H (W-W')ᵀ)).

- `rtn`: round to nearest, asymmetric min/max per output row per group of `group_size` input columns.
- `gptq` (Frantar et al. 2022): quantize column by column; after each column, spread its rounding error over the
  columns not yet quantized with the Optimal Brain Surgeon update, read off the Cholesky factor of H⁻¹.
- `magnitude`: drop the weights of smallest |W| in the layer (or the M-N smallest of each M inputs, N:M).
- `wanda` (Sun et al. 2023): drop the weights of smallest |W_ij| · ||X_j||₂ within each output row; no update.
- `sparsegpt` (Frantar & Alistarh 2023): the GPTQ sweep, where a column's pruned weights are set to zero (and,
  with `bits`, its kept ones rounded) and the error spread over later columns. The mask is chosen along the way:
  for each block of columns by the OBS saliency w² / [H⁻¹]_jj, for N:M every M columns.

Quantized weights are stored as integer codes c in [0, 2^bits) with W' = scale * (c - zero); zero is an integer,
so a pruned weight is exactly code `zero`. Scales are rounded to fp16 before the codes are chosen, since fp16 is
how they are stored. Pruning methods take `bits` too: the kept weights are then rounded to nearest
(magnitude, wanda) or quantized inside the sweep (sparsegpt, the paper's joint mode).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

QUANTIZERS = ("rtn", "gptq")
PRUNERS = ("magnitude", "wanda", "sparsegpt")
METHODS = QUANTIZERS + PRUNERS


@dataclass
class LayerResult:
    weight: torch.Tensor  # the compressed weight as it will compute, (out, in)
    keep: torch.Tensor | None = None  # bool (out, in), the weights kept; None when nothing is pruned
    codes: torch.Tensor | None = None  # int (out, in) in [0, 2^bits); None when not quantized
    scales: torch.Tensor | None = None  # (out, groups)
    zeros: torch.Tensor | None = None  # (out, groups), integers in [0, 2^bits)


def quant_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of `w`, from its min and max widened to include 0."""
    maxq = 2**bits - 1
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = ((hi - lo) / maxq).half().to(w.dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row (or a range below fp16 resolution)
    zero = (-lo / scale).round().clamp(0, maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (w / scale + zero).round().clamp(0, 2**bits - 1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def group_params(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`quant_params` of each group of `group_size` columns (the last may be shorter): two (out, groups)."""
    params = [quant_params(g, bits) for g in w.split(group_size, dim=1)]
    return torch.stack([s for s, _ in params], 1), torch.stack([z for _, z in params], 1)


def keep_mask(score: torch.Tensor, sparsity: float | None = None, n_m: tuple[int, int] | None = None,
              per_row: bool = False) -> torch.Tensor:
    """Which weights to keep: the highest scores, N of every M consecutive inputs (`n_m`), or all but the lowest
    `sparsity` fraction of the whole matrix (of each row with `per_row`)."""
    if n_m is not None:
        n, m = n_m
        groups = score.reshape(score.shape[0], -1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=2).indices, True)
        return keep.reshape(score.shape)
    rows = score if per_row else score.reshape(1, -1)
    pruned = rows.topk(int(rows.shape[1] * sparsity), dim=1, largest=False).indices
    return torch.ones_like(rows, dtype=torch.bool).scatter_(1, pruned, False).reshape(score.shape)


def per_column(t: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    """(out, groups) group parameters spread over their columns: (out, cols)."""
    return t.repeat_interleave(group_size, dim=1)[:, :cols]


def mask_and_round(w: torch.Tensor, keep: torch.Tensor | None, bits: int | None, group_size: int) -> LayerResult:
    """Zero the weights not kept, then round the rest to nearest (when `bits`): rtn, magnitude and wanda."""
    if keep is not None:
        w = w * keep
    if bits is None:
        return LayerResult(w, keep)
    scales, zeros = group_params(w, bits, group_size)
    scale, zero = per_column(scales, group_size, w.shape[1]), per_column(zeros, group_size, w.shape[1])
    codes = quantize(w, scale, zero, bits)
    return LayerResult(dequantize(codes, scale, zero), keep, codes, scales, zeros)


@torch.no_grad()
def obs_sweep(w: torch.Tensor, hessian: torch.Tensor, *, bits: int | None = None, group_size: int | None = None,
              sparsity: float | None = None, n_m: tuple[int, int] | None = None, act_order: bool = False,
              percdamp: float = 0.01, blocksize: int = 128) -> LayerResult:
    """GPTQ (`bits`) and SparseGPT (`sparsity` or `n_m`, with `bits` for the joint mode): one left-to-right sweep
    over the columns, in the dtype of `hessian`.

    The updates of a block of `blocksize` columns reach the later columns lazily, in one matrix product at the
    end of the block. A group's scale is taken when the sweep reaches its first column, from its columns as they
    were when the block began, as the reference GPTQ code does (it reads them from W, which the block's own
    updates reach only at its end): for groups smaller than the block, taking them with those updates measured
    20-40% more output error at 2 bits, groups of 32 and 64; at groups of the block's size the two agree. With
    `act_order` the columns go in decreasing order of H_jj and all groups are taken from W up front, so that a
    group stays a run of consecutive inputs and needs no index to store.
    """
    w = w.to(hessian.dtype).clone()
    hessian = hessian.clone()
    cols = w.shape[1]
    dead = hessian.diagonal() == 0  # inputs never active on the calibration data: their weights do nothing
    hessian[dead, dead] = 1
    w[:, dead] = 0
    perm = hessian.diagonal().argsort(descending=True) if act_order else torch.arange(cols, device=w.device)
    group_size = group_size or cols
    scales = zeros = codes = None
    if bits is not None:
        scales, zeros = group_params(w, bits, group_size)  # kept only with act_order, recomputed otherwise
        codes = torch.zeros_like(w)
    w, hessian = w[:, perm], hessian[perm][:, perm]
    hessian.diagonal().add_(percdamp * hessian.diagonal().mean())
    # U is the upper Cholesky factor of H⁻¹: row j of U is row j of the inverse Hessian of the columns j..end
    # (the ones still free when column j is fixed) divided by sqrt of its diagonal, which is U_jj².
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    out = torch.zeros_like(w)
    keep = torch.ones_like(w, dtype=torch.bool)
    if n_m is not None:
        blocksize = n_m[1] * math.ceil(blocksize / n_m[1])  # an N:M group never straddles two blocks
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        wb, ub = w[:, b0:b1], u[b0:b1, b0:b1]  # wb is a view: the in-block updates land in w
        d = ub.diagonal()
        # the columns of the groups that start in this block, as they are now
        starts = range(-(-b0 // group_size) * group_size, b1, group_size)
        first = starts[0] if starts else b0
        block_start = w[:, first:starts[-1] + group_size].clone() if bits is not None and not act_order and starts \
            else None
        errors = torch.zeros_like(wb)
        if sparsity is not None:
            keep[:, b0:b1] = keep_mask(wb**2 / d**2, sparsity)
        for j in range(b1 - b0):
            c = b0 + j
            if n_m is not None and c % n_m[1] == 0:
                keep[:, c:c + n_m[1]] = keep_mask(wb[:, j:j + n_m[1]] ** 2 / d[j:j + n_m[1]] ** 2, n_m=n_m)
            q = wb[:, j] * keep[:, c]
            if bits is not None:
                g = perm[c] // group_size
                if not act_order and c % group_size == 0:
                    scales[:, g], zeros[:, g] = quant_params(block_start[:, c - first:c - first + group_size], bits)
                codes[:, c] = quantize(q, scales[:, g], zeros[:, g], bits)
                q = dequantize(codes[:, c], scales[:, g], zeros[:, g])
            out[:, c] = q
            errors[:, j] = (wb[:, j] - q) / d[j]
            wb[:, j:] -= errors[:, j, None] * ub[j, j:]
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    back = perm.argsort()
    pruned = sparsity is not None or n_m is not None
    return LayerResult(out[:, back], keep[:, back] if pruned else None,
                       codes[:, back] if codes is not None else None, scales, zeros)


@torch.no_grad()
def compress_layer(w: torch.Tensor, hessian: torch.Tensor, method: str, *, bits: int | None = None,
                   group_size: int | None = 128, sparsity: float | None = None, n_m: tuple[int, int] | None = None,
                   act_order: bool = False, percdamp: float = 0.01) -> LayerResult:
    """One layer by `method` (arguments checked by the caller, `compress`). `group_size` None: one group per row."""
    if method in ("gptq", "sparsegpt"):
        return obs_sweep(w, hessian, bits=bits, group_size=group_size, sparsity=sparsity, n_m=n_m,
                         act_order=act_order, percdamp=percdamp)
    w = w.to(hessian.dtype)
    score = {"rtn": None, "magnitude": w.abs(), "wanda": w.abs() * hessian.diagonal().sqrt()}[method]
    keep = None if score is None else keep_mask(score, sparsity, n_m, per_row=method == "wanda")
    return mask_and_round(w, keep, bits, group_size or w.shape[1])


def relative_output_error(w: torch.Tensor, compressed: torch.Tensor, hessian: torch.Tensor) -> float:
    """||WX - W'X||² / ||WX||² on the calibration inputs, through H (no X needed)."""
    w = w.to(hessian.dtype)
    e = w - compressed.to(hessian.dtype)
    return ((e @ hessian * e).sum() / (w @ hessian * w).sum()).item()
