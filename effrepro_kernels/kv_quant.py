"""Group-wise asymmetric quantization of a KV cache to 2, 4 or 8 bits, in KIVI's layout (Liu et al., 2024).

KIVI quantizes keys per channel, since their outliers sit in fixed channels, and values per token, which have
no such channels: `axis="channel"` gives each channel's groups of `group_size` consecutive tokens one scale and
zero-point (the caller keeps the newest tokens, fewer than a group, in full precision), `axis="token"` gives each
token's groups of `group_size` consecutive channels one. A value x is stored as the code round((x - zero) /
scale), clamped to [0, 2^bits - 1], where zero is the group's minimum and scale (max - min) / (2^bits - 1); scale and
zero are kept in the cache's dtype, so `dequantize_kv` returns that dtype.

Codes are packed along head_dim, the same for both axes: channel c of a token sits in byte c // (8 // bits) of
the token's row, at bit (c % (8 // bits)) · bits. A token's packed row is contiguous, so a tile of tokens is one
coalesced read, and appending a group of tokens appends rows.

Written here rather than taken from a package: the packages behind HF's `QuantizedCache` (optimum-quanto, HQQ;
neither installed here) keep their own packed formats, which our decode kernel cannot dequantize in registers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .runtime import AUTOTUNE, INTERPRET, TRITON_VERSION, cdiv, next_pow2, runs_on

BITS = (2, 4, 8)
AXES = ("channel", "token")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TILE_ELEMENTS = 4096  # values a quantize or dequantize program holds at once
# Before Triton 3.9 the CPU interpreter rounds tl.fma twice (product, then sum), in fp16 too, where cancelling to
# zero loses all of what the GPU's fused one keeps: there fp16 dequantizes through fp32
FMA_ROUNDS_ONCE = tl.constexpr(not INTERPRET or TRITON_VERSION >= (3, 9))


@dataclass
class QuantizedKV:
    """A quantized (batch, kv_heads, n, head_dim) cache tensor.

    data: uint8 (batch, kv_heads, n, head_dim · bits / 8), the packed codes;
    scale, zero: the cache's dtype, (batch, kv_heads, n / group_size, head_dim) for axis="channel",
    (batch, kv_heads, n, head_dim / group_size) for axis="token";
    shape: the full-precision shape.
    The kernels index data, scale and zero with their strides, but need each contiguous in its last dimension
    and zero laid out like scale: `quantize_kv` makes them so, and concatenating along n keeps them so.
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
def kv_tile(X, XS, XZ, offs_n, offs_d, nmask, dmask, stride_n, stride_sn, row_bytes, BITS: tl.constexpr,
            GROUP_SIZE: tl.constexpr, PER_TOKEN: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The (token, channel) tile at offs_n × offs_d of one (batch, KV head) of a cache, or its transpose
    (channel, token) with TRANSPOSED, as a key tile is used. BITS == 0: X is the full-precision cache, loaded in
    the orientation asked for. Otherwise X holds packed codes: a token's packed row is loaded whole (wide loads:
    each byte once), unpacked in registers by shifts, and dequantized with its group's scale and zero-point, in
    rows of stride `stride_sn`, per token (PER_TOKEN) or per channel; `row_bytes`: the packed bytes of a token.
    The packed path reads whole rows: offs_d must be arange(0, BLOCK_D), the lanes past head_dim masked by
    `dmask`; and offs_n must be BLOCK_N consecutive tokens from a multiple of BLOCK_N (a tile of the cache)."""
    if BITS == 0:
        if TRANSPOSED:
            x = tl.load(X + offs_n[None, :].to(tl.int64) * stride_n + offs_d[:, None],
                        mask=dmask[:, None] & nmask[None, :], other=0.0)
        else:
            x = tl.load(X + offs_n[:, None].to(tl.int64) * stride_n + offs_d[None, :],
                        mask=nmask[:, None] & dmask[None, :], other=0.0)
    else:
        per_byte: tl.constexpr = 8 // BITS
        n = offs_n[:, None]
        c = offs_d[None, :]
        mask = nmask[:, None] & dmask[None, :]
        j = tl.arange(0, offs_d.shape[0] // per_byte)[None, :]  # bytes of a token's row
        byte = tl.load(X + n.to(tl.int64) * stride_n + j, mask=nmask[:, None] & (j < row_bytes), other=0)
        byte = byte.to(tl.int32)
        if BITS == 8:
            code = byte
        elif BITS == 4:
            code = tl.reshape(tl.join(byte & 15, byte >> 4), [offs_n.shape[0], offs_d.shape[0]])
        else:
            # join(a, b) stacks a and b along a new last axis, so join(join(c0, c2), join(c1, c3)) flattens to
            # c0, c1, c2, c3: the codes in the order of their channels
            code = tl.reshape(tl.join(tl.join(byte & 3, (byte >> 4) & 3), tl.join((byte >> 2) & 3, byte >> 6)),
                              [offs_n.shape[0], offs_d.shape[0]])
        if PER_TOKEN and (GROUP_SIZE & (GROUP_SIZE - 1)) == 0:
            # a token's groups loaded once each (a row of them), then repeated across their channels
            GROUPS: tl.constexpr = offs_d.shape[0] // GROUP_SIZE
            g = tl.arange(0, GROUPS)[None, :]
            at = n.to(tl.int64) * stride_sn + g
            real = nmask[:, None] & (g < row_bytes * per_byte // GROUP_SIZE)
            shape: tl.constexpr = [offs_n.shape[0], GROUPS, GROUP_SIZE]
            scale = tl.reshape(tl.broadcast_to(tl.load(XS + at, mask=real, other=0.0)[:, :, None], shape), code.shape)
            zero = tl.reshape(tl.broadcast_to(tl.load(XZ + at, mask=real, other=0.0)[:, :, None], shape), code.shape)
        elif not PER_TOKEN and (GROUP_SIZE & (GROUP_SIZE - 1)) == 0:
            # the tile's tokens fall in BLOCK_N / GROUP_SIZE whole groups, or in one: each group's row of
            # per-channel statistics loaded once, then repeated over its tokens (not one load per value)
            BLOCK_N: tl.constexpr = offs_n.shape[0]
            SPAN: tl.constexpr = GROUP_SIZE if GROUP_SIZE < BLOCK_N else BLOCK_N
            ROWS: tl.constexpr = BLOCK_N // SPAN
            first = tl.min(tl.reshape(offs_n, [ROWS, SPAN]), 1)
            real = tl.max(tl.reshape(nmask.to(tl.int32), [ROWS, SPAN]), 1) > 0
            at = (first // GROUP_SIZE).to(tl.int64)[:, None] * stride_sn + c
            shape: tl.constexpr = [ROWS, SPAN, offs_d.shape[0]]
            stats_mask = real[:, None] & dmask[None, :]
            scale = tl.reshape(tl.broadcast_to(tl.load(XS + at, mask=stats_mask, other=0.0)[:, None, :], shape),
                               code.shape)
            zero = tl.reshape(tl.broadcast_to(tl.load(XZ + at, mask=stats_mask, other=0.0)[:, None, :], shape),
                              code.shape)
        else:
            if PER_TOKEN:
                group = n.to(tl.int64) * stride_sn + c // GROUP_SIZE
            else:
                group = (n // GROUP_SIZE).to(tl.int64) * stride_sn + c
            scale = tl.load(XS + group, mask=mask, other=0.0)
            zero = tl.load(XZ + group, mask=mask, other=0.0)
        x = _dequantized(code, scale, zero, BITS)
        if TRANSPOSED:
            x = tl.trans(x)
    return x


@triton.jit
def _dequantized(code, scale, zero, BITS: tl.constexpr):
    """code · scale + zero in scale's dtype without integer-to-float conversions, which run at a quarter of the
    arithmetic rate on Hopper (without them the decode kernel over a 4-bit cache ran at 0.71 of the 16-bit
    cache's speed instead of 0.65; NOTES.md, "Dequantizing without conversions"). The code goes into
    the low mantissa bits of a power of two M whose mantissa holds it exactly (1024 in fp16, 128 in bf16 for codes
    below 128, 2^23 in fp32), M is subtracted exactly, and one fused multiply-add finishes: in the cache's dtype
    for fp16 and bf16 (two values an instruction), else in fp32."""
    dtype: tl.constexpr = scale.dtype
    if dtype == tl.float16 and FMA_ROUNDS_ONCE:
        value = (code | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
        x = tl.fma(value, scale, zero)
    elif dtype == tl.bfloat16 and BITS < 8:
        value = (code | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 128.0
        x = tl.fma(value, scale, zero)
    else:
        value = (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        x = tl.fma(value, scale.to(tl.float32), zero.to(tl.float32)).to(dtype)
    return x


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
    byte are shifted into place and summed (their bits do not overlap), so each packed byte is written once."""
    PER_BYTE: tl.constexpr = 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    t, seg = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, BLOCK_R)[:, None]
    c = tl.arange(0, BLOCK_D)[None, :]
    token = t * ROWS + r
    rows = (r < ROWS) & (token < N)
    mask = rows & (c < HEAD_DIM)
    x_seg = X + (seg // H).to(tl.int64) * stride_xb + (seg % H).to(tl.int64) * stride_xh
    x = tl.load(x_seg + token.to(tl.int64) * stride_xn + c, mask=mask, other=0.0).to(tl.float32)
    if PER_TOKEN and (GROUP_SIZE & (GROUP_SIZE - 1)) == 0:
        # each token's groups side by side: one reduction over the tile for all of them, their statistics stored
        # as one contiguous tile, then repeated across their channels
        GROUPS_PADDED: tl.constexpr = BLOCK_D // GROUP_SIZE
        shape: tl.constexpr = [BLOCK_R, GROUPS_PADDED, GROUP_SIZE]
        lo = tl.min(tl.reshape(tl.where(mask, x, float("inf")), shape), 2)
        hi = tl.max(tl.reshape(tl.where(mask, x, float("-inf")), shape), 2)
        g_scale = ((hi - lo) / LEVELS).to(SCALE.dtype.element_ty)
        g_zero = lo.to(ZERO.dtype.element_ty)
        g = tl.arange(0, GROUPS_PADDED)[None, :]
        stats = (seg.to(tl.int64) * N + token) * (HEAD_DIM // GROUP_SIZE) + g
        tl.store(SCALE + stats, g_scale, mask=rows & (g < HEAD_DIM // GROUP_SIZE))
        tl.store(ZERO + stats, g_zero, mask=rows & (g < HEAD_DIM // GROUP_SIZE))
        scale = tl.reshape(tl.broadcast_to(g_scale.to(tl.float32)[:, :, None], shape), [BLOCK_R, BLOCK_D])
        zero = tl.reshape(tl.broadcast_to(g_zero.to(tl.float32)[:, :, None], shape), [BLOCK_R, BLOCK_D])
    elif PER_TOKEN:  # a group's statistics at each of its channels, group by group
        GROUPS: tl.constexpr = HEAD_DIM // GROUP_SIZE
        group = c // GROUP_SIZE
        scale = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        zero = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for g in tl.static_range(GROUPS):
            inside = mask & (group == g)
            lo = tl.min(tl.where(inside, x, float("inf")), 1, keep_dims=True)
            hi = tl.max(tl.where(inside, x, float("-inf")), 1, keep_dims=True)
            g_scale = ((hi - lo) / LEVELS).to(SCALE.dtype.element_ty)
            g_zero = lo.to(ZERO.dtype.element_ty)
            stats = (seg.to(tl.int64) * N + token) * GROUPS + g
            tl.store(SCALE + stats, g_scale, mask=rows)
            tl.store(ZERO + stats, g_zero, mask=rows)
            scale = tl.where(group == g, g_scale.to(tl.float32), scale)
            zero = tl.where(group == g, g_zero.to(tl.float32), zero)
    else:  # each channel's statistics over the group's tokens
        lo = tl.min(tl.where(mask, x, float("inf")), 0, keep_dims=True)
        hi = tl.max(tl.where(mask, x, float("-inf")), 0, keep_dims=True)
        c_scale = ((hi - lo) / LEVELS).to(SCALE.dtype.element_ty)
        c_zero = lo.to(ZERO.dtype.element_ty)
        stats = (seg.to(tl.int64) * (N // ROWS) + t) * HEAD_DIM + c
        tl.store(SCALE + stats, c_scale, mask=c < HEAD_DIM)
        tl.store(ZERO + stats, c_zero, mask=c < HEAD_DIM)
        scale, zero = c_scale.to(tl.float32), c_zero.to(tl.float32)
    # codes from the scale and zero as stored, so dequantizing them reproduces x to within scale / 2
    code = tl.floor((x - zero) / tl.where(scale > 0, scale, 1.0) + 0.5)  # a constant group: x - zero = 0
    code = tl.minimum(tl.maximum(code, 0.0), LEVELS).to(tl.int32)
    shift = (tl.arange(0, PER_BYTE) * BITS)[None, None, :]
    packed = tl.sum(tl.reshape(code, [BLOCK_R, BLOCK_D // PER_BYTE, PER_BYTE]) << shift, 2)
    byte = tl.arange(0, BLOCK_D // PER_BYTE)[None, :]
    tl.store(DATA + (seg.to(tl.int64) * N + token) * (HEAD_DIM // PER_BYTE) + byte, packed.to(tl.uint8),
             mask=rows & (byte < HEAD_DIM // PER_BYTE))


@triton.jit
def _dequantize(DATA, SCALE, ZERO, OUT, H, N, stride_db, stride_dh, stride_dn, stride_sb, stride_sh, stride_sn,
                HEAD_DIM: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, PER_TOKEN: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t, seg = tl.program_id(0), tl.program_id(1)
    b, h = (seg // H).to(tl.int64), (seg % H).to(tl.int64)
    n = t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_D)
    stats = b * stride_sb + h * stride_sh
    x = kv_tile(DATA + b * stride_db + h * stride_dh, SCALE + stats, ZERO + stats, n, c, n < N, c < HEAD_DIM,
                stride_dn, stride_sn, HEAD_DIM // (8 // BITS), BITS, GROUP_SIZE, PER_TOKEN, False)
    tl.store(OUT + (seg.to(tl.int64) * N + n[:, None]) * HEAD_DIM + c[None, :], x,
             mask=(n < N)[:, None] & (c < HEAD_DIM)[None, :])


def _check(x: torch.Tensor, bits: int, group_size: int, axis: str):
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {BITS}")
    if axis not in AXES:
        raise ValueError(f"axis={axis!r} is not one of {AXES} (keys per channel, values per token)")
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, kv_heads, n, head_dim), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; use one of {DTYPES}")
    if not runs_on(x.device):
        raise ValueError(f"x is on {x.device}; quantize_kv runs on CUDA devices "
                         "(or on the CPU under TRITON_INTERPRET=1, for tests)")
    if x.stride(-1) != 1:
        raise ValueError("x needs a contiguous last (head_dim) dimension")
    n, d = x.shape[2:]
    per_byte = 8 // bits
    if d % per_byte:
        raise ValueError(f"head_dim={d} must be a multiple of {per_byte} to pack {bits}-bit codes in whole bytes")
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be at least 1")
    grouped, name = (n, "n (tokens)") if axis == "channel" else (d, "head_dim")
    if grouped % group_size:
        raise ValueError(f"{name}={grouped} is not a multiple of group_size={group_size} (axis={axis!r})")
    if axis == "token" and group_size % per_byte:
        raise ValueError(f"group_size={group_size} must be a multiple of {per_byte} with bits={bits} and "
                         "axis='token', so that no byte holds codes of two groups")


def quantize_kv(x: torch.Tensor, bits: int, group_size: int, axis: str) -> QuantizedKV:
    """Quantize x (batch, kv_heads, n, head_dim) to `bits` per value in groups of `group_size` along `axis`
    ("channel": tokens of a channel, n a multiple of group_size; "token": channels of a token, head_dim a
    multiple of group_size): one read of x, one write of the packed codes and of the groups' scales and zeros."""
    _check(x, bits, group_size, axis)
    b, h, n, d = x.shape
    per_token = axis == "token"
    per_byte = 8 // bits
    block_d = next_pow2(d)
    rows = max(1, TILE_ELEMENTS // block_d) if per_token else group_size
    stats_shape = (b, h, n, d // group_size) if per_token else (b, h, n // group_size, d)
    data = torch.empty(b, h, n, d // per_byte, device=x.device, dtype=torch.uint8)
    scale = torch.empty(stats_shape, device=x.device, dtype=x.dtype)
    zero = torch.empty_like(scale)
    _quantize[(cdiv(n, rows), b * h)](
        x, data, scale, zero, x.stride(0), x.stride(1), x.stride(2), h, n, HEAD_DIM=d, BITS=bits,
        PER_TOKEN=per_token, GROUP_SIZE=group_size, ROWS=rows, BLOCK_R=next_pow2(rows), BLOCK_D=block_d)
    return QuantizedKV(data, scale, zero, bits, group_size, axis, tuple(x.shape))


def dequantize_kv(qkv: QuantizedKV) -> torch.Tensor:
    """The full-precision (batch, kv_heads, n, head_dim) tensor, in the dtype of qkv.scale."""
    b, h, n, d = qkv.shape
    out = torch.empty(qkv.shape, device=qkv.data.device, dtype=qkv.dtype)
    block_d = next_pow2(d)
    block_t = max(1, TILE_ELEMENTS // block_d)
    _dequantize[(cdiv(n, block_t), b * h)](
        qkv.data, qkv.scale, qkv.zero, out, h, n, *qkv.data.stride()[:3], *qkv.scale.stride()[:3], HEAD_DIM=d,
        BITS=qkv.bits, GROUP_SIZE=qkv.group_size, PER_TOKEN=qkv.axis == "token", BLOCK_T=block_t, BLOCK_D=block_d)
    return out
