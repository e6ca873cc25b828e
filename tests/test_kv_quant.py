"""KV-cache quantization (KIVI's layout) against the plain PyTorch reference, and decode attention straight over a
quantized cache against attention over the dequantized one."""
import dataclasses
import importlib
import os
import subprocess
import sys

import pytest
import torch

from conftest import DECODE_TOL as TOL, DEVICE, ROOT, gpu, rel_err
from test_decode_attention import check_against_reference
from effrepro_kernels.decode_attention import (decode_attention, decode_attention_quantized, make_schedule,
                                               merge_attention)
from effrepro_kernels import kv_quant, runtime
from effrepro_kernels.kv_quant import QuantizedKV, dequantize_kv, packed_row_bytes, quantize_kv
from effrepro_kernels.reference import (decode_attention_reference, decode_scores_reference, dequantize_kv_reference,
                               pack_codes, quantize_kv_reference, unpack_codes)

# (batch, kv_heads, n, head_dim), group_size, axis: odd head dims (72 and 18 fill no whole number of 2-bit
# words), and group sizes that are not powers of two (values: those group by group, powers of two all in one
# reduction, a token count past one program's rows; keys: a power-of-two group longer than a dequantize tile, 32
# tokens at head_dim 128, and many programs)
CASES = [((2, 3, 24, 80), 12, "channel"), ((1, 2, 16, 48), 16, "channel"), ((2, 3, 5, 80), 20, "token"),
         ((1, 2, 7, 96), 32, "token"), ((2, 1, 3, 72), 72, "token"), ((1, 2, 37, 128), 32, "token"),
         ((2, 1, 9, 64), 16, "token"), ((1, 2, 128, 128), 64, "channel"), ((2, 3, 160, 32), 8, "channel"),
         ((1, 2, 10, 18), 6, "token")]


def random_cache(shape, dtype, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(*shape, device=DEVICE, dtype=torch.float32, generator=gen)
    return (x * torch.rand(shape[-1], device=DEVICE, generator=gen) * 4).to(dtype)  # channels of unequal range


def per_value(stats, group_size, axis):
    """A group's scale or zero at each of its values."""
    return stats.repeat_interleave(group_size, 2 if axis == "channel" else 3)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_quantize_matches_reference_and_round_trips(bits, dtype):
    """Codes, scales and zeros as the reference's; dequantized values within half a step of x; and quantizing
    the dequantized values gives back the same packed bytes."""
    for i, (shape, group_size, axis) in enumerate(CASES):
        x = random_cache(shape, dtype, seed=bits * 10 + i)
        q = quantize_kv(x, bits, group_size, axis)
        codes, scale, zero = quantize_kv_reference(x, bits, group_size, axis)
        assert q.data.dtype == torch.uint8 and q.data.shape == (*shape[:3], packed_row_bytes(shape[3], bits))
        torch.testing.assert_close(q.scale, scale, rtol=1e-3, atol=0)
        assert torch.equal(q.zero, zero)
        assert torch.equal(q.data, pack_codes(unpack_codes(q.data, bits, shape[3]), bits))  # padding zero
        ours = unpack_codes(q.data, bits, shape[3])
        # each code a nearest level to (x - zero) / scale with the stored statistics: the reference's, or at a tie
        # (frequent with fp16 inputs and few levels) the other neighbour, as the kernel's rounded reciprocal falls
        s, z = per_value(q.scale, group_size, axis).double(), per_value(q.zero, group_size, axis).double()
        exact = torch.where(s > 0, (x.double() - z) / torch.where(s > 0, s, 1.0), 0.0).clamp(0, 2**bits - 1)
        assert ((ours.double() - exact).abs() <= 0.5 + 1e-4).all(), (shape, group_size, axis)
        assert (ours != codes).float().mean() <= 1e-2
        y = dequantize_kv(q)
        assert y.dtype == dtype and y.shape == x.shape
        torch.testing.assert_close(y, dequantize_kv_reference(ours, q.scale, q.zero, group_size, axis))
        step = per_value(scale, group_size, axis).float()
        # y is rounded to the cache's dtype, and x - zero was rounded when quantizing (a code at a tie may go
        # either way)
        slack = torch.finfo(dtype).eps * (x.float().abs() + per_value(zero, group_size, axis).float().abs())
        assert ((y.float() - x.float()).abs() <= step / 2 + slack).all(), (shape, group_size, axis)
        again = quantize_kv(y, bits, group_size, axis)
        assert torch.equal(again.data, q.data) and torch.equal(again.zero, q.zero), (shape, group_size, axis)
        torch.testing.assert_close(again.scale, q.scale, rtol=1e-3, atol=0)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32,
                                   pytest.param(torch.bfloat16, marks=gpu)], ids=str)
