"""Decode attention: one query token per head over a KV cache, under three schedules of the same kernel.

- `fa2`: one program per (batch, KV head) walks the whole cache (FlashAttention-2's parallelism, the Lean
  Attention paper's baseline): few programs at small batch, so most SMs idle.
- `split`: FlashDecoding: each (batch, KV head) split into `num_splits` chunks, then merged.
- `lean`: stream-K (Lean Attention): all (batch, KV head, KV tile) tiles in one line, cut into equal shares
  for a fixed number of programs; a share may span several heads, and a head several shares. Partial results
  are merged exactly through their log-sum-exp, in a fixed order (deterministic), by whichever program
  finishes a head last, inside the same launch (the paper's host-block fix-up).

The query heads that share a KV head are processed together (grouped-query attention), so K and V are read
once. A `DecodeSchedule` is built on the host from the sequence lengths and reused across calls.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .runtime import INTERPRET, runs_on

SCHEDULES = ("fa2", "split", "lean")
HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TILE_KEYS = {"fa2": 128, "split": 64, "lean": 64}  # measured best on an H100 at head_dim 128, fp16 (NOTES.md)
PIPELINE_SMEM = 160 * 1024  # bytes of shared memory the K and V tiles of two pipeline stages may take


def pipeline_bytes(block_n: int, head_dim: int, dtype: torch.dtype) -> int:
    """Shared memory of two pipeline stages of K and V tiles."""
    return 2 * 2 * block_n * head_dim * torch.finfo(dtype).bits // 8


@triton.jit
def _store_final(OUT, LSE, out, lse, b, hk, offs_g, offs_d, gmask, stride_ob, stride_oh, HKV, G):
    tl.store(OUT + b.to(tl.int64) * stride_ob + (hk * G + offs_g)[:, None] * stride_oh + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=gmask[:, None])
    tl.store(LSE + b * (HKV * G) + hk * G + offs_g, lse, mask=gmask)


@triton.jit
def _decode(Q, K, V, WORK, MAX_ITEMS, ARRIVED, WO, WL, OUT, LSE,
            stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_ob, stride_oh, HKV, G, MAX_PIECES, sm_scale,
            HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
            BLOCK_P: tl.constexpr):
    """Each program walks its work items (segment = batch·KV head, tile range, piece number): softmax over the
    tiles with a running maximum and sum. A segment in one piece is written out at once. Otherwise the piece
    is stored, normalised, with its base-2 log-sum-exp, and counted; the program that stores a segment's last
    piece merges all its pieces, in a fixed order (so the result does not depend on which program that is),
    and resets the count for the next call. One launch, no second merge kernel."""
    p = tl.program_id(0)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    gmask = offs_g < G
    qk_scale = sm_scale * 1.4426950408889634
    for i in range(MAX_ITEMS):
        # an item carries all it needs (pieces of its segment, sequence length): one memory round trip
        # before the first K and V loads, not a chain of dependent ones
        item = WORK + (p * MAX_ITEMS + i) * 6
        seg = tl.load(item)
        lo = tl.load(item + 1)
        hi = tl.load(item + 2)
        piece = tl.load(item + 3)
        n_pieces = tl.load(item + 4)
        length = tl.load(item + 5)
        if lo < hi:  # programs with fewer items than MAX_ITEMS have empty ones
            b, hk = seg // HKV, seg % HKV
            q = tl.load(Q + b.to(tl.int64) * stride_qb + (hk * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                        mask=gmask[:, None], other=0.0)
            Kh = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
            Vh = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
            m = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
            for t in range(lo, hi):
                offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
                nmask = offs_n < length
                k = tl.load(Kh + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None], mask=nmask[None, :],
                            other=0.0)
                s = tl.where(nmask[None, :], tl.dot(q, k) * qk_scale, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))  # every tile holds a real key: m_new is finite
                prob = tl.math.exp2(s - m_new[:, None])
                alpha = tl.math.exp2(m - m_new)
                l = l * alpha + tl.sum(prob, 1)
                v = tl.load(Vh + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=nmask[:, None],
                            other=0.0)
                acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v)
                m = m_new
            if n_pieces == 1:
                _store_final(OUT, LSE, acc / l[:, None], m + tl.math.log2(l), b, hk, offs_g, offs_d, gmask,
                             stride_ob, stride_oh, HKV, G)
            else:
                slot = seg.to(tl.int64) * MAX_PIECES + piece
                tl.store(WO + (slot * G + offs_g)[:, None] * HEAD_DIM + offs_d[None, :], acc / l[:, None],
                         mask=gmask[:, None])
                tl.store(WL + slot * G + offs_g, m + tl.math.log2(l), mask=gmask)
                tl.debug_barrier()  # all of this program's stores are issued before it is counted (release below)
                if tl.atomic_add(ARRIVED + seg, 1, sem="acq_rel", scope="gpu") == n_pieces - 1:
                    _merge(WO, WL, OUT, LSE, seg, n_pieces, b, hk, offs_d, stride_ob, stride_oh, HKV, G, MAX_PIECES,
                           HEAD_DIM, GROUP, BLOCK_P)
                    tl.store(ARRIVED + seg, 0)


@triton.jit
def _merge(WO, WL, OUT, LSE, seg, n_pieces, b, hk, offs_d, stride_ob, stride_oh, HKV, G, MAX_PIECES,
           HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_P: tl.constexpr):
    """Combine a segment's pieces through their log-sum-exps in a fixed order: BLOCK_P pieces per step (loaded
    together; see `merge_step`)."""
    offs_p = tl.arange(0, BLOCK_P)
    offs_g = tl.arange(0, GROUP)
    gmask = offs_g < G
    m = tl.full([GROUP], float("-inf"), tl.float32)
    w_sum = tl.zeros([GROUP], tl.float32)
    acc = tl.zeros([GROUP, HEAD_DIM], tl.float32)
    for first in range(0, n_pieces, BLOCK_P):
        mask = ((first + offs_p) < n_pieces)[:, None] & gmask[None, :]
        rows = (seg.to(tl.int64) * MAX_PIECES + first + offs_p)[:, None] * G + offs_g[None, :]  # (piece, head)
        # .cg: read from L2, where the other programs' pieces are, never a stale L1 line
        lse = tl.load(WL + rows, mask=mask, other=float("-inf"), cache_modifier=".cg")
        lse = tl.where(gmask[None, :], lse, 0.0)  # padding heads: finite, not -inf - -inf = NaN (never stored)
        o = tl.load(WO + rows[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=mask[:, :, None], other=0.0,
                    cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse, 0))
        alpha = tl.math.exp2(m - m_new)
        w = tl.math.exp2(lse - m_new[None, :])
        acc = acc * alpha[:, None] + tl.sum(o * w[:, :, None], 0)
        w_sum = w_sum * alpha + tl.sum(w, 0)
        m = m_new
    _store_final(OUT, LSE, acc / w_sum[:, None], m + tl.math.log2(w_sum), b, hk, offs_g, offs_d, gmask,
                 stride_ob, stride_oh, HKV, G)


@dataclass
class DecodeSchedule:
    """Which program computes which tiles, built on the host. Its `arrived` counters are used and reset by each
    call: one call at a time per schedule (one decode stream)."""

    kind: str
    num_programs: int
    # int32 (num_programs, max items per program, 6): segment, first tile, end tile, piece number, pieces of
    # the segment, sequence length; a program with fewer items has empty ones (first tile == end tile)
    work: torch.Tensor
    max_pieces: int
    block_n: int
    lengths: torch.Tensor  # int32 (batch,): the sequence lengths it was built for, on its device
    arrived: torch.Tensor  # int32 (num_segments,), zero between calls: pieces of each segment stored so far
    host_lengths: tuple[int, ...]  # the same, on the host: checking them needs no device sync
    num_warps: int = 4
    num_stages: int = 3

    def to(self, device) -> "DecodeSchedule":
        if self.work.device == torch.device(device):
            return self
        moved = {name: getattr(self, name).to(device) for name in ("work", "lengths", "arrived")}
        return dataclasses.replace(self, **moved)


def lean_programs(tiles: list[int], sms: int) -> int:
    """The default number of lean programs: one per SM (which measured best on an H100 among one, two and four
    per SM), except where fewer segments (batch · KV head) than SMs are equally long: then the largest multiple
    of the segment count that fits, so that no program spans two segments. A spanning program stores, counts
    and starts a second piece, and the launch waits for the slowest program (kernels/NOTES.md: measured on an
    H100, whose 132 SMs give 128 programs at 8, 32 or 128 segments)."""
    if len(tiles) <= sms and len(set(tiles)) == 1:
        return len(tiles) * (sms // len(tiles))
    return sms


def default_block_n(kind: str, head_dim: int = 128, dtype: torch.dtype = torch.float16) -> int:
    """Keys per tile. `fa2`'s few programs each stream a whole head, so their speed is the bytes each keeps in
    flight: larger tiles. `split` and `lean` fill every SM either way. Halved where two pipeline stages of K
    and V would not fit in shared memory (long heads, float32); 16 under the CPU interpreter, for speed."""
    if INTERPRET:
        return 16
    keys = TILE_KEYS[kind]
    while keys > 16 and pipeline_bytes(keys, head_dim, dtype) > PIPELINE_SMEM:
        keys //= 2
    return keys


def merge_step(max_pieces: int, group: int, head_dim: int) -> int:
    """Pieces the merge loads per step: 16 where heads have at least 16 pieces and 16 of them fit in 128 float32
    registers a thread, else one. Measured on an H100 (kernels/NOTES.md): the 16-piece step shortened the
    launch's tail there; with fewer pieces, or pieces too large, one per step was as fast or faster."""
    return 16 if max_pieces >= 16 and 16 * group * head_dim <= 128 * 128 else 1


