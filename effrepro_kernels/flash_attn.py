"""FlashAttention in Triton: exact attention with tiling and an online softmax, never holding the N×N matrix.

The forward keeps, per query row, a running maximum and sum of exponentials and stores the log-sum-exp; the
backward recomputes the probabilities from it (FlashAttention's algorithm, with FlashAttention-2's loop order:
one pass over query tiles for dK and dV, one over key tiles for dQ; no atomics, so it is deterministic).
Dropout is fused (counter-based Philox numbers per (batch·head, row, column), reproducible from the seed), and
so are causal masks (bottom-right aligned), key padding masks and block-sparse masks, whose zero blocks are
skipped rather than masked. On Hopper, calls without dropout can run the Gluon kernels of flash_attn_gluon.py
instead, where they measured faster (`_use_gluon`, `_use_gluon_backward`).
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from . import flash_attn_gluon
from .runtime import (AUTOTUNE, INTERPRET, MAX_GRID_Y, KeptLaunches, block_shared_memory, cdiv,
                      check_attention_heads, check_tensors, int8_mask, launch, next_pow2, real_number)
from .torch_op import differentiable, kernel_op

# forward_kernel="auto" takes the Gluon forward (warp-specialised, TMA and wgmma) where it covers the inputs and was
# measured faster than the tl one (H200, Triton 3.6; effrepro_kernels/NOTES.md, "The Gluon forward overlapped"; its
# persistent grids on an H100, "A persistent forward" and "Causal grids persistent up to 2K keys"): from
# GLUON_MIN_KEYS[head_dim, causal] keys, on a Triton where it has run. EFFREPRO_GLUON=0: never; =1: wherever it
# covers the inputs.
GLUON = os.environ.get("EFFREPRO_GLUON")
GLUON_MIN_KEYS = {(128, False): 512, (128, True): 1024, (64, False): 1024, (64, True): 2048}
GLUON_MEASURED_ON = ("3.6.",)  # Triton versions on which the Gluon forward has passed its GPU tests
# and the Gluon backward (H200: at head_dim 128, 0.79-0.83 of cuDNN's fwd+bwd against the tl backward's 0.70-0.75
# from 1K keys, 2K causal; at 64, 0.84-0.90 against 0.75-0.87 from 2K keys (4K dense: 0.84 against 0.87, within
# the two runs' noise); behind it below those). Block-sparse calls take it too where blocks are of its tile
# (H200, 128-key blocks, d = 128: fwd+bwd 0.87-0.91 of FlexAttention's time on the same mask at 16K and 64K,
# where the tl backward took 1.32-1.42x).
GLUON_BACKWARD_MIN_KEYS = {(128, False): 1024, (128, True): 2048, (64, False): 2048, (64, True): 2048}
GLUON_BACKWARD_MEASURED_ON = ("3.6.",)
# With a key padding mask or block-sparse (128-key blocks), at these head sizes only. Key padding (H100,
# tune_flash_gluon.py --key-padding at 5756d7b): at 128 1.10-1.34x our tl forward's TFLOP/s with the same mask,
# 512-8K keys, dense and causal; at 64 0.70-0.87x. Block-sparse (H100, flash_kernel records of 763bade, 16K keys,
# not causal): at 128 1.51x (density 1/4) and 1.23x (1/8) the tl forward's speed; 64 not timed. The padded
# backward, from GLUON_BACKWARD_MIN_KEYS (H100, flash_kernel record of 763bade): Gluon's forward+backward 1.08-1.24x
# the speed of the Gluon forward with the tl backward, 1K-16K keys, dense and causal.
GLUON_MASKED_HEAD_DIMS = (128,)
KERNELS = ("auto", "tl", "gluon")  # forward_kernel and backward_kernel: which kernel runs each pass
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LAYOUTS = ("bhsd", "bshd")  # (batch, heads, seq, dim) as SDPA takes it, or (batch, seq, heads, dim) as FlashAttention
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------- dropout
@triton.jit
def _keep(seed, bh, row0, col0, N_K, dropout_p, BM: tl.constexpr, BN: tl.constexpr):
    """Where the (BM × BN) tile at (row0, col0) survives dropout. One Philox call gives four random numbers, for
    four neighbouring columns (counter = row · ceil(N_K / 4) + column // 4, key = seed, batch·head), so the
    generation costs a quarter of one call per element; col0 is a multiple of 4, as every tile's start is."""
    rows = (row0 + tl.arange(0, BM)).to(tl.uint32)
    quads = (col0 // 4 + tl.arange(0, BN // 4)).to(tl.uint32)
    n4 = ((quads * 0 + N_K + 3) // 4).to(tl.uint32)  # N_K may arrive as a constexpr (Triton specialises 1)
    c0 = rows[:, None] * n4[None, :] + quads[None, :]
    zero = tl.zeros_like(c0)
    r0, r1, r2, r3 = tl.philox(seed, c0, zero + bh.to(tl.uint32), zero, zero)
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BM, BN))  # columns 4j..4j+3 take r0, r2, r1, r3
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _dropout_mask_kernel(OUT, seed, N_Q, N_K, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(seed, bh, pid_m * BLOCK_M, pid_n * BLOCK_N, N_K, dropout_p, BLOCK_M, BLOCK_N)
    ptrs = OUT + bh.to(tl.int64) * N_Q * N_K + rows[:, None] * N_K + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < N_Q) & (cols[None, :] < N_K))


def dropout_keep_mask(seed: int, batch: int, heads: int, n_q: int, n_k: int, dropout_p: float,
                      device) -> torch.Tensor:
    """The keep-mask the kernel draws for `seed`, as a bool (batch, heads, n_q, n_k) tensor: for tests."""
    out = torch.empty(batch * heads, n_q, n_k, dtype=torch.int8, device=device)
    grid = (cdiv(n_q, 32), cdiv(n_k, 32), batch * heads)
    _dropout_mask_kernel[grid](out, seed, n_q, n_k, dropout_p, BLOCK_M=32, BLOCK_N=32)
    return out.view(batch, heads, n_q, n_k).bool()


