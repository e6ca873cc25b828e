"""The Triton FlashAttention kernel against the float64 reference: outputs and gradients, on fresh random inputs,
odd sizes, causal with unequal lengths, grouped heads, padding, dropout and block sparsity. On the CPU the kernels
run in Triton's interpreter (fp16 and fp32, small shapes); on a GPU bf16 and larger shapes too, each case through the
tl kernels and through the Gluon ones where they cover it (`run_both`)."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ATTENTION_TOL as TOL, DEVICE, ROOT, gpu, has_gpu, rel_err
from effrepro_kernels import (BlockSparseLayout, attention_reference, block_mask_to_dense, butterfly_block_mask,
                              dropout_keep_mask, flash_attn, flash_attn_qkvpacked, random_block_mask)
from effrepro_kernels.reference import dropout_keep_mask_reference

flash_attn_module = importlib.import_module("effrepro_kernels.flash_attn")  # the package's `flash_attn` is the function
flash_attn_gluon = importlib.import_module("effrepro_kernels.flash_attn_gluon")
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if has_gpu() else [])


def run_both(b, h, hk, n_q, n_k, d, dtype, *, causal=False, kpm=None, dropout_p=0.0, block_mask=None,
             block_size=128, seed=1234, forward_kernel=None, backward_kernel=None, data_seed=0, softmax_scale=None):
    """flash_attn's output and gradients against the float64 reference, on fresh random inputs. Without a
    kernel named, on a GPU, both paths: the tl kernels, then Gluon's wherever they cover the call
    (EFFREPRO_GLUON=1; the tl ones elsewhere and off Hopper). Returns the last output and the reference."""
    gen = torch.Generator(device=DEVICE).manual_seed(hash((b, h, hk, n_q, n_k, d, causal, data_seed)) % 2**31)
    make = lambda heads, n: torch.randn(b, heads, n, d, device=DEVICE, dtype=dtype, generator=gen)  # noqa: E731
    q, k, v = make(h, n_q), make(hk, n_k), make(hk, n_k)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    keep = dropout_keep_mask_reference(seed, b, h, n_q, n_k, dropout_p, DEVICE) if dropout_p else None
    dense = block_mask_to_dense(block_mask, n_q, n_k, block_size) if block_mask is not None else None
    ref = attention_reference(q64, k64, v64, causal=causal, key_padding_mask=kpm, attn_mask=dense,
                              dropout_p=dropout_p, dropout_mask=keep, softmax_scale=softmax_scale)
    dout = torch.randn(ref.shape, device=DEVICE, dtype=torch.float64, generator=gen)
    ref.backward(dout)
    if forward_kernel or backward_kernel:
        paths = [(forward_kernel or "auto", backward_kernel or "auto", flash_attn_module.GLUON)]
    else:
        paths = [("tl", "tl", None)] + ([("auto", "auto", "1")] if DEVICE == "cuda" else [])
    tol = TOL[dtype]
    for forward_choice, backward_choice, gluon_setting in paths:
        for t in (q, k, v):
            t.grad = None
            t.requires_grad_()
        saved, flash_attn_module.GLUON = flash_attn_module.GLUON, gluon_setting
        try:
            out = flash_attn(q, k, v, causal=causal, key_padding_mask=kpm, dropout_p=dropout_p, block_mask=block_mask,
                             block_size=block_size, seed=seed, forward_kernel=forward_choice,
                             backward_kernel=backward_choice, softmax_scale=softmax_scale)
            out.backward(dout.to(dtype))
        finally:
            flash_attn_module.GLUON = saved
        path = f"{forward_choice}/{backward_choice} EFFREPRO_GLUON={gluon_setting}"
        assert not out.isnan().any(), path
        assert rel_err(out, ref) < tol, (path, rel_err(out, ref))
        for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
            assert not got.isnan().any(), (path, name)
            assert rel_err(got, want) < 2 * tol, (path, name, rel_err(got, want))
    return out, ref


SHAPES = [  # batch, heads, kv heads, seq_q, seq_k, head_dim, causal
    (1, 2, 2, 37, 37, 32, False),
    (2, 2, 2, 37, 37, 64, True),
    (1, 4, 1, 20, 45, 16, True),    # multi-query, fewer queries than keys
    (1, 4, 2, 45, 20, 128, True),   # grouped-query; more queries than keys: the first rows see nothing
    (2, 2, 2, 1, 33, 80, False),    # one query; a head dim that is not a power of two
    (1, 2, 1, 40, 70, 256, True),   # the largest head dim
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    *dims, causal = shape
    if dtype == torch.float32 and DEVICE == "cuda" and dims[-1] > 64:
        pytest.skip("float32 on a GPU takes head_dim <= 64")
    run_both(*dims, dtype, causal=causal)


@pytest.mark.parametrize("head_dim, dropout_p", [(32, 0.17), (64, 0.0)])  # 64 without dropout: Gluon's too
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padding_dropout_and_a_fully_masked_sequence(dtype, head_dim, dropout_p):
    kpm = torch.rand(3, 41, device=DEVICE) > 0.3
    kpm[1] = False  # every key of sequence 1 is padding: its rows must be zeros, with zero gradients
    out, _ = run_both(3, 2, 2, 29, 41, head_dim, dtype, kpm=kpm, dropout_p=dropout_p)
    assert (out[1] == 0).all()


@pytest.mark.parametrize("causal, block", [(False, 32), (True, 32), (False, 16)])  # 16: below every config's tiles
def test_block_sparse_matches_a_masked_reference(causal, block):
    n = 70 * block // 32
    mask = butterfly_block_mask(3, 3, device=DEVICE).repeat(2, 1, 1, 1)
    mask[1, :, 2, :] = False  # a query block with no key block at all
    run_both(2, 2, 1, n, n, 32, torch.float16, causal=causal, block_mask=mask, block_size=block)


@pytest.mark.parametrize("causal, dropout_p", [(True, 0.0), (False, 0.2), (True, 0.2)])
def test_block_sparse_blocks_of_several_tiles_with_a_layout_per_batch_and_head(causal, dropout_p):
    """64-query blocks span several tiles of the interpreter's (and some GPU configs'); a mask that differs by
    batch and head shows a kernel reading another head's block list, in the grouped-query dK/dV loop too."""
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    mask = torch.rand(2, 4, 2, 3, generator=gen, device=DEVICE) < 0.6
    mask[0, 1, 0] = False  # a query block with no key block
    mask[1, 3, 1] = True
    run_both(2, 4, 2, 100, 150, 32, torch.float16, causal=causal, dropout_p=dropout_p, block_mask=mask,
             block_size=64)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_a_softmax_scale_of_the_callers_and_causal_with_left_padding(dropout_p):
    """A scale other than 1/sqrt(head_dim) in the forward and the backward; left padding, with causal, leaves the
    first rows of a tile that see no key."""
    kpm = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    kpm[0, :23] = False
    run_both(2, 2, 2, 40, 40, 32, torch.float16, causal=True, kpm=kpm, dropout_p=dropout_p, softmax_scale=0.37)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["causal_padding_gqa", "dropout_mqa_causal", "sparse_padding_causal"])
