"""Group-wise asymmetric quantization of a KV cache to 2, 4 or 8 bits, in KIVI's layout (Liu et al., 2024).

KIVI quantizes keys per channel, since their outliers sit in fixed channels, and values per token, which have
no such channels: `axis="channel"` gives each channel's groups of `group_size` consecutive tokens one scale and
zero-point (the caller keeps the newest tokens, fewer than a group, in full precision), `axis="token"` gives each
token's groups of `group_size` consecutive channels one. A value x is stored as the code nearest (x - zero) /
scale (ties to even; the kernel multiplies by a rounded reciprocal, so a tie may go either way), clamped to
[0, 2^bits - 1], where zero is the group's minimum and scale (max - min) / (2^bits - 1); scale and
zero are kept in the cache's dtype, so `dequantize_kv` returns that dtype.

Codes are packed along head_dim in 32-bit words (little-endian), the same for both axes: a word holds 32 / bits
consecutive channels, and channel 2s + h of a word sits at bit 16h + s · bits, so channels 2s and 2s + 1 lie at
the same place in the word's two 16-bit halves. One shift and one AND then put two neighbouring codes in two
16-bit lanes, where the decode kernel dequantizes them together (one two-lane multiply-add, no bits moved
between lanes: NOTES.md, "Codes in 16-bit lanes"). A token's packed row is padded to whole words
(`packed_row_bytes`) and contiguous, so a tile of tokens is one coalesced read, and appending a group of tokens
appends rows.

Written here rather than taken from a package: the packages behind HF's `QuantizedCache` (optimum-quanto, HQQ;
neither installed here) keep their own packed formats, which our decode kernel cannot dequantize in registers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .runtime import AUTOTUNE, INTERPRET, TRITON_VERSION, cdiv, check_tensors, next_pow2

BITS = (2, 4, 8)
AXES = ("channel", "token")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TILE_ELEMENTS = 4096  # values a quantize or dequantize program holds at once
INTERPRETED = tl.constexpr(INTERPRET)  # for jit code: the interpreter runs no inline PTX
# Before Triton 3.9 the CPU interpreter rounds tl.fma twice (product, then sum), in fp16 too, where cancelling to
# zero loses all of what the GPU's fused one keeps: there fp16 dequantizes through fp32
FMA_ROUNDS_ONCE = tl.constexpr(not INTERPRET or TRITON_VERSION >= (3, 9))


def packed_row_bytes(head_dim: int, bits: int) -> int:
    """Bytes of a token's packed codes: head_dim · bits rounded up to whole 32-bit words."""
    return 4 * cdiv(head_dim * bits, 32)


@dataclass
class QuantizedKV:
    """A quantized (batch, kv_heads, n, head_dim) cache tensor.

    data: uint8 (batch, kv_heads, n, packed_row_bytes(head_dim, bits)), the packed codes;
    scale, zero: the cache's dtype, (batch, kv_heads, n / group_size, head_dim) for axis="channel",
    (batch, kv_heads, n, head_dim / group_size) for axis="token";
    shape: the full-precision shape.
    The kernels index data, scale and zero with their strides, but need each contiguous in its last dimension,
    data's rows on 4-byte boundaries and zero laid out like scale (`check_quantized`): `quantize_kv` makes them so,
    and concatenating along n keeps them so.
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    axis: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it dequantizes to."""
        return self.scale.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, scales and zero-points."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero))


