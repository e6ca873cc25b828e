"""Task pregated_moe: its smoke run end to end, the paper's ratios from hand-made rows, bad input refused before any
work, a gpu_only that runs out of memory recorded while the sweep goes on, random and checkpoint weights, and the
quality experiment's two models differing only in pre-gating."""
import json
import math
import re
import weakref

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, gpu, run_inline
from repro.records import Row
from repro.text_data import TokenStream
from tasks.pregated_moe import quality, serving
from tasks.pregated_moe.model import SIZES, MoEConfig, SwitchLM, load_switch_weights
from tasks.pregated_moe.offload import ExpertOffload, pinned_in_place
from tasks.pregated_moe.weights import LazyTensors, random_switch, switch_state_dict

TINY = ["task=pregated_moe", "logger=none", "checkpoint.dir=null", "moe.runs=[{models:[tiny-4],batch:[1,2]}]",
        "moe.new_tokens=2"]


def record(folder):
    return json.loads((folder / "record.json").read_text())


def rows_of(saved, **where):
    return [r for r in saved["rows"] if all(r.get(k, r["extra"].get(k)) == v for k, v in where.items())]


# --- end to end --------------------------------------------------------------------------------------------------

def test_the_smoke_run_measures_every_strategy_and_batch_and_trains_both_gates(tmp_path):
    code, out, err = run_inline(*TINY, f"hydra.run.dir={tmp_path}")
    assert code == 0, err[-3000:]
    saved = record(tmp_path)
    assert saved["status"] == "ok" and all(r["status"] == "ok" for r in saved["rows"])
    assert all(r["unit"] for r in saved["rows"] if r["metric"] != "lr")  # the training loop's lr has none
    for provider in serving.PROVIDERS.values():
        for batch in (1, 2):
            measured = {r["metric"] for r in rows_of(saved, provider=provider, batch=batch)}
            assert {"throughput", "moe_block_latency", "copied_per_token", "active_experts", "speedup",
                    "relative_throughput"} <= measured, (provider, measured)
            copied = rows_of(saved, provider=provider, batch=batch, metric="copied_per_token")[0]["p50"] > 0
            assert ("hidden_copy_fraction" in measured) == ("copy_bandwidth" in measured) == copied
            assert ("hit_rate" in measured) == (provider != "gpu_only")
    speedups = rows_of(saved, metric="speedup")
    assert all(r["extra"]["baseline"] == "moe_ondemand" and r["extra"]["model"] == "tiny-4" for r in speedups)
    assert [r["p50"] for r in speedups if r["provider"] == "moe_ondemand"] == [1.0, 1.0]
    # all strategies generate the same tokens with the same experts: only when they are copied differs
    active = {r["p50"] for r in rows_of(saved, metric="active_experts", batch=2)}
    assert len(active) == 1
    ppl = {r["provider"]: r["p50"] for r in rows_of(saved, metric="val_perplexity")}
    change = rows_of(saved, metric="val_perplexity_change")
    assert set(ppl) == {"gate", "pregate"} and len(change) == 1
    assert change[0]["p50"] == pytest.approx(100 * (ppl["pregate"] / ppl["gate"] - 1))
    assert "host_link" in saved["env"] and "host_peak_rss_mb" in saved["env"]["host_memory"]
    assert saved["env"]["models"]["tiny-4"]["weights"] == "random"


def test_a_gpu_only_out_of_memory_is_a_row_and_the_sweep_goes_on(tmp_path, monkeypatch):
    class CappedOffload(ExpertOffload):
        def __init__(self, model, strategy, *args, **kwargs):
            if strategy == "gpu_only":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 51.50 GiB")
            super().__init__(model, strategy, *args, **kwargs)

    monkeypatch.setattr(serving, "ExpertOffload", CappedOffload)
    code, _, err = run_inline(*TINY, "parts=[serving]", "moe.runs=[{models:[tiny-4,tiny-8],batch:[1]}]",
                              f"hydra.run.dir={tmp_path}")
    assert code == 0, err[-3000:]
    saved = record(tmp_path)
    failed = [r for r in saved["rows"] if r["status"] != "ok"]
    assert [(r["provider"], r["extra"]["model"], r["status"]) for r in failed] == \
        [("gpu_only", "tiny-4", "oom"), ("gpu_only", "tiny-8", "oom")]
    assert "51.50 GiB" in failed[0]["message"]
    assert rows_of(saved, provider="pregated", metric="speedup", model="tiny-8")  # the next model still ran
    assert not rows_of(saved, metric="relative_throughput")  # no gpu_only row to be relative to