def test_features_combined_with_causal_grouped_heads_and_unequal_lengths(case, dtype):
    kpm = torch.rand(2, 41, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(3)) > 0.3
    if case == "causal_padding_gqa":
        run_both(2, 4, 2, 29, 41, 64, dtype, causal=True, kpm=kpm)
    elif case == "dropout_mqa_causal":
        run_both(2, 4, 1, 45, 30, 32, dtype, causal=True, dropout_p=0.2)
    else:
        mask = butterfly_block_mask(2, 3, device=DEVICE)  # query block 1 skips key block 2
        run_both(2, 2, 1, 29, 41, 32, dtype, causal=True, kpm=kpm, block_mask=mask, block_size=16)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_repeated_calls_of_one_signature_stay_exact(dropout_p):
    """From the second call of a signature on, a GPU launches the compiled kernels it kept (runtime.launch): new
    inputs and new dropout seeds must still give the reference's results, through the tl kernels and, on Hopper,
    Gluon's (without dropout, which they lack)."""
    for data_seed in range(3):
        run_both(2, 2, 2, 70, 70, 64, torch.float16, causal=True, dropout_p=dropout_p, seed=100 + data_seed,
                 data_seed=data_seed)
    if has_gpu():
        kept = [set(launches) for launches in flash_attn_module._kept.by_call.values()]
        assert {"forward"} in kept and {"delta", "dkdv", "dq"} in kept, kept
        like_the_inputs = [torch.empty(2, 2, 70, 64, device=DEVICE, dtype=torch.float16) for _ in range(3)]
        if not dropout_p and flash_attn_gluon.refusal(*like_the_inputs) is None:
            kept = [set(launches) for launches in flash_attn_gluon._kept.by_call.values()]
            assert {"forward"} in kept and {"dkdv", "dq"} in kept, kept