# ----------------------------------------------------------------------------------------------------- configs
def _configs(pairs):
    if INTERPRET:  # one config (the interpreter cannot autotune), of 32-row tiles: half the tests' time of 16-row
        # ones there (programs run one by one, each step a numpy call), and still several tiles at their lengths
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


# What a program's shared memory holds besides its tiles, at most (LSE and delta rows, layout conversions): the
# estimate below plus this bounded what Triton 3.6 and 3.9 gave each config for sm_90, compiled offline
SHARED_SLACK = 2048


def _shared_bytes(config, block_d: int, itemsize: int, streamed: str, kept_tiles: int, dropout: bool) -> int:
    """A config's shared memory, about: `num_stages` buffers of the two tiles a program streams (`streamed` rows
    each), and `kept_tiles` tiles it holds throughout (rows of the other block). With dropout, a byte per element
    of a (BLOCK_M × BLOCK_N) tile besides: its keep-mask changes layout through shared memory (`_keep`'s reshape;
    Triton 3.9, sm_90), which at head_dim 256 took every config kept without it past Hopper's 227 KB."""
    kept = "BLOCK_M" if streamed == "BLOCK_N" else "BLOCK_N"
    rows = config.num_stages * 2 * config.kwargs[streamed] + kept_tiles * config.kwargs[kept]
    keep_mask = config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] if dropout else 0
    return rows * block_d * itemsize + keep_mask + SHARED_SLACK


def _prune(configs, named_args, streamed: str, kept_tiles: int, **kwargs):
    """The configs to time: those whose tiles fit a block-sparse mask's blocks (where none does, tiles of one
    block) and whose shared memory fits the GPU's (where none does, the smallest, in one stage). Without
    autotuning, the first of them. (Triton prunes only a list of several configs, so the choice is made here
    rather than by shortening the list.)"""
    args = {**named_args, **kwargs}
    block = args["SPARSE_BLOCK"]
    kept = [c for c in configs if not block or max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= block]
    kept = kept or [triton.Config({"BLOCK_M": block, "BLOCK_N": block}, num_warps=4, num_stages=2)]
    size = functools.partial(_shared_bytes, block_d=args["BLOCK_D"], itemsize=args["Q"].element_size(),
                             streamed=streamed, kept_tiles=kept_tiles, dropout=args["DROPOUT"])
    fitting = [c for c in kept if size(c) <= block_shared_memory(args["Q"].device)]
    if not fitting:
        smallest = min(kept, key=size)
        fitting = [triton.Config(smallest.kwargs, num_warps=smallest.num_warps, num_stages=1)]
    return fitting if AUTOTUNE else fitting[:1]


# Each kernel's streamed and kept tiles: the forward streams K and V and keeps Q; dK/dV streams Q and dO and keeps
# K and V; dQ streams K and V and keeps Q and dO
_prune_forward = functools.partial(_prune, streamed="BLOCK_N", kept_tiles=1)
_prune_dkdv = functools.partial(_prune, streamed="BLOCK_M", kept_tiles=2)
_prune_dq = functools.partial(_prune, streamed="BLOCK_N", kept_tiles=2)


def _tuned(kernel, block_size: int):
    """An autotuned kernel to launch, and tile sizes to give it: Triton's autotuner on a GPU. In the interpreter, the
    kernel itself with its one config's tiles, or tiles of one block where sparse blocks are smaller (Triton 3.6 times
    even a single pruned config, which the interpreter cannot, and leaves a single config unpruned)."""
    if not INTERPRET:
        return kernel, {}
    (config,) = kernel.configs
    tile = min(config.kwargs["BLOCK_M"], block_size or config.kwargs["BLOCK_M"])
    return kernel.fn, dict(BLOCK_M=tile, BLOCK_N=tile, num_warps=config.num_warps, num_stages=config.num_stages)


FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 4, 3), (128, 64, 4, 4),
                        (64, 64, 4, 3)])