def test_a_run_killed_at_a_later_batch_keeps_the_ratios_of_the_batches_done(monkeypatch):
    measure = serving.measure_batch

    def measure_then_die(model, strategies, batch, *args):
        if batch == 2:
            raise KeyboardInterrupt  # what a job's SIGTERM becomes
        return measure(model, strategies, batch, *args)
    monkeypatch.setattr(serving, "measure_batch", measure_then_die)
    spec = OmegaConf.create(dict(top_k=1, new_tokens=2, warmup_tokens=1, weights="random", slots=None, cache="none",
                                 strategy=["on_demand", "pregated"]))
    ctx = type("Context", (), dict(device=torch.device("cpu"), env={"models": {}}))()
    kept = []
    with pytest.raises(KeyboardInterrupt):
        for row in serving.serve_model("tiny-4", [1, 2], spec, ctx, 0, None):
            kept.append(row)
    speedup = [r for r in kept if r.metric == "speedup" and r.provider == "pregated"]
    assert len(speedup) == 1 and speedup[0].extra["batch"] == 1


def test_every_row_names_the_expert_cache_and_the_tokens_generated(capsys):
    spec = OmegaConf.create(dict(top_k=1, new_tokens=2, warmup_tokens=1, weights="random", slots=4, cache="lru",
                                 strategy=["on_demand", "pregated"]))
    ctx = type("Context", (), dict(device=torch.device("cpu"), env={"models": {}}))()
    rows = list(serving.serve_model("tiny-4", [1, 2], spec, ctx, 0, None))
    assert any(r.metric == "speedup" for r in rows)  # the ratios' rows too
    assert all(r.extra["cache"] == "lru" and r.extra["new_tokens"] == 2 for r in rows)
    # each batch said as it ends (the paper's grid printed nothing for hours)
    assert re.findall(r"\[pregated_moe\] tiny-4 at batch (\d): 2 strategies \(\d+\.\d s\)\n",
                      capsys.readouterr().out) == ["1", "2"]


def test_a_groups_runtimes_are_let_go_before_the_next_group_starts(monkeypatch):
    """prefetch_all runs alone, after the others: their pools must not count in its peak memory."""
    started, alive = [], []

    def start_point(model, strategy, *args):
        if strategy == "prefetch_all":
            alive.extend(earlier().strategy for earlier in started if earlier() is not None)
        runtime, decoder = start(model, strategy, *args)
        started.append(weakref.ref(runtime))
        return runtime, decoder

    start = serving.start_point
    monkeypatch.setattr(serving, "start_point", start_point)
    torch.manual_seed(0)
    model = SwitchLM(MoEConfig(n_layer=4, n_experts=4, vocab_size=97, max_len=8, pregate=True))
    spec = OmegaConf.create(dict(slots=None, cache="none", warmup_tokens=1, new_tokens=2))
    row_of = lambda strategy: lambda metric, unit, p50=None, *args, **extra: Row(  # noqa: E731
        strategy, "experts", 4, metric, unit, p50, extra=extra)
    rows = serving.measure_batch(model, ["gpu_only", "prefetch_all", "pregated"], 1, spec, torch.device("cpu"), 0,
                                 None, row_of)
    assert {r.provider for r in rows if r.status == "ok"} == {"gpu_only", "prefetch_all", "pregated"}
    assert len(started) == 3 and alive == []


# --- the rows of a point -----------------------------------------------------------------------------------------

def test_a_points_rows_are_its_measurements_in_their_units():
    """point_rows on hand-made spans and timings: tokens/s from step times (the slow step the low percentile),
    MoE-block latency and stall as medians over steps of each step's mean, with the time of prefetches issued
    between blocks added to the blocks they serve, MB of 2^20 bytes, GB/s of 1e9."""
    from types import SimpleNamespace as Ns

    def span(kind, forward, ms):
        return Ns(kind=kind, forward=forward, ms=lambda: ms)
    spans = [span("moe", 0, 1.0), span("moe", 0, 3.0), span("moe", 1, 2.5), span("moe", 2, 4.0),
             span("stall", 0, 0.5), span("stall", 0, 0.5), span("stall", 1, 9.0), span("stall", 2, 0.1),
             span("issue", 0, 1.0), span("issue", 1, 1.0), span("copy", 1, 7.0)]
    summary = dict(slots=4, host_memory="pinned", pin_warning=None, bytes_per_token=2 * 2**20,
                   mean_active_experts=1.5, max_active_experts=2, hit_rate=0.25, cache_hits=1, cache_misses=3,
                   bytes_copied=3e9, copy_ms=1000.0, hidden_copy_fraction=0.6, prefetched_fraction=0.75)
    runtime = Ns(summary=lambda: summary, stats=Ns(spans=spans))
    timing = Ns(p50=10.0, p20=8.0, p80=12.5, n=5, clock="events")

    def row(metric, unit, p50=None, p20=None, p80=None, n=1, **extra):
        return Row("pregated", "experts", 8, metric, unit, p50, p20, p80, n, extra=extra)
    got = {r.metric: r for r in serving.point_rows(runtime, timing, 2, 2**30, 6.0, row)}
    assert (got["throughput"].p50, got["throughput"].p20, got["throughput"].p80) == (200.0, 160.0, 250.0)
    assert got["moe_block_latency"].p50 == 3.5 and got["moe_block_latency"].n == 3  # steps 2.5, 3.5, 4.0
    assert got["stall_per_moe_block"].p50 == 1.0  # steps 1.0, 10.0, 0.1: the slow step does not set it
    assert got["copied_per_token"].p50 == 2.0 and got["peak_memory"].p50 == 1024.0
    assert got["copy_bandwidth"].p50 == pytest.approx(3.0) and got["copy_bandwidth_fraction"].p50 == pytest.approx(0.5)
    assert got["hit_rate"].p50 == 0.25 and got["active_experts"].p50 == 1.5
    assert got["prefetched_fraction"].p50 == 0.75
    assert all(r.extra["slots"] == 4 for r in got.values())