def make_schedule(kind: str, lengths, num_kv_heads: int, *, num_programs: int | None = None,
                  num_splits: int | None = None, block_n: int | None = None, head_dim: int = 128,
                  dtype: torch.dtype = torch.float16, device=None) -> DecodeSchedule:
    """`fa2`: a program per (batch, KV head). `split`: `num_splits` chunks per (batch, KV head) (default: enough
    for one program per SM). `lean`: `num_programs` equal shares of all tiles (default: `lean_programs`).
    Tiles of `block_n` keys (default: `default_block_n` for the head_dim and dtype the schedule will serve)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule={kind!r} is not one of {SCHEDULES}")
    block_n = block_n or default_block_n(kind, head_dim, dtype)
    lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be a non-empty list of lengths >= 1, got {lengths}")
    tiles = [math.ceil(n / block_n) for n in lengths for _ in range(num_kv_heads)]  # per segment b·Hkv + hk
    n_seg = len(tiles)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if torch.cuda.is_available() else 8
    per_program: list[list[tuple[int, int, int, int]]] = []
    pieces = [0] * n_seg
    if kind == "fa2":
        per_program = [[(g, 0, t, 0)] for g, t in enumerate(tiles)]
        pieces = [1] * n_seg
    elif kind == "split":
        splits = num_splits or max(1, math.ceil(sms / n_seg))
        for g, t in enumerate(tiles):
            chunk = math.ceil(t / splits)
            for s in range(splits):
                lo, hi = s * chunk, min(t, (s + 1) * chunk)
                if lo < hi:
                    per_program.append([(g, lo, hi, pieces[g])])
                    pieces[g] += 1
    else:
        total = sum(tiles)
        programs = min(num_programs or lean_programs(tiles, sms), total)
        starts = [0]
        for t in tiles:
            starts.append(starts[-1] + t)
        g = 0
        for p in range(programs):
            lo, hi = p * total // programs, (p + 1) * total // programs
            items = []
            while lo < hi:
                while starts[g + 1] <= lo:
                    g += 1
                end = min(hi, starts[g + 1])
                items.append((g, lo - starts[g], end - starts[g], pieces[g]))
                pieces[g] += 1
                lo = end
            per_program.append(items)
    seg_lengths = [n for n in lengths for _ in range(num_kv_heads)]
    max_items = max(len(items) for items in per_program)
    work = [[[g, lo, hi, piece, pieces[g], seg_lengths[g]] for g, lo, hi, piece in items]
            + [[0] * 6] * (max_items - len(items)) for items in per_program]
    as_int = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return DecodeSchedule(kind, len(per_program), as_int(work), max(pieces), block_n, as_int(lengths),
                          as_int([0] * n_seg), tuple(lengths))


def _check(q, k_cache, v_cache, host_lengths):
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be (batch, heads, head_dim) and k_cache (batch, kv_heads, max_len, head_dim); "
                         f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache differ: {tuple(k_cache.shape)} vs {tuple(v_cache.shape)}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in DTYPES:
        raise ValueError(f"q, k_cache, v_cache must share one dtype of {DTYPES}; got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    b, h, d = q.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} in batch or head_dim")
    if h % k_cache.shape[1]:
        raise ValueError(f"q's {h} heads are not a multiple of the cache's {k_cache.shape[1]} KV heads")
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim={d} is not supported; use one of {HEAD_DIMS}")
    if not runs_on(q.device):
        raise ValueError(f"q is on {q.device}; decode_attention runs on CUDA devices "
                         "(or on the CPU under TRITON_INTERPRET=1, for tests)")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last (head_dim) dimension")
    if len(host_lengths) != b:
        raise ValueError(f"lengths must have shape (batch,)=({b},), got ({len(host_lengths)},)")
    if min(host_lengths) < 1 or max(host_lengths) > k_cache.shape[2]:
        raise ValueError(f"lengths must be in [1, {k_cache.shape[2]}] (the cache's max_len); "
                         f"got {min(host_lengths)}..{max(host_lengths)}")


def _lengths_on_host(lengths) -> tuple[int, ...]:
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1:
        raise ValueError(f"lengths must be a 1-d integer tensor (batch,), got {lengths!r}")
    return tuple(int(n) for n in lengths.tolist())


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     lengths: torch.Tensor | None = None, schedule: str | DecodeSchedule = "lean",
                     softmax_scale: float | None = None, return_lse: bool = False):
    """softmax(q kᵀ · scale) v for one query per head, over the first `lengths[b]` entries of the cache.

    q: (batch, heads, head_dim); k_cache, v_cache: (batch, kv_heads, max_len, head_dim), kv_heads dividing
    heads; lengths: int (batch,), each in [1, max_len]. `schedule` is "fa2", "split", "lean" or a prepared
    `DecodeSchedule`. Building a schedule reads the lengths on the host (a device sync); in a decode loop,
    build it once with `make_schedule` and pass it alone (`lengths` may then be left out), so that a call
    launches kernels and nothing else. Returns the output (batch, heads, head_dim) and, if asked, the
    log-sum-exp (natural log, float32, (batch, heads)).
    """
    prepared = isinstance(schedule, DecodeSchedule)
    if prepared:
        host_lengths = schedule.host_lengths
        if lengths is not None and lengths is not schedule.lengths and _lengths_on_host(lengths) != host_lengths:
            raise ValueError(f"lengths {_lengths_on_host(lengths)} differ from those the schedule was built for "
                             f"{host_lengths}; build a new schedule with make_schedule")
    elif lengths is None:
        raise ValueError(f"schedule={schedule!r} needs the lengths; pass lengths or a prepared DecodeSchedule")
    else:
        host_lengths = _lengths_on_host(lengths)
    _check(q, k_cache, v_cache, host_lengths)
    if prepared and schedule.arrived.numel() != q.shape[0] * k_cache.shape[1]:
        raise ValueError(f"the schedule was built for {schedule.arrived.numel() // q.shape[0]} KV heads, the cache "
                         f"has {k_cache.shape[1]}; build it with make_schedule(..., num_kv_heads={k_cache.shape[1]})")
    schedule = schedule.to(q.device) if prepared else \
        make_schedule(schedule, host_lengths, k_cache.shape[1], head_dim=q.shape[2], dtype=q.dtype, device=q.device)
    b, h, d = q.shape
    tile_bytes = pipeline_bytes(schedule.block_n, d, q.dtype)
    if tile_bytes > PIPELINE_SMEM:
        raise ValueError(f"the schedule's {schedule.block_n}-key tiles need {tile_bytes // 1024} KB of shared memory "
                         f"at head_dim={d}, {q.dtype} (at most {PIPELINE_SMEM // 1024} KB); build it with "
                         f"make_schedule(..., head_dim={d}, dtype={q.dtype})")
    hkv = k_cache.shape[1]
    groups = h // hkv
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.empty_like(q)
    lse = torch.empty(b, h, device=q.device, dtype=torch.float32)
    block_g = max(16, triton.next_power_of_2(groups))  # tl.dot takes 16 rows or more
    group = triton.next_power_of_2(groups)
    block_p = merge_step(schedule.max_pieces, group, d)
    n_slots = b * hkv * schedule.max_pieces * groups if schedule.max_pieces > 1 else 0
    wo = torch.empty(n_slots, d, device=q.device, dtype=torch.float32)
    wl = torch.empty(n_slots, device=q.device, dtype=torch.float32)
    _decode[(schedule.num_programs,)](
        q, k_cache, v_cache, schedule.work, schedule.work.shape[1], schedule.arrived, wo, wl, out, lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        hkv, groups, schedule.max_pieces, scale,
        HEAD_DIM=d, BLOCK_G=block_g, BLOCK_N=schedule.block_n, GROUP=group, BLOCK_P=block_p,
        num_warps=schedule.num_warps, num_stages=schedule.num_stages)
    return (out, lse * math.log(2.0)) if return_lse else out