def test_a_misaligned_view_of_the_same_shape_gets_its_own_kernel():
    """Triton specialises pointers on 16-byte alignment: a kept launch compiled for aligned inputs must not run on
    inputs of the same shapes and strides that are views 2 bytes into their memory (their own signature)."""
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    shape, n = (1, 2, 33, 64), 2 * 33 * 64
    for offset in (0, 1, 0):  # aligned, misaligned, aligned again
        q, k, v = (torch.randn(n + 1, device=DEVICE, dtype=torch.float16, generator=gen)[offset:offset + n]
                   .view(shape) for _ in range(3))
        ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
        assert rel_err(flash_attn(q, k, v, causal=True), ref) < TOL[torch.float16], offset


def test_layouts_and_lse():
    q, k, v = (torch.randn(2, 19, 3, 32, device=DEVICE, dtype=torch.float16, requires_grad=True) for _ in range(3))
    out, lse = flash_attn(q, k, v, layout="bshd", causal=True, return_lse=True)
    q64, k64, v64 = (t.detach().double().transpose(1, 2).requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=True)
    assert rel_err(out.transpose(1, 2), ref) < TOL[torch.float16]
    dout = torch.randn_like(ref)
    out.backward(dout.transpose(1, 2).to(out.dtype))
    ref.backward(dout)
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_err(got.transpose(1, 2), want) < 2 * TOL[torch.float16]
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 32**0.5
    s = s.masked_fill(~torch.ones(19, 19, dtype=torch.bool, device=DEVICE).tril(), float("-inf"))
    torch.testing.assert_close(lse, s.logsumexp(-1).float(), rtol=1e-3, atol=1e-3)


def test_bshd_layout_takes_unequal_lengths_grouped_heads_and_masks():
    """Its shapes are read as (batch, seq, heads, head_dim): lengths, head counts and masks checked as such."""
    b, h, hk, n_q, n_k, d = 2, 4, 2, 20, 45, 32
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    q, k, v = (torch.randn(b, n, heads, d, device=DEVICE, dtype=torch.float16, generator=gen, requires_grad=True)
               for heads, n in ((h, n_q), (hk, n_k), (hk, n_k)))
    kpm = torch.ones(b, n_k, dtype=torch.bool, device=DEVICE)
    kpm[1, 12:] = False  # with causal, batch 1's first rows see no key
    block_mask = torch.rand(1, h, 2, 3, generator=gen, device=DEVICE) < 0.7
    q64, k64, v64 = (t.detach().double().transpose(1, 2).requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=True, key_padding_mask=kpm,
                              attn_mask=block_mask_to_dense(block_mask, n_q, n_k, 16))
    out = flash_attn(q, k, v, layout="bshd", causal=True, key_padding_mask=kpm, block_mask=block_mask, block_size=16)
    assert rel_err(out.transpose(1, 2), ref) < TOL[torch.float16]
    dout = torch.randn(ref.shape, device=DEVICE, dtype=torch.float64, generator=gen)
    ref.backward(dout)
    out.backward(dout.transpose(1, 2).to(out.dtype))
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_err(got.transpose(1, 2), want) < 2 * TOL[torch.float16]
    three_heads = torch.randn(b, n_q, 3, d, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="q's 3 heads are not a multiple of k's 2"):
        flash_attn(three_heads, k.detach(), v.detach(), layout="bshd")
    with pytest.raises(ValueError, match=r"key_padding_mask must be bool of shape \(batch, seq_k\)=\(2, 45\)"):
        flash_attn(q.detach(), k.detach(), v.detach(), layout="bshd", key_padding_mask=kpm[:, :hk])