# --- the ratios --------------------------------------------------------------------------------------------------

def measured(provider, metric, p50, model="switch-base-8", batch=1, status="ok"):
    return Row(provider, "experts", 8, metric, "", p50, n=5, status=status, extra={"model": model, "batch": batch})


def test_the_ratios_pair_each_point_with_its_baseline_of_the_same_model_and_batch():
    rows = [measured("moe_ondemand", "moe_block_latency", 2.0), measured("pregated", "moe_block_latency", 1.25),
            measured("gpu_only", "moe_block_latency", 0.8), measured("gpu_only", "throughput", 120.0),
            measured("pregated", "throughput", 90.0), measured("moe_ondemand", "throughput", 60.0),
            measured("gpu_only", "peak_memory", 1000.0),
            measured("pregated", "peak_memory", 250.0),
            # another batch, whose gpu_only ran out of memory, and another model
            measured("pregated", "throughput", 30.0, batch=8), measured("gpu_only", "throughput", None, batch=8,
                                                                     status="oom"),
            measured("pregated", "moe_block_latency", 1.0, model="switch-base-16")]
    derived = {(r.provider, r.metric, r.extra["batch"], r.extra["model"]): r for r in serving.ratio_rows(rows)}
    got = {key[:2]: (r.p50, r.unit, r.extra["baseline"]) for key, r in derived.items()}
    assert got == {
        ("moe_ondemand", "speedup"): (1.0, "x", "moe_ondemand"),
        ("pregated", "speedup"): (pytest.approx(1.6), "x", "moe_ondemand"),
        ("gpu_only", "speedup"): (pytest.approx(2.5), "x", "moe_ondemand"),
        ("gpu_only", "relative_throughput"): (100.0, "%", "gpu_only"),
        ("pregated", "relative_throughput"): (pytest.approx(75.0), "%", "gpu_only"),
        ("moe_ondemand", "relative_throughput"): (pytest.approx(50.0), "%", "gpu_only"),
        ("gpu_only", "throughput_speedup"): (pytest.approx(2.0), "x", "moe_ondemand"),
        ("pregated", "throughput_speedup"): (pytest.approx(1.5), "x", "moe_ondemand"),
        ("moe_ondemand", "throughput_speedup"): (1.0, "x", "moe_ondemand"),
        ("gpu_only", "relative_peak_memory"): (100.0, "%", "gpu_only"),
        ("pregated", "relative_peak_memory"): (pytest.approx(25.0), "%", "gpu_only"),
        ("gpu_only", "memory_saving"): (1.0, "x", "gpu_only"),
        ("pregated", "memory_saving"): (pytest.approx(4.0), "x", "gpu_only"),
    }
    assert all(batch == 1 and model == "switch-base-8" for _, _, batch, model in derived)


def test_each_claim_reads_only_the_models_it_is_stated_for():
    from repro.claims import load_paper
    from repro.records import RunRecord
    from repro.report import claim_value

    _, _, claims = load_paper(ROOT / "results" / "published" / "pregated_moe.yaml")
    judged = {}
    for model in ("tiny-4", "switch-base-8"):
        rows = [measured(provider, metric, p50, model=model) for provider, metric, p50 in [
            ("moe_ondemand", "moe_block_latency", 2.0), ("pregated", "moe_block_latency", 1.25),
            ("gpu_only", "throughput", 120.0), ("pregated", "throughput", 90.0), ("moe_ondemand", "throughput", 60.0),
            ("gpu_only", "peak_memory", 1000.0), ("pregated", "peak_memory", 250.0)]]
        record = RunRecord("pregated_moe", "pregated_moe", "small", [], {}, [], {}, "2026-12-07T00:00:00+00:00",
                           rows=rows + list(serving.ratio_rows(rows)))
        judged[model] = {c.id for c in claims if claim_value(c, record)[0] is not None}
    assert judged["tiny-4"] == set()  # a smoke run's tiny models are no Switch-Base or -Large
    assert judged["switch-base-8"] == {"latency_speedup_vs_ondemand_typical", "peak_memory_saving_vs_gpu_only",
                                       "peak_memory_fraction_of_gpu_only", "throughput_fraction_of_gpu_only",
                                       "throughput_speedup_vs_ondemand"}