def test_every_code_dequantizes_to_the_rounded_exact_value(bits, dtype):
    """Every code of every bit width, under random scales and zeros, dequantizes to code · scale + zero computed
    exactly and rounded once to the cache's dtype (the kernel's fused multiply-add), or within a rounding of each
    term where it goes through float32 (8-bit bf16) or an interpreter older than Triton 3.9 rounds twice."""
    channels = 64
    gen = torch.Generator(device=DEVICE).manual_seed(bits)
    codes = torch.randint(0, 2**bits, (1, 1, 3 * 2**bits, channels), device=DEVICE, generator=gen, dtype=torch.uint8)
    codes[0, 0, :2**bits, 0] = torch.arange(2**bits, device=DEVICE, dtype=torch.uint8)
    data = pack_codes(codes, bits)
    stats = (1, 1, codes.shape[2], 1)
    scale = (torch.rand(stats, device=DEVICE, generator=gen) * 0.1 + 1e-3).to(dtype)
    zero = torch.randn(stats, device=DEVICE, generator=gen).to(dtype)
    y = dequantize_kv(QuantizedKV(data, scale, zero, bits, channels, "token", tuple(codes.shape)))
    exact = codes.double() * scale.double() + zero.double()
    rounds_once = kv_quant.FMA_ROUNDS_ONCE and not (dtype == torch.bfloat16 and bits == 8)
    if rounds_once:
        assert torch.equal(y, exact.to(dtype))
    else:
        bound = torch.finfo(dtype).eps * ((codes.double() * scale.double()).abs() + zero.double().abs())
        assert ((y.double() - exact).abs() <= bound).all()


def test_a_constant_group_quantizes_exactly():
    x = random_cache((1, 1, 8, 32), torch.float16, seed=0)
    x[:, :, :, :16] = 1.5  # the first two token groups of 8 channels are constant: scale 0
    q = quantize_kv(x, 2, 8, "token")
    assert (q.scale[..., :2] == 0).all() and torch.equal(dequantize_kv(q)[..., :16], x[..., :16])


def test_a_group_of_subnormal_range_stays_in_range_and_leaves_its_word_neighbours_alone():
    """float32 values spanning less than the smallest normal float32: 1 / scale overflows. Its codes stay levels
    (its values within the group's span), and the next group, packed in the same 32-bit word, is exact."""
    x = random_cache((1, 1, 2, 32), torch.float32, seed=4)
    x[0, 0, 0, :4] = torch.linspace(0, 3e-38, 4)
    q = quantize_kv(x, 4, 4, "token")
    codes, _, _ = quantize_kv_reference(x, 4, 4, "token")
    ours = unpack_codes(q.data, 4, 32)
    assert torch.equal(ours[0, 0, 0, 4:], codes[0, 0, 0, 4:]) and torch.equal(ours[0, 0, 1], codes[0, 0, 1])
    assert (ours <= 15).all() and ((dequantize_kv(q)[0, 0, 0, :4] - x[0, 0, 0, :4]).abs() <= 3e-38).all()


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_a_group_whose_fp16_scale_rounds_far_down_keeps_its_codes_in_range(axis):
    """fp16 values spanning 4 subnormal steps (4 · 2^-24), at 2 bits: the scale 4/3 · 2^-24 is stored as 2^-24,
    so the group's maximum is 4 steps above its zero-point, a code past the top level 3. It is clamped to 3, and
    its neighbours in the packed word keep their codes (an unclamped 4 carries into the next channel's bits)."""
    tiny = 2.0**-24
    x = random_cache((1, 1, 4, 16), torch.float16, seed=6)
    if axis == "token":
        x[0, 0, 0, :4] = torch.tensor([0, tiny, 2 * tiny, 4 * tiny])  # one token's group of 4 channels
    else:
        x[0, 0, :, 0] = torch.tensor([0, tiny, 2 * tiny, 4 * tiny])  # channel 0's group of 4 tokens
    q = quantize_kv(x, 2, 4, axis)
    codes, scale, _ = quantize_kv_reference(x, 2, 4, axis)
    assert scale.flatten()[0] == tiny  # the case named: 4/3 of a step, rounded down to one
    assert torch.equal(unpack_codes(q.data, 2, 16), codes)