def test_a_row_that_sees_no_key_has_a_log_sum_exp_of_minus_infinity_and_merges_as_no_keys():
    from effrepro_kernels import merge_attention

    q, k, v = _qkv(2, 2, 20, 32)
    q = q[:, :, :7]
    kpm = torch.ones(2, 20, dtype=torch.bool, device=DEVICE)
    kpm[1, :10] = False  # batch 1: no key in the first half
    full = flash_attn(q, k, v, key_padding_mask=kpm)
    parts = [flash_attn(q, k[:, :, s], v[:, :, s], key_padding_mask=kpm[:, s], return_lse=True)
             for s in (slice(0, 10), slice(10, 20))]
    assert (parts[0][1][1] == float("-inf")).all() and not parts[0][0][1].any()
    merged, _ = merge_attention(*zip(*parts))
    assert rel_err(merged, full) < TOL[torch.float16]
    _, lse = flash_attn(q, k, v, return_lse=True, key_padding_mask=torch.zeros_like(kpm))
    assert (lse == float("-inf")).all()  # every key padded
    _, lse = flash_attn(q, k[:, :, :4], v[:, :, :4], causal=True, return_lse=True)
    assert (lse[:, :, :3] == float("-inf")).all() and lse[:, :, 3:].isfinite().all()  # 7 queries, 4 keys


@pytest.mark.parametrize("q_shape, kv_shape", [((1, 2, 0, 32), (1, 2, 5, 32)), ((1, 2, 4, 32), (1, 2, 0, 32)),
                                             ((0, 2, 4, 32), (0, 2, 4, 32))], ids=["no query", "no key", "no batch"])
def test_empty_inputs_give_empty_or_zero_outputs_and_gradients(q_shape, kv_shape):
    q = torch.randn(q_shape, device=DEVICE, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(kv_shape, device=DEVICE, dtype=torch.float16, requires_grad=True) for _ in range(2))
    out = flash_attn(q, k, v)
    out.backward(torch.randn_like(out))
    assert out.shape == q_shape and not out.any()  # no key: every row sees nothing
    assert q.grad.shape == q_shape and k.grad.shape == kv_shape and not q.grad.any() and not k.grad.any()


def test_dropout_is_reproducible_from_its_seed_and_backward_is_deterministic():
    q, k, v = (torch.randn(1, 2, 40, 32, device=DEVICE, dtype=torch.float16, requires_grad=True) for _ in range(3))
    outs, grads = [], []
    for seed in (7, 7, 8):
        out = flash_attn(q, k, v, dropout_p=0.3, seed=seed)
        outs.append(out)
        grads.append(torch.autograd.grad(out.sum(), (q, k, v)))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1]))
    keep = dropout_keep_mask(7, 1, 2, 170, 170, 0.3, DEVICE)  # 58k draws: 0.01 is 5 standard deviations
    assert abs(keep.float().mean().item() - 0.7) < 0.01


@pytest.mark.parametrize("seed, b, h, n_q, n_k, p", [(7, 1, 2, 37, 45, 0.3), (1234, 2, 3, 33, 17, 0.1),
                                                     (2**31 - 1, 1, 1, 70, 5, 0.5)])
def test_the_kernels_dropout_mask_is_the_one_their_stated_philox_layout_gives(seed, b, h, n_q, n_k, p):
    """The kernels' mask against one written in plain torch from the layout `_keep` states (the reference the
    dropout tests above compare with), so a fault in the counters, the key or the columns' order shows."""
    got = dropout_keep_mask(seed, b, h, n_q, n_k, p, DEVICE)
    assert torch.equal(got, dropout_keep_mask_reference(seed, b, h, n_q, n_k, p, DEVICE))