def test_each_model_is_built_once_for_every_batch_named_with_it():
    runs = [{"models": ["switch-base-8", "switch-large-128"], "batch": [1]},
            {"models": ["switch-base-32", "switch-base-8"], "batch": [32, 8]}]
    assert serving.plan(runs) == {"switch-base-8": [1, 8, 32], "switch-large-128": [1], "switch-base-32": [8, 32]}
    assert serving.parse_model("switch-large-128") == ("switch-large", 128)


# --- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, expected", [
    ("moe.top_k=5", "moe.top_k=5 must be between 1 and the 4 experts of tiny-4"),
    ("moe.strategy=[pregated,offload_all]", "moe.strategy=['offload_all'] is not one of"),
    ("moe.strategy=[on_demand,prefetch_all] moe.slots=3",
     "moe.slots=3 is too few for prefetch_all on tiny-4 at batch 2: it must hold 8 experts at once"),
    ("moe.runs=[{models:[switch-huge-8],batch:[1]}]", "model 'switch-huge-8' is not '<size>-<experts>'"),
    ("moe.new_tokens=0", "moe.new_tokens=0 must be an integer >= 1"),
    ("moe.cache=lru", "moe.cache='lru' needs moe.slots, so that every strategy caches in a pool of the same size "
                      "(at least 8 here)"),
    ("quality.top_k=5", "quality.top_k=5 exceeds quality.n_experts=4"),
    ("moe.strategy=[gpu_only] moe.slots=8", "moe.strategy=[gpu_only] keeps every expert on the device"),
    ("moe.weights=hub moe.checkpoint=null", "moe.checkpoint=None must be a path or Hub name"),
])
def test_bad_input_is_named_before_any_work(override, expected, tmp_path):
    code, out, err = run_inline(*TINY, *override.split(), f"hydra.run.dir={tmp_path}")
    assert code == 2, (out, err[-2000:])
    assert expected in err, err[-2000:]
    assert "Traceback" not in err and not record(tmp_path)["rows"]


def test_every_setting_is_checked(compose):
    from repro.context import ConfigError
    from tasks.pregated_moe.task import validate

    base = compose("task=pregated_moe", "moe.runs=[{models:[tiny-4],batch:[1,2]}]", "moe.strategy=[pregated]")
    validate(base)
    for key, value, expected in [
        ("moe.slots", 3, "moe.slots=3 is too few for pregated on tiny-4 at batch 2: it must hold 4 experts at once"),
        ("moe.runs", [{"models": ["tiny-4"], "batch": [0]}], "moe.runs.batch=0 must be an integer >= 1"),
        ("moe.runs", [{"models": ["tiny-4"]}], "each run is {models: [...], batch: [...]}"),
        ("moe.runs", [{"models": ["tiny-0"], "batch": [1]}], "model 'tiny-0' is not '<size>-<experts>'"),
        # another spelling of tiny-4 would build and measure it twice
        ("moe.runs", [{"models": ["tiny-4", "tiny-04"], "batch": [1]}], "model 'tiny-04' is not '<size>-<experts>'"),
        ("moe.runs", [], "moe.runs is empty"),
        ("moe.runs", [{"models": [], "batch": [1]}], "moe.runs.models=[] is empty"),
        ("moe.runs", [{"models": ["tiny-4"], "batch": []}], "moe.runs.batch=[] is empty"),
        ("moe.strategy", [], "moe.strategy=[] is empty: choose some of ['gpu_only', 'on_demand', 'prefetch_all',"),
        ("moe.strategy", ["pregated", "pregated"], "moe.strategy names 'pregated' more than once"),
        ("parts", [], "parts=[] is empty: choose some of ['serving', 'quality']"),
        ("moe.warmup_tokens", 0, "moe.warmup_tokens=0 must be an integer >= 1"),
        ("moe.memory_cap_gb", -1, "moe.memory_cap_gb=-1 must be a number >= 0.01"),
        ("moe.cache", "fifo", "moe.cache='fifo' is not one of ['none', 'lru', 'lfu']"),
        ("moe.weights", "pretrained", "moe.weights='pretrained' is not one of ['random', 'hub']"),
        ("moe.checkpoint", "google/{size}", "moe.checkpoint='google/{size}' must be a path or Hub name"),
        ("moe.checkpoint", None, "moe.checkpoint=None must be a path or Hub name in which {model} stands"),
        ("moe.checkpoint", "google/{model.x}", "moe.checkpoint='google/{model.x}' must be a path or Hub name"),
        ("moe.checkpoint", "google/{model[x]}", "moe.checkpoint='google/{model[x]}' must be a path or Hub name"),
        ("moe.checkpoint", "/nonexistent/{model}", "/nonexistent/tiny-4 is no folder here (a local checkpoint must"),
        ("moe.checkpoint", "my_ckpts_{model}", "my_ckpts_tiny-4 is no folder here"),  # no Switch has a bare name
        ("parts", ["serving", "speed"], "parts=['speed'] is not one of ['serving', 'quality']"),
        ("quality.n_layer", 2, "quality.n_layer=2 must be an integer >= 4"),
        ("quality.n_head", 3, "quality.d_model=32 must be a multiple of quality.n_head=3"),
        ("quality.batch_tokens", 16, "quality.batch_tokens=16 must be a multiple of quality.seq_len=32"),
        ("quality.batch_tokens", 48, "quality.batch_tokens=48 must be a multiple of quality.seq_len=32"),
        ("quality", {"seq_len": 10**7, "batch_tokens": 10**7}, "too few for sequences of quality.seq_len=10000000"),
        ("train.steps", 0, "train.steps=0 must be an integer >= 1"),
    ]:
        cfg = base.copy()
        if key == "moe.checkpoint":
            OmegaConf.update(cfg, "moe.weights", "hub")
        OmegaConf.update(cfg, key, value)
        with pytest.raises(ConfigError) as error:
            validate(cfg)
        assert expected in str(error.value), (key, str(error.value))