def test_a_token_group_shorter_than_its_program_leaves_the_padding_rows_out_of_its_statistics():
    """Keys per channel in groups of 12 tokens at head_dim 64: a program's 16 rows hold 4 past its group, and no
    padding lanes (CASES' groups of 12 come with padding lanes, which mask the rows' minimum and maximum anyway).
    The values are all positive, so a padding row's 0 would pull every zero-point down to 0."""
    x = random_cache((1, 2, 24, 64), torch.float16, seed=7).abs() + 1
    q = quantize_kv(x, 4, 12, "channel")
    codes, scale, zero = quantize_kv_reference(x, 4, 12, "channel")
    assert torch.equal(q.zero, zero) and (zero >= 1).all()
    torch.testing.assert_close(q.scale, scale, rtol=1e-3, atol=0)
    assert (unpack_codes(q.data, 4, 64) != codes).float().mean() <= 1e-2


def test_a_view_of_the_oldest_groups_dequantizes_like_the_whole_cache():
    """A cache preallocated for more tokens than it holds: the kernels follow the views' strides."""
    x = random_cache((2, 3, 32, 24), torch.float16, seed=2)
    for axis, group_size in (("channel", 8), ("token", 12)):
        q = quantize_kv(x, 4, group_size, axis)
        groups = 16 // group_size if axis == "channel" else 16
        view = QuantizedKV(q.data[:, :, :16], q.scale[:, :, :groups], q.zero[:, :, :groups], 4, group_size, axis,
                           (2, 3, 16, 24))
        assert not view.data.is_contiguous()
        assert torch.equal(dequantize_kv(view), dequantize_kv(q)[:, :, :16])


def test_nbytes_counts_codes_scales_and_zeros():
    x = random_cache((2, 3, 32, 80), torch.float16, seed=1)
    keys, values = quantize_kv(x, 4, 16, "channel"), quantize_kv(x, 2, 20, "token")
    assert keys.nbytes == 2 * 3 * 32 * 40 + 2 * (2 * 3 * 2 * 80) * 2
    assert values.nbytes == 2 * 3 * 32 * 20 + 2 * (2 * 3 * 32 * 4) * 2
    assert keys.dtype == torch.float16 and keys.shape == (2, 3, 32, 80)


@pytest.mark.parametrize("args, match", [
    (dict(bits=3), r"bits=3 .*\(2, 4, 8\)"),
    (dict(axis="head"), "axis='head'"),
    (dict(group_size=5), r"n \(tokens\)=16 is not a multiple of group_size=5"),
    (dict(axis="token", group_size=7), "head_dim=24 is not a multiple of group_size=7"),
    (dict(group_size=0), "group_size=0"),
    (dict(group_size=8.0), "group_size=8.0 must be an integer"),
    (dict(bits="4"), r"bits='4' is not one of"),
    (dict(shape=(16, 24)), "batch, kv_heads, n, head_dim"),
    (dict(dtype=torch.float64), r"x has dtype torch.float64; use one of"),
    (dict(shape=(1, 2, 16, 48), every_other_channel=True), r"x needs a contiguous last \(head_dim\) dimension"),
])
def test_bad_input_is_a_clear_value_error(args, match):
    x = torch.randn(*args.get("shape", (1, 2, 16, 24)), device=DEVICE, dtype=args.get("dtype", torch.float16))
    if args.get("every_other_channel"):  # 24 channels 2 apart: the kernel reads a row's channels as neighbours
        x = x[..., ::2]
    with pytest.raises(ValueError, match=match):
        quantize_kv(x, args.get("bits", 4), args.get("group_size", 8), args.get("axis", "channel"))