@triton.jit
def kv_tile(X, XS, XZ, start, offs_n, offs_d, nmask, dmask, stride_n, stride_sn, head_dim, BITS: tl.constexpr,
            GROUP_SIZE: tl.constexpr, PER_TOKEN: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The (token, channel) tile at (start + offs_n) × offs_d of one (batch, KV head) of a cache, or its transpose
    (channel, token) with TRANSPOSED, as a key tile is used: 64-bit arithmetic once for the tile's first token,
    32-bit offsets within it. BITS == 0: X is the full-precision cache, loaded in the orientation asked for.
    Otherwise X holds packed codes: a token's packed row is loaded whole, as 32-bit
    words (wide loads: each byte once), unpacked in registers two codes an operation, and dequantized with its
    group's scale and zero-point, in rows of stride `stride_sn`, per token (PER_TOKEN) or per channel. The
    packed path reads whole rows: offs_d must be arange(0, BLOCK_D), the lanes past head_dim masked by `dmask`;
    and start + offs_n must be BLOCK_N consecutive tokens from a multiple of BLOCK_N (a tile of the cache), those
    past the cache's end either masked by `nmask` or repeating its last token (as the decode kernel passes them)."""
    if BITS == 0:
        X += start.to(tl.int64) * stride_n
        if TRANSPOSED:
            x = tl.load(X + offs_n[None, :] * stride_n + offs_d[:, None], mask=dmask[:, None] & nmask[None, :],
                        other=0.0)
        else:
            x = tl.load(X + offs_n[:, None] * stride_n + offs_d[None, :], mask=nmask[:, None] & dmask[None, :],
                        other=0.0)
    else:
        n = start + offs_n[:, None]  # tokens, for their statistics
        c = offs_d[None, :]
        mask = nmask[:, None] & dmask[None, :]
        w = tl.arange(0, offs_d.shape[0] * BITS // 32)[None, :]
        X32 = X.to(tl.pointer_type(tl.int32)) + start.to(tl.int64) * (stride_n // 4)
        word = tl.load(X32 + offs_n[:, None] * (stride_n // 4) + w,
                       mask=nmask[:, None] & (w < (head_dim * BITS + 31) // 32), other=0)
        # a power of two whose mantissa holds every code exactly: a code ORed into its low bits is MAGIC + code
        dtype: tl.constexpr = XS.dtype.element_ty
        if dtype == tl.float16 and FMA_ROUNDS_ONCE:
            MAGIC: tl.constexpr = 0x6400  # 1024
        elif dtype == tl.bfloat16 and BITS < 8:
            MAGIC: tl.constexpr = 0x4300  # 128
        else:  # the code alone, through float32 in _dequantized: float32 caches, 8-bit bf16, and fp16 where the
            MAGIC: tl.constexpr = 0  # interpreter's fma rounds twice
        POW2_GROUPS: tl.constexpr = (GROUP_SIZE & (GROUP_SIZE - 1)) == 0
        shape: tl.constexpr = [offs_n.shape[0], offs_d.shape[0]]
        if PER_TOKEN and POW2_GROUPS:  # a token's groups, each loaded once (a row of them), then repeated
            GROUPS: tl.constexpr = offs_d.shape[0] // GROUP_SIZE
            g = tl.arange(0, GROUPS)[None, :]
            at = n.to(tl.int64) * stride_sn + g
            real = nmask[:, None] & (g < head_dim // GROUP_SIZE)
        if PER_TOKEN and POW2_GROUPS and GROUP_SIZE * BITS >= 32 and MAGIC != 0 and not TRANSPOSED:
            # a value tile whose words each lie in one group: a word's two lanes dequantized together, with its
            # group's scale and zero-point in both halves of a word
            words: tl.constexpr = [offs_n.shape[0], GROUPS, GROUP_SIZE * BITS // 32]
            scale2 = tl.reshape(tl.broadcast_to(_both_halves(XS, at, real)[:, :, None], words), word.shape)
            zero2 = tl.reshape(tl.broadcast_to(_both_halves(XZ, at, real)[:, :, None], words), word.shape)
            x = tl.reshape(tl.join(_lanes(word, False, BITS, MAGIC, scale2, zero2, True),
                                   _lanes(word, True, BITS, MAGIC, scale2, zero2, True)), shape).to(dtype, bitcast=True)
        else:
            if TRANSPOSED:
                # a key tile, the matrix unit's operand once transposed: spelt with a word's channel pairs as a
                # third axis, it is loaded straight into that operand's layout (no round trip through shared
                # memory; value tiles take one anyway, and do better with the joins of _lanes)
                S: tl.constexpr = 16 // BITS
                pair = _masked_or(word[:, :, None] >> (tl.arange(0, S) * BITS)[None, None, :],
                                  ((1 << BITS) - 1) * 0x10001, MAGIC * 0x10001)
                code = tl.reshape(tl.join(pair.to(tl.int16), (pair >> 16).to(tl.int16)), shape)
            else:
                code = tl.reshape(tl.join(_lanes(word, False, BITS, MAGIC, word, word, False),
                                          _lanes(word, True, BITS, MAGIC, word, word, False)), shape)
            if PER_TOKEN and POW2_GROUPS:
                groups: tl.constexpr = [offs_n.shape[0], GROUPS, GROUP_SIZE]
                scale = tl.reshape(tl.broadcast_to(tl.load(XS + at, mask=real, other=0.0)[:, :, None], groups), shape)
                zero = tl.reshape(tl.broadcast_to(tl.load(XZ + at, mask=real, other=0.0)[:, :, None], groups), shape)
            elif POW2_GROUPS:
                # the tile's tokens fall in BLOCK_N / GROUP_SIZE whole groups, or in one: each group's row of
                # per-channel statistics loaded once, then repeated over its tokens (not one load per value)
                BLOCK_N: tl.constexpr = offs_n.shape[0]
                SPAN: tl.constexpr = GROUP_SIZE if GROUP_SIZE < BLOCK_N else BLOCK_N
                ROWS: tl.constexpr = BLOCK_N // SPAN
                first = start + tl.min(tl.reshape(offs_n, [ROWS, SPAN]), 1)
                real = tl.max(tl.reshape(nmask.to(tl.int32), [ROWS, SPAN]), 1) > 0
                at = (first // GROUP_SIZE).to(tl.int64)[:, None] * stride_sn + c
                spans: tl.constexpr = [ROWS, SPAN, offs_d.shape[0]]
                stats_mask = real[:, None] & dmask[None, :]
                scale = tl.reshape(tl.broadcast_to(tl.load(XS + at, mask=stats_mask, other=0.0)[:, None, :], spans),
                                   shape)
                zero = tl.reshape(tl.broadcast_to(tl.load(XZ + at, mask=stats_mask, other=0.0)[:, None, :], spans),
                                  shape)
            else:
                if PER_TOKEN:
                    group = n.to(tl.int64) * stride_sn + c // GROUP_SIZE
                else:
                    group = (n // GROUP_SIZE).to(tl.int64) * stride_sn + c
                scale = tl.load(XS + group, mask=mask, other=0.0)
                zero = tl.load(XZ + group, mask=mask, other=0.0)
            x = _dequantized(code, scale, zero, MAGIC)
        if TRANSPOSED:
            x = tl.trans(x)
    return x


@triton.jit
def _masked_or(x, MASK: tl.constexpr, BITS_SET: tl.constexpr):
    """(x & MASK) | BITS_SET. On the GPU as one PTX lop3 with its constants in registers: the compilers' own
    spelling took two instructions (Triton 3.6's ptxas) or reloaded a constant every time (3.9's)."""
    if INTERPRETED:
        y = (x & MASK) | BITS_SET
    else:
        y = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xea;", "=r,r,r,r",
                                      [x, tl.full(x.shape, MASK, tl.int32), tl.full(x.shape, BITS_SET, tl.int32)],
                                      dtype=tl.int32, is_pure=True, pack=1)
    return y


@triton.jit
def _both_halves(STATS, at, mask):
    """16-bit statistics (scales or zero-points) at `at`, each as an int32 holding its bits in both halves."""
    bits = tl.load(STATS.to(tl.pointer_type(tl.int16)) + at, mask=mask, other=0).to(tl.int32) & 0xFFFF
    return bits | (bits << 16)


# (pair · $2 + $3) · $4 + $5 on two 16-bit lanes
FMA2_F16, FMA2_BF16 = (tl.constexpr(f"{{ .reg .b32 t; fma.rn.{t} t, $1, $2, $3; fma.rn.{t} $0, t, $4, $5; }}")
                       for t in ("f16x2", "bf16x2"))


@triton.jit
def _dequantized_pairs(pair, scale2, zero2, MAGIC: tl.constexpr):
    """_dequantized on both 16-bit lanes of int32s at once: a lane of pair holds MAGIC + code, of scale2 and
    zero2 a scale and a zero-point, all in the cache's dtype; the result's lanes hold the values. On the GPU two
    two-lane fused multiply-adds, (pair · 1 - MAGIC) · scale + zero, exact then rounded once (PTX's f16x2 and
    bf16x2 forms, from sm_80; the compilers did not find them for value tiles, whose statistics repeat across a
    token's groups); lane by lane in the interpreter, which has no inline assembly."""
    if INTERPRETED:
        dtype: tl.constexpr = tl.float16 if MAGIC == 0x6400 else tl.bfloat16
        lo = _dequantized(pair.to(tl.int16), scale2.to(tl.int16).to(dtype, bitcast=True),
                          zero2.to(tl.int16).to(dtype, bitcast=True), MAGIC)
        hi = _dequantized((pair >> 16).to(tl.int16), (scale2 >> 16).to(tl.int16).to(dtype, bitcast=True),
                          (zero2 >> 16).to(tl.int16).to(dtype, bitcast=True), MAGIC)
        x = (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)
    else:
        if MAGIC == 0x6400:  # 1.0 and -1024 in both fp16 lanes
            ONE2: tl.constexpr = 0x3C003C00
            MINUS_MAGIC2: tl.constexpr = 0xE400E400 - (1 << 32)
            ASM: tl.constexpr = FMA2_F16
        else:  # 1.0 and -128 in both bf16 lanes
            ONE2: tl.constexpr = 0x3F803F80
            MINUS_MAGIC2: tl.constexpr = 0xC300C300 - (1 << 32)
            ASM: tl.constexpr = FMA2_BF16
        x = tl.inline_asm_elementwise(ASM, "=r,r,r,r,r,r", [pair, tl.full(pair.shape, ONE2, tl.int32),
                                                            tl.full(pair.shape, MINUS_MAGIC2, tl.int32), scale2, zero2],
                                      dtype=tl.int32, is_pure=True, pack=1)
    return x


@triton.jit
def _lane(word, s: tl.constexpr, HIGH: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr, scale2, zero2,
          DEQUANTIZE: tl.constexpr):
    """Channel 2s + HIGH of each word, as 16 bits: MAGIC with the code in its low bits, or with DEQUANTIZE the
    value (`_dequantized_pairs`). The shift and mask act on both halves of the word at once (the other half is the
    neighbouring channel's, for its own call, which the compiler merges with this one)."""
    pair = _masked_or(word >> (s * BITS), ((1 << BITS) - 1) * 0x10001, MAGIC * 0x10001)
    if DEQUANTIZE:
        pair = _dequantized_pairs(pair, scale2, zero2, MAGIC)
    if HIGH:
        pair = pair >> 16
    return pair.to(tl.int16)


@triton.jit
def _lanes(word, HIGH: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr, scale2, zero2,
           DEQUANTIZE: tl.constexpr):
    """_lane for s = 0 .. 16 / BITS - 1, joined so that they flatten in the order of s (join stacks along a
    new last axis, so join(join(a0, a2), join(a1, a3)) flattens to a0, a1, a2, a3)."""
    if BITS == 8:
        x = tl.join(_lane(word, 0, HIGH, BITS, MAGIC, scale2, zero2, DEQUANTIZE),
                    _lane(word, 1, HIGH, BITS, MAGIC, scale2, zero2, DEQUANTIZE))
    elif BITS == 4:
        x = tl.join(tl.join(_lane(word, 0, HIGH, BITS, MAGIC, scale2, zero2, DEQUANTIZE),
                            _lane(word, 2, HIGH, BITS, MAGIC, scale2, zero2, DEQUANTIZE)),
                    tl.join(_lane(word, 1, HIGH, BITS, MAGIC, scale2, zero2, DEQUANTIZE),
                            _lane(word, 3, HIGH, BITS, MAGIC, scale2, zero2, DEQUANTIZE)))
    else:
        x = tl.join(tl.join(tl.join(_lane(word, 0, HIGH, BITS, MAGIC, scale2, zero2, DEQUANTIZE),
                                    _lane(word, 4, HIGH, BITS, MAGIC, scale2, zero2, DEQUANTIZE)),
                            tl.join(_lane(word, 2, HIGH, BITS, MAGIC, scale2, zero2, DEQUANTIZE),
                                    _lane(word, 6, HIGH, BITS, MAGIC, scale2, zero2, DEQUANTIZE))),
                    tl.join(tl.join(_lane(word, 1, HIGH, BITS, MAGIC, scale2, zero2, DEQUANTIZE),
                                    _lane(word, 5, HIGH, BITS, MAGIC, scale2, zero2, DEQUANTIZE)),
                            tl.join(_lane(word, 3, HIGH, BITS, MAGIC, scale2, zero2, DEQUANTIZE),
                                    _lane(word, 7, HIGH, BITS, MAGIC, scale2, zero2, DEQUANTIZE))))
    return x


@triton.jit
def _dequantized(code, scale, zero, MAGIC: tl.constexpr):
    """code · scale + zero in scale's dtype without integer-to-float conversions, which run at a quarter of the
    arithmetic rate on Hopper (without them the decode kernel over a 4-bit cache ran at 0.71 of the 16-bit
    cache's speed instead of 0.65; NOTES.md, "Dequantizing without conversions"). `code` (int16) holds the code
    in the low mantissa bits of the power of two MAGIC (1024 in fp16, 128 in bf16 for codes below 128): its bits
    read as scale's dtype are MAGIC + code, MAGIC is subtracted exactly, and one fused multiply-add finishes,
    two values an instruction. MAGIC == 0: the same through float32 (2^23), for float32 caches, 8-bit bf16, and
    fp16 where the interpreter's fma rounds twice."""
    dtype: tl.constexpr = scale.dtype
    if MAGIC == 0x6400:
        x = tl.fma(code.to(tl.float16, bitcast=True) - 1024.0, scale, zero)
    elif MAGIC == 0x4300:
        x = tl.fma(code.to(tl.bfloat16, bitcast=True) - 128.0, scale, zero)
    else:
        value = (code.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        x = tl.fma(value, scale.to(tl.float32), zero.to(tl.float32)).to(dtype)
    return x


@triton.jit
def _inverse(scale):
    """1 / scale in float32, 0 for a constant group (scale 0: its values are all the zero-point, code 0). A scale
    below float32's smallest normal number is taken as that number (its codes then crowd the low levels, within
    the group's tiny span): 1 / scale would overflow, or the GPU's division flush the scale to 0, and
    (x - zero) · inf or 0 · inf is no code."""
    scale = scale.to(tl.float32)
    return tl.where(scale > 0, 1.0 / tl.maximum(scale, 1.1754944e-38), 0.0)


# warps per program, tuned per shape on a GPU (one config in the interpreter, which cannot autotune, and in tests)
QUANTIZE_CONFIGS = [triton.Config({}, num_warps=w) for w in ((4,) if INTERPRET or not AUTOTUNE else (1, 2, 4, 8))]


@triton.autotune(configs=QUANTIZE_CONFIGS, key=["HEAD_DIM", "BITS", "PER_TOKEN", "GROUP_SIZE", "ROWS"])
@triton.jit
def _quantize(X, DATA, SCALE, ZERO, stride_xb, stride_xh, stride_xn, H, N, HEAD_DIM: tl.constexpr,
              BITS: tl.constexpr, PER_TOKEN: tl.constexpr, GROUP_SIZE: tl.constexpr, ROWS: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program quantizes ROWS tokens of one (batch, KV head), read once as a (token, channel) tile of whole
    rows (wide, coalesced loads). Per token: each group of GROUP_SIZE channels gets its scale and zero-point from
    its min and max; per channel: each channel over the ROWS tokens, which are one token group. The codes of a
    word are shifted into place and summed (their bits do not overlap), so each packed word is written once;
    BLOCK_D holds whole words."""
    PER_WORD: tl.constexpr = 32 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    t, seg = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, BLOCK_R)[:, None]
    c = tl.arange(0, BLOCK_D)[None, :]
    token = t * ROWS + r
    rows = (r < ROWS) & (token < N)
    mask = rows & (c < HEAD_DIM)
    x_seg = X + (seg // H).to(tl.int64) * stride_xb + (seg % H).to(tl.int64) * stride_xh
    x = tl.load(x_seg + token.to(tl.int64) * stride_xn + c, mask=mask, other=0.0).to(tl.float32)
    # the minimum and maximum skip padding lanes, and padding rows where they would join a real row's group (the
    # statistics of a token past N are never stored); a tile without either needs no masking
    PADDED: tl.constexpr = HEAD_DIM < BLOCK_D or (not PER_TOKEN and ROWS < BLOCK_R)
    if PADDED:
        x_lo, x_hi = tl.where(mask, x, float("inf")), tl.where(mask, x, float("-inf"))
    else:
        x_lo, x_hi = x, x
    if PER_TOKEN and (GROUP_SIZE & (GROUP_SIZE - 1)) == 0:
        # each token's groups side by side: one reduction over the tile for all of them, their statistics stored
        # as one contiguous tile, then repeated across their channels
        GROUPS_PADDED: tl.constexpr = BLOCK_D // GROUP_SIZE
        shape: tl.constexpr = [BLOCK_R, GROUPS_PADDED, GROUP_SIZE]
        lo = tl.min(tl.reshape(x_lo, shape), 2)
        hi = tl.max(tl.reshape(x_hi, shape), 2)
        g_scale = ((hi - lo) / LEVELS).to(SCALE.dtype.element_ty)
        g_zero = lo.to(ZERO.dtype.element_ty)
        g = tl.arange(0, GROUPS_PADDED)[None, :]
        stats = (seg.to(tl.int64) * N + token) * (HEAD_DIM // GROUP_SIZE) + g
        tl.store(SCALE + stats, g_scale, mask=rows & (g < HEAD_DIM // GROUP_SIZE))
        tl.store(ZERO + stats, g_zero, mask=rows & (g < HEAD_DIM // GROUP_SIZE))
        inverse = tl.reshape(tl.broadcast_to(_inverse(g_scale)[:, :, None], shape), x.shape)
        zero = tl.reshape(tl.broadcast_to(g_zero.to(tl.float32)[:, :, None], shape), x.shape)
    elif PER_TOKEN:  # a group's statistics at each of its channels, group by group
        GROUPS: tl.constexpr = HEAD_DIM // GROUP_SIZE
        group = c // GROUP_SIZE
        inverse = tl.zeros(x.shape, dtype=tl.float32)
        zero = tl.zeros(x.shape, dtype=tl.float32)
        for g in tl.static_range(GROUPS):
            inside = group == g
            lo = tl.min(tl.where(inside, x_lo, float("inf")), 1, keep_dims=True)
            hi = tl.max(tl.where(inside, x_hi, float("-inf")), 1, keep_dims=True)
            g_scale = ((hi - lo) / LEVELS).to(SCALE.dtype.element_ty)
            g_zero = lo.to(ZERO.dtype.element_ty)
            stats = (seg.to(tl.int64) * N + token) * GROUPS + g
            tl.store(SCALE + stats, g_scale, mask=rows)
            tl.store(ZERO + stats, g_zero, mask=rows)
            inverse = tl.where(inside, _inverse(g_scale), inverse)
            zero = tl.where(inside, g_zero.to(tl.float32), zero)
    else:  # each channel's statistics over the group's tokens
        lo = tl.min(x_lo, 0, keep_dims=True)
        hi = tl.max(x_hi, 0, keep_dims=True)
        c_scale = ((hi - lo) / LEVELS).to(SCALE.dtype.element_ty)
        c_zero = lo.to(ZERO.dtype.element_ty)
        stats = (seg.to(tl.int64) * (N // ROWS) + t) * HEAD_DIM + c
        tl.store(SCALE + stats, c_scale, mask=c < HEAD_DIM)
        tl.store(ZERO + stats, c_zero, mask=c < HEAD_DIM)
        inverse, zero = _inverse(c_scale), c_zero.to(tl.float32)
    # codes from the scale and zero as stored, so dequantizing them reproduces x to within scale / 2. x - zero >= 0
    # (zero is the group's minimum, exact in the cache's dtype); adding 1.5 · 2^23 in the same fused multiply-add
    # rounds the quotient to an integer (ties to even) in the low bits, with no floor and no conversion
    offset = x - zero
    if PADDED:
        offset = tl.where(mask, offset, 0.0)  # padding, whose zero-point may be inf: code 0 (no inf · 0)
    rounded = tl.fma(offset, inverse, 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
    code = tl.minimum(rounded, LEVELS)  # above where the stored scale was rounded down (far, if fp16 subnormal)
    k = tl.arange(0, PER_WORD)
    shift = ((k % 2) * 16 + (k // 2) * BITS)[None, None, :]  # channel 2s + h of a word at bit 16h + s · BITS
    packed = tl.sum(tl.reshape(code, [BLOCK_R, BLOCK_D // PER_WORD, PER_WORD]) << shift, 2)
    ROW_WORDS: tl.constexpr = (HEAD_DIM * BITS + 31) // 32
    word = tl.arange(0, BLOCK_D // PER_WORD)[None, :]
    tl.store(DATA.to(tl.pointer_type(tl.int32)) + (seg.to(tl.int64) * N + token) * ROW_WORDS + word, packed,
             mask=rows & (word < ROW_WORDS))


@triton.jit
def _dequantize(DATA, SCALE, ZERO, OUT, H, N, stride_db, stride_dh, stride_dn, stride_sb, stride_sh, stride_sn,
                HEAD_DIM: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, PER_TOKEN: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t, seg = tl.program_id(0), tl.program_id(1)
    b, h = (seg // H).to(tl.int64), (seg % H).to(tl.int64)
    n = t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_D)
    stats = b * stride_sb + h * stride_sh
    x = kv_tile(DATA + b * stride_db + h * stride_dh, SCALE + stats, ZERO + stats, t * BLOCK_T, tl.arange(0, BLOCK_T),
                c, n < N, c < HEAD_DIM, stride_dn, stride_sn, HEAD_DIM, BITS, GROUP_SIZE, PER_TOKEN, False)
    tl.store(OUT + (seg.to(tl.int64) * N + n[:, None]) * HEAD_DIM + c[None, :], x,
             mask=(n < N)[:, None] & (c < HEAD_DIM)[None, :])


def _check_scheme(bits: int, group_size: int, axis: str, shape: tuple[int, ...]) -> None:
    """The quantization a (batch, kv_heads, n, head_dim) cache of `shape` is in, or is to be put in."""
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not one of {BITS}")
    if axis not in AXES:
        raise ValueError(f"axis={axis!r} is not one of {AXES} (keys per channel, values per token)")
    if len(shape) != 4:
        raise ValueError(f"the cache must be (batch, kv_heads, n, head_dim), got shape {tuple(shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be an integer >= 1")
    grouped, name = (shape[2], "n (tokens)") if axis == "channel" else (shape[3], "head_dim")
    if grouped % group_size:
        raise ValueError(f"{name}={grouped} is not a multiple of group_size={group_size} (axis={axis!r})")


def _check(x: torch.Tensor, bits: int, group_size: int, axis: str):
    _check_scheme(bits, group_size, axis, tuple(x.shape))
    if x.dtype not in DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; use one of {DTYPES}")
    check_tensors("quantize_kv", x=x)
    if x.stride(-1) != 1:
        raise ValueError("x needs a contiguous last (head_dim) dimension")


def quantize_kv(x: torch.Tensor, bits: int, group_size: int, axis: str) -> QuantizedKV:
    """Quantize x (batch, kv_heads, n, head_dim) to `bits` per value in groups of `group_size` along `axis`
    ("channel": tokens of a channel, n a multiple of group_size; "token": channels of a token, head_dim a
    multiple of group_size): one read of x, one write of the packed codes and of the groups' scales and zeros."""
    _check(x, bits, group_size, axis)
    b, h, n, d = x.shape
    per_token = axis == "token"
    block_d = max(next_pow2(d), 32 // bits)  # whole words
    rows = max(1, TILE_ELEMENTS // block_d) if per_token else group_size
    data = torch.empty(b, h, n, packed_row_bytes(d, bits), device=x.device, dtype=torch.uint8)
    scale = torch.empty(stats_shape(tuple(x.shape), group_size, axis), device=x.device, dtype=x.dtype)
    zero = torch.empty_like(scale)
    _quantize[(cdiv(n, rows), b * h)](
        x, data, scale, zero, x.stride(0), x.stride(1), x.stride(2), h, n, HEAD_DIM=d, BITS=bits,
        PER_TOKEN=per_token, GROUP_SIZE=group_size, ROWS=rows, BLOCK_R=next_pow2(rows), BLOCK_D=block_d)
    return QuantizedKV(data, scale, zero, bits, group_size, axis, tuple(x.shape))


def stats_shape(shape: tuple[int, ...], group_size: int, axis: str) -> tuple[int, ...]:
    """The shape of a cache's scales and zero-points: one per group of `group_size` along `axis`."""
    b, h, n, d = shape
    return (b, h, n, d // group_size) if axis == "token" else (b, h, n // group_size, d)


def check_quantized(qkv: QuantizedKV) -> None:
    """That the kernels can read `qkv` as it says it is: its bits and axis, its parts' shapes against `shape` and
    `group_size`, zero laid out like scale, one device, and data as they read it, 32-bit words of a packed row's
    width on word-aligned rows (as quantize_kv makes it, and views of it along batch, heads or tokens keep it). A
    part that disagrees would be read out of its bounds."""
    _check_scheme(qkv.bits, qkv.group_size, qkv.axis, tuple(qkv.shape))
    width = packed_row_bytes(qkv.shape[3], qkv.bits)
    if qkv.data.dtype != torch.uint8 or tuple(qkv.data.shape) != (*qkv.shape[:3], width):
        raise ValueError(f"a {qkv.bits}-bit QuantizedKV of shape {tuple(qkv.shape)} needs uint8 data of shape "
                         f"{(*qkv.shape[:3], width)} ({width} bytes a token: packed_row_bytes); got {qkv.data.dtype} "
                         f"of shape {tuple(qkv.data.shape)}")
    if qkv.scale.dtype not in DTYPES:
        raise ValueError(f"a QuantizedKV's scale and zero must be of {DTYPES}; got {qkv.scale.dtype}")
    want = stats_shape(tuple(qkv.shape), qkv.group_size, qkv.axis)
    for name, part in (("scale", qkv.scale), ("zero", qkv.zero)):
        if tuple(part.shape) != want or part.dtype != qkv.scale.dtype or part.stride(-1) != 1:
            raise ValueError(f"a QuantizedKV's {name} must be {qkv.scale.dtype} of shape {want} (one per group of "
                             f"{qkv.group_size} along {qkv.axis}), contiguous in its last dimension; got "
                             f"{part.dtype} of shape {tuple(part.shape)}, strides {part.stride()}")
    if qkv.zero.stride() != qkv.scale.stride():  # the kernels read both with the scale's strides
        raise ValueError(f"a QuantizedKV's zero must be laid out like its scale (same strides); got strides "
                         f"{qkv.zero.stride()} and {qkv.scale.stride()}")
    if not qkv.data.device == qkv.scale.device == qkv.zero.device:
        raise ValueError(f"a QuantizedKV's parts must be on one device; got data on {qkv.data.device}, scale on "
                         f"{qkv.scale.device}, zero on {qkv.zero.device}")
    if qkv.data.stride(3) != 1 or any(stride % 4 for stride in qkv.data.stride()[:3]) or qkv.data.data_ptr() % 4:
        raise ValueError(f"a QuantizedKV's data must be contiguous in its last dimension, with rows on 4-byte "
                         f"boundaries; got strides {qkv.data.stride()}")


def dequantize_kv(qkv: QuantizedKV) -> torch.Tensor:
    """The full-precision (batch, kv_heads, n, head_dim) tensor, in the dtype of qkv.scale."""
    check_quantized(qkv)
    check_tensors("dequantize_kv", data=qkv.data, scale=qkv.scale, zero=qkv.zero)
    b, h, n, d = qkv.shape
    out = torch.empty(qkv.shape, device=qkv.data.device, dtype=qkv.dtype)
    block_d = max(next_pow2(d), 32 // qkv.bits)  # whole words
    block_t = max(1, TILE_ELEMENTS // block_d)
    _dequantize[(cdiv(n, block_t), b * h)](
        qkv.data, qkv.scale, qkv.zero, out, h, n, *qkv.data.stride()[:3], *qkv.scale.stride()[:3], HEAD_DIM=d,
        BITS=qkv.bits, GROUP_SIZE=qkv.group_size, PER_TOKEN=qkv.axis == "token", BLOCK_T=block_t, BLOCK_D=block_d)
    return out