def test_random_block_mask_has_the_asked_density_and_its_diagonal():
    mask = random_block_mask(16, 16, 0.25, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (1, 1, 16, 16) and (mask.sum(-1) == 4).all() and mask[0, 0].diagonal().all()
    with pytest.raises(ValueError, match="density"):
        random_block_mask(4, 4, 0.0)
    # more query blocks than key blocks: the rows past the last key block keep it as their diagonal
    assert random_block_mask(4, 2, 0.5)[0, 0].tolist() == [[True, False], [False, True], [False, True], [False, True]]
    for counts, name in (((2, 0), "n_k_blocks=0"), ((0, 2), "n_q_blocks=0"), ((2.0, 2), "n_q_blocks=2.0")):
        for make in (lambda: random_block_mask(*counts, 0.5), lambda: butterfly_block_mask(*counts)):
            with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
                make()


def test_pruning_keeps_tiles_within_the_mask_blocks_and_the_shared_memory():
    import triton

    module = flash_attn_module
    configs = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_stages=3),
               triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_stages=3)]
    args = dict(Q=torch.empty(0, dtype=torch.bfloat16), BLOCK_D=128, DROPOUT=False)  # no GPU: Hopper's 227 KB
    first = configs if module.AUTOTUNE else configs[:1]
    assert module._prune_forward(configs, args, SPARSE_BLOCK=64) == configs[1:]
    assert module._prune_forward(configs, args, SPARSE_BLOCK=0) == first
    (small,) = module._prune_forward(configs, args, SPARSE_BLOCK=32)
    assert small.kwargs == {"BLOCK_M": 32, "BLOCK_N": 32}
    # head_dim 256: 128-row query tiles' K and V buffers (3 x 2 x 64 x 256 x 2 bytes, and Q's 64 KB) pass 227 KB
    assert module._prune_forward(configs, {**args, "BLOCK_D": 256}, SPARSE_BLOCK=0) == configs[1:]
    # with dropout, its (64 x 64)-byte keep-mask takes the 64-row tiles' three stages past it too
    (fallback,) = module._prune_forward(configs, {**args, "BLOCK_D": 256, "DROPOUT": True}, SPARSE_BLOCK=0)
    assert fallback.kwargs == configs[1].kwargs and fallback.num_stages == 1
    # where none fits, the smallest in one stage
    (alone,) = module._prune_forward(configs, {**args, "BLOCK_D": 512}, SPARSE_BLOCK=0)
    assert alone.kwargs == configs[1].kwargs and alone.num_stages == 1