def test_the_interpreter_refuses_bfloat16_and_tensors_off_the_cpu(monkeypatch):
    """Under TRITON_INTERPRET=1 (set here, so that a GPU machine checks it too), 2- and 4-bit bfloat16 caches would
    quantize and dequantize to garbage, and a meta tensor fail inside the launch."""
    x = torch.randn(1, 2, 16, 24, dtype=torch.float16)
    q = quantize_kv(x.to(DEVICE), 4, 8, "channel")  # before the interpreter is set: a GPU machine's kernel
    q = dataclasses.replace(q, data=q.data.cpu(), scale=q.scale.cpu(), zero=q.zero.cpu())
    monkeypatch.setattr(runtime, "INTERPRET", True)
    with pytest.raises(ValueError, match=r"quantize_kv: bfloat16 needs a CUDA GPU; the Triton interpreter cannot "
                                         r"compute it \(got x in bfloat16\)"):
        quantize_kv(x.bfloat16(), 4, 8, "channel")
    with pytest.raises(ValueError, match="quantize_kv runs on CUDA devices .*; got tensors on meta"):
        quantize_kv(x.to("meta"), 4, 8, "channel")
    in_bf16 = dataclasses.replace(q, scale=q.scale.bfloat16(), zero=q.zero.bfloat16())
    with pytest.raises(ValueError, match=r"dequantize_kv: bfloat16 needs a CUDA GPU.*\(got scale, zero in bfloat16\)"):
        dequantize_kv(in_bf16)
    on_meta = dataclasses.replace(q, data=q.data.to("meta"), scale=q.scale.to("meta"), zero=q.zero.to("meta"))
    with pytest.raises(ValueError, match="dequantize_kv runs on CUDA devices .*; got tensors on meta"):
        dequantize_kv(on_meta)


def test_packed_data_of_another_width_or_off_word_rows_is_a_clear_value_error():
    q = quantize_kv(random_cache((1, 2, 16, 24), torch.float16, seed=3), 4, 8, "channel")
    assert q.data.shape[-1] == 12
    narrow = QuantizedKV(q.data[..., :8], q.scale, q.zero, 4, 8, "channel", q.shape)
    with pytest.raises(ValueError, match=r"needs uint8 data of shape \(1, 2, 16, 12\) \(12 bytes a token"):
        dequantize_kv(narrow)
    wide = torch.zeros(1, 2, 16, 13, dtype=torch.uint8, device=DEVICE)
    wide[..., :12] = q.data
    off_word = QuantizedKV(wide[..., :12], q.scale, q.zero, 4, 8, "channel", q.shape)  # rows 13 bytes apart
    with pytest.raises(ValueError, match="rows on 4-byte boundaries"):
        dequantize_kv(off_word)
    shifted = torch.zeros(q.data.numel() + 1, dtype=torch.uint8, device=DEVICE)[1:].view(q.data.shape)
    shifted.copy_(q.data)  # rows 12 bytes apart, a byte past a word: the kernel reads whole words
    with pytest.raises(ValueError, match="rows on 4-byte boundaries"):
        dequantize_kv(dataclasses.replace(q, data=shifted))


@pytest.mark.parametrize("change, match", [
    (lambda q: dict(shape=(1, 2, 32, 24)), r"needs uint8 data of shape \(1, 2, 32, 12\)"),  # more tokens than held
    (lambda q: dict(bits=3), r"bits=3 is not one of \(2, 4, 8\)"),
    (lambda q: dict(axis="head"), "axis='head' is not one of"),
    (lambda q: dict(group_size=16), r"scale must be torch.float16 of shape \(1, 2, 1, 24\)"),  # fewer groups
    (lambda q: dict(group_size=5), r"n \(tokens\)=16 is not a multiple of group_size=5"),
    (lambda q: dict(zero=q.zero[:, :1]), r"zero must be torch.float16 of shape \(1, 2, 2, 24\)"),
    (lambda q: dict(scale=q.scale.int(), zero=q.zero.int()), "scale and zero must be of .*; got torch.int32"),
    # the right shape, as a slice of a wider tensor: read with scale's strides, it would be another tensor's numbers
    (lambda q: dict(zero=torch.cat([q.zero, q.zero], -1)[..., :24]), "zero must be laid out like its scale"),
])
def test_a_quantized_cache_whose_parts_disagree_is_refused_not_read_out_of_bounds(change, match):
    q = quantize_kv(random_cache((1, 2, 16, 24), torch.float16, seed=4), 4, 8, "channel")
    bad = dataclasses.replace(q, **change(q))
    with pytest.raises(ValueError, match=match):
        dequantize_kv(bad)
    lengths = torch.tensor([16], device=DEVICE)
    v_q = quantize_kv(random_cache((1, 2, 16, 24), torch.float16, seed=5), 4, 8, "token")
    with pytest.raises(ValueError, match=match):
        decode_attention_quantized(torch.randn(1, 2, 24, device=DEVICE, dtype=torch.float16), bad, v_q, lengths)


