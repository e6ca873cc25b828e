"""The Gluon forward and backward for Hopper (flash_attn_gluon.py) against the float64 reference, alone and inside
flash_attn. Gluon does not run in Triton's interpreter: without a Hopper GPU, the dispatch's refusals (and their
reasons) and choices are tested, and the kernels are compiled for sm_90 (gluon_offline.py)."""
import functools
import importlib
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
import triton

from conftest import DEVICE, ROOT, has_gpu, rel_err
from effrepro_kernels import (BlockSparseLayout, attention_reference, block_mask_to_dense, flash_attn, flash_attn_gluon,
                              random_block_mask)
from effrepro_kernels.flash_attn_gluon import CANDIDATES, backward, config_name, forward, refusal
from test_flash_attn import run_both

LOG2E = 1.4426950408889634
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}


def on_hopper() -> bool:
    if not has_gpu() or torch.cuda.get_device_capability()[0] != 9:
        return False
    x = torch.zeros(1, 1, 1, 64, device="cuda", dtype=torch.float16)
    return refusal(x, x, x) is None


hopper = pytest.mark.skipif(not on_hopper(), reason="needs a Hopper GPU and a Triton whose Gluon this kernel knows")


def test_the_gluon_path_refuses_what_it_does_not_cover_and_says_why():
    q = torch.randn(1, 4, 8, 64, device=DEVICE, dtype=torch.float16)
    narrow = q[..., :48].contiguous()
    for (q_, k_, v_), reason in [((q.float(), q.float(), q.float()), "dtypes torch.float32"),
                                 ((q, q.bfloat16(), q), "dtypes torch.float16, torch.bfloat16"),
                                 ((narrow, narrow, narrow), "head_dim 48"),
                                 ((q, q[:, :3].contiguous(), q[:, :3].contiguous()), "kv_heads dividing heads"),
                                 ((q, q, q[:, :2].contiguous()), "k and v alike"),
                                 ((q.transpose(1, 2),) * 3, "must be contiguous"),
                                 ((q[:, :, :0],) * 3, "an empty input")]:
        assert reason in refusal(q_, k_, v_)
    if DEVICE == "cpu":
        assert refusal(q, q, q) == "Gluon does not run under TRITON_INTERPRET=1" or \
            refusal(q, q, q).startswith(f"Triton {triton.__version__} has no Gluon that this kernel knows")
    with pytest.raises(ValueError, match="forward_kernel='gluon' does not cover this call: dropout"):
        flash_attn(q, q, q, dropout_p=0.1, forward_kernel="gluon")
    with pytest.raises(ValueError, match="backward_kernel='gluon' does not cover this call: dropout"):
        x = q.clone().requires_grad_()
        flash_attn(x, x, x, dropout_p=0.1, forward_kernel="tl", backward_kernel="gluon").sum().backward()
    lists = BlockSparseLayout(torch.ones(1, 1, 1, 1, dtype=torch.bool, device=DEVICE), 1, 4, 128).by_query  # 1 x 4
    with pytest.raises(ValueError, match=r"block_lists must be int32 .* with 17 offsets.* got torch.int32 \(5,\)"):
        forward(q.repeat(2, 2, 1, 1), q.repeat(2, 2, 1, 1), q.repeat(2, 2, 1, 1), False, 0.125,
                block_lists=tuple(lists))
    with pytest.raises(ValueError, match="forward_kernel='gluon' does not cover this call: head_dim 48"):
        flash_attn(narrow, narrow, narrow, forward_kernel="gluon")
    with pytest.MonkeyPatch.context() as patch:  # a Triton the kernels were not written for
        patch.setattr(flash_attn_gluon.triton, "__version__", "3.10.0")
        assert "Triton 3.10.0 has no Gluon that this kernel knows (it was written for 3.6, 3.7" in refusal(q, q, q)
    for argument in ("forward_kernel", "backward_kernel"):
        with pytest.raises(ValueError, match=f"{argument}='triton' is not one of"):
            flash_attn(q, q, q, **{argument: "triton"})


