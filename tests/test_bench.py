"""The benchmark harness: ratios to the baseline, and points that cannot run are recorded, not fatal."""
import importlib
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import DEVICE, gpu
from repro.bench import DTYPES, Call, Point, Provider, Unsupported, rotating, run_benchmark
from repro.context import ConfigError
from repro.timing import measure


def sleeper(seconds):
    return lambda point: Call(lambda: time.sleep(seconds))


def raiser(exc):
    def build(point):
        raise exc
    return Provider(type(exc).__name__, build)


def run(providers, points=None):
    points = points or [Point("n", 8, {"mode": "fwd"}, flops=2e9)]
    return list(run_benchmark(points, providers, torch.device("cpu"), warmup_ms=1, rep_ms=20, progress=False))


def test_speedup_and_throughput_against_the_baseline():
    rows = run([Provider("slow", sleeper(0.004), baseline=True), Provider("fast", sleeper(0.001))])
    by = {(r.provider, r.metric): r for r in rows}
    assert by[("slow", "speedup")].p50 == pytest.approx(1.0)
    assert 2.0 < by[("fast", "speedup")].p50 < 5.0
    tflops = by[("fast", "tflops")]
    assert tflops.p20 <= tflops.p50 <= tflops.p80
    assert tflops.p50 == pytest.approx(2e9 / (by[("fast", "time")].p50 * 1e-3) / 1e12)
    assert by[("fast", "time")].extra["clock"] == "wall_clock"