def sass_loop(*args) -> str:
    """scripts/sass_loop.py's table for these arguments, run outside the interpreter (which cannot compile)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "sass_loop.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("bits, dtype, sm", [(4, "bf16", 90), (4, "fp16", 90), (2, "bf16", 90), (8, "fp16", 90),
                                             (4, "bf16", 80)])
def test_the_quantized_decode_kernel_compiles_without_a_gpu(bits, dtype, sm):
    """The GPU's own path (inline PTX: two-lane dequantizing, lop3) compiles for Hopper, and for an A100 (no PTX
    of sm_90 only), and assembles with Triton's ptxas, in a process outside the interpreter, which takes the
    lane-by-lane path instead."""
    table = sass_loop("--bits", bits, "--dtype", dtype, "--sm", sm)
    assert f"{bits}-bit {dtype} cache" in table and "| 1 |" in table, table


@pytest.mark.parametrize("block_n", [64, 128])
def test_the_quantized_decode_loop_keeps_its_registers_under_a_cap_of_168(block_n):
    """Capped at 168 registers a thread (DecodeSchedule.max_registers: three programs of 4 warps an SM), the 4-bit
    loop over a tile compiles for Hopper without local-memory loads or stores."""
    table = sass_loop("--bits", 4, "--block-n", block_n, "--max-registers", 168)
    tile_loop = next(line for line in table.splitlines() if line.startswith("| 1 |"))
    assert tile_loop.split("|")[4].strip() == "0", tile_loop  # the spills column


def quantized_inputs(batch, heads, kv_heads, n, head_dim, bits, dtype, key_group, value_group, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(batch, heads, head_dim, device=DEVICE, dtype=dtype, generator=gen)
    k = random_cache((batch, kv_heads, n, head_dim), dtype, seed + 1)
    v = random_cache((batch, kv_heads, n, head_dim), dtype, seed + 2)
    return q, quantize_kv(k, bits, key_group, "channel"), quantize_kv(v, bits, value_group, "token")


def dequantized_reference(qkv: QuantizedKV) -> torch.Tensor:
    return dequantize_kv_reference(unpack_codes(qkv.data, qkv.bits, qkv.shape[3]), qkv.scale, qkv.zero, qkv.group_size,
                                   qkv.axis).double()


def check_quantized(q, k_q, v_q, lengths, schedule="lean"):
    out, lse, got_scores = decode_attention_quantized(q, k_q, v_q, lengths, schedule=schedule, return_lse=True,
                                                      return_scores=True)
    check_against_reference(out, lse, got_scores, q, dequantized_reference(k_q), dequantized_reference(v_q), lengths)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_quantized_decode_matches_attention_over_the_dequantized_cache(bits, dtype):
    # 3 query heads per KV head; head_dim 80 (128 lanes); the second sequence ends inside a key group and a tile;
    # value groups of 40 channels (scales gathered per channel) and of 16 (loaded per group, then repeated)
    for value_group in (40, 16):
        q, k_q, v_q = quantized_inputs(2, 6, 2, 48, 80, bits, dtype, key_group=16, value_group=value_group, seed=bits)
        check_quantized(q, k_q, v_q, torch.tensor([48, 29], device=DEVICE))


@pytest.mark.parametrize("head_dim", [40, 96, 200])
def test_quantized_decode_at_head_dims_that_are_not_powers_of_two(head_dim):
    """Packed rows padded to a power of two lanes (64, 128, 256), the padding lanes masked; keys in groups of 8
    tokens of a channel, values in groups of 8 channels of a token; the second sequence ends inside a tile."""
    q, k_q, v_q = quantized_inputs(2, 4, 2, 40, head_dim, 4, torch.float16, key_group=8, value_group=8,
                                   seed=head_dim)
    check_quantized(q, k_q, v_q, torch.tensor([40, 23], device=DEVICE))


@pytest.mark.parametrize("schedule", ["lean", "split", "fa2"])
@pytest.mark.parametrize("key_group, value_group, n", [(24, 20, 48), (12, 40, 48), (64, 16, 128)])
def test_quantized_decode_with_groups_that_are_not_powers_of_two_or_span_tiles(key_group, value_group, n, schedule):
    """Key groups of 24 and 12 tokens (not powers of two: the general path for transposed key tiles) and of 64
    (one group over several 16-key tiles); value groups of 20 channels; lengths that end inside a group."""
    q, k_q, v_q = quantized_inputs(2, 4, 2, n, 80, 4, torch.float16, key_group=key_group, value_group=value_group,
                                   seed=key_group)
    check_quantized(q, k_q, v_q, torch.tensor([n, n - key_group // 2 - 1], device=DEVICE), schedule)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_decode_with_the_fast_memory_tiles(bits):
    """The schedule a GPU with fast memory gets for a quantized cache (128-key tiles, two lean programs per SM),
    on lengths that end inside a tile and a key group (the CPU's default tiles are 16 keys)."""
    q, k_q, v_q = quantized_inputs(2, 4, 2, 320, 64, bits, torch.float16, key_group=32, value_group=32, seed=bits)
    lengths = torch.tensor([320, 141], device=DEVICE)
    schedule = make_schedule("lean", lengths, 2, block_n=128, head_dim=64, dtype=torch.float16, quantized=True)
    assert schedule.block_n == 128
    check_quantized(q, k_q, v_q, lengths, schedule)


def test_quantized_part_and_full_precision_residual_merge_to_attention_over_both():
    """KIVI's cache: the oldest tokens quantized in whole groups, the newest (fewer than a group) in full
    precision; attention over each, merged, is attention over the concatenated cache."""
    q, k_q, v_q = quantized_inputs(2, 4, 2, 32, 64, 4, torch.float16, key_group=16, value_group=32)
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    k_res, v_res = (torch.randn(2, 2, 5, 64, device=DEVICE, dtype=torch.float16, generator=gen) for _ in range(2))
    old, old_lse = decode_attention_quantized(q, k_q, v_q, torch.tensor([32, 32], device=DEVICE), return_lse=True)
    new, new_lse = decode_attention(q, k_res, v_res, torch.tensor([5, 5], device=DEVICE), return_lse=True)
    out, lse = merge_attention([old, new], [old_lse, new_lse])
    k = torch.cat([dequantized_reference(k_q), k_res.double()], 2)
    v = torch.cat([dequantized_reference(v_q), v_res.double()], 2)
    lengths = torch.tensor([37, 37], device=DEVICE)
    ref = decode_attention_reference(q.double(), k, v, lengths)
    assert rel_err(out, ref) < TOL[torch.float16]
    torch.testing.assert_close(lse, decode_scores_reference(q.double(), k, lengths).logsumexp(-1).float(),
                               rtol=1e-3, atol=1e-3)


def test_quantized_decode_refuses_other_layouts():
    q, k_q, v_q = quantized_inputs(1, 2, 1, 16, 32, 4, torch.float16, key_group=16, value_group=16)
    lengths = torch.tensor([16], device=DEVICE)
    values_per_channel = quantize_kv(dequantize_kv(v_q), 4, 16, "channel")
    with pytest.raises(ValueError, match="values with axis='token'"):
        decode_attention_quantized(q, k_q, values_per_channel, lengths)
    with pytest.raises(ValueError, match="must be QuantizedKV"):
        decode_attention_quantized(q, dequantize_kv(k_q), v_q, lengths)
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 16\]"):
        decode_attention_quantized(q, k_q, v_q, torch.tensor([17], device=DEVICE))