# dK/dV programs hold two (BLOCK_N, head_dim) float32 accumulators: at 128 keys and head_dim 128 four warps spill
# (ptxas: 155 local loads an iteration under Triton 3.6), eight do not; the first is the one used without autotuning
BWD_CONFIGS = _configs([(32, 128, 8, 3), (32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (32, 64, 4, 2)])
AUTOTUNE_KEY = ["N_Q", "N_K", "HEAD_DIM", "CAUSAL", "HAS_KPM", "DROPOUT", "SPARSE_BLOCK"]
DELTA_ELEMENTS = 4096  # of O and of dO a program of the backward's rowsum(dO ∘ O) holds (a light pass)


# ----------------------------------------------------------------------------------------------------- forward
@triton.jit
def _tile_start(t, IDX, SPARSE: tl.constexpr, SUB: tl.constexpr, BLOCK: tl.constexpr):
    """The first row of the t-th tile a program visits: dense, tile t; block-sparse, tile t % SUB of the
    (t // SUB)-th kept block (IDX), SUB tiles to a block. One loop over tiles rather than a nested loop over a
    block's tiles: unrolled, that would pipeline whole blocks (shared memory growing with the block size: past
    Hopper's 227 KB with 128-key blocks in the backward at head_dim 128, everywhere at 256)."""
    if SPARSE:
        return (tl.load(IDX + t // SUB) * SUB + t % SUB) * BLOCK
    return t * BLOCK


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, KPM, IDX, stride_kn, stride_kd, stride_vn, stride_vd,
               offs_m, offs_d, lo, hi, N_Q, N_K, qk_scale, seed, bh, dropout_p,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
               SPARSE: tl.constexpr, SUB: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    dmask = offs_d < HEAD_DIM
    for t in range(lo * SUB, hi * SUB):
        start_n = _tile_start(t, IDX, SPARSE, SUB, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < N_K
        k_ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASK or HEAD_DIM != BLOCK_D:
            k = tl.load(k_ptrs, mask=dmask[:, None] & nmask[None, :], other=0.0)
        else:  # a whole tile: an unpredicated load pipelines better
            k = tl.load(k_ptrs)
        s = tl.dot(q, k)  # unscaled: the scale is folded into the exponent's multiply-add below
        if MASK:
            valid = nmask[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + (N_K - N_Q))
            if HAS_KPM:
                valid = valid & (tl.load(KPM + offs_n, mask=nmask, other=0) != 0)[None, :]
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # qk_scale > 0, so max commutes with it
        if MASK:  # a row with no visible key yet: keep exp2 away from inf - inf
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        p = tl.math.exp2(s * qk_scale - m_new_safe[:, None])
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            start_m = tl.program_id(0) * BLOCK_M
            p = tl.where(_keep(seed, bh, start_m, start_n, N_K, dropout_p, BLOCK_M, BLOCK_N), p, 0.0)
        if MASK or HEAD_DIM != BLOCK_D:
            v = tl.load(v_ptrs, mask=nmask[:, None] & dmask[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # accumulate in the matrix unit
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=FWD_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_forward})
@triton.jit(do_not_specialize=["seed"])  # a new seed per call: one compiled kernel, kept (`_kept`)
def _attn_fwd(Q, K, V, O, LSE, KPM, CNT, IDX,
              stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
              stride_sb, stride_sh, stride_sm,
              H, GROUPS, N_Q, N_K, sm_scale, seed, dropout_p,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
              DROPOUT: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // GROUPS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask, dmask = offs_m < N_Q, offs_d < HEAD_DIM
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=mmask[:, None] & dmask[None, :], other=0.0)
    K += b.to(tl.int64) * stride_kb + hk * stride_kh
    V += b.to(tl.int64) * stride_vb + hk * stride_vh
    KPM += b.to(tl.int64) * N_K
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x·log2 e)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    shift = N_K - N_Q  # causal: row r sees keys j <= r + shift
    n_tiles = tl.cdiv(N_K, BLOCK_N)
    if CAUSAL:
        n_tiles = tl.minimum(n_tiles, tl.maximum(tl.cdiv(pid_m * BLOCK_M + BLOCK_M + shift, BLOCK_N), 0))
    if SPARSE_BLOCK:
        row = (b * H + h) * tl.cdiv(N_Q, SPARSE_BLOCK) + pid_m * BLOCK_M // SPARSE_BLOCK
        start, end = tl.load(CNT + row), tl.load(CNT + row + 1)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, KPM, IDX, stride_kn, stride_kd, stride_vn, stride_vd,
                                   offs_m, offs_d, start, end, N_Q, N_K, qk_scale, seed, bh, dropout_p,
                                   True, CAUSAL, HAS_KPM, DROPOUT, True, SPARSE_BLOCK // BLOCK_N, HEAD_DIM,
                                   BLOCK_D, BLOCK_M, BLOCK_N)
    elif HAS_KPM:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, KPM, IDX, stride_kn, stride_kd, stride_vn, stride_vd,
                                   offs_m, offs_d, 0, n_tiles, N_Q, N_K, qk_scale, seed, bh, dropout_p,
                                   True, CAUSAL, True, DROPOUT, False, 1, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N)
    else:
        # tiles that every row of this block sees whole need no mask; the rest (diagonal, tail) do
        full = N_K // BLOCK_N
        if CAUSAL:
            full = tl.minimum(full, tl.maximum(pid_m * BLOCK_M + shift + 1, 0) // BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, KPM, IDX, stride_kn, stride_kd, stride_vn, stride_vd,
                                   offs_m, offs_d, 0, full, N_Q, N_K, qk_scale, seed, bh, dropout_p,
                                   False, CAUSAL, False, DROPOUT, False, 1, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, KPM, IDX, stride_kn, stride_kd, stride_vn, stride_vd,
                                   offs_m, offs_d, full, n_tiles, N_Q, N_K, qk_scale, seed, bh, dropout_p,
                                   True, CAUSAL, False, DROPOUT, False, 1, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N)
    seen = l_i > 0  # a row that saw no key at all (fully masked) gives zeros, and an infinite LSE
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if DROPOUT:
        out = out / (1.0 - dropout_p)
    tl.store(O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))  # base 2
    tl.store(LSE + b * stride_sb + h * stride_sh + offs_m * stride_sm, lse, mask=mmask)


# ----------------------------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_tile_scores(q_rows, k_cols, offs_m, offs_n, lse, KPM, N_Q, N_K, qk_scale,
                     CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """Probabilities P recomputed from the saved LSE for a (rows × cols) tile given as broadcastable index
    tensors, zero where masked."""
    s = tl.dot(q_rows, k_cols) * qk_scale
    valid = (offs_m < N_Q) & (offs_n < N_K)
    if CAUSAL:
        valid = valid & (offs_n <= offs_m + (N_K - N_Q))
    if HAS_KPM:
        valid = valid & (tl.load(KPM + offs_n, mask=offs_n < N_K, other=0) != 0)
    return tl.where(valid, tl.math.exp2(s - lse), 0.0)