@pytest.mark.skipif(on_hopper(), reason="the Gluon backward covers these inputs here")
def test_a_forced_gluon_backward_that_cannot_run_says_why():
    q = torch.randn(1, 2, 8, 64, device=DEVICE, dtype=torch.float16, requires_grad=True)
    out = flash_attn(q, q, q, backward_kernel="gluon")  # the forward runs wherever the tl kernel does
    with pytest.raises(ValueError, match="backward_kernel='gluon' does not cover this call: "):
        out.sum().backward()
    flash_attn(q, q, q, backward_kernel="tl").sum().backward()
    assert q.grad is not None and not q.grad.isnan().any()


def test_importing_works_with_a_triton_whose_gluon_differs():
    """A Triton whose Gluon differs from what the kernels know (here: TMA loads under neither name they know)
    leaves the package importable, refusing the Gluon path with the reason, and flash_attn running on the tl
    kernel, on a GPU where there is one, else in the interpreter. (Triton's own runtime imports Gluon, so an
    import that fails cannot be simulated. On the GPU machine's stack, Triton 3.6's interpreter converts a loop
    bound with int() of a one-element array, which its numpy refuses: "only 0-dimensional arrays".)"""
    script = ("import torch\n"
              "from triton.experimental.gluon.language.nvidia.hopper import tma\n"
              "for name in ('async_load', 'async_copy_global_to_shared'):\n"
              "    if hasattr(tma, name):\n"
              "        delattr(tma, name)\n"
              "from effrepro_kernels import flash_attn, flash_attn_gluon\n"
              f"q = torch.randn(1, 2, 8, 64, dtype=torch.float16, device='{DEVICE}')\n"
              "assert 'has no Gluon' in flash_attn_gluon.refusal(q, q, q), flash_attn_gluon.refusal(q, q, q)\n"
              "out = flash_attn(q, q, q, causal=True)\n"
              "assert out.shape == q.shape and not out.isnan().any()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({} if has_gpu() else {"TRITON_INTERPRET": "1"})}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, timeout=300, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def deciding_flash_attn(monkeypatch, setting, version, refusal):
    """effrepro_kernels.flash_attn deciding as under EFFREPRO_GLUON=`setting` and Triton `version`, with the Gluon
    check `refusal` (refusal or backward_refusal) passing any tensors."""
    flash_attn_module = importlib.import_module("effrepro_kernels.flash_attn")
    monkeypatch.setattr(flash_attn_module, "GLUON", setting)
    monkeypatch.setattr(flash_attn_module.triton, "__version__", version)
    monkeypatch.setattr(flash_attn_module.flash_attn_gluon, refusal, lambda *tensors: None)
    return flash_attn_module


@pytest.mark.parametrize("setting, head_dim, causal, keys, version, expected", [
    (None, 128, False, 512, "3.6.0", True),    # head_dim 128, no mask (a persistent grid): from 512 keys
    (None, 128, False, 256, "3.6.0", False),
    (None, 128, True, 512, "3.6.0", False),    # causal and short: the tl forward was as fast
    (None, 128, True, 1024, "3.6.0", True),
    (None, 64, False, 1024, "3.6.0", True),    # head_dim 64 (three consumer warpgroups) from 1K keys
    (None, 64, False, 512, "3.6.0", False),
    (None, 64, True, 2048, "3.6.0", True),
    (None, 64, True, 1024, "3.6.0", False),
    (None, 128, False, 8192, "3.9.0", False),  # a Triton on which the Gluon forward has not run
    ("1", 64, True, 2048, "3.9.0", True),      # EFFREPRO_GLUON=1: wherever it covers the call
    ("0", 128, False, 8192, "3.6.0", False),   # EFFREPRO_GLUON=0: never
])
def test_auto_takes_the_gluon_forward_where_it_was_measured_faster(monkeypatch, setting, head_dim, causal, keys,
                                                                    version, expected):
    flash_attn_module = deciding_flash_attn(monkeypatch, setting, version, "refusal")
    q = torch.empty(1, 2, 16, head_dim)
    k = torch.empty(1, 2, keys, head_dim)
    assert flash_attn_module._use_gluon("auto", q, k, k, None, 0, causal, 0.0) == expected
    assert not flash_attn_module._use_gluon("auto", q, k, k, None, 0, causal, 0.1)  # dropout: not covered
    # key padding and block sparsity (of its 128-key blocks): taken by "auto" at head_dim 128, where they were
    # timed faster, elsewhere only under EFFREPRO_GLUON=1; not both at once
    padded, blocks = torch.ones(1, keys, dtype=torch.bool), flash_attn_gluon.SPARSE_BLOCK
    for mask, block_size in ((padded, 0), (None, blocks)):
        use = functools.partial(flash_attn_module._use_gluon, q=q, k=k, v=k, key_padding_mask=mask,
                                block_size=block_size, causal=causal, dropout_p=0.0)
        assert use("auto") == (expected and (head_dim == 128 or setting == "1")) and use("gluon")
    assert not flash_attn_module._use_gluon("auto", q, k, k, None, 64, causal, 0.0)  # blocks smaller than its tile
    with pytest.raises(ValueError, match="block-sparse masks of 64-key blocks"):
        flash_attn_module._use_gluon("gluon", q, k, k, None, 64, causal, 0.0)
    with pytest.raises(ValueError, match="a key padding mask with block sparsity"):
        flash_attn_module._use_gluon("gluon", q, k, k, padded, blocks, causal, 0.0)
    assert not flash_attn_module._use_gluon("tl", q, k, k, None, 0, causal, 0.0)


@pytest.mark.parametrize("setting, head_dim, causal, keys, version, expected", [
    (None, 128, False, 1024, "3.6.0", True),   # measured faster at head_dim 128 from 1K keys
    (None, 128, False, 512, "3.6.0", False),
    (None, 128, True, 1024, "3.6.0", False),   # causal from 2K
    (None, 128, True, 2048, "3.6.0", True),
    (None, 64, False, 2048, "3.6.0", True),    # head_dim 64 from 2K keys, causal too
    (None, 64, True, 1024, "3.6.0", False),
    (None, 32, False, 8192, "3.6.0", False),   # head_dim 32: not measured
    (None, 128, False, 8192, "3.9.0", False),  # a Triton on which the Gluon backward has not run
    ("1", 64, True, 512, "3.9.0", True),       # EFFREPRO_GLUON=1: wherever it covers the call
    ("0", 128, False, 8192, "3.6.0", False),   # EFFREPRO_GLUON=0: never
])
def test_the_backward_takes_gluon_where_it_was_measured_faster(monkeypatch, setting, head_dim, causal, keys,
                                                                version, expected):
    flash_attn_module = deciding_flash_attn(monkeypatch, setting, version, "backward_refusal")
    q = torch.empty(1, 2, 16, head_dim)
    k = torch.empty(1, 2, keys, head_dim)
    use = functools.partial(flash_attn_module._use_gluon_backward, "auto", q, k, k, q, None, q, k, k)
    assert use(None, 0, causal, 0.0) == expected
    assert not use(None, 0, causal, 0.1)  # dropout: not covered
    # key padding: taken by "auto" at head_dim 128, where it was timed faster (EFFREPRO_GLUON=1 takes it anywhere)
    padded = torch.ones(1, keys, dtype=torch.bool)
    assert use(padded, 0, causal, 0.0) == (expected and (head_dim == 128 or setting == "1"))
    assert flash_attn_module._use_gluon_backward("gluon", q, k, k, q, None, q, k, k, padded, 0, causal, 0.0)
    assert not use(None, 64, causal, 0.0)  # sparse blocks smaller than the kernel's tile
    assert use(None, flash_attn_gluon.SPARSE_BLOCK, causal, 0.0) == expected  # block-sparse, blocks of its tile
    assert not flash_attn_module._use_gluon_backward("tl", q, k, k, q, None, q, k, k, None, 0, causal, 0.0)


@pytest.mark.parametrize("head_dim, most_keys", [(64, 4096), (128, 2048)])
def test_causal_grids_are_persistent_only_where_a_head_has_few_query_tiles(head_dim, most_keys):
    """Up to 4K keys at head_dim 64 and 2K at 128, as measured on the H100 and the H200 (NOTES.md)."""
    assert all(flash_attn_gluon.kernel_config(head_dim, False, n)["PERSISTENT"] for n in (128, 2048, 65536))
    assert flash_attn_gluon.kernel_config(head_dim, True, most_keys)["PERSISTENT"]
    assert not flash_attn_gluon.kernel_config(head_dim, True, most_keys + 1)["PERSISTENT"]


@pytest.mark.parametrize("seq_len", [512, 1024, 2048, 4096])
def test_a_persistent_causal_grid_gives_every_program_a_like_share(seq_len):
    """The kernel's order of tiles (a head's together, causal ones last first) dealt out t, t + P, ... over the
    grid that `persistent_programs` sizes, d = 64's 192-row tiles, the flash_kernel task's shapes (B·N = 16K, 32
    heads) on 132 SMs: no program's key tiles exceed the mean by more than a tenth. A grid of all 132 programs
    gives each one the same tile of every head at these lengths (up to 1.9x the mean). From 8K keys a program
    takes fewer tiles than a head has, and no static share is that even (1.20 at 8K)."""
    rows, block_n, sms = 3 * flash_attn_gluon.ROWS_PER_WARPGROUP, 128, 132
    m_tiles, heads = -(-seq_len // rows), 32 * 16384 // seq_len
    key_tiles = [min(-(-seq_len // block_n), -(-(m + 1) * rows // block_n)) for m in range(m_tiles)]
    work = [key_tiles[m_tiles - 1 - t % m_tiles] for t in range(m_tiles * heads)]

    def worst(programs):
        loads = [sum(work[p::programs]) for p in range(programs)]
        return max(loads) / (sum(loads) / programs)

    programs = flash_attn_gluon.persistent_programs(m_tiles, len(work), sms, causal=True)
    assert sms - 12 <= programs <= sms and worst(programs) < 1.1, (programs, worst(programs))
    if sms % m_tiles == 0:
        assert worst(sms) > 1.3
    assert flash_attn_gluon.persistent_programs(m_tiles, len(work), sms, causal=False) == sms


@pytest.mark.skipif(not flash_attn_gluon._GLUON_OK, reason="a Triton whose Gluon this kernel does not know")
def test_the_gluon_kernels_compile_for_hopper_without_a_gpu():
    """Every variant compiles for sm_90 with the installed Triton (in a process of its own: under the
    interpreter Gluon cannot compile), with wgmma and TMA, in the shared memory a Hopper block has (227 KB),
    each at most a few scalars spilled (under Triton 3.9 each consumer of the dense d = 64 forward keeps one
    address in local memory, read back once a query tile for the epilogue (outside the loop over key tiles),
    3.6 none; under 3.6 the causal block-sparse and key-padded dK/dV kernels keep one across their loops, 3.9
    none; with key padding or block-sparse, in their own configurations, none)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "gluon_offline.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # each distinct configuration dense and the chosen one causal too, then the key padding one and the block-sparse
    # one, each dense and causal
    forwards = sum(len({config_name(dict(c, PERSISTENT=False)) for c in configs}) + 5
                   for configs in flash_attn_gluon.CANDIDATES.values())
    # dK dV and dQ: dense and causal, each block-sparse or not, each with key padding or not
    assert len(report) == forwards + 2 * 8 * len(flash_attn_gluon.GLUON_HEAD_DIMS)
    for variant, found in report.items():
        assert found["wgmma"] > 0 and found["tma_copies"] > 0 and found["shared"] <= 227 * 1024, (variant, found)
        assert found["spilled_bytes"] <= (8 if variant.startswith("forward") else 16), (variant, found)


CASES = [  # batch, heads, kv heads, seq_q, seq_k, head_dim, causal
    (1, 2, 2, 1, 1, 64, False),
    (2, 4, 4, 63, 63, 64, True),         # fewer rows than one warpgroup's 64
    (1, 8, 2, 129, 1000, 128, True),     # grouped-query; many key tiles through a 2-stage ring
    (1, 8, 1, 1000, 129, 128, True),     # multi-query; more queries than keys: the first rows see nothing
    (2, 2, 2, 65, 127, 128, False),
    (1, 4, 2, 127, 65, 64, True),
    (1, 2, 2, 4096, 4096, 128, True),
    (1, 2, 2, 256, 1024, 64, True),      # 8 key tiles through d = 64's 3-stage ring: its phases flip
]


def per_head_block_mask(batch: int, heads: int, n_q: int, n_k: int) -> torch.Tensor:
    """Random 128-key block masks, a different one for each (batch, head) (a kernel that read another head's list
    would show), half the blocks kept, and query block 1 of (batch 0, head 1) keeping none."""
    blocks = [-(-n // flash_attn_gluon.SPARSE_BLOCK) for n in (n_q, n_k)]
    mask = torch.cat([random_block_mask(*blocks, 0.5, generator=torch.Generator().manual_seed(seed), device="cuda")
                      for seed in range(batch * heads)]).view(batch, heads, *blocks)
    mask[0, 1, min(1, blocks[0] - 1)] = False
    return mask


def reference_lse(q, k, causal, key_padding_mask=None, attn_mask=None):
    """Natural-log LSE of each row's scores in float64, -inf for a row that sees no key."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if causal:
        n_q, n_k = q.shape[2], k.shape[2]
        keep = torch.arange(n_k, device=q.device)[None, :] <= torch.arange(n_q, device=q.device)[:, None] + n_k - n_q
        scores = scores.masked_fill(~keep, float("-inf"))
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.logsumexp(-1)


@hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_reference(case, dtype):
    check_forward(case, dtype)


@hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(3, 4, 2, 130, 300, 128, False), (3, 4, 4, 300, 130, 64, True),
                                  (2, 8, 1, 64, 1000, 128, True), (2, 2, 2, 700, 1400, 64, False),
                                  (3, 24, 8, 700, 1400, 128, False), (3, 24, 8, 1000, 300, 64, True)], ids=str)
def test_forward_with_key_padding_matches_reference(case, dtype):
    """Keys left out at random in every tile, grouped and multi-query heads, causal with unequal lengths, a
    sequence whose keys are all padding (zeros and an LSE of +inf, as the tl backward expects), and persistent
    programs that take several query tiles (the last two)."""
    check_forward(case, dtype, padded=True)


@hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
def test_block_sparse_forward_matches_reference(head_dim, causal):
    """The forward over each query tile's list of kept 128-key blocks, against the float64 reference on the dense
    mask, output and LSE: a different mask per (batch, head), lengths that end inside a block, grouped and
    multi-query heads, more queries than keys and fewer, a query block that keeps none (zeros and an LSE of +inf),
    and a persistent grid whose programs take several query tiles of uneven lists (the last case)."""
    persistent = dict(flash_attn_gluon.SPARSE_CONFIGS[head_dim][0], PERSISTENT=True)
    for b, h, hk, n_q, n_k, config in ((2, 4, 2, 300, 700, None), (1, 4, 1, 700, 300, None),
                                       (3, 2, 2, 1000, 1000, None), (3, 24, 8, 1000, 1400, persistent)):
        check_forward((b, h, hk, n_q, n_k, head_dim, causal), torch.bfloat16, config,
                      block_mask=per_head_block_mask(b, h, n_q, n_k))


PADDED_CONFIGS = [(d, config) for d, configs in flash_attn_gluon.KEY_PADDING_CONFIGS.items() for config in configs]


@hopper
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("head_dim, config", PADDED_CONFIGS, ids=[f"d={d} {config_name(c)}" for d, c in PADDED_CONFIGS])
def test_every_key_padding_configuration_matches_reference(head_dim, config, causal):
    """The configurations `tune_flash_gluon.py --key-padding` compares, before their times count, with the
    tests' random padding: lengths off every tile, more queries than keys and fewer, grouped-query heads."""
    for n_q, n_k in ((63, 63), (129, 1000), (1000, 129), (700, 1400)):
        check_forward((3, 4, 2, n_q, n_k, head_dim, causal), torch.bfloat16, config, padded=True)


OTHER_CONFIGS = [(d, config) for d, configs in CANDIDATES.items() for config in configs[1:]]


@hopper
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("head_dim, config", OTHER_CONFIGS, ids=[f"d={d} {config_name(c)}" for d, c in OTHER_CONFIGS])
def test_every_candidate_configuration_matches_reference(head_dim, config, causal):
    """The configurations scripts/tune_flash_gluon.py compares, before their times count: lengths that are not
    a multiple of any tile, more queries than keys and fewer, grouped-query heads, more key tiles than stages."""
    for n_q, n_k in ((63, 63), (129, 1000), (1000, 129), (700, 2100)):
        check_forward((1, 4, 2, n_q, n_k, head_dim, causal), torch.bfloat16, config)


PERSISTENT_CONFIGS = [(d, config) for d, configs in CANDIDATES.items() for config in configs if config["PERSISTENT"]]


@hopper
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("head_dim, config", PERSISTENT_CONFIGS,
                         ids=[f"d={d} {config_name(c)}" for d, c in PERSISTENT_CONFIGS])
def test_persistent_programs_that_take_many_query_tiles_match_reference(head_dim, config, causal):
    """Two to four query tiles a program, so that the K/V ring runs on across them with its phases mid-turn
    (11 and 3 key tiles), Q's buffer is refilled while O of the tile before leaves, and causal tiles where the
    first rows see no key follow ones that see all."""
    for n_q, n_k in ((700, 1400), (1000, 300)):
        check_forward((3, 24, 8, n_q, n_k, head_dim, causal), torch.bfloat16, config)


def random_key_padding(k: torch.Tensor, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """A key padding mask leaving out about a third of the keys at random, and every key of the last sequence;
    and k with the padded keys scaled up 30-fold, so that their scores, were they not masked, would dwarf the rest
    (exp2 of them past the LSE overflows)."""
    mask = torch.rand(k.shape[0], k.shape[2], device="cuda", generator=gen) > 0.3
    mask[-1] = False
    return mask, torch.where(mask[:, None, :, None], k, 30 * k)


def check_forward(case, dtype, config=None, padded=False, block_mask=None):
    """The forward against the float64 reference; `padded`: with `random_key_padding`; `block_mask`: block-sparse,
    of SPARSE_BLOCK-key blocks."""
    b, h, hk, n_q, n_k, d, causal = case
    gen = torch.Generator(device="cuda").manual_seed(n_q * 1009 + n_k)
    q, k, v = (torch.randn(b, heads, n, d, device="cuda", dtype=dtype, generator=gen)
               for heads, n in ((h, n_q), (hk, n_k), (hk, n_k)))
    mask = lists = dense = None
    if padded:
        mask, k = random_key_padding(k, gen)
    if block_mask is not None:
        lists = tuple(BlockSparseLayout(block_mask, b, h, flash_attn_gluon.SPARSE_BLOCK).by_query)
        dense = block_mask_to_dense(block_mask, n_q, n_k, flash_attn_gluon.SPARSE_BLOCK)
    out, lse2 = forward(q, k, v, causal, d ** -0.5, config, key_padding_mask=mask, block_lists=lists)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=causal, key_padding_mask=mask,
                              attn_mask=dense)
    assert not out.isnan().any() and rel_err(out, ref) < TOL[dtype], rel_err(out, ref)
    want = reference_lse(q.double(), k.double(), causal, mask, dense)
    seen = want > float("-inf")
    torch.testing.assert_close(lse2[seen] / LOG2E, want[seen].float(), rtol=1e-3, atol=1e-2)
    assert (lse2[~seen] == float("inf")).all() and not out[~seen].any()  # what the tl backward expects


@hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_reference(case, dtype):
    """The Gluon dQ, dK and dV from the forward's LSE and the backward's delta, against float64 autograd."""
    check_backward(case, dtype)


@hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(3, 4, 2, 130, 300, 128, False), (3, 4, 4, 300, 130, 64, True),
                                  (2, 8, 1, 200, 1000, 128, True)], ids=str)
def test_backward_with_key_padding_matches_reference(case, dtype):
    """Padded keys get no gradient and give none, in tiles of the dK/dV and the dQ kernels alike; a sequence whose
    keys are all padding gets zeros."""
    check_backward(case, dtype, padded=True)


def check_backward(case, dtype, padded=False):
    """`backward` against float64 autograd; `padded` as in `check_forward`."""
    b, h, hk, n_q, n_k, d, causal = case
    gen = torch.Generator(device="cuda").manual_seed(n_q * 7 + n_k)
    q, k, v = (torch.randn(b, heads, n, d, device="cuda", dtype=dtype, generator=gen)
               for heads, n in ((h, n_q), (hk, n_k), (hk, n_k)))
    do = torch.randn(b, h, n_q, d, device="cuda", dtype=dtype, generator=gen)
    mask = None
    if padded:
        mask, k = random_key_padding(k, gen)
    out, lse2 = forward(q, k, v, causal, d ** -0.5, key_padding_mask=mask)
    delta = (out.float() * do.float()).sum(-1).reshape(b * h, n_q)
    dq, dk, dv = backward(q, k, v, do, lse2, delta, causal, d ** -0.5, key_padding_mask=mask)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    attention_reference(q64, k64, v64, causal=causal, key_padding_mask=mask).backward(do.double())
    for name, got, want in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        # with one key the softmax is constant and dQ, dK are zero in exact arithmetic: measured against dO's size;
        # elsewhere against the gradient's own, with run_both's tolerance for gradients
        size = do.double().norm() if n_k == 1 and name != "dv" else want.norm()
        err = ((got.double() - want).norm() / size).item()
        assert not got.isnan().any() and err < 2 * TOL[dtype], (name, err)


@hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backward_with_very_negative_scores_past_the_last_key(dtype):
    """Every score near -180 (base 2), 70 keys (a partial last tile): exp2(-lse) of a key past the end would be
    inf, and dS·K NaN, if those keys were not masked."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    k = (1 + 0.1 * torch.randn(1, 1, 70, 64, device="cuda", generator=gen)).to(dtype)
    v = torch.randn(1, 1, 70, 64, device="cuda", dtype=dtype, generator=gen)
    q = (-16 + 0.1 * torch.randn(1, 1, 3, 64, device="cuda", generator=gen)).to(dtype)
    do = torch.randn(1, 1, 3, 64, device="cuda", dtype=dtype, generator=gen)
    out, lse2 = forward(q, k, v, False, 64 ** -0.5)
    assert (lse2 < -128).all()
    dq, dk, dv = backward(q, k, v, do, lse2, (out.float() * do.float()).sum(-1).reshape(1, 3), False, 64 ** -0.5)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    attention_reference(q64, k64, v64).backward(do.double())
    # dQ = scale · dS·K, and dS sums to zero over the keys: K's common part (1) cancels, which magnifies the
    # rounding of P and dS to bfloat16 about tenfold here (2-4% in a CPU emulation of the kernel's roundings)
    dq_tol = 4 * TOL[dtype] if dtype == torch.bfloat16 else TOL[dtype]
    for got, want, tol in ((dq, q64.grad, dq_tol), (dk, k64.grad, TOL[dtype]), (dv, v64.grad, TOL[dtype])):
        assert not got.isnan().any() and rel_err(got, want) < tol, rel_err(got, want)


@hopper
@pytest.mark.parametrize("dtype, d, config", [(torch.bfloat16, 128, None), (torch.float16, 64, None)] +
                         [(torch.bfloat16, d, config) for d, config in OTHER_CONFIGS],
                         ids=lambda x: config_name(x) if isinstance(x, dict) else str(x))
def test_forward_gives_the_same_result_every_time(dtype, d, config):
    """Races between the producer, the consumer warpgroups and the reuse of the ring and of Q's and O's buffers
    from one query tile to the next would show as results that differ from call to call, or as NaNs
    (triton-lang/triton#10106)."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(2, 8, 2048, d, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    first = forward(q, k, v, True, d ** -0.5, config)
    for _ in range(50):
        again = forward(q, k, v, True, d ** -0.5, config)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert not first[0].isnan().any()


@hopper
@pytest.mark.parametrize("shape", [(2, 4, 2, 300, 300, 64, True), (1, 4, 4, 129, 257, 128, False),
                                   (1, 4, 1, 200, 100, 128, True), (2, 2, 2, 520, 520, 128, False)], ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "key_padding"])
def test_inside_flash_attn_with_the_tl_backward(shape, padded):
    """The Gluon forward's LSE taken by the tl backward, as "auto" pairs them (with a key padding mask at head_dim
    128 below GLUON_BACKWARD_MIN_KEYS): keys padded at random, and in a batch of two the last sequence all
    padding, whose rows' infinite LSE must give zero gradients."""
    *dims, causal = shape
    kpm = None
    if padded:
        kpm = torch.rand(dims[0], dims[4], device="cuda", generator=torch.Generator("cuda").manual_seed(5)) > 0.3
        if dims[0] > 1:
            kpm[-1] = False
    run_both(*dims, torch.bfloat16, causal=causal, kpm=kpm, forward_kernel="gluon", backward_kernel="tl")


@hopper
@pytest.mark.parametrize("shape", [(1, 4, 2, 300, 700, 128, False), (2, 2, 2, 513, 513, 64, True),
                                   (1, 4, 1, 1000, 260, 128, True)], ids=str)
def test_block_sparse_backward_matches_reference(monkeypatch, shape):
    """The Gluon forward's and backward's block-sparse paths (forced by EFFREPRO_GLUON=1, at head_dim 64 too)
    through flash_attn, against float64 autograd on the dense mask: lengths that end inside a block, grouped-query
    heads, blocks above the causal diagonal, query blocks that keep no key block."""
    flash_attn_module = importlib.import_module("effrepro_kernels.flash_attn")
    monkeypatch.setattr(flash_attn_module, "GLUON", "1")
    calls = []
    for name, kernel in (("forward", forward), ("backward", backward)):
        monkeypatch.setattr(flash_attn_module.flash_attn_gluon, name, lambda *args, name=name, kernel=kernel, **kwargs:
                            calls.append((name, kwargs.get("block_lists") is not None)) or kernel(*args, **kwargs))
    *dims, causal = shape
    mask = per_head_block_mask(dims[0], dims[1], dims[3], dims[4])
    run_both(*dims, torch.bfloat16, causal=causal, block_mask=mask, block_size=flash_attn_gluon.SPARSE_BLOCK)
    assert calls == [("forward", True), ("backward", True)]  # both block-sparse paths ran
    # what "auto" takes until the sparse forward has run on a GPU: the tl forward's LSE into the Gluon backward
    calls.clear()
    run_both(*dims, torch.bfloat16, causal=causal, block_mask=mask, block_size=flash_attn_gluon.SPARSE_BLOCK,
             forward_kernel="tl", backward_kernel="gluon")
    assert calls == [("backward", True)]


@pytest.mark.parametrize("batch, heads, kv_heads, n_q, n_k", [(2, 4, 2, 300, 700), (1, 6, 2, 1000, 260),
                                                            (1, 3, 3, 200, 500)], ids=str)
def test_the_backward_lists_all_query_heads_of_a_key_block_in_one_list(batch, heads, kv_heads, n_q, n_k):
    """`kv_head_lists` (what the dK/dV kernel reads, made with torch on the device; here on the CPU) against the
    lists written out from the mask: per (batch, KV head, key block), each group's query blocks in order, as
    group · query blocks + query block; key blocks that no query block keeps, and a mask that keeps none."""
    block = flash_attn_gluon.SPARSE_BLOCK
    q_blocks, k_blocks = -(-n_q // block), -(-n_k // block)
    groups = heads // kv_heads
    gen = torch.Generator().manual_seed(n_q + heads)
    for mask in (torch.rand(batch, heads, q_blocks, k_blocks, generator=gen) < 0.4,
                 torch.zeros(1, 1, q_blocks, k_blocks, dtype=torch.bool)):
        mask[..., k_blocks - 1] = False  # a key block no query block keeps
        layout = BlockSparseLayout(mask, batch, heads, block)
        offsets, entries = flash_attn_gluon.kv_head_lists(layout.by_key, batch, kv_heads, groups, n_q)
        full = mask.expand(batch, heads, q_blocks, k_blocks)
        expected = [[g * q_blocks + qb for g in range(groups) for qb in range(q_blocks)
                     if full[b, hk * groups + g, qb, kb]]
                    for b in range(batch) for hk in range(kv_heads) for kb in range(k_blocks)]
        assert offsets.tolist() == [0, *itertools.accumulate(map(len, expected))]
        assert entries[:offsets[-1]].tolist() == [e for lst in expected for e in lst]
        assert entries.dtype == offsets.dtype == torch.int32