def test_quantized_decode_builds_its_schedule_for_a_quantized_cache(monkeypatch):
    """A schedule given by name is made with the quantized cache's levers (keys per tile, lean programs)."""
    module = importlib.import_module("effrepro_kernels.decode_attention")
    made = []
    real = module.make_schedule
    monkeypatch.setattr(module, "make_schedule", lambda *args, **kwargs: made.append(kwargs) or real(*args, **kwargs))
    q, k_q, v_q = quantized_inputs(1, 2, 1, 16, 32, 4, torch.float16, key_group=16, value_group=16)
    decode_attention_quantized(q, k_q, v_q, torch.tensor([16], device=DEVICE), schedule="lean")
    assert [kwargs.get("quantized") for kwargs in made] == [True]


@gpu
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gpu_quantized_decode_bf16_long_context(bits):
    q, k_q, v_q = quantized_inputs(4, 32, 8, 8192, 128, bits, torch.bfloat16, key_group=32, value_group=32)
    check_quantized(q, k_q, v_q, torch.tensor([8192, 1000, 1, 4099], device=DEVICE))


@gpu
def test_gpu_quantize_round_trip_bf16():
    x = random_cache((2, 8, 4096, 128), torch.bfloat16, seed=0)
    for axis in ("channel", "token"):
        q = quantize_kv(x, 4, 32, axis)
        step = per_value(q.scale, 32, axis).float()
        slack = torch.finfo(torch.bfloat16).eps * x.float().abs()
        assert ((dequantize_kv(q).float() - x.float()).abs() <= step / 2 + slack).all()