@triton.jit
def _bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_od, stride_gb, stride_gh, stride_gm, stride_gd,
               H, N_Q, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """DELTA (batch · heads, N_Q) = rowsum(dO ∘ O) in float32 (FlashAttention-2's D), from one read of each: in
    PyTorch it is four passes and two float32 copies of the output."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0)
    do = tl.load(DO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
                 mask=mask, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1),
             mask=offs_m < N_Q)


@triton.autotune(configs=BWD_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_dkdv})
@triton.jit(do_not_specialize=["seed"])  # a new seed per call: one compiled kernel, kept (`_kept`)
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, KPM, CNT, IDX,
                   stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
                   stride_sb, stride_sh, stride_sm, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   H, GROUPS, N_Q, N_K, sm_scale, seed, dropout_p,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                   DROPOUT: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (key tile, batch · KV head): sums dK, dV over every query row of the group's heads."""
    pid_n, bhk = tl.program_id(0), tl.program_id(1)
    HK = H // GROUPS
    b, hk = bhk // HK, bhk % HK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask, dmask = offs_n < N_K, offs_d < HEAD_DIM
    kv_mask = nmask[:, None] & dmask[None, :]
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    KPM += b.to(tl.int64) * N_K
    qk_scale = sm_scale * 1.4426950408889634
    inv_keep = 1.0 / (1.0 - dropout_p)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    SUB: tl.constexpr = (SPARSE_BLOCK + BLOCK_M * (SPARSE_BLOCK == 0)) // BLOCK_M  # query tiles per sparse block
    for g in range(GROUPS):
        h = hk * GROUPS + g
        bh = b * H + h
        Qh = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        DOh = DO + b.to(tl.int64) * stride_ob + h * stride_oh
        if SPARSE_BLOCK:  # the transposed layout: for this key block, the query blocks that see it
            col = (b * H + h) * tl.cdiv(N_K, SPARSE_BLOCK) + pid_n * BLOCK_N // SPARSE_BLOCK
            lo, hi = tl.load(CNT + col), tl.load(CNT + col + 1)
        else:
            lo, hi = 0, tl.cdiv(N_Q, BLOCK_M)
            if CAUSAL:  # rows before this key tile's first visible row contribute nothing
                lo = tl.maximum(pid_n * BLOCK_N - (N_K - N_Q), 0) // BLOCK_M
        for t in range(lo * SUB, hi * SUB):
            start_m = _tile_start(t, IDX, SPARSE_BLOCK != 0, SUB, BLOCK_M)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mmask = offs_m < N_Q
            qT = tl.load(Qh + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                         mask=mmask[None, :] & dmask[:, None], other=0.0)
            lse = tl.load(LSE + b * stride_sb + h * stride_sh + offs_m * stride_sm, mask=mmask,
                          other=float("inf"))
            pT = _bwd_tile_scores(k, qT, offs_m[None, :], offs_n[:, None], lse[None, :], KPM, N_Q, N_K,
                                  qk_scale, CAUSAL, HAS_KPM)
            if DROPOUT:
                keepT = tl.trans(_keep(seed, bh, start_m, pid_n * BLOCK_N, N_K, dropout_p, BLOCK_M, BLOCK_N))
            do = tl.load(DOh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                         mask=mmask[:, None] & dmask[None, :], other=0.0)
            if DROPOUT:
                dv += tl.dot(tl.where(keepT, pT * inv_keep, 0.0).to(do.dtype), do)
            else:
                dv += tl.dot(pT.to(do.dtype), do)
            dpT = tl.dot(v, tl.trans(do))
            if DROPOUT:
                dpT = tl.where(keepT, dpT * inv_keep, 0.0)
            delta = tl.load(DELTA + bh.to(tl.int64) * N_Q + offs_m, mask=mmask, other=0.0)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT))
    dk *= sm_scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=[triton.Config({"BLOCK_M": c.kwargs["BLOCK_N"], "BLOCK_N": c.kwargs["BLOCK_M"]},
                                        num_warps=c.num_warps, num_stages=c.num_stages) for c in BWD_CONFIGS],
                 key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_dq})
@triton.jit(do_not_specialize=["seed"])  # a new seed per call: one compiled kernel, kept (`_kept`)
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, KPM, CNT, IDX,
                 stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
                 stride_sb, stride_sh, stride_sm, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 H, GROUPS, N_Q, N_K, sm_scale, seed, dropout_p,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                 DROPOUT: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (query tile, batch · head): dQ over the key tiles it sees."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // GROUPS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask, dmask = offs_m < N_Q, offs_d < HEAD_DIM
    q_mask = mmask[:, None] & dmask[None, :]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
                 + offs_d[None, :] * stride_od, mask=q_mask, other=0.0)
    lse = tl.load(LSE + b * stride_sb + h * stride_sh + offs_m * stride_sm, mask=mmask, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * N_Q + offs_m, mask=mmask, other=0.0)
    K += b.to(tl.int64) * stride_kb + hk * stride_kh
    V += b.to(tl.int64) * stride_vb + hk * stride_vh
    KPM += b.to(tl.int64) * N_K
    qk_scale = sm_scale * 1.4426950408889634
    inv_keep = 1.0 / (1.0 - dropout_p)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    SUB: tl.constexpr = (SPARSE_BLOCK + BLOCK_N * (SPARSE_BLOCK == 0)) // BLOCK_N  # key tiles per sparse block
    if SPARSE_BLOCK:
        row = (b * H + h) * tl.cdiv(N_Q, SPARSE_BLOCK) + pid_m * BLOCK_M // SPARSE_BLOCK
        lo, hi = tl.load(CNT + row), tl.load(CNT + row + 1)
    else:
        lo, hi = 0, tl.cdiv(N_K, BLOCK_N)
        if CAUSAL:
            hi = tl.minimum(hi, tl.maximum(tl.cdiv(pid_m * BLOCK_M + BLOCK_M + N_K - N_Q, BLOCK_N), 0))
    for t in range(lo * SUB, hi * SUB):
        start_n = _tile_start(t, IDX, SPARSE_BLOCK != 0, SUB, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < N_K
        kT = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=nmask[None, :] & dmask[:, None], other=0.0)
        vT = tl.load(V + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                     mask=nmask[None, :] & dmask[:, None], other=0.0)
        p = _bwd_tile_scores(q, kT, offs_m[:, None], offs_n[None, :], lse[:, None], KPM, N_Q, N_K, qk_scale,
                             CAUSAL, HAS_KPM)
        dp = tl.dot(do, vT)
        if DROPOUT:
            keep = _keep(seed, bh, pid_m * BLOCK_M, start_n, N_K, dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT))
    dq *= sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------------- host side
class BlockSparseLayout:
    """A block mask prepared for the kernels: row-compressed (CSR) lists of the kept blocks per (batch, head),
    for the forward and dQ (by query block) and for dK/dV (by key block). Build it once and pass it as
    `block_mask` to skip the preparation (and its device sync) on every call."""

    def __init__(self, block_mask: torch.Tensor, batch: int, heads: int, block_size: int = 128):
        self.mask, self.block_size, self.batch, self.heads = block_mask, block_size, batch, heads
        self.by_query, self.by_key = _csr_layouts(block_mask, batch, heads)


