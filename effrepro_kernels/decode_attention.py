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

Also here: each key's score (`return_scores`, the logit q·k·scale, stored as the kernel computes it: with the
log-sum-exp it gives each key's probability, for eviction by attention such as Scissorhands'),
attention straight over a KIVI-quantized cache (`decode_attention_quantized`, the same kernel dequantizing in
registers), and `merge_attention`, which combines attention over disjoint sets of keys.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
import triton
import triton.language as tl

from .kv_quant import QuantizedKV, check_quantized, kv_tile
from .runtime import (HOPPER_BLOCK_SMEM, INTERPRET, block_shared_memory, cdiv, check_attention_heads, check_tensors,
                      launch, next_pow2, real_number, signature, sm_count, sm_shared_memory)

SCHEDULES = ("fa2", "split", "lean")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TILE_KEYS = {"fa2": 128, "split": 64, "lean": 64}  # measured best on an H100 at head_dim 128, fp16 (NOTES.md)
# Peak memory bandwidth per SM above which `split` and `lean` tiles hold twice the keys: an H100 SXM has 25 GB/s
# per SM and an H200 37, whose programs need more bytes in flight to keep its faster memory busy (NOTES.md)
FAST_MEMORY_GB_S_PER_SM = 30
# Lean programs per SM over a quantized cache: unpacking and dequantizing in registers is bound by latency, not
# by bytes, and a second program per SM hides part of it (measured on an H200, with integer-to-float conversions
# and without: results/probes/decode_quantized_levers_h200_30819b8.md, decode_quantized_dequant_h200_f322545.md)
QUANTIZED_PROGRAMS_PER_SM = 2
# Bytes of shared memory the K and V tiles of two pipeline stages may take: 160 KB on Hopper, of the 227 KB a block
# may opt into there (where the tiles were measured); as much less on a GPU with less (`pipeline_smem`)
PIPELINE_SMEM = 160 * 1024
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def padded_head_dim(head_dim: int) -> int:
    """Lanes a head takes in the kernels' tiles: the next power of two (tl.arange and tl.dot need one)."""
    return max(16, next_pow2(head_dim))


def head_dim_chunks(head_dim: int, quantized: bool = False) -> tuple[int, int]:
    """A head's lanes in the kernel's tiles: one power-of-two chunk, or two where that saves lanes (the second 0
    where it does not). Padding 80 or 96 to 128 lanes spends a quarter to a third of the tiles' shared memory and
    matrix work on zeros; 64 + 32 lanes do not. The second chunk takes at least 32 lanes: compiled for sm_90, a
    16-lane chunk's products took 2.5x the matrix instructions of the padded tile (its few columns spread over
    4 warps). Packed (quantized) tiles take whole rows."""
    padded = padded_head_dim(head_dim)
    first = padded // 2
    if quantized or head_dim == padded or first < 32:
        return padded, 0
    second = max(32, next_pow2(head_dim - first))
    return (first, second) if first + second < padded else (padded, 0)


def pipeline_smem(device=None) -> int:
    """Shared memory the K and V tiles of two pipeline stages may take on `device` (default: the current GPU):
    `PIPELINE_SMEM` less what the GPU's blocks have below Hopper's, so that the rest of the kernel keeps the room
    it had there; `PIPELINE_SMEM` without a GPU."""
    return max(16 * 1024, PIPELINE_SMEM - max(0, HOPPER_BLOCK_SMEM - block_shared_memory(device)))


def pipeline_bytes(block_n: int, head_dim: int, dtype: torch.dtype, quantized: bool = False) -> int:
    """Shared memory of two pipeline stages of K and V tiles (`head_dim_chunks` lanes)."""
    return 2 * 2 * block_n * sum(head_dim_chunks(head_dim, quantized)) * torch.finfo(dtype).bits // 8


