"""Decode attention, each schedule against the float64 reference: GQA, odd lengths, length 1, a batch whose
lengths differ by 100x, head dims that are not powers of two; each key's score; merging attention over
disjoint key sets."""
import importlib
import math

import pytest
import torch
import triton

from conftest import DECODE_TOL as TOL, DEVICE, gpu, rel_err
from effrepro_kernels.decode_attention import (QUANTIZED_PROGRAMS_PER_SM, SCHEDULES, decode_attention, default_block_n,
                                               head_dim_chunks, lean_programs, make_schedule, merge_attention,
                                               flash_decoding_splits, merge_step, padded_head_dim,
                                               resident_programs)
from effrepro_kernels import runtime
from effrepro_kernels.runtime import sm_count
from effrepro_kernels.reference import decode_attention_reference, decode_scores_reference


def check(b, hq, hkv, lengths, d, dtype, schedule, max_len=None):
    gen = torch.Generator(device=DEVICE).manual_seed(b * 1000 + hq + d)
    max_len = max_len or max(lengths) + 3
    q = torch.randn(b, hq, d, device=DEVICE, dtype=dtype, generator=gen)
    k, v = (torch.randn(b, hkv, max_len, d, device=DEVICE, dtype=dtype, generator=gen) for _ in range(2))
    # slots past a sequence's length hold NaN, as an unused part of a preallocated cache may: never read
    past = torch.arange(max_len, device=DEVICE) >= torch.tensor(lengths, device=DEVICE)[:, None, None, None]
    k_held, v_held = (x.masked_fill(past.transpose(-1, -2), float("nan")) for x in (k, v))
    if schedule == "split":  # FlashDecoding's own count is one chunk at most of these lengths on 8 CPU "SMs"
        schedule = make_schedule("split", lengths, hkv, num_splits=3, block_n=16, head_dim=d, dtype=dtype,
                                 device=DEVICE)
        assert schedule.max_pieces == 3  # the longest head in three pieces, merged
    lengths = torch.tensor(lengths, device=DEVICE)
    out, lse, got_scores = decode_attention(q, k_held, v_held, lengths, schedule=schedule, return_lse=True,
                                            return_scores=True)
    check_against_reference(out, lse, got_scores, q, k.double(), v.double(), lengths)


# Bounds (absolute and relative) on decode's log-sum-exps and scores against float64, by the inputs' dtype. float32
# is computed in float32 on a GPU too ("ieee" products): errors near 1e-6, where tf32 products give near 1e-3.
# 16-bit inputs' products are exact in either: the bounds their GPU runs passed.
LSE_AND_SCORE_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (1e-3, 2e-3)}


def check_against_reference(out, lse, got_scores, q, k, v, lengths):
    """A decode call's output, log-sum-exp and scores against the float64 reference over q and the float64 k and v
    (a cache, or what a quantized one dequantizes to): scores up to each length, and the probabilities they give
    with the lse against softmax."""
    ref = decode_attention_reference(q.double(), k, v, lengths)
    assert rel_err(out, ref) < TOL[q.dtype], rel_err(out, ref)
    scores = decode_scores_reference(q.double(), k, lengths)
    lse_tol, score_tol = LSE_AND_SCORE_TOL[q.dtype]
    torch.testing.assert_close(lse, scores.logsumexp(-1).float(), rtol=lse_tol, atol=lse_tol)
    assert got_scores.dtype == torch.float32 and got_scores.shape == scores.shape
    held = (torch.arange(got_scores.shape[-1], device=got_scores.device) < lengths[:, None, None]).expand_as(scores)
    torch.testing.assert_close(got_scores[held], scores[held].float(), rtol=score_tol, atol=score_tol)
    probs = torch.where(held, (got_scores - lse[..., None]).exp(), 0.0)
    torch.testing.assert_close(probs, scores.softmax(-1).float(), rtol=2e-3, atol=1e-6)