def hf_switch_folder(folder, num_experts: int, decoder_layers: int = 4):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(4)
    config = SwitchTransformersConfig(vocab_size=97, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=4,
                                      num_decoder_layers=decoder_layers, num_experts=num_experts, encoder_sparse_step=2,
                                      decoder_sparse_step=2)
    hf = SwitchTransformersForConditionalGeneration(config).eval()
    hf.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("experts, decoder_layers, expected", [
    (8, 4, "checkpoint '{folder}' is not a tiny-4: num_experts=8 where tiny-4 has 4"),
    # else every row failed, after the model was built, when its weights were copied in
    (4, 6, "is not a tiny-4: 3 decoder MoE blocks (num_decoder_layers=6, decoder_sparse_step=2) where tiny-4 has 2"),
    # transformers reads a folder with no config.json as switch-base-8's config
    (None, None, "checkpoint folder '{folder}' has no config.json"),
])
def test_a_checkpoint_of_another_model_is_refused_before_any_work(experts, decoder_layers, expected, tmp_path):
    folder = tmp_path / "ckpt" / "tiny-4"
    if experts is None:
        folder.mkdir(parents=True)
    else:
        hf_switch_folder(folder, num_experts=experts, decoder_layers=decoder_layers)
    code, _, err = run_inline(*TINY, "moe.weights=hub", f"moe.checkpoint='{tmp_path}/ckpt/{{model}}'",
                              f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2
    assert expected.format(folder=folder) in err, err[-2000:]


# --- weights -----------------------------------------------------------------------------------------------------

def test_random_weights_are_initialised_as_the_model_does_and_follow_the_seed():
    cfg = MoEConfig.of_size("tiny", n_experts=8, vocab_size=1000)
    model = random_switch(cfg, seed=3, device="cpu")
    assert model.lm_head.weight is model.embed.weight  # still tied
    assert all(torch.equal(p, torch.ones_like(p)) for p in model.parameters() if p.dim() == 1)
    experts = torch.cat([f.w_in.flatten() for f in model.moe_layers])
    assert experts.std().item() == pytest.approx(0.02, rel=0.02) and abs(experts.mean().item()) < 1e-3
    again, other = random_switch(cfg, seed=3, device="cpu"), random_switch(cfg, seed=4, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert not torch.equal(model.moe_layers[0].w_in, other.moe_layers[0].w_in)
    reference = SwitchLM(cfg)  # the same parameters, in the same order
    shapes = [(n, p.shape) for n, p in model.named_parameters()]
    assert shapes == [(n, p.shape) for n, p in reference.named_parameters()]


def spec(**overrides):
    return OmegaConf.create({"top_k": 1, "new_tokens": 2, "warmup_tokens": 1, "weights": "hub",
                             "checkpoint": "{model}", **overrides})


def test_checkpoint_weights_come_from_the_folder_and_an_unreachable_one_leaves_random_weights_said_so(tmp_path):
    hf = hf_switch_folder(tmp_path / "tiny-8", num_experts=8)
    model, weights = serving.build("tiny-8", spec(checkpoint=f"{tmp_path}/{{model}}"), torch.device("cpu"), 0)
    assert weights.startswith(f"{tmp_path}/tiny-8")
    for ffn, block in zip(model.moe_layers, (1, 3)):
        mlp = hf.decoder.block[block].layer[-1].mlp
        assert torch.equal(ffn.w_in[5], mlp.experts["expert_5"].wi.weight)
    assert isinstance(switch_state_dict(str(tmp_path / "tiny-8")), LazyTensors)  # read a tensor at a time
    model, weights = serving.build("tiny-8", spec(checkpoint=f"{tmp_path}/missing/{{model}}"), torch.device("cpu"), 0)
    assert weights.startswith(f"random: {tmp_path}/missing/tiny-8 could not be read")


@pytest.mark.parametrize("setting, expected", [
    ({"dense_act_fn": "gelu"}, "is not a tiny-4: dense_act_fn='gelu' where tiny-4 has 'relu'"),
    ({"router_bias": True}, "is not a tiny-4: router_bias=True where tiny-4 has False"),
])
def test_a_checkpoint_whose_experts_or_routers_compute_otherwise_is_refused(setting, expected):
    """SwitchLM's experts are ReLU and its routers have no bias: such weights would compute something else."""
    from transformers import SwitchTransformersConfig

    from tasks.pregated_moe.weights import check_switch_config

    config = SwitchTransformersConfig(d_model=32, d_ff=64, num_decoder_layers=4, num_experts=4, decoder_sparse_step=2)
    cfg = MoEConfig.of_size("tiny", n_experts=4, vocab_size=97)
    check_switch_config(config, "ckpt", "tiny-4", cfg)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint 'ckpt' {expected}")):
        check_switch_config(SwitchTransformersConfig(**{**config.to_dict(), **setting}), "ckpt", "tiny-4", cfg)


def test_experts_read_from_a_checkpoint_are_not_drawn_at_random_first(tmp_path, monkeypatch):
    hf_switch_folder(tmp_path / "tiny-8", num_experts=8)
    drawn = []
    normal = torch.Tensor.normal_

    def draw(t, *args, **kwargs):
        if t.device.type != "meta":  # SwitchLM's own initialisation of the shapes costs nothing
            drawn.append(t.numel())
        return normal(t, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "normal_", draw)
    model, _ = serving.build("tiny-8", spec(checkpoint=f"{tmp_path}/{{model}}"), torch.device("cpu"), 0)
    experts = {id(p) for f in model.moe_layers for p in (f.w_in, f.w_out)}
    assert sum(drawn) == sum(p.numel() for p in model.parameters() if p.dim() > 1 and id(p) not in experts)


def test_a_local_checkpoint_without_weight_files_is_refused_not_replaced_by_random_weights(tmp_path):
    from repro.context import ConfigError

    folder = tmp_path / "tiny-8"
    hf_switch_folder(folder, num_experts=8)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    cfg, checkpoint = MoEConfig.of_size("tiny", n_experts=8, vocab_size=97), spec(checkpoint=f"{tmp_path}/{{model}}")
    with pytest.raises(ConfigError, match=f"checkpoint folder '{folder}' has no .safetensors or .bin weight files"):
        serving.validate_checkpoint(checkpoint, "tiny-8", cfg)
    with pytest.raises(ValueError, match="has no .safetensors or .bin weight files"):
        serving.build("tiny-8", checkpoint, torch.device("cpu"), 0)


def test_a_relative_checkpoint_path_is_not_taken_for_a_hub_name_where_its_folder_is_here(tmp_path, monkeypatch):
    from repro.context import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()
    cfg = MoEConfig.of_size("tiny", n_experts=8, vocab_size=97)
    with pytest.raises(ConfigError, match="ckpts/tiny-8 is no folder here"):
        serving.validate_checkpoint(spec(checkpoint="ckpts/{model}"), "tiny-8", cfg)
    serving.validate_checkpoint(spec(checkpoint="google/{model}"), "tiny-8", cfg)  # a Hub name: read when run


def test_a_checkpoint_under_the_home_folder_is_read_from_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    hf_switch_folder(tmp_path / "ckpt" / "tiny-8", num_experts=8)
    checkpoint = spec(checkpoint="~/ckpt/{model}")
    serving.validate_checkpoint(checkpoint, "tiny-8", MoEConfig.of_size("tiny", n_experts=8, vocab_size=97))
    _, weights = serving.build("tiny-8", checkpoint, torch.device("cpu"), 0)
    assert weights.startswith(f"{tmp_path}/ckpt/tiny-8 (decoder experts")


def test_switch_weights_read_lazily_match_reading_them_whole(tmp_path):
    hf = hf_switch_folder(tmp_path / "ckpt", num_experts=4)
    lazy, whole = (random_switch(MoEConfig(n_experts=4, vocab_size=97), seed=0, device="cpu") for _ in range(2))
    load_switch_weights(lazy, switch_state_dict(str(tmp_path / "ckpt")))
    load_switch_weights(whole, hf.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(lazy.parameters(), whole.parameters()))


def test_switch_weights_read_lazily_are_read_once_each(tmp_path, monkeypatch):
    hf_switch_folder(tmp_path / "ckpt", num_experts=4)
    lazy = switch_state_dict(str(tmp_path / "ckpt"))
    read = []
    get = LazyTensors.__getitem__
    monkeypatch.setattr(LazyTensors, "__getitem__", lambda self, name: read.append(name) or get(self, name))
    load_switch_weights(random_switch(MoEConfig(n_experts=4, vocab_size=97), seed=0, device="cpu"), lazy)
    experts = [name for name in read if ".experts." in name]  # the routers, small, are read for their shape too
    assert len(experts) == len(set(experts)) == 2 * 4 * 2  # 2 MoE blocks of 4 experts, wi and wo
    read.clear()
    assert "decoder.block.1.layer.2.mlp.router.classifier.weight" in lazy and "nothing" not in lazy
    assert not read  # asking whether a tensor is there reads none


# --- the quality experiment --------------------------------------------------------------------------------------

QUALITY_VAL = torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)


def quality_setup():
    cfg = OmegaConf.create({
        "seed": 5, "quality": {"d_model": 32, "d_ff": 64, "n_layer": 6, "n_head": 2, "n_experts": 4, "top_k": 1,
                               "seq_len": 16, "batch_tokens": 64, "eval_batches": 2},
        "train": {"steps": 2, "lr": 1e-3}})
    train = torch.randint(0, 50, (3000,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    data = TokenStream(train, QUALITY_VAL, tokenizer=[None] * 50, fingerprint="fake")
    ctx = type("Ctx", (), {"device": torch.device("cpu")})()
    return [c.build() for c in quality.candidates(cfg, ctx, data)]


def test_the_quality_runs_differ_only_in_pre_gating():
    gate, pregate = quality_setup()
    assert (gate.name, pregate.name) == ("gate", "pregate")
    assert {**vars(gate.model.config), "pregate": True} == vars(pregate.model.config)
    assert gate.fingerprint != pregate.fingerprint and gate.extra == pregate.extra
    for step in (0, 7):  # the same batches
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in
                   zip(gate.batches(step, 0, 1), pregate.batches(step, 0, 1)))
    ordinary, twin = gate.model.state_dict(), pregate.model.state_dict()
    first, second, third = (b.index for b in gate.model.blocks if b.moe)
    gates = {f"blocks.{first}.ffn.pregate.classifier.weight": f"blocks.{second}.ffn.gate.classifier.weight",
             f"blocks.{second}.ffn.pregate.classifier.weight": f"blocks.{third}.ffn.gate.classifier.weight"}
    for name, value in twin.items():  # every weight the same; each pre-gate starts as the next block's gate
        assert torch.equal(value, ordinary[gates.get(name, name)]), name
    assert set(ordinary) - set(twin) == set(gates.values())
    x = gate.batches(0, 0, 1)[0]["input_ids"]
    out_gate, out_pregate = gate.model(x, labels=x), pregate.model(x, labels=x)
    assert math.isfinite(out_pregate.lm_loss.item()) and out_gate.lm_loss.item() != out_pregate.lm_loss.item()


def test_the_quality_is_the_language_model_loss_on_the_same_validation_windows_for_both_models():
    """The load-balancing loss is a training term, which pre-gating changes: it is no part of the perplexity."""
    from repro.text_data import windows

    gate, pregate = quality_setup()
    got = {r.metric: r.p50 for r in gate.evaluate(gate.model)}
    assert {r.metric: r.p50 for r in pregate.evaluate(gate.model)} == got  # either's evaluation, the same windows
    generator = torch.Generator().manual_seed(5 + 1)  # seed + 1, apart from the training batches' seeds
    with torch.no_grad():
        out = [gate.model(x, labels=x) for x in (windows(QUALITY_VAL, 4, 16, generator) for _ in range(2))]
    assert all(o.aux_loss > 0 for o in out)
    assert got["val_loss"] == pytest.approx(sum(o.lm_loss.item() for o in out) / 2, rel=1e-6)
    assert got["val_perplexity"] == pytest.approx(math.exp(got["val_loss"]))


def test_the_perplexity_change_compares_only_models_that_finished_training():
    """One that ran out of memory at step 400 had evaluated at step 300: that perplexity is not the final model's."""
    def ppl(provider, step, value):
        return Row(provider, "step", step, "val_perplexity", "ppl", value, n=1, extra={"model": "moe"})

    def tps(provider):
        return Row(provider, "step", 500, "tokens_per_s", "tokens/s", 1.0, n=1, extra={"model": "moe"})

    def finished(provider, final):
        return [ppl(provider, 300, 90.0), ppl(provider, 500, final), tps(provider)]

    def stopped(provider):
        failure = Row(provider, "step", 0, "loss", "nats", status="oom", extra={"model": "moe"})
        return [ppl(provider, 300, 91.0), failure]
    assert list(quality.change_rows(finished("gate", 70.0) + stopped("pregate"))) == []
    assert list(quality.change_rows(stopped("gate") + finished("pregate", 70.0))) == []
    change, = quality.change_rows(finished("gate", 70.0) + finished("pregate", 77.0))
    assert (change.x_value, change.extra["baseline"]) == (500, "gate")
    assert change.p50 == pytest.approx(10.0)


# --- on a GPU ----------------------------------------------------------------------------------------------------

@gpu
def test_experts_are_pinned_where_they_lie_and_unpinned_after():
    model = random_switch(MoEConfig(n_experts=8, pregate=True), seed=0, device="cuda")
    host = [t for f in model.moe_layers for t in (f.w_in.data, f.w_out.data)]
    pointers = [t.data_ptr() for t in host]
    with pinned_in_place(host, "cuda") as warning:
        assert warning is None and all(t.is_pinned() for t in host)
        runtime = ExpertOffload(model, "pregated", "cuda")
        assert [t.data_ptr() for f in runtime.layers for t in (f.w_in, f.w_out)] == pointers  # not copied
        assert runtime.host_memory == "pinned" and runtime(torch.ones(1, 1, dtype=torch.long)).isfinite().all()
    assert not any(t.is_pinned() for t in host)


@gpu
def test_experts_that_cannot_be_pinned_in_place_stay_pageable_with_a_warning(monkeypatch):
    class Refusing:
        def cudaHostRegister(self, *args):
            return 2  # cudaErrorMemoryAllocation

        def cudaHostUnregister(self, *args):
            raise AssertionError("nothing was registered")

    monkeypatch.setattr(torch.cuda, "cudart", Refusing)
    tensors = [torch.randn(1000)]
    with pytest.warns(UserWarning, match="pinning the experts failed"), pinned_in_place(tensors, "cuda") as warning:
        assert "CUDA error 2" in warning and not tensors[0].is_pinned()
    torch.zeros(1, device="cuda")  # the failed call left no error behind for the next kernel


@gpu
def test_the_memory_cap_refuses_larger_allocations_and_is_lifted_after():
    device = torch.device("cuda")
    with serving.MemoryCap(1.0, device):
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    assert torch.empty(2 * 2**30, dtype=torch.uint8, device=device).numel() == 2 * 2**30  # allowed again


@gpu
def test_on_a_gpu_every_strategy_records_memory_hidden_copies_and_the_copy_bandwidth(tmp_path):
    code, _, err = run_inline(*TINY, "scale=small", "parts=[serving]", "moe.runs=[{models:[tiny-16],batch:[1,4]}]",
                              f"paths.records={tmp_path}/runs", f"hydra.run.dir={tmp_path}/job")
    assert code == 0, err[-3000:]
    saved = record(tmp_path / "job")
    assert saved["env"]["host_link"]["h2d_pinned_gb_s"] > 0 and saved["env"]["memory_cap_gb"] == 40
    for provider in serving.PROVIDERS.values():
        measured = {r["metric"] for r in rows_of(saved, provider=provider)}
        assert {"peak_memory", "relative_peak_memory", "memory_saving"} <= measured, provider
    for r in rows_of(saved, provider="pregated", metric="hidden_copy_fraction"):
        assert 0 <= r["p50"] <= 1 and r["extra"]["host_memory"] == "pinned"
    assert rows_of(saved, provider="moe_ondemand", metric="copy_bandwidth_fraction")
    # top-1 at batch 1: on_demand's pool holds one expert, pregated's two, prefetch_all's two blocks' 16. The peaks
    # differ by those pools alone, whichever point started first and whatever ran in the group before.
    peak = {strategy: rows_of(saved, provider=provider, metric="peak_memory", batch=1)[0]["p50"] * 2**20
            for strategy, provider in serving.PROVIDERS.items()}
    d_model, d_ff, *_ = SIZES["tiny"]
    expert = 2 * d_model * d_ff * 4  # w_in and w_out, float32
    assert peak["pregated"] - peak["on_demand"] == pytest.approx(expert, abs=expert / 4)
    assert peak["prefetch_all"] - peak["on_demand"] == pytest.approx(31 * expert, abs=expert / 4)


@pytest.mark.parametrize("parts, given, readers", [
    ("[serving]", "train.steps=3", "quality"),
    ("[serving]", "quality.n_layer=2", "quality"),
    ("[serving]", "data.max_files=4", "quality"),
    ("[quality]", "moe.top_k=2", "serving"),
])
def test_a_setting_of_a_part_not_run_is_refused(job_refusal, parts, given, readers):
    message = job_refusal("task=pregated_moe", "scale=smoke", f"parts={parts}", given)
    assert message.startswith(f"{given} would have no effect: it is read only for {readers}, and parts="), message