@triton.jit
def _load_q(Q, b, hk, offs_g, offs_d, gmask, dmask, stride_qb, stride_qh, G):
    """The G query heads of KV head hk, padded to BLOCK_G rows and BLOCK_D columns with zeros."""
    return tl.load(Q + b.to(tl.int64) * stride_qb + (hk * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                   mask=gmask[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _store_out(OUT, out, b, hk, offs_g, offs_d, gmask, dmask, stride_ob, stride_oh, G):
    tl.store(OUT + b.to(tl.int64) * stride_ob + (hk * G + offs_g)[:, None] * stride_oh + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _store_final(OUT, LSE, out, lse2, b, hk, offs_g, offs_d, gmask, dmask, stride_ob, stride_oh, HKV, G):
    _store_out(OUT, out, b, hk, offs_g, offs_d, gmask, dmask, stride_ob, stride_oh, G)
    tl.store(LSE + b * (HKV * G) + hk * G + offs_g, lse2 * LN2, mask=gmask)


@triton.jit
def _decode(Q, K, KS, KZ, V, VS, VZ, WORK, MAX_ITEMS, ARRIVED, WO, WL, OUT, LSE, SCORES,
            stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_ksb, stride_ksh, stride_ksn,
            stride_vb, stride_vh, stride_vn, stride_vsb, stride_vsh, stride_vsn,
            stride_ob, stride_oh, HKV, G, MAX_PIECES, SCORES_ROW, sm_scale,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, WO_D: tl.constexpr,
            BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, BLOCK_P: tl.constexpr,
            K_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr,
            PRECISION: tl.constexpr, STORE_SCORES: tl.constexpr):
    """Each program walks its work items (segment = batch·KV head, tile range, piece number): softmax over the
    tiles with a running maximum and sum. A segment in one piece is written out at once. Otherwise the piece
    is stored, normalised, with its base-2 log-sum-exp, and counted; the program that stores a segment's last
    piece merges all its pieces, in a fixed order (so the result does not depend on which program that is),
    and resets the count for the next call. One launch, no second merge kernel.

    A head's lanes are one power-of-two chunk of BLOCK_D, or two (BLOCK_D, then BLOCK_E: `head_dim_chunks`), each
    with its own products, so that a head of 80 takes 64 + 32 lanes rather than 128; lanes past HEAD_DIM are
    masked on load (zeros add nothing to q·k, and are not stored). Pieces are stored WO_D lanes wide. K and V
    are full precision (K_BITS, V_BITS = 0) or `quantize_kv`'s packed codes, keys per channel and values per
    token, dequantized in registers (`kv_tile`); KS, KZ, VS, VZ are their scales and zero-points. With
    STORE_SCORES, each key's logit for each query head goes to SCORES (batch, heads, SCORES_ROW) as it is
    computed: whole tiles, those past a head's length as -inf, since SCORES_ROW is a multiple of BLOCK_N (no mask
    by key, and aligned rows: 16-byte stores)."""
    p = tl.program_id(0)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    gmask = offs_g < G
    dmask = offs_d < HEAD_DIM
    if BLOCK_E > 0:
        offs_e = BLOCK_D + tl.arange(0, BLOCK_E)
        emask = offs_e < HEAD_DIM
    qk_scale = sm_scale * LOG2E
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
            q = _load_q(Q, b, hk, offs_g, offs_d, gmask, dmask, stride_qb, stride_qh, G)
            if BLOCK_E > 0:
                q_e = _load_q(Q, b, hk, offs_g, offs_e, gmask, emask, stride_qb, stride_qh, G)
                acc_e = tl.zeros([BLOCK_G, BLOCK_E], tl.float32)
            Kh = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
            Vh = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
            k_stats = b.to(tl.int64) * stride_ksb + hk.to(tl.int64) * stride_ksh
            v_stats = b.to(tl.int64) * stride_vsb + hk.to(tl.int64) * stride_vsh
            m = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            every_row = tl.full([BLOCK_N], 1, tl.int1)
            for t in range(lo, hi):
                start = t * BLOCK_N
                offs_n = start + tl.arange(0, BLOCK_N)
                nmask = offs_n < length
                # rows past the length read the last key and value again instead of being masked, so the loads
                # take no per-row predicate (12% of a 16-bit tile's instructions); their scores are -inf, and a
                # finite value times probability 0 adds nothing
                rows = tl.minimum(tl.arange(0, BLOCK_N), length - 1 - start)
                k = kv_tile(Kh, KS + k_stats, KZ + k_stats, start, rows, offs_d, every_row, dmask, stride_kn,
                            stride_ksn, HEAD_DIM, K_BITS, K_GROUP, False, True)
                qk = tl.dot(q, k, input_precision=PRECISION)
                if BLOCK_E > 0:  # full precision only (the packed path reads whole rows into one chunk)
                    k_e = kv_tile(Kh, KS, KZ, start, rows, offs_e, every_row, emask, stride_kn, 0, 0, 0, 1, False,
                                  True)
                    qk += tl.dot(q_e, k_e, input_precision=PRECISION)
                s = tl.where(nmask[None, :], qk * qk_scale, float("-inf"))
                if STORE_SCORES:
                    heads = b * (HKV * G) + hk * G + offs_g
                    tl.store(SCORES + heads[:, None].to(tl.int64) * SCORES_ROW + offs_n[None, :], s * LN2,
                             mask=gmask[:, None])
                m_new = tl.maximum(m, tl.max(s, 1))  # every tile holds a real key: m_new is finite
                prob = tl.math.exp2(s - m_new[:, None])
                alpha = tl.math.exp2(m - m_new)
                l = l * alpha + tl.sum(prob, 1)
                v = kv_tile(Vh, VS + v_stats, VZ + v_stats, start, rows, offs_d, every_row, dmask, stride_vn,
                            stride_vsn, HEAD_DIM, V_BITS, V_GROUP, True, False)
                acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=PRECISION)
                if BLOCK_E > 0:
                    v_e = kv_tile(Vh, VS, VZ, start, rows, offs_e, every_row, emask, stride_vn, 0, 0, 0, 1, False,
                                  False)
                    acc_e = acc_e * alpha[:, None] + tl.dot(prob.to(v_e.dtype), v_e, input_precision=PRECISION)
                m = m_new
            if n_pieces == 1:
                _store_final(OUT, LSE, acc / l[:, None], m + tl.math.log2(l), b, hk, offs_g, offs_d, gmask, dmask,
                             stride_ob, stride_oh, HKV, G)
                if BLOCK_E > 0:
                    _store_out(OUT, acc_e / l[:, None], b, hk, offs_g, offs_e, gmask, emask, stride_ob, stride_oh, G)
            else:
                slot = seg.to(tl.int64) * MAX_PIECES + piece
                tl.store(WO + (slot * G + offs_g)[:, None] * WO_D + offs_d[None, :], acc / l[:, None],
                         mask=gmask[:, None])
                if BLOCK_E > 0:
                    tl.store(WO + (slot * G + offs_g)[:, None] * WO_D + offs_e[None, :], acc_e / l[:, None],
                             mask=gmask[:, None])
                tl.store(WL + slot * G + offs_g, m + tl.math.log2(l), mask=gmask)
                tl.debug_barrier()  # all of this program's stores are issued before it is counted (release below)
                if tl.atomic_add(ARRIVED + seg, 1, sem="acq_rel", scope="gpu") == n_pieces - 1:
                    offs_w = tl.arange(0, WO_D)
                    _merge(WO, WL, OUT, LSE, seg, n_pieces, b, hk, offs_w, offs_w < HEAD_DIM, stride_ob, stride_oh,
                           HKV, G, MAX_PIECES, WO_D, GROUP, BLOCK_P)
                    tl.store(ARRIVED + seg, 0)


@triton.jit
def _merge(WO, WL, OUT, LSE, seg, n_pieces, b, hk, offs_d, dmask, stride_ob, stride_oh, HKV, G, MAX_PIECES,
           BLOCK_D: tl.constexpr, GROUP: tl.constexpr, BLOCK_P: tl.constexpr):
    """Combine a segment's pieces through their log-sum-exps in a fixed order: BLOCK_P pieces per step (loaded
    together; see `merge_step`)."""
    offs_p = tl.arange(0, BLOCK_P)
    offs_g = tl.arange(0, GROUP)
    gmask = offs_g < G
    m = tl.full([GROUP], float("-inf"), tl.float32)
    w_sum = tl.zeros([GROUP], tl.float32)
    acc = tl.zeros([GROUP, BLOCK_D], tl.float32)
    for first in range(0, n_pieces, BLOCK_P):
        mask = ((first + offs_p) < n_pieces)[:, None] & gmask[None, :]
        rows = (seg.to(tl.int64) * MAX_PIECES + first + offs_p)[:, None] * G + offs_g[None, :]  # (piece, head)
        # .cg: read from L2, where the other programs' pieces are, never a stale L1 line
        lse = tl.load(WL + rows, mask=mask, other=float("-inf"), cache_modifier=".cg")
        lse = tl.where(gmask[None, :], lse, 0.0)  # padding heads: finite, not -inf - -inf = NaN (never stored)
        o = tl.load(WO + rows[:, :, None] * BLOCK_D + offs_d[None, None, :],
                    mask=mask[:, :, None] & dmask[None, None, :], other=0.0,
                    cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse, 0))
        alpha = tl.math.exp2(m - m_new)
        w = tl.math.exp2(lse - m_new[None, :])
        acc = acc * alpha[:, None] + tl.sum(o * w[:, :, None], 0)
        w_sum = w_sum * alpha + tl.sum(w, 0)
        m = m_new
    _store_final(OUT, LSE, acc / w_sum[:, None], m + tl.math.log2(w_sum), b, hk, offs_g, offs_d, gmask, dmask,
                 stride_ob, stride_oh, HKV, G)


@dataclass
class DecodeSchedule:
    """Which program computes which tiles, built on the host. Its `arrived` counters and its workspace are used
    by each call: one call at a time per schedule (one decode stream)."""

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
    # registers a thread may take (Triton's maxnreg; None: what the compiler chooses). The 4-bit loop takes 216-254
    # by itself, which leaves room for two programs of 4 warps an SM; capped at 168 it compiles without spills
    # for three (`scripts/tune_decode.py --quantized` measures it)
    max_registers: int | None = None
    # Set by the first call with a new signature (shapes, strides, dtypes, devices of q, k_cache, v_cache): the
    # signature that passed the checks, and the scratch memory made for it (`_workspace`). Calls with the same
    # signature skip both, so a call costs the output's allocation and the launches.
    checked_for: tuple | None = field(default=None, repr=False, compare=False)
    workspace: tuple = field(default=(), repr=False, compare=False)
    launchers: dict = field(default_factory=dict, repr=False, compare=False)  # `runtime.launch`'s, per signature
    copies: dict = field(default_factory=dict, repr=False, compare=False)  # device -> this schedule there
    # the last lengths tensor a call passed that matched, and its version counter (which in-place changes bump); at
    # first, `lengths` as built
    lengths_seen: tuple | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        # `make_schedule` and `to` make the lengths outside inference mode, so they have a version counter; lengths
        # made by hand in inference mode have none, and are read at every call they are passed to
        if not self.lengths.is_inference():
            self.lengths_seen = (self.lengths, self.lengths._version)

    def seen(self, lengths: torch.Tensor) -> bool:
        """Whether `lengths` is the tensor a call passed before, unchanged since: it matched then, so it does now
        (and reading it again would cost a device sync)."""
        return self.lengths_seen is not None and self.lengths_seen[0] is lengths and \
            self.lengths_seen[1] == lengths._version

    def to(self, device) -> "DecodeSchedule":
        """This schedule on `device`: a copy made once per device and kept, so that a schedule built on the
        CPU costs no copies (nor checks) on later calls."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # the key tensors' devices carry
        if self.work.device == device:
            return self
        if device not in self.copies:
            with torch.inference_mode(False):  # tensors with a version counter (`__post_init__`)
                moved = {name: getattr(self, name).to(device) for name in ("work", "lengths", "arrived")}
            self.copies[device] = dataclasses.replace(self, **moved, checked_for=None, workspace=(), copies={},
                                                      launchers={})
        return self.copies[device]


def flash_decoding_splits(segments: int, longest: int, head_dim: int, slots: int) -> int:
    """The chunks FlashAttention-2 splits each (batch, KV head) into when left to choose (`num_splits=0`, which
    is FlashDecoding, and what PyTorch's SDPA does): its `num_splits_heuristic`, as the upstream `flash_api.cpp`
    has it (../shared/reference/lean_attention.md, section 2.4), for waves of `slots` programs (FA2 passes two
    an SM, its own kernel's; see `resident_programs` for ours). No split where the segments fill 80% of a wave;
    else the fewest splits whose last wave is at least 85% as full as the best choice's (that fill in float32, as
    there), counting only split counts that change the chunk size. The counts are of FA2's own key blocks (256
    keys at head_dim <= 64, 128 to 128, 64 above) over the `longest` length (FA2 with a KV cache counts the
    cache's allocated length; here the lengths are the cache's), not of this kernel's tiles."""
    if segments >= 0.8 * slots:
        return 1
    blocks = math.ceil(longest / (256 if head_dim <= 64 else 128 if head_dim <= 128 else 64))
    choices = [s for s in range(1, min(128, slots, blocks) + 1)
               if s == 1 or math.ceil(blocks / s) != math.ceil(blocks / (s - 1))]
    waves = {s: np.float32(segments * s) / np.float32(slots) for s in choices}
    fill = {s: float(w / np.ceil(w)) for s, w in waves.items()}
    best = max(fill.values())
    return next(s for s in choices if fill[s] >= 0.85 * best)


def resident_programs(block_n: int, head_dim: int, dtype: torch.dtype, device=None, quantized: bool = False) -> int:
    """The `split` programs that run on an SM at once, for FlashDecoding's waves: as many as the SM's shared
    memory holds the pipelines of, at most two (FA2's count). An H200's 128-key tiles at head_dim 128 take 128 KB,
    so only one fits there: waves of two an SM would leave a partial second wave."""
    per_program = pipeline_bytes(block_n, head_dim, dtype, quantized) + 1024  # and the 1 KB CUDA keeps a block
    return max(1, min(2, sm_shared_memory(device) // per_program))


def lean_programs(tiles: list[int], sms: int) -> int:
    """The default number of lean programs: one per SM (which measured best on an H100 among one, two and four
    per SM), except where fewer segments (batch · KV head) than SMs are equally long: then the largest multiple
    of the segment count that fits, so that no program spans two segments. A spanning program stores, counts
    and starts a second piece, and the launch waits for the slowest program (effrepro_kernels/NOTES.md: measured on an
    H100, whose 132 SMs give 128 programs at 8, 32 or 128 segments)."""
    if len(tiles) <= sms and len(set(tiles)) == 1:
        return len(tiles) * (sms // len(tiles))
    return sms


def peak_gb_s_per_sm(device=None) -> float:
    """The device's peak memory bandwidth per SM (GB/s) from its properties (double data rate × bus width ×
    memory clock); 0 without a GPU, or where torch does not report them."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return 0.0
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 / props.multi_processor_count


def default_block_n(kind: str, head_dim: int = 128, dtype: torch.dtype = torch.float16, device=None,
                    quantized: bool = False) -> int:
    """Keys per tile. `fa2`'s few programs each stream a whole head, so their speed is the bytes each keeps in
    flight: larger tiles. `split` and `lean` fill every SM, and need larger tiles where the memory is fast for
    the SM count (`FAST_MEMORY_GB_S_PER_SM`), and on every card for a quantized cache and for heads of two
    chunks (80, 96: `head_dim_chunks`), whose tiles carry a chain of dependent work per byte longer than the
    16-bit d = 128 tile's (on an H100, 128-key tiles against 64: 4-bit attention 1.12-1.45x the 16-bit cache's
    speed against 1.01-1.10, d = 80 and 96 8-13% faster; effrepro_kernels/NOTES.md). The measured key counts are
    for head_dim 128; a tile keeps their bytes at other head dims (twice the keys at 64). Halved where two
    pipeline stages of K and V would not fit in the device's `pipeline_smem` (long heads, float32), or half of it
    for a float32
    quantized cache: there Triton pipelines the key groups' scales and zeros through shared memory too (for group
    sizes that are not powers of two), which `pipeline_bytes` does not count: compiled offline for sm_90, a
    128-key tile at head_dim 128 with key groups of 24 needs 352 KB, where an H200 has 227 KB. 16 under the CPU
    interpreter, for speed."""
    if INTERPRET:
        return 16
    keys = TILE_KEYS[kind]
    if kind != "fa2" and (quantized or head_dim_chunks(head_dim)[1] or
                          peak_gb_s_per_sm(device) > FAST_MEMORY_GB_S_PER_SM):
        keys *= 2
    keys = min(256, keys * 128 // padded_head_dim(head_dim)) if head_dim < 128 else keys
    room = pipeline_smem(device) // (2 if quantized and dtype == torch.float32 else 1)
    while keys > 16 and pipeline_bytes(keys, head_dim, dtype, quantized) > room:
        keys //= 2
    return keys


def merge_step(max_pieces: int, group: int, head_dim: int) -> int:
    """Pieces the merge loads per step: 16 where heads have at least 16 pieces and 16 of them fit in 128 float32
    registers a thread, else one. Measured on an H100 (effrepro_kernels/NOTES.md): the 16-piece step shortened the
    launch's tail there; with fewer pieces, or pieces too large, one per step was as fast or faster."""
    return 16 if max_pieces >= 16 and 16 * group * head_dim <= 128 * 128 else 1


def make_schedule(kind: str, lengths, num_kv_heads: int, *, num_programs: int | None = None,
                  num_splits: int | None = None, block_n: int | None = None, head_dim: int = 128,
                  dtype: torch.dtype = torch.float16, device=None, quantized: bool = False) -> DecodeSchedule:
    """`fa2`: a program per (batch, KV head). `split`: `num_splits` chunks per (batch, KV head) (default:
    FlashDecoding's choice, `flash_decoding_splits`). `lean`: `num_programs` equal shares of all tiles (default:
    `lean_programs`, times `QUANTIZED_PROGRAMS_PER_SM` for a `quantized` cache).
    Tiles of `block_n` keys (default: `default_block_n` for the head_dim, dtype, device and kind of cache, full
    precision or `quantized`, the schedule will serve). The schedule lives on `device` (default: that of
    `lengths`, if a tensor; else the CPU)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule={kind!r} is not one of {SCHEDULES}")
    def whole(n):
        return isinstance(n, numbers.Integral) and not isinstance(n, bool)
    for name, value in (("num_programs", num_programs), ("num_splits", num_splits)):
        if value is not None and not (whole(value) and value >= 1):
            raise ValueError(f"{name}={value!r} must be an integer >= 1 (None: the default)")
    if not (whole(num_kv_heads) and num_kv_heads >= 1):
        raise ValueError(f"num_kv_heads={num_kv_heads!r} must be an integer >= 1")
    if block_n is not None and not (isinstance(block_n, int) and block_n >= 16 and block_n & (block_n - 1) == 0):
        raise ValueError(f"block_n={block_n!r} must be a power of two >= 16 (None: the default)")
    if isinstance(lengths, torch.Tensor):
        if device is None:
            device = lengths.device  # where the lengths are, the calls will be
        lengths = _lengths_on_host(lengths)
    # sized for the GPU the calls will run on: the current one where the schedule is held on the host
    gpu = device if device is not None and torch.device(device).type == "cuda" else None
    block_n = block_n or default_block_n(kind, head_dim, dtype, gpu, quantized)
    lengths = list(lengths)
    if not lengths or not all(whole(n) and n >= 1 for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of integer lengths >= 1, got {lengths}")
    lengths = [int(n) for n in lengths]
    tiles = [math.ceil(n / block_n) for n in lengths for _ in range(num_kv_heads)]  # per segment b·Hkv + hk
    n_seg = len(tiles)
    sms = sm_count(gpu) if torch.cuda.is_available() else 8
    per_program: list[list[tuple[int, int, int, int]]] = []
    pieces = [0] * n_seg
    if kind == "fa2":
        per_program = [[(g, 0, t, 0)] for g, t in enumerate(tiles)]
        pieces = [1] * n_seg
    elif kind == "split":
        slots = sms * resident_programs(block_n, head_dim, dtype, gpu, quantized)
        splits = num_splits or flash_decoding_splits(n_seg, max(lengths), head_dim, slots)
        for g, t in enumerate(tiles):
            chunk = math.ceil(t / splits)
            for s in range(splits):
                lo, hi = s * chunk, min(t, (s + 1) * chunk)
                if lo < hi:
                    per_program.append([(g, lo, hi, pieces[g])])
                    pieces[g] += 1
    else:
        total = sum(tiles)
        per_sm = QUANTIZED_PROGRAMS_PER_SM if quantized else 1
        programs = min(num_programs or lean_programs(tiles, sms) * per_sm, total)
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
    # made outside a decode loop's inference mode too: the schedule's lengths keep a version counter, so that a call
    # given them back reads them (a device sync) only after an in-place change (`_prepare`)
    with torch.inference_mode(False):
        as_int = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
        return DecodeSchedule(kind, len(per_program), as_int(work), max(pieces), block_n, as_int(lengths),
                              as_int([0] * n_seg), tuple(lengths))


def _check(q, k_cache, v_cache, host_lengths):
    """k_cache and v_cache are tensors or `QuantizedKV`s, whose shape and dtype are those they dequantize to."""
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a tensor (batch, heads, head_dim), got {type(q).__name__}")
    if q.dim() != 3 or len(k_cache.shape) != 4:
        raise ValueError(f"q must be (batch, heads, head_dim) and k_cache (batch, kv_heads, max_len, head_dim); "
                         f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
    if tuple(k_cache.shape) != tuple(v_cache.shape):
        raise ValueError(f"k_cache and v_cache differ: {tuple(k_cache.shape)} vs {tuple(v_cache.shape)}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in DTYPES:
        raise ValueError(f"q, k_cache, v_cache must share one dtype of {DTYPES}; got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    b, h, d = q.shape
    if b == 0:
        raise ValueError(f"q has a batch of 0 sequences {tuple(q.shape)}; decode_attention needs at least one")
    if h == 0:
        raise ValueError(f"q has 0 query heads {tuple(q.shape)}; decode_attention needs at least one")
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} in batch or head_dim")
    check_attention_heads(h, k_cache.shape[1], d, "the cache")
    caches = {}
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if isinstance(c, QuantizedKV):
            caches.update({f"{name}.data": c.data, f"{name}.scale": c.scale, f"{name}.zero": c.zero})
        else:
            caches[name] = c
    check_tensors("decode_attention", q=q, **caches)
    parts = [q, *caches.values()]
    if any(t.stride(-1) != 1 for t in parts):
        raise ValueError("q and the caches (their data, scales and zeros, if quantized) need a contiguous last "
                         "dimension")
    if len(host_lengths) != b:
        raise ValueError(f"lengths must have shape (batch,)=({b},), got ({len(host_lengths)},)")
    if min(host_lengths) < 1 or max(host_lengths) > k_cache.shape[2]:
        raise ValueError(f"lengths must be in [1, {k_cache.shape[2]}] (the cache's max_len); "
                         f"got {min(host_lengths)}..{max(host_lengths)}")


def _lengths_on_host(lengths) -> tuple[int, ...]:
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.is_floating_point() or \
            lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be a 1-d integer tensor (batch,), got {lengths!r}")
    return tuple(int(n) for n in lengths.tolist())


def _cache_args(cache):
    """A cache as the kernels take it: pointers to its data, scales and zero-points; the (batch, head, token)
    strides of its data and of its scales; its bits (0: full precision) and group size. A full-precision cache
    stands in for its own scales, which are never read."""
    if isinstance(cache, QuantizedKV):
        return ((cache.data, cache.scale, cache.zero), (*cache.data.stride()[:3], *cache.scale.stride()[:3]),
                (cache.bits, cache.group_size))
    return (cache, cache, cache), (*cache.stride()[:3], 0, 0, 0), (0, 1)


def _workspace(q: torch.Tensor, max_pieces: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A call's scratch memory: each piece's output and base-2 log-sum-exp (where heads are cut into pieces),
    and the log-sum-exp for calls that do not return it."""
    b, h, d = q.shape
    n_slots = b * h * max_pieces if max_pieces > 1 else 0
    f32 = dict(device=q.device, dtype=torch.float32)
    return torch.empty(n_slots, padded_head_dim(d), **f32), torch.empty(n_slots, **f32), torch.empty(b, h, **f32)


def _attend(q, k_cache, v_cache, schedule: DecodeSchedule, workspace, softmax_scale, return_lse: bool,
            return_scores: bool):
    """Launch the kernel on checked inputs: out, then lse and scores if asked."""
    if return_scores and not return_lse:
        raise ValueError("return_scores=True needs return_lse=True: a key's probability is exp(score - lse)")
    b, h, d = q.shape
    hkv = k_cache.shape[1]
    groups = h // hkv
    padded = padded_head_dim(d)
    block_d, block_e = head_dim_chunks(d, quantized=isinstance(k_cache, QuantizedKV))
    block_g = max(16, next_pow2(groups))  # tl.dot takes 16 rows or more
    group = next_pow2(groups)
    # a float always: a prepared schedule's kept kernel was compiled for one (Triton makes an integer 1 a constant)
    scale = d ** -0.5 if softmax_scale is None else real_number("softmax_scale", softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale={softmax_scale} must be a finite number")
    # float32 in float32 arithmetic, as torch's own attention gives it, not tf32: decode is bound by memory, so
    # exact products cost little, and the probabilities that evict keys stay exact to float32 rounding
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    out = torch.empty_like(q)
    wo, wl, lse = workspace
    if return_lse:
        lse = torch.empty_like(lse)
    k_ptrs, k_strides, (k_bits, k_group) = _cache_args(k_cache)
    v_ptrs, v_strides, (v_bits, v_group) = _cache_args(v_cache)
    kept = schedule.launchers if schedule.checked_for is not None else None  # a prepared schedule's
    # rows of whole tiles: the kernel stores a tile's scores without a mask by key, in 16-byte stores (Triton
    # specialises a row length divisible by 16); the caller sees the first max_len of each row
    scores_row = cdiv(k_cache.shape[2], schedule.block_n) * schedule.block_n if return_scores else 0
    scores = torch.empty(b, h, scores_row, device=q.device, dtype=torch.float32) if return_scores else out
    launch(_decode, (schedule.num_programs,), (
        q, *k_ptrs, *v_ptrs, schedule.work, schedule.work.shape[1], schedule.arrived, wo, wl, out, lse, scores,
        q.stride(0), q.stride(1), *k_strides, *v_strides, out.stride(0), out.stride(1),
        hkv, groups, schedule.max_pieces, scores_row, scale), dict(
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_E=block_e, WO_D=padded, BLOCK_G=block_g, BLOCK_N=schedule.block_n,
        GROUP=group, BLOCK_P=merge_step(schedule.max_pieces, group, padded), K_BITS=k_bits, K_GROUP=k_group,
        V_BITS=v_bits, V_GROUP=v_group, PRECISION=precision, STORE_SCORES=return_scores, num_warps=schedule.num_warps,
        num_stages=schedule.num_stages, maxnreg=schedule.max_registers), kept,
        "decode+scores" if return_scores else "decode")
    if return_scores:
        return out, lse, scores[..., :k_cache.shape[2]]
    return (out, lse) if return_lse else out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     lengths: torch.Tensor | None = None, schedule: str | DecodeSchedule = "lean",
                     softmax_scale: float | None = None, return_lse: bool = False, return_scores: bool = False):
    """softmax(q kᵀ · scale) v for one query per head, over the first `lengths[b]` entries of the cache.

    q: (batch, heads, head_dim), head_dim 16 to 256; k_cache, v_cache: (batch, kv_heads, max_len, head_dim),
    kv_heads dividing heads; lengths: int (batch,), each in [1, max_len]. `schedule` is "fa2", "split", "lean"
    or a prepared `DecodeSchedule`. Building a schedule reads the lengths on the host (a device sync); in a
    decode loop, build it once with `make_schedule` and pass it alone (`lengths` may then be left out), so
    that a call launches kernels and nothing else.

    Returns the output (batch, heads, head_dim); then, if asked, the log-sum-exp (natural log, float32,
    (batch, heads)); then, if asked (with the log-sum-exp), each query head's score of each cached key, the
    logit q·k·scale (float32, (batch, heads, max_len), rows padded in memory to whole tiles, so not contiguous
    where max_len is not a multiple of the schedule's block_n; undefined from lengths[b] on), stored as the kernel
    computes it, so the keys are read once: a key's probability is exp(score − lse). Eviction by attention reads
    the scores as they are (`pivotal_counts`) or turns them into probabilities (one pass over b·h·max_len floats).
    """
    if not (isinstance(k_cache, torch.Tensor) and isinstance(v_cache, torch.Tensor)):
        raise ValueError(f"k_cache and v_cache must be tensors, got {type(k_cache).__name__}, "
                         f"{type(v_cache).__name__}; a quantized cache goes to decode_attention_quantized")
    schedule, workspace = _prepare(q, k_cache, v_cache, lengths, schedule)
    return _attend(q, k_cache, v_cache, schedule, workspace, softmax_scale, return_lse, return_scores)


def _tensors(cache) -> tuple[torch.Tensor, ...]:
    return (cache.data, cache.scale, cache.zero) if isinstance(cache, QuantizedKV) else (cache,)


def _prepare(q, k_cache, v_cache, lengths, schedule) -> tuple[DecodeSchedule, tuple]:
    """The schedule and scratch memory of a call. A prepared schedule checks its inputs once per call signature
    (shapes, strides, dtypes, devices) and owns its scratch memory, so that a decode loop's calls launch kernels
    and nothing else; lengths given with it are read (a device sync) only when they are a tensor it has not
    seen, or one changed in place since. A schedule given by name is built here from the lengths (a sync)."""
    if isinstance(schedule, DecodeSchedule):
        if lengths is not None and not schedule.seen(lengths):
            if _lengths_on_host(lengths) != schedule.host_lengths:
                raise ValueError(f"lengths {_lengths_on_host(lengths)} differ from those the schedule was built for "
                                 f"{schedule.host_lengths}; build a new schedule with make_schedule")
            if not lengths.is_inference():  # inference tensors keep no version counter: read every call
                schedule.lengths_seen = (lengths, lengths._version)
        schedule = schedule.to(q.device)
        call = signature(q, *_tensors(k_cache), *_tensors(v_cache))
        if schedule.checked_for != call:  # once per schedule and signature, not per call
            _check(q, k_cache, v_cache, schedule.host_lengths)
            _check_schedule_fits(schedule, q, k_cache)
            schedule.checked_for, schedule.workspace = call, _workspace(q, schedule.max_pieces)
            schedule.launchers = {}
        return schedule, schedule.workspace
    if lengths is None:
        raise ValueError(f"schedule={schedule!r} needs the lengths; pass lengths or a prepared DecodeSchedule")
    host_lengths = _lengths_on_host(lengths)
    _check(q, k_cache, v_cache, host_lengths)
    # keys per tile, and lean programs, for the kind of cache (`default_block_n`, `make_schedule`)
    schedule = make_schedule(schedule, host_lengths, k_cache.shape[1], head_dim=q.shape[2], dtype=q.dtype,
                             device=q.device, quantized=isinstance(k_cache, QuantizedKV))
    return schedule, _workspace(q, schedule.max_pieces)


def _check_schedule_fits(schedule: DecodeSchedule, q: torch.Tensor, k_cache: torch.Tensor):
    if schedule.arrived.numel() != q.shape[0] * k_cache.shape[1]:
        raise ValueError(f"the schedule was built for {schedule.arrived.numel() // q.shape[0]} KV heads, the cache "
                         f"has {k_cache.shape[1]}; build it with make_schedule(..., num_kv_heads={k_cache.shape[1]})")
    tile_bytes = pipeline_bytes(schedule.block_n, q.shape[2], q.dtype, quantized=isinstance(k_cache, QuantizedKV))
    room = pipeline_smem(q.device)
    if tile_bytes > room:
        raise ValueError(f"the schedule's {schedule.block_n}-key tiles need {tile_bytes // 1024} KB of shared memory "
                         f"at head_dim={q.shape[2]}, {q.dtype} (at most {room // 1024} KB on {q.device}); build it "
                         f"with make_schedule(..., head_dim={q.shape[2]}, dtype={q.dtype})")


def decode_attention_quantized(q: torch.Tensor, k_q: QuantizedKV, v_q: QuantizedKV,
                               lengths: torch.Tensor | None = None, schedule: str | DecodeSchedule = "lean",
                               softmax_scale: float | None = None, return_lse: bool = False,
                               return_scores: bool = False):
    """`decode_attention` over a cache quantized by `kv_quant.quantize_kv` in KIVI's layout: keys with
    axis="channel", values with axis="token" (any bits and group sizes). The same kernel dequantizes each tile
    in registers, so the full-precision cache never exists and a call reads the packed codes and the groups'
    scales: about bits/16 of an fp16 cache's bytes at long contexts, plus the scales' share.

    `schedule` as for `decode_attention`: a name, or a prepared `DecodeSchedule` (in a decode loop). Returns
    what `decode_attention` returns. KIVI keeps the newest tokens in full precision: attend to those with
    `decode_attention(..., return_lse=True)` and combine the two with `merge_attention`.
    """
    if not (isinstance(k_q, QuantizedKV) and isinstance(v_q, QuantizedKV)):
        raise ValueError(f"k_q and v_q must be QuantizedKV (from quantize_kv); got {type(k_q).__name__}, "
                         f"{type(v_q).__name__}")
    check_quantized(k_q)
    check_quantized(v_q)
    if k_q.axis != "channel" or v_q.axis != "token":
        raise ValueError(f"keys must be quantized with axis='channel' and values with axis='token' (KIVI); got "
                         f"{k_q.axis!r} and {v_q.axis!r}")
    schedule, workspace = _prepare(q, k_q, v_q, lengths, schedule)
    return _attend(q, k_q, v_q, schedule, workspace, softmax_scale, return_lse, return_scores)


def merge_attention(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of disjoint key sets, from attention over each: outs (batch, heads, head_dim)
    and their natural log-sum-exps (batch, heads), as `decode_attention(..., return_lse=True)` gives them.
    Returns the merged output (in the outputs' dtype) and its log-sum-exp. A part with no keys (lse = -inf)
    adds nothing. A key's score does not depend on the part; exp(score − lse) with the merged lse is its
    probability over the union."""
    if not outs or len(outs) != len(lses):
        raise ValueError(f"merge_attention needs one lse per output, at least one; got {len(outs)} outputs and "
                         f"{len(lses)} lses")
    if not all(o.shape == outs[0].shape and lse.shape == outs[0].shape[:-1] for o, lse in zip(outs, lses)):
        raise ValueError(f"merge_attention needs outputs of one shape (batch, heads, head_dim) and lses of their "
                         f"(batch, heads); got {[tuple(o.shape) for o in outs]} and {[tuple(x.shape) for x in lses]}")
    if len({o.dtype for o in outs}) > 1 or len({x.dtype for x in lses}) > 1:
        raise ValueError(f"merge_attention needs outputs of one dtype and lses of one dtype; got outputs in "
                         f"{[str(o.dtype) for o in outs]} and lses in {[str(x.dtype) for x in lses]}")
    if len({t.device for t in (*outs, *lses)}) > 1:
        raise ValueError(f"merge_attention takes its tensors on one device; got outputs on "
                         f"{[str(o.device) for o in outs]} and lses on {[str(x.device) for x in lses]}")
    part_lse = torch.stack(lses).float()
    lse = torch.logsumexp(part_lse, 0)
    weights = torch.exp(part_lse - lse)[..., None]  # NaN where no part has keys: dropped below, as -inf parts
    merged = sum(torch.where(w > 0, w * o.float(), 0.0) for w, o in zip(weights, outs))
    return merged.to(outs[0].dtype), lse