def test_every_kept_config_fits_hoppers_shared_memory_as_estimated():
    """The tl kernels compiled for sm_90 (flash_attn_offline.py) in each config the pruning keeps at head_dim 128
    and 256 with 128-key sparse blocks, and at 256 with dropout: what each takes is within the estimate the pruning
    went by, and so within Hopper's 227 KB (a block-sparse backward once took 258 KB there: its pipeline held whole
    sparse blocks; with dropout every kernel's first config at 256 took 228 KB, its keep-mask unestimated)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "flash_attn_offline.py")], cwd=ROOT,
                          env={**env, "EFFREPRO_AUTOTUNE": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert {name.split()[0] for name in report} == {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"}
    assert {name.split()[2] for name in report} == {"sparse", "dropout"}
    assert any(name.startswith("_attn_fwd d=256") for name in report)
    for name, found in report.items():
        assert found["shared"] <= found["estimate"] <= 227 * 1024, (name, found)


@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_256_dense_and_block_sparse(causal):
    """head_dim 256 on a GPU, untuned (the tests' first fitting config), dense, with dropout (whose keep-mask took
    the first configs past Hopper's shared memory) and with 128-key sparse blocks."""
    run_both(1, 2, 1, 300, 700, 256, torch.bfloat16, causal=causal)
    run_both(1, 2, 1, 300, 700, 256, torch.bfloat16, causal=causal, dropout_p=0.1)
    mask = random_block_mask(3, 6, 0.5, device=DEVICE)
    run_both(1, 2, 1, 300, 700, 256, torch.bfloat16, causal=causal, block_mask=mask, block_size=128)


def _qkv(*shape, dtype=torch.float16):
    return [torch.randn(*shape, device=DEVICE, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("call, match", [
    (lambda: flash_attn(*_qkv(1, 2, 8, 32, dtype=torch.float64)), "dtype=torch.float64"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 8)), "head_dim=8"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 512)), "head_dim=512"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 32)[:2], torch.randn(1, 2, 9, 32, device=DEVICE, dtype=torch.float16)),
     "same shape"),
    (lambda: flash_attn(torch.randn(1, 3, 8, 32, device=DEVICE, dtype=torch.float16), *_qkv(1, 2, 8, 32)[1:]),
     "multiple"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 32), key_padding_mask=torch.ones(1, 9, dtype=torch.bool, device=DEVICE)),
     "key_padding_mask"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 32), key_padding_mask=torch.ones(1, 8, dtype=torch.bool, device="meta")),
     "key_padding_mask must be bool of shape .* on"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 32), block_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool, device=DEVICE)),
     "block_mask"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 32), block_mask=torch.zeros(1, 1, 1, 1, device=DEVICE)),  # additive: 0 = keep
     "block_mask must be a bool tensor"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 32), block_mask=[[[[True]]]]), "block_mask must be a bool tensor"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 32), block_mask=BlockSparseLayout(
        torch.ones(1, 1, 1, 1, dtype=torch.bool, device=DEVICE), 1, 4, 16)), "prepared for batch 1 and 4 heads"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 32), dropout_p=1.0), "dropout_p"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 32), layout="sbhd"), "layout"),
    (lambda: flash_attn(*_qkv(2, 8, 32)), "4-d"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 32), softmax_scale=-0.1), "softmax_scale"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 32), softmax_scale=float("inf")), "softmax_scale=inf must be a positive finite"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 32), softmax_scale="0.1"),
     "softmax_scale='0.1' must be a real number, not a str"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 32), dropout_p=None), "dropout_p=None must be a real number, not a NoneType"),
    (lambda: flash_attn_qkvpacked(torch.randn(1, 8, 3, 2, 32, device=DEVICE, dtype=torch.float16), dropout_p=True),
     "dropout_p=True must be a real number, not a bool"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 32)[:1], *_qkv(1, 0, 8, 32)[1:]), "not a multiple of k's 0"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 32), dropout_p=0.1, seed=1.5), r"seed=1.5 must be an integer"),
    (lambda: flash_attn(*_qkv(1, 2, 8, 32), dropout_p=0.1, seed=2**31),
     r"seed=2147483648 must be in \[0, 2\*\*31\)"),
    (lambda: flash_attn(*_qkv(32768, 2, 1, 16)), r"batch \* heads = 32768 \* 2 = 65536 is more than the kernels launch"),
])
def test_bad_input_is_a_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_the_interpreter_refuses_bfloat16_and_takes_meta_tensors_for_shapes_alone(monkeypatch):
    """Under TRITON_INTERPRET=1 (set here, so that a GPU machine checks it too), bfloat16 would give garbage;
    meta tensors take the operator's fake version, which computes nothing."""
    monkeypatch.setattr(importlib.import_module("effrepro_kernels.runtime"), "INTERPRET", True)
    q = torch.randn(1, 2, 8, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"flash_attn: bfloat16 needs a CUDA GPU; the Triton interpreter cannot "
                                         r"compute it \(got q, k, v in bfloat16\)"):
        flash_attn(q, q, q)
    assert flash_attn(*(q.to("meta"),) * 3).is_meta


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 8, 8, 1000, 1000, 128, False), (1, 8, 2, 777, 2049, 64, True),
                                   (2, 4, 4, 4096, 4096, 128, True), (1, 4, 4, 513, 300, 32, True)], ids=str)
def test_gpu_large_shapes(shape, dtype):
    *dims, causal = shape
    run_both(*dims, dtype, causal=causal)


@gpu
def test_gpu_block_sparse_and_dropout_at_scale():
    n = 1000
    mask = random_block_mask(8, 8, 0.4, device=DEVICE)
    run_both(2, 4, 4, n, n, 64, torch.bfloat16, block_mask=mask, dropout_p=0.1)