def test_the_float32_bounds_fail_what_tf32_products_give():
    """decode's float32 is float32 arithmetic on a GPU too: its bounds fail the output, log-sum-exp and scores of
    the exact computation over operands rounded to tf32's 10 mantissa bits, as a tf32 kernel's would (a GPU's
    checks are these; the interpreter computes float32 whatever the precision asked)."""
    def tf32(x):  # round to nearest at tf32's last mantissa bit
        return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)

    gen = torch.Generator(device=DEVICE).manual_seed(6)
    q = torch.randn(2, 8, 64, device=DEVICE, generator=gen)
    k, v = (torch.randn(2, 2, 100, 64, device=DEVICE, generator=gen) for _ in range(2))
    lengths = torch.tensor([100, 37], device=DEVICE)
    rounded = [tf32(x).double() for x in (q, k, v)]
    out = decode_attention_reference(*rounded, lengths)
    scores = decode_scores_reference(*rounded[:2], lengths)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), lengths)
    ref_scores = decode_scores_reference(q.double(), k.double(), lengths)
    assert rel_err(out, ref) > 10 * TOL[torch.float32]
    lse_tol, score_tol = LSE_AND_SCORE_TOL[torch.float32]
    assert not torch.allclose(scores.logsumexp(-1), ref_scores.logsumexp(-1), rtol=lse_tol, atol=lse_tol)
    held = ref_scores.isfinite()
    assert not torch.allclose(scores[held], ref_scores[held], rtol=score_tol, atol=score_tol)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_schedules_match_reference(schedule, dtype):
    check(3, 8, 2, [1, 37, 100], 64, dtype, schedule)    # length 1; lengths not a multiple of the tile
    check(2, 4, 4, [300, 3], 128, dtype, schedule)       # lengths 100x apart; MHA


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_head_dims_that_are_not_powers_of_two_match_reference(schedule, dtype):
    # 64 lanes (40: 32 + 16 would be below the 32-lane second chunk); 64 + 32 (three times); 128 + 32; 256
    for head_dim in (40, 48, 72, 80, 96, 160, 200):  # (head_dim_chunks)
        check(2, 6, 2, [5, 37], head_dim, dtype, schedule)  # 3 query heads per KV head


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_smallest_and_largest_head_dims_match_reference(schedule):
    for head_dim in (16, 32, 256):
        check(2, 4, 2, [9, 40], head_dim, torch.float16, schedule)


def test_return_order_is_out_then_lse_then_scores_and_one_prepared_schedule_serves_every_kind_of_call():
    q = torch.randn(1, 2, 32, device=DEVICE)
    k, v = (torch.randn(1, 1, 20, 32, device=DEVICE) for _ in range(2))
    n = torch.tensor([20], device=DEVICE)
    out = decode_attention(q, k, v, n)
    out2, lse, scores = decode_attention(q, k, v, n, return_lse=True, return_scores=True)
    assert lse.shape == (1, 2) and scores.shape == (1, 2, 20) and torch.equal(out, out2)
    with pytest.raises(ValueError, match="return_scores=True needs return_lse=True"):
        decode_attention(q, k, v, n, return_scores=True)
    schedule = make_schedule("lean", [20], 1, head_dim=32, dtype=q.dtype, device=DEVICE)
    for return_scores in (False, True, False, True):  # a launch kept for one kind never serves the other
        got = decode_attention(q, k, v, schedule=schedule, return_lse=return_scores, return_scores=return_scores)
        torch.testing.assert_close(got[0] if return_scores else got, out)
        if return_scores:
            torch.testing.assert_close(got[2], scores)