def test_oom_unsupported_and_errors_are_rows_and_the_sweep_goes_on():
    rows = run([Provider("base", sleeper(0.001), baseline=True),
                raiser(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 GiB")),
                raiser(Unsupported("no such backend here")),
                raiser(ZeroDivisionError("bug"))])
    status = {r.provider: (r.status, r.message) for r in rows if r.metric == "time"}
    assert status["OutOfMemoryError"][0] == "oom" and "64 GiB" in status["OutOfMemoryError"][1]
    assert status["Unsupported"] == ("unsupported", "no such backend here")
    assert status["ZeroDivisionError"][0] == "error" and "bug" in status["ZeroDivisionError"][1]
    assert status["base"][0] == "ok"


def _raised(exc: BaseException, cause: BaseException | None = None, context: BaseException | None = None,
            hidden: bool = False) -> BaseException:
    """`exc` as `raise exc from cause` (`from None`: hidden) leaves it, raised while `context` was handled."""
    exc.__cause__, exc.__context__, exc.__suppress_context__ = cause, context, cause is not None or hidden
    return exc


FULL = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("exc, oom", [
    (RuntimeError("CUDA error: out of memory"), True),  # what some kernels raise in place of OutOfMemoryError
    (RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"), True),
    (MemoryError(), True),
    # CUDA libraries whose own allocation failed (was recorded as an error)
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    # a task's own error around one (was recorded as an error)
    (_raised(RuntimeError("the training step failed"), cause=FULL), True),
    (_raised(KeyError("step"), context=_raised(RuntimeError("wrapped"), cause=FULL)), True),
    (_raised(RuntimeError("no kernel for this shape"), context=FULL, hidden=True), False),  # `from None`
    (RuntimeError("expected mat1 and mat2 to have the same dtype"), False),
    (ValueError("out of memory"), False),  # a value error that only says the words is a bug, not a full device
])
def test_out_of_memory_is_told_from_other_errors(exc, oom):
    from repro.timing import is_out_of_memory
    assert is_out_of_memory(exc) is oom


def test_a_steps_peak_memory_is_measured_without_the_timed_calls_gradients(monkeypatch):
    import repro.bench
    weight = torch.randn(64, 64, requires_grad=True)
    seen = []

    def peak(fn, device):
        seen.append(weight.grad is None)  # what the measured step starts from
        fn()
        return 1.0

    monkeypatch.setattr(repro.bench, "peak_memory_mb", peak)
    step = Provider("step", lambda point: Call(lambda: (weight @ weight).sum().backward(), grad_to_none=(weight,)),
                    baseline=True)
    rows = run([step])
    assert seen == [True] and weight.grad is not None
    assert [r.p50 for r in rows if r.metric == "peak_memory"] == [1.0]


@gpu
def test_gpu_peak_memory_leaves_out_the_baselines_kept_result():
    """The baseline's result, kept to check the others against, is no part of any provider's peak."""
    cuda = torch.device("cuda")
    size_mb = 256
    x = torch.randn(1 << 20, device=cuda)  # 4 MB of input for both

    def build(point):
        return Call(lambda: x.mul(2), result=lambda: torch.randn(size_mb << 18, device=cuda))

    rows = list(run_benchmark([Point("n", 8, {"mode": "fwd"})], [Provider("base", build, baseline=True),
                                                                   Provider("other", build)],
                              cuda, warmup_ms=1, rep_ms=5, progress=False))
    peaks = {r.provider: r.p50 for r in rows if r.metric == "peak_memory"}
    assert set(peaks) == {"base", "other"} and max(peaks.values()) < size_mb / 2, peaks


def test_exactly_one_baseline():
    with pytest.raises(ValueError, match="baseline"):
        run([Provider("a", sleeper(0)), Provider("b", sleeper(0))])


def test_cpu_timing_is_marked_as_wall_clock_and_times_the_call():
    t = measure(lambda: time.sleep(0.002), torch.device("cpu"), warmup_ms=1, rep_ms=20)
    assert t.clock == "wall_clock" and t.n >= 3 and 2.0 <= t.p50 < 50
    with pytest.raises(ValueError, match="back_to_back='python' is not one of"):
        measure(lambda: None, torch.device("cpu"), back_to_back="python")


@gpu
@pytest.mark.parametrize("back_to_back, clock", [("graph", "cuda_graph"), ("eager", "eager_loop")])
def test_gpu_back_to_back_loops_time_each_call(back_to_back, clock):
    x = torch.randn(1 << 26, device="cuda")
    one = measure(lambda: x.mul_(1.0), torch.device("cuda"), rep_ms=20)
    t = measure(lambda: x.mul_(1.0), torch.device("cuda"), rep_ms=20, back_to_back=back_to_back)
    # 256 MB read and written a call: beyond L2 either way, so a call costs the same alone or in a loop
    assert t.clock == clock and t.p50 == pytest.approx(one.p50, rel=0.3)


def test_the_flop_and_byte_counts_behind_tflops_and_bandwidth():
    from omegaconf import OmegaConf

    from tasks.flashattention.kernel_bench import attention_flops
    from tasks.lean_attention.decode_bench import grid

    # two N x N x d products, 2 FLOPs per multiply-add: 2 * 2 * B*H*N^2*d
    assert attention_flops(2, 3, 5, 7, causal=False, mode="fwd") == 2 * 2 * 2 * 3 * 5 * 5 * 7
    assert attention_flops(2, 3, 5, 7, causal=True, mode="fwd") == 2 * 3 * 5 * 5 * 7 * 2
    assert attention_flops(2, 3, 5, 7, causal=False, mode="fwd_bwd") == 3.5 * 4 * 2 * 3 * 5 * 5 * 7
    cfg = OmegaConf.create({"dtype": "float16", "context": [1000], "batch": [2], "heads": ["8/4"], "head_dim": 64})
    (point,) = grid(cfg, "eager")
    assert point.bytes == 2 * 2 * 4 * 1000 * 64 * 2  # K and V, batch 2, 4 KV heads, 1000 tokens, 64 dims, fp16
    assert point.extra["mode"] == "eager"


@pytest.mark.parametrize("n_q, n_k, density, causal", [(300, 500, 0.25, False), (300, 500, 0.25, True),
                                                       (500, 300, 0.5, True), (512, 512, 0.125, False)])
def test_a_block_sparse_provider_is_credited_with_the_flops_of_the_pairs_its_blocks_keep(n_q, n_k, density, causal):
    from tasks.flashattention.kernel_bench import SPARSE_BLOCK, sparse_block_mask, sparse_flops_fraction

    blocks = sparse_block_mask(n_q, n_k, density, "cpu")[0, 0]
    kept = blocks.repeat_interleave(SPARSE_BLOCK, 0).repeat_interleave(SPARSE_BLOCK, 1)[:n_q, :n_k]
    counted = torch.ones(n_q, n_k, dtype=torch.bool)
    if causal:  # bottom-right aligned, as flash_attn's
        counted = counted.tril(n_k - n_q)
    assert sparse_flops_fraction(n_q, n_k, density, causal) == pytest.approx((kept & counted).sum() / counted.sum())
    # a row keeps at least one block: 0.125 of 4 blocks is one, a quarter
    assert sparse_flops_fraction(512, 512, 0.125, False) == 0.25

    rows = run([Provider("dense", lambda point: Call(lambda: time.sleep(0.001)), baseline=True),
                Provider("sparse", lambda point: Call(lambda: time.sleep(0.001), flops_fraction=0.25))])
    tflops = {r.provider: r for r in rows if r.metric == "tflops"}
    time_of = {r.provider: r.p50 for r in rows if r.metric == "time"}
    assert tflops["sparse"].p50 == pytest.approx(0.25 * 2e9 / (time_of["sparse"] * 1e-3) / 1e12)
    assert tflops["sparse"].extra["flops_fraction"] == 0.25 and "flops_fraction" not in tflops["dense"].extra


def test_a_sweep_run_with_a_mask_or_dropout_is_a_series_of_its_own():
    """So that the report plots it beside the plain sweep, not in its place; a setting's own mask is its name's."""
    from omegaconf import OmegaConf

    from tasks.flashattention.kernel_bench import grid

    kernel = OmegaConf.create(dict(seq_len=[512], head_dim=64, causal=[True], mode=["fwd"], tokens=4096, hidden=1024,
                                   batch=None, heads=None, dtype="float16", dropout=0.1, padding_mask=True,
                                   settings={"paper": {"padding_mask": True, "dropout": 0.1}}))
    assert sorted(p.extra["series"] for p in grid(kernel)) == ["paper d=64 causal",
                                                                "sweep d=64 causal padded dropout 0.1"]
    kernel.dropout, kernel.padding_mask = 0.0, False
    assert "sweep d=64 causal" in {p.extra["series"] for p in grid(kernel)}


def test_a_head_count_that_would_round_down_is_refused():
    """hidden 2048 in heads of 96 would be 21 heads (2016 wide); 16384 tokens in sequences of 3000 are a batch of
    5, which its rows say."""
    from omegaconf import OmegaConf

    from tasks.flashattention.kernel_bench import grid

    kernel = OmegaConf.create(dict(seq_len=[512, 32768], head_dim=[64, 128], causal=[False], mode=["fwd"],
                                   tokens=16384, hidden=2048, batch=None, heads=None, dtype="float16", dropout=0.0,
                                   padding_mask=False, settings={"odd": {"head_dim": 96, "heads": 8}}))
    points = grid(kernel)  # a length beyond tokens runs one sequence; a setting's own heads need no division
    assert {(p.x_value, p.extra["batch"]) for p in points} == {(512, 32), (32768, 1)}
    assert {p.extra["heads"] for p in points if p.extra["setting"] == "odd"} == {8}
    with pytest.raises(ConfigError, match=r"kernel.hidden=2048 is not a multiple of kernel.head_dim=96: .* 21, "
                                          r"2016 wide; .* or set kernel.heads"):
        grid(OmegaConf.merge(kernel, {"head_dim": [64, 96]}))
    assert {p.extra["batch"] for p in grid(OmegaConf.merge(kernel, {"settings": {"mid": {"seq_len": [3000]}}}))
            if p.extra["setting"] == "mid"} == {5}


def test_densities_without_a_block_sparse_provider_are_refused(job_refusal, compose):
    from repro.cli import check_job
    message = job_refusal("kernel.providers=[standard,effrepro]", "kernel.sparse_densities=[0.1]")
    assert message.startswith("kernel.sparse_densities=[0.1] would have no effect: only the block-sparse providers "
                              "(effrepro_sparse, flex_sparse) read it, and kernel.providers=['standard', 'effrepro'] "
                              "has none"), message
    for sparse in ("effrepro_sparse", "flex_sparse_0.1"):  # a family, or one of its densities by name
        given = [f"kernel.providers=[standard,{sparse}]", "kernel.sparse_densities=[0.1]"]
        check_job(compose(*given), given)


@pytest.mark.parametrize("n_q, n_k, causal, density", [(256, 384, False, 0.5), (384, 384, True, 0.5),
                                                     (200, 300, True, None), (130, 130, False, 1.0)])
def test_flex_attention_on_a_points_block_mask_computes_what_flash_attn_does(n_q, n_k, causal, density):
    """flash_kernel's FlexAttention baseline sees the same blocks as our block-sparse provider (lengths that are
    not a multiple of the 128-token block; causal aligned bottom-right; dense causal)."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    from effrepro_kernels import BlockSparseLayout, flash_attn
    from tasks.flashattention.kernel_bench import flex_block_mask, sparse_block_mask

    gen = torch.Generator(device=DEVICE).manual_seed(n_q + n_k)
    q = torch.randn(1, 2, n_q, 64, device=DEVICE, generator=gen)
    k, v = (torch.randn(1, 2, n_k, 64, device=DEVICE, generator=gen) for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention without torch.compile warns that it is slow
        flex = flex_attention(q, k, v, block_mask=flex_block_mask(n_q, n_k, causal, density, DEVICE))
    layout = None if density is None else BlockSparseLayout(sparse_block_mask(n_q, n_k, density, DEVICE), 1, 2, 128)
    ours = flash_attn(q, k, v, causal=causal, block_mask=layout)
    torch.testing.assert_close(ours, flex, rtol=1e-2, atol=1e-2)  # tf32 products on a GPU


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_flash_kernel_checks_block_sparse_providers_under_their_mask_and_dropout_points_without_dropout(mode):
    """A block-sparse provider against standard attention under its block mask (computing the dense function is
    wrong); at a point with dropout, every provider's output (or gradients) with dropout off, as implementations
    draw their own dropout masks."""
    from omegaconf import OmegaConf

    from tasks.flashattention import kernel_bench as kb

    kernel = OmegaConf.create(dict(seq_len=[200], head_dim=[16], causal=[True], mode=[mode], tokens=400, hidden=32,
                                   batch=None, heads=None, dtype="float32", dropout=0.1, padding_mask=True))
    device = torch.device(DEVICE)  # our kernel in the interpreter on a CPU
    ctx = SimpleNamespace(device=device)
    providers = [kb.provider("standard", kb.standard, ctx, 0),
                 kb.provider("sdpa_math", kb.sdpa_attention, ctx, 0),
                 kb.provider("effrepro_sparse_0.5", kb.ours_sparse(0.5), ctx, 0, density=0.5),
                 kb.provider("dense_as_sparse", kb.standard, ctx, 0, density=0.5)]
    rows = list(run_benchmark(kb.grid(kernel), providers, device, warmup_ms=1, rep_ms=5, progress=False))
    error = {r.provider: r for r in rows if r.metric == "rel_error"}
    assert set(error) == {"sdpa_math", "effrepro_sparse_0.5", "dense_as_sparse"}
    assert error["sdpa_math"].p50 < 2e-3 and error["effrepro_sparse_0.5"].p50 < 2e-3
    assert error["dense_as_sparse"].p50 > 0.1 and "its reference's" in error["dense_as_sparse"].message
    # the verdict on every row of the provider, its speedups included (the claims leave out a False one)
    verdicts = {(r.provider, r.extra.get("matches_baseline")) for r in rows if r.provider != "standard"}
    assert verdicts == {("sdpa_math", True), ("effrepro_sparse_0.5", True), ("dense_as_sparse", False)}


def test_a_block_sparse_provider_whose_masked_reference_runs_out_of_memory_is_measured_unchecked(monkeypatch):
    from omegaconf import OmegaConf

    from tasks.flashattention import kernel_bench as kb

    def out_of_memory(density):
        def attend(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return attend
    monkeypatch.setattr(kb, "masked_standard", out_of_memory)
    kernel = OmegaConf.create(dict(seq_len=[200], head_dim=[16], causal=[False], mode=["fwd"], tokens=200, hidden=16,
                                   batch=None, heads=None, dtype="float32", dropout=0.0, padding_mask=False))
    ctx = SimpleNamespace(device=torch.device("cpu"))
    providers = [kb.provider("standard", kb.standard, ctx, 0), kb.provider("sparse", kb.standard, ctx, 0, density=0.5)]
    rows = [r for r in run(providers, kb.grid(kernel)) if r.provider == "sparse"]
    assert {r.metric for r in rows} == {"time", "tflops", "speedup"}  # no rel_error; no memory on a CPU
    assert all(r.status == "ok" and r.extra["matches_baseline"] is None for r in rows)


def test_each_provider_is_checked_against_the_baselines_output_on_the_same_inputs():
    x = torch.randn(64, 64, dtype=torch.float64)

    def provider(name, result, baseline=False):
        return Provider(name, lambda point: Call(lambda: None, result=lambda: result), baseline=baseline)

    point = Point("n", 8, {"dtype": "float32"})
    rows = run([provider("base", x, baseline=True), provider("same", x + 1e-6 * torch.randn_like(x)),
                provider("wrong", x.flip(0))], [point])
    error = {r.provider: r for r in rows if r.metric == "rel_error"}
    assert set(error) == {"same", "wrong"}  # the baseline is the reference, not checked against itself
    assert error["same"].p50 < 1e-5 and all(r.extra["matches_baseline"] for r in rows if r.provider == "same")
    assert error["wrong"].p50 > 0.5 and "differs from the baseline" in error["wrong"].message
    assert not any(r.extra["matches_baseline"] for r in rows if r.provider == "wrong")
    # where the baseline could not run, a provider's rows say they were not checked
    def out_of_memory(point):
        raise torch.OutOfMemoryError("CUDA out of memory")
    rows = run([Provider("base", out_of_memory, baseline=True), provider("same", x)], [point])
    assert [r.extra["matches_baseline"] for r in rows if r.provider == "same"] == [None]


@pytest.mark.parametrize("dtype, matches", [("float32", False), ("float16", True), ("bfloat16", True), (None, True)])
def test_the_tolerance_a_provider_is_held_to_is_its_points_dtypes(dtype, matches):
    """An error of 5e-3 is more than float32's rounding allows (2e-3) and within float16's and bfloat16's; a point
    that names no dtype is held to the loosest. (The checks above pass under any one tolerance.)"""
    x = torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    point = Point("n", 8, {} if dtype is None else {"dtype": dtype})
    rows = run([Provider("base", lambda p: Call(lambda: None, result=lambda: x), baseline=True),
                Provider("off", lambda p: Call(lambda: None, result=lambda: x * 1.005))], [point])
    (error,) = [r for r in rows if r.metric == "rel_error"]
    assert error.p50 == pytest.approx(5e-3)
    assert all(r.extra["matches_baseline"] is matches for r in rows if r.provider == "off")


def test_the_baselines_result_is_kept_without_its_autograd_graph():
    """A forward's graph (standard attention's N x N scores) must not stay alive while the others are measured."""
    import gc
    import weakref
    saved, alive = [], []

    def baseline_result():
        weight = torch.randn(64, requires_grad=True)
        scores = torch.randn(64, 64)  # saved by the product for its backward
        saved.append(weakref.ref(scores))
        return scores * weight

    def probe(point):
        gc.collect()
        alive.append(saved[0]() is not None)
        return Call(lambda: None)
    run([Provider("base", lambda point: Call(lambda: None, result=baseline_result), baseline=True),
         Provider("probe", probe)])
    assert alive == [False]


def test_a_provider_on_our_kernels_is_unsupported_where_they_cannot_run(monkeypatch):
    import effrepro_kernels.runtime
    monkeypatch.setattr(effrepro_kernels.runtime, "INTERPRET", False)
    rows = run([Provider("base", sleeper(0.001), baseline=True),
                Provider("ours", lambda point: pytest.fail("built where it cannot run"), needs_triton=True)])
    (ours,) = [r for r in rows if r.provider == "ours"]
    assert ours.status == "unsupported" and "CUDA GPU" in ours.message


def test_a_median_is_never_taken_over_fewer_than_min_calls(monkeypatch):
    """do_bench fits its calls into rep_ms: a call longer than that is timed once, and timed again with room for
    MIN_CALLS (a fake do_bench stands in for the GPU's)."""
    import triton.testing

    from repro import timing
    asked = []

    def fake_do_bench(fn, warmup, rep, grad_to_none, return_mode):
        asked.append(rep)
        return [80.0] * max(1, int(rep // 100))  # do_bench's estimate (with its L2 flush) above the call's time
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    t = timing.measure(lambda: None, torch.device("cuda"), warmup_ms=10, rep_ms=50)
    assert asked == [50, 1.5 * timing.MIN_CALLS * 80] and t.n >= timing.MIN_CALLS
    assert timing.measure(lambda: time.sleep(0.002), torch.device("cpu"), warmup_ms=0, rep_ms=1).n == timing.MIN_CALLS


def test_a_sequence_of_stateful_steps_is_timed_step_by_step_in_order():
    from repro.timing import measure_steps_in_turn
    seen = []
    t = measure_steps_in_turn({"s": (lambda i: (seen.append(i), time.sleep(0.001 * (i + 1))), ())}, 4,
                              torch.device("cpu"), warmup=2)["s"]
    assert seen == [0, 1, 2, 3, 4, 5]  # each step once: the warm-up ones, then the timed ones
    assert t.n == 4 and 3.0 <= t.p20 <= t.p50 <= t.p80 < 60  # the timed steps sleep 3, 4, 5, 6 ms
    with pytest.raises(ValueError, match="steps"):
        measure_steps_in_turn({"s": (lambda i: None, ())}, 0, torch.device("cpu"))


def test_sequences_timed_in_turn_take_one_step_each_in_order():
    from repro.timing import measure_steps_in_turn
    seen = []
    sequences = {name: (lambda i, name=name, ms=ms: (seen.append((name, i)), time.sleep(ms / 1e3)), [])
                 for name, ms in (("slow", 8), ("fast", 2))}
    t = measure_steps_in_turn(sequences, 3, torch.device("cpu"), warmup=1)
    assert seen == [("slow", 0), ("fast", 0), ("slow", 1), ("fast", 1), ("slow", 2), ("fast", 2), ("slow", 3),
                    ("fast", 3)]
    assert t["slow"].n == t["fast"].n == 3 and t["fast"].p50 < t["slow"].p50


def test_host_memory_reports_the_peak_resident_size():
    from repro.timing import host_memory
    assert host_memory()["host_peak_rss_mb"] > 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_work_on_a_side_stream_is_inside_the_timed_call():
    from repro.timing import measure
    side = torch.cuda.Stream()
    x = torch.randn(4096, 4096, device="cuda")

    def on_side():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(20):
                x @ x
    unjoined = measure(on_side, torch.device("cuda"), warmup_ms=5, rep_ms=20)
    joined = measure(on_side, torch.device("cuda"), warmup_ms=5, rep_ms=20, streams=[side])
    assert joined.p50 > 5 * unjoined.p50  # 20 matrix products, not an empty main stream


def test_decode_bench_rotates_the_kv_copies_and_divides_bandwidth_by_the_same_runs_copy(compose, monkeypatch):
    """lean_decode's own arithmetic, without a GPU: each call reads the next of enough KV copies to fill
    rotate_bytes, the copy row comes first, every bandwidth row gets a fraction of that copy's p50 (its
    percentiles too), and the speedups are asked over fa2 and split."""
    from repro.records import Row
    from tasks.lean_attention import decode_bench

    point = Point("context", 100, dict(batch=2, heads="4/2", head_dim=16, dtype="float16"),
                  bytes=2 * 2 * 2 * 100 * 16 * 2)
    copies, lengths = decode_bench.make_inputs(point, torch.device("cpu"), 0, rotate_bytes=3 * point.bytes + 1)
    assert len(copies) == 4 and lengths.tolist() == [100, 100]
    assert not torch.equal(copies[0][1], copies[1][1])  # fresh random copies, not one tensor four times
    seen = []
    call = rotating(copies, lambda q, k, v: seen.append(k) or k.sum())
    for _ in range(5):
        call.fn()
    assert [next(i for i, c in enumerate(copies) if c[1] is k) for k in seen] == [0, 1, 2, 3, 0]
    assert call.cycle == 4  # a graph captures every copy

    cfg = compose("task=lean_decode", "decode.timing=[eager]")
    copy = Row("copy", "bytes", 1, "bandwidth", "GB/s", 2000.0, 1900.0, 2100.0, 5)
    monkeypatch.setattr(decode_bench, "copy_bandwidth", lambda device, size: copy)
    asked = {}

    def fake_benchmark(points, providers, device, **kwargs):
        asked.update(kwargs, points=len(points))
        yield Row("lean", "context", 4096, "bandwidth", "GB/s", 1500.0, 1400.0, 1600.0, 5, extra={"mode": "eager"})
        yield Row("lean", "context", 4096, "time", "ms", 0.1, n=5, extra={"mode": "eager"})
    monkeypatch.setattr(decode_bench, "run_benchmark", fake_benchmark)
    ctx = SimpleNamespace(device=torch.device("cpu"))
    rows = list(decode_bench.run(cfg, ctx))
    assert rows[0].provider == "copy" and [r.metric for r in rows[1:]] == ["bandwidth", "bandwidth_fraction", "time"]
    fraction = rows[2]
    assert (fraction.p50, fraction.p20, fraction.p80) == (0.75, 0.7, 0.8) and fraction.extra == {"mode": "eager"}
    assert asked["compare_to"] == ["fa2", "split"] and asked["back_to_back"] == "eager"


def test_a_copy_bandwidth_out_of_memory_is_a_row_and_the_decode_points_run_without_fractions(compose, monkeypatch):
    """The 2 x 4 GiB reference copy runs before any point: out of memory there ended the run."""
    import repro.bench
    from repro.records import Row
    from tasks.lean_attention import decode_bench

    def full(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
    monkeypatch.setattr(repro.bench, "measure", full)
    copy = repro.bench.copy_bandwidth(torch.device("cpu"), 1 << 20)
    assert (copy.status, copy.p50, copy.extra["reference"]) == ("oom", None, True) and "4.00 GiB" in copy.message
    monkeypatch.setattr(repro.bench, "measure", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug is not a row
        repro.bench.copy_bandwidth(torch.device("cpu"), 1 << 20)

    monkeypatch.setattr(decode_bench, "copy_bandwidth", lambda device, size: copy)
    monkeypatch.setattr(decode_bench, "run_benchmark", lambda *args, **kwargs: iter(
        [Row("lean", "context", 4096, "bandwidth", "GB/s", 1500.0, 1400.0, 1600.0, 5)]))
    rows = list(decode_bench.run(compose("task=lean_decode"), SimpleNamespace(device=torch.device("cpu"))))
    assert [(r.provider, r.metric, r.status) for r in rows] == [("device_copy", "copy_bandwidth", "oom"),
                                                                ("lean", "bandwidth", "ok")]


def test_a_calls_context_is_entered_once_around_its_result_and_every_timed_call():
    from contextlib import contextmanager

    from repro.timing import MIN_CALLS

    state, seen = {"on": False, "entered": 0}, []

    @contextmanager
    def backend():
        state.update(on=True, entered=state["entered"] + 1)
        try:
            yield
        finally:
            state["on"] = False

    def build(point):
        return Call(lambda: seen.append(state["on"]), result=lambda: seen.append(state["on"]) or torch.ones(1),
                    context=backend())
    run([Provider("base", build, baseline=True)])
    assert state == {"on": False, "entered": 1} and len(seen) > MIN_CALLS and all(seen)


def test_decode_bench_sdpa_sets_its_backend_once_per_point_not_in_every_timed_call(monkeypatch):
    """A decode loop sets SDPA's backend once; entering sdpa_kernel in each call (six global flags set and
    restored) cost about twice the call's own host time on a CPU."""
    import torch.nn.attention as attention

    from repro.timing import MIN_CALLS
    from tasks.lean_attention import decode_bench

    flag_sets, real = [], attention._sdpa_kernel
    monkeypatch.setattr(attention, "_sdpa_kernel", lambda *args: flag_sets.append(args) or real(*args))
    point = Point("context", 64, dict(batch=2, heads="4/2", head_dim=16, dtype="float16"), bytes=8192)
    ctx = SimpleNamespace(device=torch.device("cpu"))
    rows = run([Provider("fa2", lambda p: Call(lambda: None), baseline=True),
                decode_bench.sdpa_provider("sdpa_math", ctx, 0, rotate_bytes=1)], [point])
    (timed,) = [r for r in rows if r.provider == "sdpa_math" and r.metric == "time"]
    assert timed.status == "ok" and timed.n >= MIN_CALLS
    assert len(flag_sets) == 4  # set and restored twice: the first call, which may decline; then the measurement


def test_flash_kernel_sdpa_sets_its_backend_and_makes_its_mask_once_per_point_not_in_every_timed_call(monkeypatch):
    """A causal point with key padding: SDPA's (batch, 1, N, N) mask is made once, when the point is built, and
    its backend set once around the timed calls (about 18 us of host time a call where each entered it)."""
    import torch.nn.attention as attention
    from omegaconf import OmegaConf

    from repro.timing import MIN_CALLS
    from tasks.flashattention import kernel_bench as kb

    flag_sets, real = [], attention._sdpa_kernel
    monkeypatch.setattr(attention, "_sdpa_kernel", lambda *args: flag_sets.append(args) or real(*args))
    masks_made, masks_used = [], set()
    real_mask, real_sdpa = kb.sdpa_mask, torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(kb, "sdpa_mask", lambda *args: masks_made.append(args) or real_mask(*args))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, attn_mask, **kwargs: masks_used.add(id(attn_mask)) or
                        real_sdpa(*args, attn_mask=attn_mask, **kwargs))
    kernel = OmegaConf.create(dict(seq_len=[40], head_dim=[16], causal=[True], mode=["fwd"], tokens=80, hidden=32,
                                   batch=None, heads=None, dtype="float32", dropout=0.0, padding_mask=True))
    ctx = SimpleNamespace(device=torch.device("cpu"))
    rows = run([kb.provider("standard", kb.standard, ctx, 0), kb.provider("sdpa_math", kb.sdpa_attention, ctx, 0)],
               kb.grid(kernel))
    timed = {r.provider: r for r in rows if r.metric == "time"}["sdpa_math"]
    assert timed.status == "ok" and timed.n >= MIN_CALLS
    error = {r.provider: r for r in rows if r.metric == "rel_error"}["sdpa_math"]
    assert error.p50 < 2e-3  # the mask made once is the point's: causal and padded, as the baseline's
    assert len(masks_made) == 1 and len(masks_used) == 1
    assert len(flag_sets) == 4  # set and restored twice: the first call, which may decline; then the measurement


def test_a_graph_captures_a_whole_number_of_cycles_of_a_calls_rotated_inputs():
    from repro.timing import calls_per_loop
    assert calls_per_loop(0.25, 1, graph=True) == calls_per_loop(0.25, 7, graph=False) == 4  # about 1 ms
    assert calls_per_loop(0.25, 7, graph=True) == 7  # were 4: replays read 4 of the 7 copies
    assert calls_per_loop(0.001, 7, graph=True) == 1001 and calls_per_loop(0.001, 7, graph=False) == 1000
    assert calls_per_loop(0.004, 300, graph=True) == 300 and calls_per_loop(0.4, 300, graph=True) == 300


@gpu
def test_gpu_a_graph_replays_every_copy_a_call_rotates_through():
    import itertools

    copies = [torch.randn(256, device="cuda") for _ in range(1500)]  # more than a loop's 1,000 calls
    turn, captured = itertools.cycle(copies), []

    def call():
        x = next(turn)
        if torch.cuda.is_current_stream_capturing():
            captured.append(id(x))
        return x.sum()
    rows = list(run_benchmark([Point("n", 1, {})], [Provider("base", lambda p: Call(call, cycle=len(copies)),
                                                             baseline=True)],
                              torch.device("cuda"), warmup_ms=1, rep_ms=5, progress=False, back_to_back="graph"))
    assert rows[0].status == "ok" and len(captured) == len(copies) and set(captured) == {id(c) for c in copies}


@pytest.mark.parametrize("module", ["tasks.flashattention.kernel_bench", "tasks.scissorhands.bench",
                                    "tasks.greenformers.task"])
def test_the_benchmarks_take_their_dtype_names_from_the_harness(module):
    assert importlib.import_module(module).DTYPES is DTYPES