@pytest.mark.parametrize("uses_output", [True, False])
def test_gradients_flow_through_the_log_sum_exp(uses_output):
    """A loss of the returned LSE (alone, or with the output) differentiates through it: d lse / d logit = p."""
    gen = torch.Generator(device=DEVICE).manual_seed(31)
    q = torch.randn(2, 4, 13, 32, device=DEVICE, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 29, 32, device=DEVICE, generator=gen, requires_grad=True) for _ in range(2))
    weight = torch.randn(2, 4, 13, device=DEVICE, generator=gen)

    def loss(out, lse):
        return (lse * weight).sum() + (out.square().sum() if uses_output else 0)
    out, lse = flash_attn(q, k, v, causal=True, return_lse=True)
    got = torch.autograd.grad(loss(out, lse), (q, k, v) if uses_output else (q, k))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = q64 @ k64.repeat_interleave(2, dim=1).transpose(-1, -2) * 32 ** -0.5
    scores = scores.masked_fill(torch.ones(13, 29, dtype=torch.bool, device=DEVICE).tril(29 - 13).logical_not(),
                                float("-inf"))
    out64 = attention_reference(q64, k64, v64, causal=True)
    want = torch.autograd.grad(loss(out64, scores.logsumexp(-1)), (q64, k64, v64) if uses_output else (q64, k64))
    for g, w in zip(got, want):
        assert rel_err(g, w) < 2 * TOL[torch.float32]