def _csr_layouts(block_mask: torch.Tensor, batch: int, heads: int):
    mask = block_mask.expand(batch, heads, *block_mask.shape[-2:]).bool()

    def csr(m):
        counts = m.sum(-1).flatten()
        offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=m.device)
        offsets[1:] = counts.cumsum(0)
        indices = m.reshape(-1, m.shape[-1]).nonzero()[:, 1].to(torch.int32).contiguous()
        return offsets, indices if indices.numel() else torch.zeros(1, dtype=torch.int32, device=m.device)

    return csr(mask), csr(mask.transpose(-1, -2))


def _natural_lse(lse2: torch.Tensor) -> torch.Tensor:
    """The kernels' base-2 log-sum-exp in natural log. A row that saw no key carries +inf there (its
    probabilities exp2(s - lse) are then zero in the backward); the log-sum-exp of no key is -inf, which is what
    `merge_attention` and any other combination of parts takes as "no keys"."""
    return torch.where(lse2 == float("inf"), float("-inf"), lse2 / LOG2E)


def _check(q, k, v, key_padding_mask, block_mask, block_size, dropout_p, layout):
    prepared = block_mask if isinstance(block_mask, BlockSparseLayout) else None
    if prepared is not None:
        block_mask, block_size = prepared.mask, prepared.block_size
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; use one of {LAYOUTS}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor in layout {layout!r}, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name}.dtype={t.dtype} is not supported; use one of {DTYPES}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_tensors("flash_attn", True, q=q, k=k, v=v)  # meta: shapes alone, from the fake version
    if layout == "bshd":  # the checks below read (batch, heads, seq, head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    b, h, n_q, d = q.shape
    if prepared is not None and (prepared.batch, prepared.heads) != (b, h):
        raise ValueError(f"the BlockSparseLayout was prepared for batch {prepared.batch} and {prepared.heads} heads; "
                         f"q has batch {b} and {h} heads (layout {layout!r})")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k must match q in batch and head_dim: as (batch, heads, seq, head_dim), q is "
                         f"{tuple(q.shape)} and k {tuple(k.shape)} (layout {layout!r})")
    check_attention_heads(h, k.shape[1], d, "k")
    if b * h > MAX_GRID_Y:  # a program per (batch, head) on the grid's second dimension
        raise ValueError(f"batch * heads = {b} * {h} = {b * h} is more than the kernels launch, {MAX_GRID_Y}; "
                         "split the batch into calls of fewer sequences")
    if q.dtype == torch.float32 and q.device.type == "cuda" and d > 64:
        raise ValueError(f"head_dim={d} with float32 on a GPU is not supported (its tiles overflow shared "
                         "memory); use float16 or bfloat16, or head_dim <= 64")
    if not 0.0 <= real_number("dropout_p", dropout_p) < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1)")
    n_k = k.shape[2]
    if key_padding_mask is not None and (key_padding_mask.shape != (b, n_k) or key_padding_mask.dtype != torch.bool
                                         or key_padding_mask.device != q.device):
        raise ValueError(f"key_padding_mask must be bool of shape (batch, seq_k)={(b, n_k)} on {q.device}, got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)} on {key_padding_mask.device}")
    if block_mask is not None:
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool or block_mask.device != q.device:
            raise ValueError(f"block_mask must be a bool tensor (True: the block is computed) on {q.device}, or a "
                             f"BlockSparseLayout; got {getattr(block_mask, 'dtype', type(block_mask).__name__)} on "
                             f"{getattr(block_mask, 'device', None)} (an additive float mask would be read inverted)")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size={block_size} must be a power of two, at least 16")
        want = (cdiv(n_q, block_size), cdiv(n_k, block_size))
        if block_mask.dim() != 4 or tuple(block_mask.shape[-2:]) != want or block_mask.shape[0] not in (1, b) \
                or block_mask.shape[1] not in (1, h):
            raise ValueError(f"block_mask must have shape (1 or {b}, 1 or {h}, {want[0]}, {want[1]}) for "
                             f"block_size={block_size}, got {tuple(block_mask.shape)}")