def test_merging_attention_over_two_halves_equals_attention_over_the_whole():
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    q = torch.randn(2, 6, 48, device=DEVICE, generator=gen)
    k, v = (torch.randn(2, 2, 53, 48, device=DEVICE, generator=gen) for _ in range(2))
    lengths, split = torch.tensor([53, 30], device=DEVICE), 21
    whole, whole_lse, whole_scores = decode_attention(q, k, v, lengths, return_lse=True, return_scores=True)
    first, first_lse, first_scores = decode_attention(q, k[:, :, :split], v[:, :, :split],
                                                      torch.full_like(lengths, split), return_lse=True,
                                                      return_scores=True)
    second, second_lse = decode_attention(q, k[:, :, split:], v[:, :, split:], lengths - split, return_lse=True)
    merged, merged_lse = merge_attention([first, second], [first_lse, second_lse])
    torch.testing.assert_close(merged, whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged_lse, whole_lse, rtol=1e-5, atol=1e-5)
    # a key's score is the same in the part as in the whole: with the merged lse, its probability over the whole
    torch.testing.assert_close(first_scores, whole_scores[..., :split], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((first_scores - merged_lse[..., None]).exp(),
                               (whole_scores[..., :split] - whole_lse[..., None]).exp(), rtol=1e-4, atol=1e-7)
    # a part with no keys (lse = -inf, output undefined) adds nothing
    empty = torch.full_like(first, float("nan"))
    alone, alone_lse = merge_attention([first, empty], [first_lse, torch.full_like(first_lse, float("-inf"))])
    assert torch.equal(alone_lse, first_lse) and torch.allclose(alone, first, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="one lse per output"):
        merge_attention([first, second], [first_lse])


def test_head_dim_chunks_cover_the_head_in_powers_of_two_and_save_lanes():
    for head_dim in range(16, 257):
        first, second = head_dim_chunks(head_dim)
        assert first + second >= head_dim and first & (first - 1) == 0 and second & (second - 1) == 0
        assert first + second <= padded_head_dim(head_dim) and (second == 0 or second >= 32)
        assert head_dim_chunks(head_dim, quantized=True) == (padded_head_dim(head_dim), 0)  # whole packed rows
    assert head_dim_chunks(80) == head_dim_chunks(96) == (64, 32) and head_dim_chunks(128) == (128, 0)


def test_lean_shares_cross_segments_and_merge_exactly():
    lengths = [50, 7, 200]
    sched = make_schedule("lean", lengths, 2, num_programs=5, block_n=16, device=DEVICE)
    items = sched.work.reshape(-1, 6)
    items = items[items[:, 1] < items[:, 2]]  # the non-empty work items
    assert int((items[:, 2] - items[:, 1]).sum()) == 2 * sum(-(-n // 16) for n in lengths)
    for seg in range(6):  # each segment's pieces are numbered 0..n-1, and every item knows n
        of_seg = items[items[:, 0] == seg]
        assert sorted(of_seg[:, 3].tolist()) == list(range(len(of_seg))) and set(of_seg[:, 4].tolist()) == {len(of_seg)}
        assert set(of_seg[:, 5].tolist()) == {lengths[seg // 2]}
    assert sched.max_pieces > 1
    q = torch.randn(3, 6, 64, device=DEVICE)  # 3 query heads per KV head: not a power of two
    k, v = (torch.randn(3, 2, 200, 64, device=DEVICE) for _ in range(2))
    n = torch.tensor(lengths, device=DEVICE)
    outs = [decode_attention(q, k, v, n, schedule=s) for s in ("fa2", "split", sched)]
    ref = decode_attention_reference(q.double(), k.double(), v.double(), n)
    for o in outs:
        assert rel_err(o, ref) < TOL[torch.float32], rel_err(o, ref)
    for o in outs[1:]:  # float32 arithmetic, on a GPU too: the schedules differ in the order of sums only
        torch.testing.assert_close(o, outs[0])
    assert torch.equal(decode_attention(q, k, v, schedule=sched), outs[2])  # deterministic; lengths from sched
    assert not sched.arrived.any()  # the merging programs reset their counts for the next call
    with pytest.raises(ValueError, match="differ from those the schedule was built for"):
        decode_attention(q, k, v, torch.tensor([50, 8, 200], device=DEVICE), schedule=sched)


def test_default_lean_programs_never_span_two_equal_segments():
    assert lean_programs([64] * 8, sms=132) == 128 and lean_programs([64] * 132, sms=132) == 132
    assert lean_programs([64, 65], sms=132) == 132 and lean_programs([4] * 200, sms=132) == 132
    sched = make_schedule("lean", [100] * 3, 2, block_n=16)  # 6 segments of 7 tiles
    assert sched.num_programs % 6 == 0 and sched.work.shape[1] == 1  # one item per program
    # a quantized cache: programs per SM to hide the latency of dequantizing
    plain, quantized = (make_schedule("lean", [4096] * 3, 2, block_n=16, quantized=q) for q in (False, True))
    assert quantized.num_programs == QUANTIZED_PROGRAMS_PER_SM * plain.num_programs  # fewer than the 1,536 tiles


def test_tiles_are_larger_for_fa2_and_shrink_to_fit_shared_memory(monkeypatch):
    # the module, not the function `effrepro_kernels.decode_attention` that the package exports under the same name
    module = importlib.import_module("effrepro_kernels.decode_attention")
    monkeypatch.setattr(module, "INTERPRET", False)
    monkeypatch.setattr(module, "peak_gb_s_per_sm", lambda device=None: 25.4)  # an H100 SXM's
    assert default_block_n("fa2") == 128 and default_block_n("lean") == default_block_n("split") == 64
    assert default_block_n("fa2", 256) == 64 and default_block_n("fa2", 128, torch.float32) == 64
    assert default_block_n("lean", 256, torch.float32) == 32
    # the same bytes a tile at smaller heads; twice the keys for two-chunk heads and quantized caches, whose
    # tiles are bound by their chain of work; a float32 quantized cache leaves room for its dequantized tiles
    assert default_block_n("lean", 64) == 128 and default_block_n("lean", 96) == default_block_n("lean", 80) == 128
    assert default_block_n("fa2", 32) == default_block_n("fa2", 16) == 256 and default_block_n("fa2", 96) == 128
    assert default_block_n("lean", quantized=True) == 128
    assert default_block_n("lean", 128, torch.float32, quantized=True) == 32
    monkeypatch.setattr(module, "peak_gb_s_per_sm", lambda device=None: 37.3)  # an H200's: more bytes in flight
    assert default_block_n("lean") == default_block_n("split") == default_block_n("fa2") == 128
    assert default_block_n("lean", 64) == 256 and default_block_n("lean", 80) == 128
    assert default_block_n("lean", 256, torch.float32) == 32
    assert default_block_n("lean", 128, torch.bfloat16, quantized=True) == 128
    assert default_block_n("lean", 128, torch.float32, quantized=True) == 32


def test_peak_bandwidth_per_sm_comes_from_the_device():
    from effrepro_kernels.decode_attention import peak_gb_s_per_sm
    assert peak_gb_s_per_sm("cpu") == 0
    if DEVICE == "cuda":  # an H100 SXM has 25 GB/s per SM, an H200 37
        assert 5 < peak_gb_s_per_sm(DEVICE) < 100
    q = torch.randn(1, 2, 256, device=DEVICE)
    k = torch.randn(1, 1, 8, 256, device=DEVICE)
    with pytest.raises(ValueError, match="64-key tiles need 256 KB"):
        decode_attention(q, k, k, schedule=make_schedule("lean", [8], 1, block_n=64))


@pytest.mark.parametrize("programs, heads, head_dim", [(11, 16, 128), (21, 2, 64)], ids=["one-per-step", "16-per-step"])
def test_a_head_cut_into_many_pieces_merges_exactly(programs, heads, head_dim):
    sched = make_schedule("lean", [350], 1, num_programs=programs, block_n=16)
    assert sched.max_pieces == programs
    assert merge_step(programs, heads, head_dim) == (16 if programs >= 16 else 1)  # 21 pieces: 16, then 5 masked
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    q = torch.randn(1, heads, head_dim, device=DEVICE, generator=gen)
    k, v = (torch.randn(1, 1, 353, head_dim, device=DEVICE, generator=gen) for _ in range(2))
    out, lse = decode_attention(q, k, v, schedule=sched, return_lse=True)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), sched.lengths)
    assert rel_err(out, ref) < TOL[torch.float32]
    whole, whole_lse = decode_attention(q, k, v, sched.lengths, schedule="fa2", return_lse=True)
    torch.testing.assert_close(lse, whole_lse, rtol=1e-4, atol=1e-4)


def test_merging_parts_of_other_shapes_dtypes_or_devices_is_a_clear_value_error():
    out, lse = torch.randn(2, 4, 64, device=DEVICE), torch.randn(2, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"outputs of one shape .* got \[\(2, 4, 64\), \(2, 4, 32\)\]"):
        merge_attention([out, out[..., :32]], [lse, lse])
    with pytest.raises(ValueError, match=r"and \[\(2, 4\), \(2, 3\)\]"):
        merge_attention([out, out], [lse, lse[:, :3]])
    with pytest.raises(ValueError, match=r"one dtype; got outputs in \['torch.float16', 'torch.float32'\] and lses "
                                         r"in \['torch.float32', 'torch.float32'\]"):
        merge_attention([out.half(), out], [lse, lse])
    with pytest.raises(ValueError, match=r"lses in \['torch.float16', 'torch.float32'\]"):
        merge_attention([out, out], [lse.half(), lse])
    with pytest.raises(ValueError, match=r"one device; got outputs on \[.*\] and lses on \['meta', .*\]"):
        merge_attention([out, out], [lse.to("meta"), lse])


@pytest.mark.parametrize("change, match", [
    (dict(q=(2, 5, 64)), "multiple"),
    (dict(q=(2, 4, 8), cache=(2, 2, 16, 8)), "head_dim=8"),
    (dict(q=(2, 4, 264), cache=(2, 2, 16, 264)), "head_dim=264"),
    (dict(lengths=[0, 3]), r"\[1, 16\]"),
    (dict(lengths=[17, 3]), r"\[1, 16\]"),
    (dict(cache_dtype=torch.float32), "dtype"),
    (dict(v=(2, 2, 8, 64)), "differ"),
    (dict(lengths=[5.0, 9.0]), "1-d integer tensor"),
    (dict(cache=(2, 0, 16, 64)), "not a multiple of the cache's 0 KV heads"),
    (dict(scale=math.inf), "softmax_scale=inf must be a finite number"),
    (dict(scale="0.1"), "softmax_scale='0.1' must be a real number, not a str"),
    (dict(scale=True), "softmax_scale=True must be a real number, not a bool"),
    (dict(q_as_list=True), "q must be a tensor"),
    (dict(q=(0, 4, 64), cache=(0, 2, 16, 64), lengths=torch.zeros(0, dtype=torch.int64)), "a batch of 0 sequences"),
    (dict(q=(2, 0, 64)), r"q has 0 query heads \(2, 0, 64\)"),
    (dict(cache_device="meta"), r"decode_attention takes its tensors on one device; got q on .*, k_cache on meta"),
    (dict(lengths=[5]), r"lengths must have shape \(batch,\)=\(2,\), got \(1,\)"),
    (dict(q=(2, 4, 128), every_other_channel=True), "q and the caches .* need a contiguous last dimension"),
])
def test_bad_input_is_a_clear_value_error(change, match):
    q = torch.randn(*change.get("q", (2, 4, 64)), device=DEVICE, dtype=torch.float16)
    if change.get("every_other_channel"):  # 64 channels 2 apart: the kernel reads a head's channels as neighbours
        q = q[..., ::2]
    shape = change.get("cache", (2, 2, 16, 64))
    k = torch.randn(*shape, device=change.get("cache_device", DEVICE), dtype=change.get("cache_dtype", torch.float16))
    v = torch.randn(*change.get("v", shape), device=k.device, dtype=k.dtype)
    with pytest.raises(ValueError, match=match):
        lengths = torch.as_tensor(change.get("lengths", [5, 9]), device=DEVICE)
        decode_attention(q.tolist() if change.get("q_as_list") else q, k, v, lengths, softmax_scale=change.get("scale"))
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("fastest", [4], 1)
    with pytest.raises(ValueError, match="needs the lengths"):
        decode_attention(q, k, v)


@pytest.mark.parametrize("dtype, device, match", [
    (torch.bfloat16, "cpu", r"decode_attention: bfloat16 needs a CUDA GPU; the Triton interpreter cannot compute it "
                            r"\(got q, k_cache, v_cache in bfloat16\)"),
    (torch.float16, "meta", r"decode_attention runs on CUDA devices \(or on the CPU under TRITON_INTERPRET=1, for "
                            r"tests; it is on here\); got tensors on meta"),
])
def test_the_interpreter_refuses_bfloat16_and_tensors_off_the_cpu(dtype, device, match, monkeypatch):
    """Under TRITON_INTERPRET=1 (set here, so that a GPU machine checks it too), bfloat16 would give garbage and a
    meta tensor fail inside the launch."""
    monkeypatch.setattr(runtime, "INTERPRET", True)
    q = torch.randn(2, 4, 64, device=device, dtype=dtype)
    k = torch.randn(2, 2, 16, 64, device=device, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        decode_attention(q, k, k, torch.tensor([5, 9]))


@pytest.mark.parametrize("settings, match", [
    (dict(block_n=24), "block_n=24 must be a power of two >= 16"),
    (dict(block_n=8), "block_n=8 must be a power of two >= 16"),
    (dict(num_programs=0), "num_programs=0 must be an integer >= 1"),
    (dict(kind="split", num_splits=0), "num_splits=0 must be an integer >= 1"),
    (dict(lengths=torch.tensor([5.0, 9.0])), "lengths must be a 1-d integer tensor"),
    (dict(lengths=[5.7, 9.2]), "integer lengths >= 1"),  # not cut to (5, 9), a schedule of the wrong keys
    (dict(lengths=[True]), "integer lengths >= 1"),
    (dict(num_kv_heads=0), "num_kv_heads=0 must be an integer >= 1"),
    (dict(kind="split", num_kv_heads=-2), "num_kv_heads=-2 must be an integer >= 1"),
])
def test_a_bad_schedule_setting_is_a_clear_value_error(settings, match):
    settings = {"kind": "lean", "lengths": [5, 9], "num_kv_heads": 2, **settings}
    with pytest.raises(ValueError, match=match):
        make_schedule(settings.pop("kind"), settings.pop("lengths"), settings.pop("num_kv_heads"), **settings)


@pytest.mark.parametrize("segments, longest, head_dim, slots, splits", [
    (8, 262144, 128, 264, 29),  # the reference's worked example (132 SMs, two programs each): the first >= 0.85
    (32, 262144, 128, 264, 8),  # 256 of 264 slots
    (212, 262144, 128, 264, 1),  # 80% of the slots filled: no split
    (8, 1024, 128, 264, 8),  # 8 blocks: 5-7 splits make the same 2-block chunks as 4, so are not choices
    (8, 1024, 64, 264, 4),  # FA2's 256-key blocks at head_dim 64: 4 blocks
    (8, 262144, 128, 132, 15),  # one program an SM: 120 of 132
    (13, 65536, 128, 264, 18),  # 221/264 against 0.85 x 260/264 ties in float64 and falls short in FA2's float32
])
def test_the_split_schedule_chooses_flash_decodings_split_count(segments, longest, head_dim, slots, splits):
    assert flash_decoding_splits(segments, longest, head_dim, slots) == splits


@pytest.mark.parametrize("block_n, head_dim, dtype, programs", [
    (64, 128, torch.float16, 2),  # 64 KB of pipeline: two (FA2's count), though three would fit
    (128, 128, torch.float16, 1),  # an H200's tiles: 128 KB
    (128, 64, torch.float16, 2),
    (64, 128, torch.float32, 1),
])
def test_split_waves_count_the_programs_an_sm_holds(block_n, head_dim, dtype, programs):
    assert resident_programs(block_n, head_dim, dtype, device="cpu") == programs  # Hopper's 228 KB an SM


def test_a_split_schedule_left_to_choose_takes_flash_decodings_count():
    lengths, kv_heads = [1000, 700], 1
    sms = sm_count(None) if torch.cuda.is_available() else 8  # what make_schedule counts without a GPU
    chosen = flash_decoding_splits(2, 1000, 128, sms * resident_programs(16, 128, torch.float16, device="cpu"))
    sched = make_schedule("split", lengths, kv_heads, block_n=16, device="cpu")
    assert 1 < chosen and sched.num_programs == 2 * chosen


def test_lengths_passed_with_a_prepared_schedule_are_read_once_until_changed(monkeypatch):
    """Reading lengths costs a device sync: a tensor that matched before, unchanged since, is not read again;
    changed in place, it is, and refused if it no longer matches."""
    module = importlib.import_module("effrepro_kernels.decode_attention")
    q = torch.randn(2, 4, 32, device=DEVICE)
    k, v = (torch.randn(2, 2, 40, 32, device=DEVICE) for _ in range(2))
    lengths = torch.tensor([40, 9], device=DEVICE)
    sched = make_schedule("lean", lengths.clone(), 2, head_dim=32, dtype=q.dtype)
    real, reads = module._lengths_on_host, []  # counted from the first call on
    monkeypatch.setattr(module, "_lengths_on_host", lambda lengths: reads.append(1) or real(lengths))
    first = decode_attention(q, k, v, lengths, schedule=sched)
    for _ in range(3):
        assert torch.equal(decode_attention(q, k, v, lengths, schedule=sched), first)
    assert len(reads) == 1
    lengths[1] = 10  # in place: the version counter moves
    with pytest.raises(ValueError, match=r"lengths \(40, 10\) differ from those the schedule was built for"):
        decode_attention(q, k, v, lengths, schedule=sched)
    with torch.inference_mode():  # a decode loop's usual mode: its tensors keep no version counter, so are read
        in_inference, before = torch.tensor([40, 9], device=DEVICE), len(reads)
        for _ in range(2):
            assert torch.equal(decode_attention(q, k, v, in_inference, schedule=sched), first)
        assert len(reads) == before + 2


def test_the_schedules_own_lengths_are_read_only_once_changed_in_place(monkeypatch):
    """A decode loop may pass the schedule's own lengths back, or advance them in place: unchanged, they are not
    read (a device sync); changed, they are, and refused. Built in inference mode (a decode loop's usual mode),
    they keep a version counter all the same."""
    module = importlib.import_module("effrepro_kernels.decode_attention")
    q = torch.randn(2, 4, 32, device=DEVICE)
    k, v = (torch.randn(2, 2, 40, 32, device=DEVICE) for _ in range(2))
    with torch.inference_mode():
        sched = make_schedule("lean", [40, 9], 2, head_dim=32, dtype=q.dtype, device=DEVICE)
        real, reads = module._lengths_on_host, []
        monkeypatch.setattr(module, "_lengths_on_host", lambda lengths: reads.append(1) or real(lengths))
        first = decode_attention(q, k, v, sched.lengths, schedule=sched)
        assert torch.equal(decode_attention(q, k, v, sched.lengths, schedule=sched), first) and not reads
        sched.lengths[1] += 1
        with pytest.raises(ValueError, match=r"lengths \(40, 10\) differ from those the schedule was built for"):
            decode_attention(q, k, v, sched.lengths, schedule=sched)


def test_a_prepared_schedule_checks_each_new_signature_once_and_keeps_its_workspace(monkeypatch):
    module = importlib.import_module("effrepro_kernels.decode_attention")
    real_check, checked = module._check, []

    def counted_check(*args):
        checked.append(args)
        real_check(*args)

    monkeypatch.setattr(module, "_check", counted_check)
    sched = make_schedule("lean", [40, 9], 2, num_programs=5, block_n=16, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    q = torch.randn(2, 4, 32, device=DEVICE, generator=gen)
    k, v = (torch.randn(2, 2, 40, 32, device=DEVICE, generator=gen) for _ in range(2))
    out, lse = decode_attention(q, k, v, schedule=sched, return_lse=True)
    workspace = sched.workspace
    again, _ = decode_attention(q, k.clone(), v.clone(), schedule=sched, return_lse=True)  # same signature
    assert len(checked) == 1 and sched.workspace is workspace and torch.equal(again, out)
    returned = lse.clone()
    decode_attention(-q, k, v, schedule=sched)  # fills the schedule's scratch log-sum-exp
    assert torch.equal(lse, returned)  # a returned lse is the caller's, not that scratch
    with pytest.raises(ValueError, match="dtype"):
        decode_attention(q.half(), k, v, schedule=sched)  # a new signature is checked
    assert len(checked) == 2


def test_a_schedule_lives_where_its_lengths_are_unless_told():
    assert make_schedule("lean", torch.tensor([5, 9], device=DEVICE), 2).work.device.type == DEVICE
    assert make_schedule("lean", [5, 9], 2).work.device.type == "cpu"


@gpu
def test_gpu_a_schedule_built_on_the_cpu_is_copied_once_and_checked_once():
    sched = make_schedule("lean", [40, 9], 2, num_programs=5, block_n=16)  # from a list: on the CPU
    q = torch.randn(2, 4, 32, device=DEVICE)
    k, v = (torch.randn(2, 2, 40, 32, device=DEVICE) for _ in range(2))
    first = decode_attention(q, k, v, schedule=sched)
    on_gpu = sched.to(DEVICE)
    assert on_gpu is sched.to(q.device) and on_gpu.checked_for is not None
    assert torch.equal(decode_attention(q, k, v, schedule=sched), first)


def test_a_schedule_built_for_other_kv_heads_is_refused():
    q = torch.randn(2, 4, 64, device=DEVICE, dtype=torch.float16)
    k, v = (torch.randn(2, 2, 16, 64, device=DEVICE, dtype=torch.float16) for _ in range(2))
    with pytest.raises(ValueError, match="built for 4 KV heads, the cache has 2"):
        decode_attention(q, k, v, schedule=make_schedule("lean", [5, 9], 4))


@gpu
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gpu_long_contexts_bf16(schedule):
    check(4, 32, 8, [65536, 655, 70000, 1], 128, torch.bfloat16, schedule, max_len=70000)


@gpu
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gpu_head_dims_that_are_not_powers_of_two_bf16(schedule):
    for head_dim in (48, 72, 80, 96, 200):
        check(4, 32, 8, [4099, 1, 300, 2048], head_dim, torch.bfloat16, schedule)


@gpu
def test_gpu_in_kernel_merge_is_deterministic_whichever_program_finishes_last():
    # many programs, each head cut into many pieces: the program that merges changes from call to call
    lengths = [4096, 1000, 77, 20000]
    sched = make_schedule("lean", lengths, 8, num_programs=528, device=DEVICE)
    assert sched.max_pieces > 8
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(4, 32, 128, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(4, 8, 20000, 128, device=DEVICE, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    first = decode_attention(q, k, v, schedule=sched)
    for _ in range(50):
        assert torch.equal(decode_attention(q, k, v, schedule=sched), first)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), sched.lengths)
    assert rel_err(first, ref) < TOL[torch.bfloat16]


def test_a_prepared_schedule_takes_every_softmax_scale_as_given():
    """A prepared schedule keeps its compiled kernel (on a GPU): an integer scale must not be compiled into it
    (Triton makes an integer 1 a constant), so each later scale is the one used."""
    sched = make_schedule("lean", [37, 5], 2, head_dim=64, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    q = torch.randn(2, 4, 64, device=DEVICE, dtype=torch.float16, generator=gen)
    k, v = (torch.randn(2, 2, 40, 64, device=DEVICE, dtype=torch.float16, generator=gen) for _ in range(2))
    for scale in (1, 0.05, 2):
        got = decode_attention(q, k, v, schedule=sched, softmax_scale=scale)
        ref = decode_attention_reference(q.double(), k.double(), v.double(), sched.lengths, softmax_scale=scale)
        assert rel_err(got, ref) < TOL[torch.float16], scale


def test_next_pow2_is_the_smallest_power_of_two_not_below_n_and_refuses_n_below_1():
    assert [runtime.next_pow2(n) for n in (1, 2, 3, 16, 17)] == [1, 2, 4, 16, 32]
    for n in (0, -3):
        with pytest.raises(ValueError, match=f"next_pow2 takes n >= 1, got {n}"):
            runtime.next_pow2(n)


def test_kept_launches_are_per_signature_and_bounded(monkeypatch):
    runtime = importlib.import_module("effrepro_kernels.runtime")
    monkeypatch.setattr(runtime, "FAST_LAUNCH", True)
    kept = runtime.KeptLaunches()
    monkeypatch.setattr(kept, "MAX_SIGNATURES", 2)
    memory = torch.zeros(9, dtype=torch.float16)
    x = memory[:8]
    first = kept((x,), True)
    assert kept((x.clone(),), True) is first  # same shape, strides, dtype, device, alignment
    assert kept((memory[1:],), True) is not first  # the same shape 2 bytes in: not 16-byte aligned
    assert kept((x,), False) is not first
    assert len(kept.by_call) == 2 and kept((x,), True) is not first  # the oldest went for the newest


def test_a_kept_launch_passes_every_parameter_in_order_and_only_for_the_owner(monkeypatch):
    runtime = importlib.import_module("effrepro_kernels.runtime")
    monkeypatch.setattr(runtime, "FAST_LAUNCH", True)
    calls = []

    class Compiled:  # stands for Triton's compiled kernel: indexed by the grid, called with every parameter
        def __getitem__(self, grid):
            return lambda *args: calls.append(("kept", grid, args))

    class Kernel:  # stands for a @triton.jit function
        arg_names = ["X", "n", "BLOCK", "MODE"]

        def __getitem__(self, grid):
            return lambda *args, **meta: calls.append(("jit", grid, args, meta)) or Compiled()

    kept, meta = {}, dict(MODE="a", BLOCK=16, num_warps=4)
    for _ in range(2):
        runtime.launch(Kernel(), (3,), ("x", 5), meta, kept, "k")
    runtime.launch(Kernel(), (3,), ("x", 5), meta)  # no owner: always through the JIT
    assert calls == [("jit", (3,), ("x", 5), meta), ("kept", (3, 1, 1), ("x", 5, 16, "a")),
                     ("jit", (3,), ("x", 5), meta)]

    class Tuned(Kernel):  # stands for an autotuned one: its chosen config's values are parameters too
        best_config = triton.Config({"BLOCK": 64})

    calls.clear()
    kept, grid = {}, lambda m: (100 // m["BLOCK"], 2)
    for mode in ("b", "b", "c"):  # another constexpr under the same name: through the JIT, never the kept kernel
        runtime.launch(Tuned(), grid, ("x", 5), dict(MODE=mode), kept, "k")
    assert calls == [("jit", grid, ("x", 5), dict(MODE="b")), ("kept", (1, 2, 1), ("x", 5, 64, "b")),
                     ("jit", grid, ("x", 5), dict(MODE="c"))]