def test_views_of_a_fused_projection_get_correct_gradients():
    """q, k, v split from one (batch, seq, 3·hidden) tensor are strided views with gaps, as in GPT-2. The output
    is laid out in (batch, seq, heads, head_dim) memory like them, so a transformers model's transpose back is
    free, and so are the gradients the backward returns."""
    x = torch.randn(2, 21, 3 * 64, device=DEVICE, dtype=torch.float32, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    dout = torch.randn(2, 2, 21, 32, device=DEVICE, dtype=torch.float64)  # random: a wrong stride would show
    outs = []
    for src, attend in ((x, lambda q, k, v: flash_attn(q, k, v, causal=True)),
                        (x64, lambda q, k, v: attention_reference(q, k, v, causal=True))):
        q, k, v = (t.view(2, 21, 2, 32).transpose(1, 2) for t in src.split(64, dim=2))
        out = attend(q, k, v)
        if src is x:
            assert out.transpose(1, 2).is_contiguous()
            torch.library.opcheck(torch.ops.effrepro.flash_attn.default,
                                  (q, k, v, None, [], [], 0, True, 0.2, 0.0, 0, "tl", "tl"),
                                  test_utils=("test_faketensor",))
            lse = torch.zeros(2, 2, 21, device=DEVICE)
            grads = torch.ops.effrepro.flash_attn_backward(out, None, q, k, v, out, lse, None, [], [], 0, True, 1.0,
                                                           0.0, 0, "tl")
            assert all(g.transpose(1, 2).is_contiguous() for g in grads)
        out.backward(dout.to(out.dtype))
        outs.append(out)
    assert rel_err(outs[0], outs[1]) < TOL[torch.float32]
    assert rel_err(x.grad, x64.grad) < 2 * TOL[torch.float32]


def test_an_output_laid_out_like_a_broadcast_input_keeps_its_last_dimension_contiguous():
    dense_like = flash_attn_module._dense_like
    k = torch.randn(2, 1, 21, 32).expand(2, 4, 21, 32)  # stride 0 over heads
    out = dense_like(k)
    assert out.shape == k.shape and out.stride(-1) == 1 and out.is_contiguous()
    view = torch.randn(2, 21, 3 * 64)[..., 64:128].view(2, 21, 2, 32).transpose(1, 2)  # GPT-2's k
    assert dense_like(view).transpose(1, 2).is_contiguous()


def test_the_kernels_are_pytorch_operators_that_torch_compile_traces_without_a_graph_break():
    """Registered with torch.library: schema and shapes-only (fake) versions pass PyTorch's own checks, and a
    compiled function that calls flash_attn forward and backward (its autograd.Function) is one graph."""
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    q, k, v = (torch.randn(1, 2, 24, 32, device=DEVICE, dtype=torch.float32, generator=gen, requires_grad=True)
               for _ in range(3))
    mask = torch.ones(1, 24, dtype=torch.bool, device=DEVICE)
    mask[0, 20:] = False
    torch.library.opcheck(torch.ops.effrepro.flash_attn.default, (q, k, v, mask, [], [], 0, True, 0.2, 0.0, 0, "tl",
                                                                  "tl"), test_utils=("test_schema", "test_faketensor"))

    def loss(q, k, v):
        return flash_attn(q, k, v, causal=True, key_padding_mask=mask).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    expected = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_packed_qkv_with_dropout_and_a_scale_of_the_callers_keeps_both_in_the_backward():
    """flash_attn_qkvpacked with dropout, as GPT-2 trains with it, and a scale of its own (a layer's scaling):
    output and gradient against the reference under the mask the seed gives (the packed operator saves its own
    settings for the backward, apart from flash_attn's)."""
    gen = torch.Generator(device=DEVICE).manual_seed(43)
    x = torch.randn(2, 29, 3 * 2 * 32, device=DEVICE, generator=gen, requires_grad=True)
    out = flash_attn_qkvpacked(x.view(2, 29, 3, 2, 32), causal=True, softmax_scale=0.3, dropout_p=0.2, seed=77)
    dout = torch.randn(out.shape, device=DEVICE, generator=gen)
    out.backward(dout)
    x64 = x.detach().double().requires_grad_()
    q, k, v = (t.view(2, 29, 2, 32).transpose(1, 2) for t in x64.split(64, dim=2))
    keep = dropout_keep_mask_reference(77, 2, 2, 29, 29, 0.2, DEVICE)
    want = attention_reference(q, k, v, causal=True, softmax_scale=0.3, dropout_p=0.2,
                               dropout_mask=keep).transpose(1, 2)
    want.backward(dout.double())
    assert rel_err(out, want) < TOL[torch.float32] and rel_err(x.grad, x64.grad) < 2 * TOL[torch.float32]


@pytest.mark.parametrize("padded", [False, True])
def test_packed_qkv_gives_its_gradient_whole_and_exact(padded):
    """flash_attn_qkvpacked: q, k and v in one (batch, seq, 3, heads, head_dim) tensor, as GPT-2's c_attn gives
    them; against the fp64 reference, with key padding (a sequence that sees no key too), and inside
    torch.compile, whose backward graph has the packed operator and concatenates nothing (nor makes zeros)."""
    gen = torch.Generator(device=DEVICE).manual_seed(41)
    x = torch.randn(3, 37, 3 * 2 * 32, device=DEVICE, generator=gen, requires_grad=True)  # a projection's output
    mask = None
    if padded:
        mask = torch.ones(3, 37, dtype=torch.bool, device=DEVICE)
        mask[1, 30:] = False
        mask[2] = False

    def attend(x):
        return flash_attn_qkvpacked(x.view(3, 37, 3, 2, 32), causal=not padded, key_padding_mask=mask)
    out = attend(x)
    assert out.shape == (3, 37, 2, 32)
    out.square().sum().backward()
    x64 = x.detach().double().requires_grad_()
    q, k, v = (t.view(3, 37, 2, 32).transpose(1, 2) for t in x64.split(64, dim=2))
    want = attention_reference(q, k, v, causal=not padded, key_padding_mask=mask).transpose(1, 2)
    want.square().sum().backward()
    assert rel_err(out, want) < TOL[torch.float32] and rel_err(x.grad, x64.grad) < 2 * TOL[torch.float32]
    targets = []

    def backend(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._functorch.aot_autograd import aot_module_simplified

        def record(graph, _):
            targets.extend(str(n.target) for n in graph.graph.nodes if n.op == "call_function")
            return make_boxed_func(graph.forward)
        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)
    grad = torch.autograd.grad(torch.compile(attend, fullgraph=True, backend=backend)(x).square().sum(), x)[0]
    torch.testing.assert_close(grad, x.grad)
    assert "effrepro.flash_attn_backward_packed.default" in targets and not any("cat" in t for t in targets)
    assert "aten.zeros.default" not in targets  # the unused LSE's gradient is None, not zeros made and read