def _dense_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised dense tensor of t's shape and dtype, its dimensions in memory in the order of t's strides:
    an output or gradient laid out like an input that is a view with gaps (q split from GPT-2's fused projection,
    in (batch, seq, heads, head_dim) memory), which `empty_like` would make contiguous instead. So the caller's
    transpose back to (batch, seq, heads, head_dim) is free, and the input is never copied."""
    if 0 in t.stride():  # a broadcast input has no memory order to follow
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    dense = torch.empty([t.shape[i] for i in order], dtype=t.dtype, device=t.device)
    return dense.permute(*[order.index(i) for i in range(t.dim())])


# The kernels as operators (torch_op.py): the forward, the backward, what each returns for shapes alone, and the
# autograd rule joining them. A block-sparse layout travels as its four CSR tensors (block_size 0: dense).
@kernel_op("flash_attn", fake=lambda q, k, v, key_padding_mask, rows, cols, block_size, causal, sm_scale, dropout_p,
           seed, forward_kernel, backward_kernel: (_dense_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)))
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
             rows: list[torch.Tensor], cols: list[torch.Tensor], block_size: int, causal: bool, sm_scale: float,
             dropout_p: float, seed: int, forward_kernel: str,
             backward_kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_gluon(forward_kernel, q, k, v, key_padding_mask, block_size, causal, dropout_p):
        return flash_attn_gluon.forward(q, k, v, causal, sm_scale, key_padding_mask=key_padding_mask,
                                        block_lists=tuple(rows) if block_size else None)
    b, h, n_q, d = q.shape
    n_k, groups = k.shape[2], h // k.shape[1]
    o = _dense_like(q)
    lse = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32)
    kpm = int8_mask(key_padding_mask, lse)
    (cnt, idx) = rows if block_size else (lse, lse)
    grid = lambda m: (cdiv(n_q, m["BLOCK_M"]), b * h)  # noqa: E731
    forward, tiles = _tuned(_attn_fwd, block_size)
    meta = _meta(d, causal, key_padding_mask, dropout_p, block_size)
    launch(forward, grid, (q, k, v, o, lse, kpm, cnt, idx, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                           *lse.stride(), h, groups, n_q, n_k, sm_scale, seed, dropout_p),
           {**meta, **tiles}, _kept((q, k, v), *meta.values()), "forward")
    return o, lse


def _masked_untimed(kernel: str, q) -> bool:
    """Whether "auto" keeps the tl kernel for a call with a key padding mask or block sparsity: Gluon's masked paths
    were measured faster at GLUON_MASKED_HEAD_DIMS only (EFFREPRO_GLUON=1 takes them wherever they cover)."""
    return kernel == "auto" and GLUON != "1" and q.shape[-1] not in GLUON_MASKED_HEAD_DIMS


def _use_gluon(forward_kernel: str, q, k, v, key_padding_mask, block_size: int, causal: bool,
               dropout_p: float) -> bool:
    """Whether the Gluon forward runs: decided on the real tensors, inside the operator (their alignment and
    device are not known while torch.compile traces)."""
    if not _gluon_considered(forward_kernel, GLUON_MEASURED_ON, GLUON_MIN_KEYS, q, k, causal):
        return False
    if (key_padding_mask is not None or block_size) and _masked_untimed(forward_kernel, q):
        return False
    reason = _gluon_lacks(dropout_p, block_size, sparse_blocks=(flash_attn_gluon.SPARSE_BLOCK,)) or \
        flash_attn_gluon.refusal(q, k, v)
    if reason is None and key_padding_mask is not None and block_size:
        reason = "a key padding mask with block sparsity"
    return _covered("forward_kernel", forward_kernel, reason)


def _use_gluon_backward(backward_kernel: str, q, k, v, do, lse, dq, dk, dv, key_padding_mask, block_size: int,
                        causal: bool, dropout_p: float) -> bool:
    """Whether the Gluon backward runs: as `_use_gluon` decides for the forward, from GLUON_BACKWARD_MIN_KEYS keys
    under "auto". Block-sparse calls need blocks of its tile (SPARSE_BLOCK keys)."""
    if not _gluon_considered(backward_kernel, GLUON_BACKWARD_MEASURED_ON, GLUON_BACKWARD_MIN_KEYS, q, k, causal):
        return False
    if key_padding_mask is not None and _masked_untimed(backward_kernel, q):
        return False
    reason = _gluon_lacks(dropout_p, block_size, sparse_blocks=(flash_attn_gluon.SPARSE_BLOCK,)) or \
        flash_attn_gluon.backward_refusal(q, k, v, do, lse, dq, dk, dv)
    return _covered("backward_kernel", backward_kernel, reason)


def _gluon_considered(choice: str, measured_on: tuple[str, ...], min_keys: dict, q, k, causal: bool) -> bool:
    """Whether a pass may take its Gluon kernel: forced ("gluon"), or under "auto" on a Triton where it was
    measured, from `min_keys[head_dim, causal]` keys (EFFREPRO_GLUON=0: never; =1: wherever it covers)."""
    if choice == "tl" or (choice == "auto" and GLUON == "0"):
        return False
    return choice == "gluon" or GLUON == "1" or (
        triton.__version__.startswith(measured_on) and k.shape[2] >= min_keys.get((q.shape[-1], causal), math.inf))


def _gluon_lacks(dropout_p: float, block_size: int, sparse_blocks: tuple[int, ...]) -> str | None:
    """Which feature of the call a Gluon kernel lacks (it takes block-sparse masks of `sparse_blocks` keys), if
    any."""
    if dropout_p:
        return "dropout"
    if block_size and block_size not in sparse_blocks:
        return f"block-sparse masks of {block_size}-key blocks (it takes {list(sparse_blocks) or 'none'})"
    return None


def _covered(argument: str, choice: str, reason: str | None) -> bool:
    """Whether the Gluon kernel covers the call; where `choice` forces it and it does not, an error saying why."""
    if choice == "gluon" and reason is not None:
        raise ValueError(f"{argument}='gluon' does not cover this call: {reason}; use 'auto' or 'tl'")
    return reason is None


def _launch_backward(do, dlse, q, k, v, o, lse, key_padding_mask, rows, cols, block_size, causal, sm_scale, dropout_p,
                     seed, dq, dk, dv, backward_kernel: str = "auto") -> None:
    """The backward's kernels, writing dq, dk and dv (any strides) in place."""
    b, h, n_q, d = q.shape
    n_k, groups = k.shape[2], h // k.shape[1]
    do = do.contiguous() if do.stride(-1) != 1 else do
    meta = _meta(d, causal, key_padding_mask, dropout_p, block_size)
    kept = _kept((q, k, v, o, lse, do, dq, dk, dv), *meta.values())
    delta = torch.empty(b * h, n_q, device=q.device, dtype=torch.float32)
    delta_rows = max(16, DELTA_ELEMENTS // meta["BLOCK_D"])
    launch(_bwd_delta, (cdiv(n_q, delta_rows), b * h), (o, do, delta, *o.stride(), *do.stride(), h, n_q),
           dict(HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK_M=delta_rows), kept, "delta")
    if dlse is not None:
        # d lse / d logit = p, so a gradient g of the (base-2) LSE joins dS = P (dP - delta) as delta - g ln 2⁻¹
        delta -= dlse.reshape(b * h, n_q) * LOG2E
    kpm = int8_mask(key_padding_mask, lse)
    (row_cnt, row_idx), (col_cnt, col_idx) = (rows, cols) if block_size else ((lse, lse), (lse, lse))
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride())
    scalars = (h, groups, n_q, n_k, sm_scale, seed, dropout_p)
    if _use_gluon_backward(backward_kernel, q, k, v, do, lse, dq, dk, dv, key_padding_mask, block_size, causal,
                           dropout_p):
        flash_attn_gluon.backward(q, k, v, do, lse, delta, causal, sm_scale, dq, dk, dv,
                                  block_lists=(rows, cols) if block_size else None,
                                  key_padding_mask=kpm if key_padding_mask is not None else None)
        return
    grid_kv = lambda m: (cdiv(n_k, m["BLOCK_N"]), b * k.shape[1])  # noqa: E731
    dkdv, tiles = _tuned(_attn_bwd_dkdv, block_size)
    launch(dkdv, grid_kv, (q, k, v, do, dk, dv, lse, delta, kpm, col_cnt, col_idx, *strides, *dk.stride(),
                           *dv.stride(), *scalars), {**meta, **tiles}, kept, "dkdv")
    grid_q = lambda m: (cdiv(n_q, m["BLOCK_M"]), b * h)  # noqa: E731
    dq_kernel, tiles = _tuned(_attn_bwd_dq, block_size)
    launch(dq_kernel, grid_q, (q, k, v, do, dq, lse, delta, kpm, row_cnt, row_idx, *strides, *dq.stride(), *scalars),
           {**meta, **tiles}, kept, "dq")


@kernel_op("flash_attn_backward", fake=lambda do, dlse, q, k, v, o, lse, key_padding_mask, rows, cols, block_size,
           causal, sm_scale, dropout_p, seed, backward_kernel: (_dense_like(q), _dense_like(k), _dense_like(v)))
def _backward(do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              o: torch.Tensor, lse: torch.Tensor, key_padding_mask: torch.Tensor | None, rows: list[torch.Tensor],
              cols: list[torch.Tensor], block_size: int, causal: bool, sm_scale: float, dropout_p: float,
              seed: int, backward_kernel: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _dense_like(q), _dense_like(k), _dense_like(v)
    _launch_backward(do, dlse, q, k, v, o, lse, key_padding_mask, rows, cols, block_size, causal, sm_scale,
                     dropout_p, seed, dq, dk, dv, backward_kernel)
    return dq, dk, dv


def _save_for_backward(ctx, inputs, output):
    q, k, v, key_padding_mask, rows, cols, block_size, causal, sm_scale, dropout_p, seed, _, backward_kernel = inputs
    ctx.save_for_backward(q, k, v, *output, key_padding_mask, *rows, *cols)
    ctx.settings = (len(rows), block_size, causal, sm_scale, dropout_p, seed, backward_kernel)


def _gradients(ctx, do, dlse):
    q, k, v, o, lse, key_padding_mask, *layout = ctx.saved_tensors
    n_rows, block_size, causal, sm_scale, dropout_p, seed, backward_kernel = ctx.settings
    do = torch.zeros_like(o) if do is None else do  # a loss of the LSE alone
    dq, dk, dv = _backward(do, dlse, q, k, v, o, lse, key_padding_mask, layout[:n_rows], layout[n_rows:],
                           block_size, causal, sm_scale, dropout_p, seed, backward_kernel)
    return dq, dk, dv, *[None] * 10


_flash_attn_function = differentiable(_forward, _save_for_backward, _gradients)


# Packed q, k, v (batch, seq, 3, heads, head_dim), as a fused projection gives them: the Function's input is the
# packed tensor, so its gradient is written whole rather than concatenated by autograd from three.
def _unpacked(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v of a packed tensor, as (batch, heads, seq, head_dim) views."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # two calls: views made one by one cost the host 4x more


@kernel_op("flash_attn_packed", fake=lambda qkv, key_padding_mask, causal, sm_scale, dropout_p, seed: (
    _dense_like(_unpacked(qkv)[0]), qkv.new_empty((qkv.shape[0], qkv.shape[3], qkv.shape[1]), dtype=torch.float32)))
def _forward_packed(qkv: torch.Tensor, key_padding_mask: torch.Tensor | None, causal: bool, sm_scale: float,
                    dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(*_unpacked(qkv), key_padding_mask, [], [], 0, causal, sm_scale, dropout_p, seed, "auto", "auto")


@kernel_op("flash_attn_backward_packed", fake=lambda do, dlse, qkv, o, lse, key_padding_mask, causal, sm_scale,
           dropout_p, seed: torch.empty_like(qkv))
def _backward_packed(do: torch.Tensor, dlse: torch.Tensor | None, qkv: torch.Tensor, o: torch.Tensor,
                     lse: torch.Tensor, key_padding_mask: torch.Tensor | None, causal: bool, sm_scale: float,
                     dropout_p: float, seed: int) -> torch.Tensor:
    grad = torch.empty_like(qkv)
    _launch_backward(do, dlse, *_unpacked(qkv), o, lse, key_padding_mask, [], [], 0, causal, sm_scale, dropout_p,
                     seed, *_unpacked(grad))
    return grad


def _save_packed(ctx, inputs, output):
    qkv, key_padding_mask, causal, sm_scale, dropout_p, seed = inputs
    ctx.save_for_backward(qkv, *output, key_padding_mask)
    ctx.settings = (causal, sm_scale, dropout_p, seed)


def _gradients_packed(ctx, do, dlse):
    qkv, o, lse, key_padding_mask = ctx.saved_tensors
    do = torch.zeros_like(o) if do is None else do
    return _backward_packed(do, dlse, qkv, o, lse, key_padding_mask, *ctx.settings), *[None] * 5


_flash_attn_packed_function = differentiable(_forward_packed, _save_packed, _gradients_packed)


# Training calls the attention with the same shapes at every layer and step, so from the second call on, a launch
# skips the autotuner's and the JIT's handling of its 40 arguments, most of the host's time of a call
# (effrepro_kernels/NOTES.md, "The host cost of our attention"). Keyed by the tensors and `_meta`'s constexprs; the
# dropout probability is a float and the seed `do_not_specialize`, so Triton specialises on neither.
_kept = KeptLaunches()


def _meta(head_dim: int, causal: bool, key_padding_mask, dropout_p: float, block_size: int) -> dict:
    return dict(HEAD_DIM=head_dim, BLOCK_D=max(16, next_pow2(head_dim)), CAUSAL=causal,
                HAS_KPM=key_padding_mask is not None, DROPOUT=dropout_p > 0.0, SPARSE_BLOCK=block_size)


def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
               softmax_scale: float | None = None, dropout_p: float = 0.0,
               key_padding_mask: torch.Tensor | None = None,
               block_mask: torch.Tensor | BlockSparseLayout | None = None,
               block_size: int = 128, seed: int | None = None, layout: str = "bhsd", return_lse: bool = False,
               forward_kernel: str = "auto", backward_kernel: str = "auto"):
    """Exact attention softmax(q kᵀ · scale) v, forward and backward, never materialising the N×N matrix.

    q: (batch, heads, seq_q, head_dim); k, v: (batch, kv_heads, seq_k, head_dim) with kv_heads dividing heads
    (multi-query and grouped-query attention); `layout="bshd"` takes (batch, seq, heads, head_dim) instead.
    fp16 or bf16 (fp32 too, with tf32 matrix products on a GPU); head_dim 16 to 256; any lengths.
    - causal: bottom-right aligned, query i sees keys j <= i + seq_k - seq_q (FlashAttention 2's convention).
    - key_padding_mask: bool (batch, seq_k), True for real keys. A row that sees no key gives zeros (and a
      log-sum-exp of -inf).
    - dropout_p: fused dropout on the attention probabilities, drawn from `seed` (random if None); the same
      seed gives the same mask in the forward and the backward, and from run to run.
    - block_mask: bool (1|batch, 1|heads, ceil(seq_q/block_size), ceil(seq_k/block_size)): block-sparse
      attention; blocks that are False are skipped, so time falls with the density. A `BlockSparseLayout`
      built once from such a mask saves preparing it on every call.
    The backward uses no atomics: it is deterministic.
    - forward_kernel: "tl" (this file's kernel), "gluon" (flash_attn_gluon.py's, for Hopper; an error saying why
      where it does not cover the call), or "auto": the Gluon one on Hopper where it covers the call and was
      measured faster (`GLUON_MIN_KEYS`: dense from 512 keys at head_dim 128 and 1K at 64, causal from 1K and 2K;
      with a key padding mask or block-sparse (128-key blocks) at head_dim 128 only (`GLUON_MASKED_HEAD_DIMS`);
      EFFREPRO_GLUON=0 never, =1 wherever it covers), else tl.
    - backward_kernel: the same choice for the backward; "auto" takes Gluon from `GLUON_BACKWARD_MIN_KEYS` keys
      (head_dim 128 from 1K, 2K causal, 64 from 2K; block-sparse too, with 128-key blocks; with a key padding
      mask at head_dim 128 only).
    Returns the output, and the log-sum-exp of each row (natural log, float32) if `return_lse`; gradients flow
    through both.
    """
    _check(q, k, v, key_padding_mask, block_mask, block_size, dropout_p, layout)
    for name, choice in (("forward_kernel", forward_kernel), ("backward_kernel", backward_kernel)):
        if choice not in KERNELS:
            raise ValueError(f"{name}={choice!r} is not one of {KERNELS}")
    scale, dropout_p, seed = _scalars(q.shape[-1], softmax_scale, dropout_p, seed)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    rows, cols, sparse_block = [], [], 0  # dense
    if block_mask is not None:
        prepared = block_mask if isinstance(block_mask, BlockSparseLayout) else \
            BlockSparseLayout(block_mask, q.shape[0], q.shape[1], block_size)
        rows, cols, sparse_block = list(prepared.by_query), list(prepared.by_key), prepared.block_size
    out, lse = _flash_attn_function(q, k, v, key_padding_mask, rows, cols, sparse_block, causal, scale, dropout_p,
                                    seed, forward_kernel, backward_kernel)
    if layout == "bshd":
        out = out.transpose(1, 2)
    return (out, _natural_lse(lse)) if return_lse else out


def flash_attn_qkvpacked(qkv: torch.Tensor, causal: bool = False, softmax_scale: float | None = None,
                         dropout_p: float = 0.0, key_padding_mask: torch.Tensor | None = None, seed: int | None = None,
                         return_lse: bool = False):
    """`flash_attn` of q, k and v packed in one tensor (batch, seq, 3, heads, head_dim), as a fused q, k, v
    projection gives them (GPT-2's c_attn); the output is (batch, seq, heads, head_dim). The backward writes qkv's
    gradient as one tensor, where autograd, given q, k and v split from it, would concatenate three (a copy of all
    of them every layer)."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (batch, seq, 3, heads, head_dim), got "
                         f"{getattr(qkv, 'shape', type(qkv).__name__)}")
    q, k, v = _unpacked(qkv)
    _check(q, k, v, key_padding_mask, None, 128, dropout_p, "bhsd")
    scale, dropout_p, seed = _scalars(qkv.shape[-1], softmax_scale, dropout_p, seed)
    out, lse = _flash_attn_packed_function(qkv, key_padding_mask, causal, scale, dropout_p, seed)
    out = out.transpose(1, 2)
    return (out, _natural_lse(lse)) if return_lse else out


def _scalars(head_dim: int, softmax_scale: float | None, dropout_p: float, seed: int | None) -> tuple:
    """The softmax scale (1/√head_dim unless given), the dropout probability, and the dropout seed (drawn unless
    given), as the kernels take them: floats, and a 31-bit integer (a kept launch was compiled for those types)."""
    if softmax_scale is not None and not 0 < real_number("softmax_scale", softmax_scale) < math.inf:
        raise ValueError(f"softmax_scale={softmax_scale} must be a positive finite number")
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0 else 0
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**31)")
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed={seed} must be in [0, 2**31)")
    return float(head_dim ** -0.5 if softmax_scale is None else softmax_scale), float(dropout_p), seed
