"""Greenformers (task greenformers): the smoke run end to end; the counted FLOPs and parameters (count_rows)
against a hand count; the crossover and cost rows from hand-made rows, and the claims that read them; the grids'
pairs and lengths; the notebook's BERT-base parameter counts; the CPU memory tracker against a hand count; the
generated classification set and the quality part's micro-batches; the SVD error as rank falls; bad input named
before any work."""
import copy
import json
import math
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import DEVICE, ROOT, check_smoke_record, run_inline
from repro.bench import Point
from repro.claims import load_paper
from repro.models import count_parameters
from repro.records import Row, RunRecord
from repro.report import NOT_REPRODUCED, NOT_RUN, REPRODUCED, WITHIN, evaluate
from tasks.common.low_rank import LowRankLinear
from tasks.greenformers.efficiency import (Models, cost_rows, count_rows, crossover_rows, host_memory_rows,
                                           shortest_win, tensor_peak_mb)
from tasks.greenformers.quality import MARKERS, _trainee, counting_set, svd_rows
from tasks.greenformers.task import _point
from tasks.greenformers.variants import (Variant, build, count_flops, distinct_models, on_meta, parse_variant,
                                         with_attention)

BERT_BASE = dict(name="bert-base", vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072)
# odd sizes: 3 heads of 12, an FFN of 52
TINY = dict(name="tiny", vocab_size=50, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
            intermediate_size=52)


def test_smoke_run_writes_every_kind_of_row(tmp_path):
    code, out, err = run_inline("task=greenformers", "logger=none", f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    record = json.loads((tmp_path / "record.json").read_text())
    check_smoke_record(record, out)  # this file runs the task's smoke run for test_cli.py
    rows = [Row(**r) for r in record["rows"]]
    metrics = {r.metric for r in rows if r.status == "ok"}
    assert {"time", "peak_memory", "speedup", "memory_saving", "flops", "params", "params_ratio", "crossover_time",
            "crossover_peak_memory", "cost_reduction", "val_accuracy", "output_rel_error"} <= metrics
    # the dense model under SDPA computes base's function, checked by the harness
    checks = [r for r in rows if r.metric == "rel_error"]
    assert checks and all(r.provider == "base+sdpa" and r.p50 < 1e-4 for r in checks)
    # every timed row says which variant, rank, k and attention it is
    lrt = next(r for r in rows if r.provider == "lrt_r8" and r.metric == "time")
    assert lrt.extra["rank"] == 8 and lrt.extra["attention"] == "eager" and lrt.extra["variant"] == "lrt"
    crossover = [r for r in rows if r.metric == "crossover_time"]
    assert {r.extra["against"] for r in crossover} == {"lrt_r8", "lrt_r8+sdpa", "base", "base+sdpa"}
    assert {r.provider for r in rows if r.metric == "cost_reduction"} == {"lrt_r8"}  # LRT alone, as base runs
    assert all(r.message for r in crossover)
    notebook = {r.provider for r in rows if r.extra.get("setting") == "notebook" and r.metric == "speedup"}
    assert notebook == {"base", "lrt_r0.2_last1"}


def hand_flops(model: dict, variant: Variant, batch: int, n: int) -> int:
    """Forward FLOPs of BertForSequenceClassification written out: 2·rows·in·out per dense linear layer,
    2·rows·r·(in + out) per factorised one, 4·B·n²·d for attention's two products, and for Linformer
    4·B·k·n·d for projecting keys and values plus 4·B·n·k·d for attention over the k rows."""
    d, ff, layers = model["hidden_size"], model["intermediate_size"], model["num_hidden_layers"]

    def linear(rows, n_in, n_out, factorise):
        rank = variant.rank
        if factorise and isinstance(rank, float):
            rank = math.floor(rank * n_in * n_out / (n_in + n_out))
        if factorise and rank is not None and 1 <= rank and rank * (n_in + n_out) < n_in * n_out:
            return 2 * rows * rank * (n_in + n_out)
        return 2 * rows * n_in * n_out

    total = 0
    for layer in range(layers):
        factorise = variant.last is None or layer >= layers - variant.last
        total += sum(linear(batch * n, i, o, factorise) for i, o in [(d, d)] * 4 + [(d, ff), (ff, d)])
        total += 8 * batch * variant.k * n * d if variant.k else 4 * batch * n * n * d
    # the pooler; the classifier, factorised with the whole model only (at these ranks that never pays)
    return total + linear(batch, d, d, True) + linear(batch, d, 2, variant.last is None)


@pytest.mark.parametrize("name", ["base", "lrt_r5", "lrt_r0.5", "lrt_r5_last1", "linformer_k7", "lrt_r5+linformer_k7",
                                  "linformer_k7_sharekv"])
def test_counted_flops_match_a_hand_count(name):
    variant, batch, n = parse_variant(name), 3, 21
    model = on_meta(variant, TINY, n, positions=32)
    forward = hand_flops(TINY, variant, batch, n)
    # the backward of every product is two products of its size (every input, the embeddings', needs a gradient)
    assert count_flops(model, batch, n) == {"inference": forward, "fwd_bwd": 3 * forward}


def hand_params(model: dict, variant: Variant, n: int, positions: int) -> int:
    """Encoder (BertModel) parameters written out, for a dense or whole-model integer-rank variant: the
    embeddings (words, positions, 2 token types, a LayerNorm), per layer four d×d attention layers, the FFN's two
    and two LayerNorms, the pooler; a factorised layer r·(in + out) weights and its bias; Linformer's E and F,
    k × n each, per layer (E alone where it projects the values too)."""
    d, ff = model["hidden_size"], model["intermediate_size"]

    def linear(n_in, n_out):
        saves = variant.rank is not None and variant.rank * (n_in + n_out) < n_in * n_out
        return (variant.rank * (n_in + n_out) if saves else n_in * n_out) + n_out

    layer = sum(linear(i, o) for i, o in [(d, d)] * 4 + [(d, ff), (ff, d)]) + 2 * 2 * d
    projections = (1 if variant.share_kv else 2) * variant.k * n if variant.k else 0
    return (model["vocab_size"] + positions + 2 + 2) * d + model["num_hidden_layers"] * (layer + projections) + \
        linear(d, d)


@pytest.mark.parametrize("mode, passes", [("inference", 1), ("fwd_bwd", 3)])
def test_count_rows_are_each_variants_hand_counted_flops_and_parameters_and_base_over_them(mode, passes):
    """FLOPs of the point's own mode (a training step: the forward and a backward of twice its products), the
    encoder's parameters, and the parameter ratio base / variant (above 1 where the variant is smaller); nothing
    for a variant that could not run at the point."""
    names = ["base", "lrt_r5", "linformer_k7", "lrt_r5+linformer_k7", "linformer_k7_sharekv", "linformer_k30"]
    variants = [parse_variant(name) for name in names]
    point = Point("seq_len", 21, dict(setting="sweep", mode=mode, batch=3))
    timed = [Row(name, "seq_len", 21, "time", "ms", 1.0, n=1, extra=dict(point.extra)) for name in names[:-1]]
    timed.append(Row("linformer_k30", "seq_len", 21, "time", "ms", status="unsupported", extra=dict(point.extra)))
    models = Models(TINY, positions=32, attention="eager", dtype=torch.float32, seed=0)
    found = {(r.provider, r.metric): r.p50 for r in count_rows(point, variants, timed, models)}
    assert {provider for provider, _ in found} == set(names[:-1])
    params = {v.name: hand_params(TINY, v, 21, positions=32) for v in variants[:-1]}
    for variant in variants[:-1]:
        assert found[variant.name, "flops"] == pytest.approx(passes * hand_flops(TINY, variant, 3, 21) / 1e9)
        assert found[variant.name, "params"] == params[variant.name]
        assert found[variant.name, "params_ratio"] == pytest.approx(params["base"] / params[variant.name])
    assert found["lrt_r5", "params_ratio"] > 1 > found["linformer_k7_sharekv", "params_ratio"] > \
        found["linformer_k7", "params_ratio"]


@pytest.mark.parametrize("name, params", [
    ("base", 109_482_240), ("lrt_r256", 66_818_304), ("lrt_r0.4", 58_052_352), ("lrt_r0.2_last6", 74_965_248)])
def test_bert_base_parameters_are_the_greenformer_notebooks(name, params):
    model = on_meta(parse_variant(name), BERT_BASE, 256, positions=512)
    assert count_parameters(model.bert) == params  # the encoder, as the notebook counts BertModel


@pytest.mark.parametrize("name, factorised, linformer, attention", [
    ("base", 0, False, "eager"), ("base+sdpa", 0, False, "sdpa"), ("lrt_r5", 13, False, "eager"),
    ("lrt_r5_last1", 7, False, "eager"), ("linformer_k7", 0, True, "linformer"),
    ("lrt_r5+linformer_k7", 13, True, "linformer"), ("linformer_k7_sharekv", 0, True, "linformer")])
def test_the_timed_model_is_the_variant_that_was_counted(name, factorised, linformer, attention):
    """The model a point times (built apart from the meta copy its FLOPs and parameters are counted on) has the
    variant's factorised layers (TINY: 6 per layer and the pooler; the classifier's 2 outputs never pay),
    Linformer's projections in every layer, its attention, and the counted parameters."""
    models = Models(TINY, positions=32, attention="eager", dtype=torch.float32, seed=0)
    variant = parse_variant(name)
    model = models.on_device(variant, 21, torch.device("cpu"))
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == factorised
    layers = [layer.attention.self for layer in model.bert.encoder.layer]
    assert all(hasattr(m, "linformer") == linformer for m in layers)
    assert all((m.linformer.f is None) == variant.share_kv for m in layers if linformer)  # F = E: one projection
    assert model.config._attn_implementation == attention
    assert count_parameters(model.bert) == models.counted(variant, 3, 21)[1]


def test_cpu_memory_rows_are_each_tensor_peak_and_base_over_it():
    timed = [Row(p, "seq_len", 64, "time", "ms", 1.0, n=5, extra=dict(mode="inference"))
             for p in ("base", "lrt_r8", "linformer_k8")]
    timed.append(Row("lrt_r4", "seq_len", 64, "time", "ms", None, n=0, status="oom", extra=dict(mode="inference")))
    rows = host_memory_rows(timed, {"base": 30.0, "lrt_r8": 20.0, "linformer_k8": 40.0, "lrt_r4": 1.0})
    peaks = {r.provider: r.p50 for r in rows if r.metric == "peak_memory"}
    savings = {r.provider: r.p50 for r in rows if r.metric == "memory_saving"}
    assert peaks == {"base": 30.0, "lrt_r8": 20.0, "linformer_k8": 40.0}  # none for the point that failed
    assert savings == {"base": 1.0, "lrt_r8": 1.5, "linformer_k8": 0.75}


def test_variant_names_parse_into_their_parts():
    assert parse_variant("base") == Variant("base")
    assert parse_variant("lrt_r256+linformer_k128") == Variant("lrt_r256+linformer_k128", rank=256, k=128)
    assert parse_variant("lrt_r0.2_last6+sdpa") == Variant("lrt_r0.2_last6+sdpa", rank=0.2, last=6, attention="sdpa")
    assert parse_variant("base+effrepro").extra("eager")["attention"] == "effrepro"
    assert parse_variant("linformer_k64").extra("eager") == dict(variant="linformer", rank=None, last_layers=None,
                                                                  k=64, share_kv=False, attention="linformer")
    assert parse_variant("lrt_r8+linformer_k64_sharekv") == Variant("lrt_r8+linformer_k64_sharekv", rank=8, k=64,
                                                                     share_kv=True)


def test_a_linformer_model_refuses_a_longer_sequence_than_it_was_built_for():
    model = build(parse_variant("linformer_k4"), TINY, 16, positions=32, attention="eager").eval()
    with torch.no_grad():
        model(input_ids=torch.randint(4, 50, (2, 16)))
        with pytest.raises(ValueError, match="20 tokens but Linformer was built for at most seq_len=16"):
            model(input_ids=torch.randint(4, 50, (2, 20)))


def times(values: dict[int, float | None], provider: str, mode="inference", metric="time") -> list[Row]:
    """Hand-made harness rows: a value per length, None for a point that ran out of memory."""
    return [Row(provider, "seq_len", n, metric, "ms", v, n=1, status="ok" if v is not None else "oom",
                extra=dict(setting="sweep", mode=mode)) for n, v in values.items()]


def test_the_crossover_is_the_shortest_length_from_which_on_linformer_wins():
    rows = (times({128: 1.0, 256: 2.0, 512: 4.0, 1024: 7.0, 2048: 12.0}, "lrt_r256")
            + times({128: 0.9, 256: 2.5, 512: 3.0, 1024: 5.0, 2048: 8.0}, "linformer_k128")  # a lone early win
            + times({128: 1.5, 256: 2.5, 512: 4.5, 1024: 9.0, 2048: None}, "base")  # out of memory at 2048
            + times({128: 2.0, 256: 3.0, 512: 5.0, 1024: 5.0, 2048: 6.0}, "linformer_k64"))
    found = {(r.provider, r.extra["against"]): r for r in
             crossover_rows(rows, [("linformer_k128", "lrt_r256"), ("linformer_k64", "base"),
                                   ("linformer_k64", "lrt_r256")])}
    assert found["linformer_k128", "lrt_r256"].p50 == 512
    assert "from 512 tokens on" in found["linformer_k128", "lrt_r256"].message
    # a loss at 512 (5.0 against 4.5); base's OOM at 2048 is a loss, so 2048 is among the lengths compared
    assert found["linformer_k64", "base"].p50 == 1024
    assert "measured at 128..2048 tokens" in found["linformer_k64", "base"].message
    assert found["linformer_k64", "lrt_r256"].p50 == 1024
    assert all(r.metric == "crossover_time" and r.x_value == "inference" for r in found.values())
    # Linformer ahead everywhere but out of memory at the longest length, where LRT runs: no crossover
    oom = times({256: 1.0, 512: 2.0, 1024: None}, "linformer_k128") + times({256: 2.0, 512: 3.0, 1024: 5.0}, "lrt_r256")
    [row] = crossover_rows(oom, [("linformer_k128", "lrt_r256")])
    assert row.p50 is None and "not faster than lrt_r256 at the longest length" in row.message


def test_the_crossover_says_so_when_linformer_never_wins_and_ignores_lengths_where_both_failed():
    assert shortest_win({256: 2.0, 512: 3.0}, {256: 1.0, 512: 2.0}) == (None, [256, 512])
    assert shortest_win({256: 1.0, 512: 3.0, 1024: math.inf}, {256: 2.0, 512: 4.0, 1024: math.inf}) == \
        (256, [256, 512])
    assert shortest_win({256: 1.0}, {512: 2.0}) == (None, [])  # no length in common: nothing to say
    rows = times({256: 2.0, 512: 3.0}, "linformer_k128") + times({256: 1.0, 512: 2.0}, "lrt_r256")
    [row] = crossover_rows(rows, [("linformer_k128", "lrt_r256")])
    assert row.p50 is None and "not faster than lrt_r256 at the longest length" in row.message
    # a point that failed with an error is no win for the other side: only running out of memory loses
    broken = times({256: 2.0, 512: 3.0}, "linformer_k128") + times({256: 1.0}, "lrt_r256") + [
        Row("lrt_r256", "seq_len", 512, "time", "ms", status="error", message="a bug", extra=dict(
            setting="sweep", mode="inference"))]
    [row] = crossover_rows(broken, [("linformer_k128", "lrt_r256")])
    assert row.p50 is None and "measured at 256..256 tokens; no result at [512], an error" in row.message
    # Linformer cannot run below its k: winning at k is not a crossover that may lie below
    short = times({256: 1.0, 512: 1.0}, "linformer_k256") + times({256: 2.0, 512: 2.0}, "lrt_r256") + [
        Row("linformer_k256", "seq_len", 128, "time", "ms", status="unsupported", extra=dict(
            setting="sweep", mode="inference"))]
    [row] = crossover_rows(short, [("linformer_k256", "lrt_r256")])
    assert row.p50 == 256 and row.message.endswith("256 is the shortest length linformer_k256 runs at (n >= k)")


CLAIMS = {c.id: c for c in load_paper(ROOT / "results" / "published" / "greenformers.yaml")[2]}
CROSSOVER_CLAIMS = [c for c in CLAIMS.values() if c.compare.metrics[0].startswith("crossover_")]
SCALES = {"small": ["scale=small"], "paper": ["scale=paper"]}


def test_the_crossover_claims_read_linformer_against_lrt_under_its_own_attention_in_each_mode():
    """Each claim reads its mode's and metric's crossover of linformer_k128 against lrt_r256+sdpa (not against the
    eager lrt_r256): 512 reproduced, 256 within tolerance, 1024 not reproduced, and not reproduced either where
    Linformer never gets ahead (the row's message says so); a run with no such rows has not run it."""
    def sweep(values, provider, mode, metric):
        extra = dict(setting="sweep", mode=mode, model="bert-base", device="cuda")
        return [Row(provider, "seq_len", n, metric, "x", v, n=1, extra=extra) for n, v in values.items()]
    lengths = [128, 256, 512, 1024, 2048]
    linformer = dict.fromkeys(lengths, 5.0)
    lrt = {("time", "inference"): [1.0, 2.0, 6.0, 9.0, 9.0], ("time", "fwd_bwd"): [1.0, 6.0, 6.0, 9.0, 9.0],
           ("peak_memory", "inference"): [1.0, 2.0, 4.0, 9.0, 9.0], ("peak_memory", "fwd_bwd"): [1.0] * 5}
    rows = []
    for (metric, mode), values in lrt.items():
        rows += sweep(linformer, "linformer_k128", mode, metric) + \
            sweep(dict(zip(lengths, values)), "lrt_r256+sdpa", mode, metric) + \
            sweep(dict.fromkeys(lengths, 9.0), "lrt_r256", mode, metric)  # eager: overtaken at 128
    crossovers = crossover_rows(rows, [("linformer_k128", "lrt_r256+sdpa"), ("linformer_k128", "lrt_r256")])
    record = RunRecord("greenformers", "greenformers", "small", [], {}, [], {"gpu_name": "NVIDIA H200"}, "now",
                       status="ok", rows=rows + list(crossovers))
    outcomes = {c.id: evaluate(c, [(Path("record.json"), record)]) for c in CROSSOVER_CLAIMS}
    assert {claim: o.status for claim, o in outcomes.items()} == {
        "linformer_overtakes_lrt_time_inference": REPRODUCED, "linformer_overtakes_lrt_time_training": WITHIN,
        "linformer_overtakes_lrt_memory_inference": NOT_REPRODUCED,
        "linformer_overtakes_lrt_memory_training": NOT_REPRODUCED}  # Linformer never ahead
    never = outcomes["linformer_overtakes_lrt_memory_training"]
    assert never.value is None and never.detail.startswith(
        "linformer_k128 is not smaller in peak memory than lrt_r256+sdpa at the longest length (fwd_bwd, measured")
    eager_only = RunRecord("greenformers", "greenformers", "small", [], {}, [], {"gpu_name": "NVIDIA H200"}, "now",
                           status="ok", rows=list(crossover_rows(rows, [("linformer_k128", "lrt_r256")])))
    assert {evaluate(c, [(Path("record.json"), eager_only)]).status for c in CROSSOVER_CLAIMS} == {NOT_RUN}


@pytest.mark.parametrize("scale", SCALES)
def test_the_claims_providers_are_in_the_grid_and_the_long_sequence_claims_read_every_long_length(compose, scale):
    """The crossover claims' pair is timed at each scale they are judged at, and the claims of Linformer at long
    sequences (>= 512) read every such length of the grid."""
    sweep = compose("task=greenformers", *SCALES[scale]).greenformers.crossover
    for claim in CROSSOVER_CLAIMS:
        assert scale in claim.compare.comparable_at
        assert {*claim.compare.providers, claim.compare.where["against"]} <= set(sweep.variants), claim.id
    for name in ("linformer_faster_long_sequences", "linformer_less_memory_long_sequences"):
        assert {n for n in sweep.seq_len if n >= 512} <= set(CLAIMS[name].compare.where["seq_len"]), name


def test_cost_rows_are_what_lrt_saves_in_time_and_flops_at_short_sequences():
    def row(provider, n, metric, value):
        return Row(provider, "seq_len", n, metric, "x", value, n=1, extra=dict(setting="sweep", mode="fwd_bwd"))
    rows = [row("lrt_r256", 256, "speedup", 1.25), row("lrt_r256", 1024, "speedup", 1.1),
            row("base", 256, "flops", 40.0), row("lrt_r256", 256, "flops", 30.0), row("lrt_r128", 256, "speedup", 2.0)]
    found = {(r.x_value, r.extra["basis"]): r.p50 for r in cost_rows(rows, ["lrt_r256"], max_seq_len=512)}
    assert found == {(256, "time"): pytest.approx(20.0), (256, "flops"): pytest.approx(25.0)}


def test_tensor_peak_is_the_most_bytes_alive_at_once():
    a = torch.randn(1024, 1024)  # 4 MB, alive throughout

    def fn():
        b = a * 2
        c = b + 1  # a, b and c: 12 MB at the peak
        del b
        return c.sum()
    assert tensor_peak_mb(fn, a) == pytest.approx(12.0, rel=1e-3)


def test_the_generated_set_labels_the_more_frequent_marker():
    data = counting_set(200, 40, 20, seed=3)
    ids, labels = data["input_ids"], data["labels"]
    first, second = (ids == MARKERS[0]).sum(1), (ids == MARKERS[1]).sum(1)
    assert ids.shape == (200, 40) and (ids[:, 0] == 1).all() and ((ids >= 1) & (ids < 20)).all()
    assert torch.equal(labels, (second > first).long()) and (first != second).all()
    assert 0.3 < labels.float().mean() < 0.7
    assert torch.equal(counting_set(200, 40, 20, seed=3)["input_ids"], ids)


def test_accuracy_is_the_percent_classified_right_over_every_batch():
    from tasks.greenformers.quality import accuracy

    class EvenFirstToken(torch.nn.Module):  # class 1 where the first token is even
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids):
            even = (input_ids[:, 0] % 2 == 0).float()
            return SimpleNamespace(logits=torch.stack([1 - even, even], -1))
    ids = torch.arange(7)[:, None].expand(7, 3)  # predicted 1, 0, 1, 0, 1, 0, 1
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 1])  # right at 0, 2, 3, 5, 6
    assert accuracy(EvenFirstToken(), {"input_ids": ids, "labels": labels}, batch=3) == pytest.approx(500 / 7)


@pytest.mark.parametrize("accum", [1, 3])
def test_a_quality_step_draws_grad_accum_micro_batches_and_counts_their_tokens(compose, accum):
    cfg = compose("task=greenformers", f"train.grad_accum={accum}")
    spec = cfg.greenformers.quality  # smoke: batches of 16 examples of 32 tokens
    data = {"train": counting_set(spec.n_train, spec.seq_len, spec.model.vocab_size, seed=0)}
    trainee = _trainee(Variant("base"), cfg, SimpleNamespace(device=torch.device("cpu")), data)
    micro = trainee.batches(0, 0, 1)
    assert [len(batch["labels"]) for batch in micro] == [spec.batch] * accum
    assert trainee.tokens_per_step == accum * spec.batch * spec.seq_len
    assert accum == 1 or not torch.equal(micro[0]["input_ids"], micro[1]["input_ids"])  # draws, not one repeated


def test_svd_error_is_the_factorised_encoders_and_falls_as_the_rank_rises():
    torch.manual_seed(0)
    dense = build(Variant("base"), TINY, 24, positions=24, attention="eager").eval()
    data = counting_set(8, 24, TINY["vocab_size"], seed=0)
    rows = list(svd_rows(dense, [2, 6, 12], data, batch=3, extra={}))  # 3 does not divide 8
    errors = [r.p50 for r in rows if r.metric == "output_rel_error"]
    params = [r.p50 for r in rows if r.metric == "params"]
    assert [r.x_value for r in rows if r.metric == "output_rel_error"] == [12, 6, 2]
    assert 0 < errors[0] < errors[1] < errors[2] and params[0] > params[1] > params[2]
    # the reference: rank 6 by a plain truncated SVD of every weight that a rank-6 factorisation makes smaller
    low = copy.deepcopy(dense)
    for module in low.modules():
        if isinstance(module, torch.nn.Linear) and 6 * sum(module.weight.shape) < module.weight.numel():
            u, s, vh = torch.linalg.svd(module.weight.detach(), full_matrices=False)
            module.weight.data = (u[:, :6] * s[:6]) @ vh[:6]
    with torch.no_grad():
        want, got = dense.bert(input_ids=data["input_ids"]), low.bert(input_ids=data["input_ids"])
        expected = (got.last_hidden_state - want.last_hidden_state).norm() / want.last_hidden_state.norm()
    assert errors[1] == pytest.approx(float(expected), rel=1e-4)
    # 13 linear layers (6 a block, the pooler); rank 20 saves weights in the 36×52 FFN layers alone (limit 21.3),
    # not in the 36×36 ones (limit 18)
    assert {(r.extra["factorised_layers"], r.extra["linear_layers"]) for r in rows} == {(13, 13)}
    (at_20,) = [r for r in svd_rows(dense, [20], data, batch=8, extra={}) if r.metric == "params"]
    assert (at_20.extra["factorised_layers"], at_20.extra["linear_layers"]) == (4, 13)


def test_a_factorised_copy_that_runs_out_of_memory_is_an_oom_row(monkeypatch):
    import tasks.greenformers.quality as quality

    factorised = quality.factorised

    def rank_6_runs_out_of_memory(model, variant, init):
        if variant.rank == 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return factorised(model, variant, init=init)
    monkeypatch.setattr(quality, "factorised", rank_6_runs_out_of_memory)
    dense = build(Variant("base"), TINY, 24, positions=24, attention="eager")
    rows = list(svd_rows(dense, [2, 6, 12], counting_set(8, 24, TINY["vocab_size"], seed=0), batch=4, extra={}))
    errors = [(r.x_value, r.status) for r in rows if r.metric == "output_rel_error"]
    assert errors == [(12, "ok"), (6, "oom"), (2, "ok")]  # the other ranks still measured
    assert [r.message for r in rows if r.status == "oom"] == ["CUDA out of memory. Tried to allocate 2.00 GiB"]


@pytest.mark.parametrize("scale", [["scale=small"], ["scale=paper"],
                                   ["scale=small", "scale.device=cpu", "task_scale/greenformers@_global_=cpu"]])
def test_each_grid_times_lrt_under_the_attention_linformer_runs(compose, scale):
    """Linformer attends with SDPA: linformer_k128 against lrt_r256+sdpa compares the methods, not the kernels."""
    variants = compose("task=greenformers", *scale).greenformers.crossover.variants
    assert {"linformer_k128", "lrt_r256+sdpa"} <= set(variants)


def test_the_cpu_setting_composes(compose):
    cfg = compose("task=greenformers", "scale=small", "scale.device=cpu", "task_scale/greenformers@_global_=cpu")
    assert cfg.scale.device == "cpu" and list(cfg.greenformers.parts) == ["crossover"]
    assert cfg.greenformers.model.hidden_size == 768 and cfg.greenformers.dtype == "float32"


def test_our_kernel_in_bert_matches_eager_attention_with_padding():
    """On a CPU our kernel runs in the Triton interpreter, in float16 too. Weights drawn wider than BERT's 0.02
    make the attention peaked: at 0.02 it is near uniform, and a softmax scale 1.25x too large moved the encoder's
    output by 2e-5 of its size (the classifier's logits, near 0.02, by 1e-5)."""
    from conftest import ATTENTION_TOL, rel_err

    torch.manual_seed(0)
    dense = build(Variant("base"), TINY | dict(hidden_size=48, initializer_range=0.2), 40, positions=64,
                  attention="eager").to(DEVICE).half()
    ids = torch.randint(4, 50, (2, 40), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 29:] = 0
    real = mask.bool()
    with torch.no_grad():
        expected = dense.bert(input_ids=ids, attention_mask=mask).last_hidden_state[real]
        ours = with_attention(dense, parse_variant("base+effrepro"), 40)
        got = ours.bert(input_ids=ids, attention_mask=mask).last_hidden_state[real]
    # both in float16: twice the kernel's bound against float64 (measured on a CPU: 9e-4; 3e-2 at a scale 1.05x)
    assert rel_err(got, expected.double()) < 2 * ATTENTION_TOL[torch.float16]


@pytest.mark.parametrize("override, expected", [
    ("greenformers.crossover.variants=[base,lrt_r0]", "rank=0 must be >= 1"),
    ("greenformers.crossover.variants=[base,lrt_r40]", "'lrt_r40' does not fit this model"),  # min(in, out) = 32
    ("greenformers.crossover.variants=[base,linformer_k0]", "k=0 must be between 1 and seq_len=64"),
    ("greenformers.crossover.variants=[base,linformer_k65]", "k=65 must be between 1 and seq_len=64"),
    ("greenformers.quality.variants=[base,linformer_k33]", "k=33 must be between 1 and seq_len=32"),
    ("greenformers.crossover.variants=[base,performer_k8]", "'performer_k8' is not a part of a variant"),
    ("greenformers.crossover.variants=[base,linformer_k8+effrepro]", "Linformer computes its own attention"),
    ("greenformers.crossover.variants=[lrt_r8]", "must include 'base', the dense model every ratio is taken against"),
    ("greenformers.quality.variants=[lrt_r8]", "must include 'base', the model factorised at greenformers.quality.svd"),
    ("greenformers.crossover.variants=[base,lrt_r8+linformer_k16,linformer_k16+lrt_r8]",
     "names one model twice (as 'lrt_r8+linformer_k16' and 'linformer_k16+lrt_r8')"),
    ("greenformers.crossover.variants=[base,lrt_r8+eager,lrt_r8+eager]", "names one model twice: it would be"),
    ("greenformers.quality.svd_ranks=[8,8]", "greenformers.quality.svd_ranks names one model twice: it would be"),
    ("greenformers.notebook.variants=[lrt_r0.2_last3]", "_last3 must be between 1 and the model's 2 layers"),
    ("greenformers.parts=[speed]", "greenformers.parts=['speed'] is not one of"),
    ("greenformers.parts=[]", "greenformers.parts=[] is empty: choose some of ['crossover', 'notebook', 'quality']"),
    ("greenformers.parts=[quality,quality]", "greenformers.parts names 'quality' more than once"),
    ("greenformers.crossover.tokens=0", "greenformers.crossover.tokens=0 must be an integer >= 1"),
    ("greenformers.notebook.batch.fwd_bwd=0", "greenformers.notebook.batch.fwd_bwd=0 must be an integer >= 1"),
    ("greenformers.model.num_attention_heads=5", "greenformers.model.num_attention_heads=5 must divide 32"),
    ("greenformers.crossover.seq_len=[]", "greenformers.crossover.seq_len=[] is empty"),
    ("greenformers.crossover.seq_len=[64,128,64]", "greenformers.crossover.seq_len names 64 more than once"),
    ("greenformers.crossover.modes=[]", "greenformers.crossover.modes=[] is empty: choose some of"),
    ("greenformers.crossover.modes=[inference,inference]", "greenformers.crossover.modes names 'inference' more"),
    ("greenformers.crossover.variants=[base,lrt_r8_last0]", "_last0 must be between 1 and the model's 2 layers"),
    ("greenformers.crossover.cost_max_seq_len=8", "cost_max_seq_len=8 is below every length"),
    ("greenformers.notebook.variants=[base,lrt_r8]", "names 'base', which is always measured (first): leave it out"),
    # a block of settings set to null is named, not a traceback at its first setting
    *[(f"greenformers.{key}=null", f"greenformers.{key}=None must be a mapping of settings, as the task's config")
      for key in ("model", "crossover", "notebook", "notebook.batch", "quality", "quality.model")],
    ("train.parallel=fsdp", "svd_ranks factorise the trained base model itself, which train.parallel=fsdp would"),
])
def test_bad_input_is_named(refusal, override, expected):
    assert expected in refusal("task=greenformers", override)


def test_a_quality_part_with_nothing_to_train_is_refused(refusal):
    """With no svd_ranks, no variant would pass validation and then measure nothing."""
    assert "greenformers.quality.variants=[] is empty: give one value or a list of them" in refusal(
        "task=greenformers", "greenformers.parts=[quality]", "greenformers.quality.variants=[]",
        "greenformers.quality.svd_ranks=[]")


def test_one_value_stands_for_a_list_of_one(tmp_path):
    code, out, err = run_inline("task=greenformers", "logger=none", "greenformers.parts=crossover",
                                "greenformers.crossover.seq_len=32", "greenformers.crossover.modes=inference",
                                "greenformers.crossover.variants=base", f"hydra.run.dir={tmp_path}")
    assert code == 0, err[-3000:]
    rows = json.loads((tmp_path / "record.json").read_text())["rows"]
    assert {(r["provider"], r["x_value"], r["extra"]["mode"]) for r in rows if r["metric"] == "time"} == \
        {("base", 32, "inference")}


def test_one_notebook_variant_that_starts_like_base_is_not_taken_for_base(compose):
    from tasks.greenformers.task import validate
    validate(compose("task=greenformers", "greenformers.notebook.variants=base+sdpa"))
    # the default grid under another default attention; quality needs base only to factorise it
    validate(compose("task=greenformers", "greenformers.attention=sdpa",
                     "greenformers.crossover.variants=[base,base+sdpa]", "greenformers.quality.variants=[lrt_r8]",
                     "greenformers.quality.svd_ranks=[]"))


def test_a_variant_naming_the_default_attention_is_measured_once(capsys):
    names = [v.name for v in distinct_models(["base", "base+eager", "lrt_r8+eager", "lrt_r8", "base+sdpa"], "eager")]
    assert names == ["base", "lrt_r8", "base+sdpa"]  # the plain name, which the claims and cost rows look for
    out = capsys.readouterr().out
    assert "base+eager is base under greenformers.attention=eager: measured once, as base" in out
    assert "lrt_r8+eager is lrt_r8 under greenformers.attention=eager: measured once, as lrt_r8" in out


def test_a_cpu_run_on_a_gpu_machine_is_labelled_the_cpu():
    ctx = SimpleNamespace(device=torch.device("cpu"), env={"gpu_name": "NVIDIA H200"})
    point = _point(ctx, "sweep", 64, "inference", 4, "float32", "tiny")
    assert point.extra["device_name"].startswith("CPU, ") and point.extra["series"].startswith("CPU, ")


def test_our_kernel_as_the_default_attention_is_refused_where_it_cannot_run(refusal, compose, monkeypatch):
    """base, the baseline of every ratio, would be unsupported: a run of nothing but failed ratios."""
    monkeypatch.setattr("tasks.greenformers.task.runs_on", lambda device: False)  # a CPU without the interpreter
    assert "greenformers.attention=effrepro is our Triton kernel, which needs a CUDA GPU" in \
        refusal("task=greenformers", "greenformers.attention=effrepro", "scale.device=cpu")
    from tasks.greenformers.task import validate
    validate(compose("task=greenformers", "greenformers.attention=sdpa", "scale.device=cpu"))


def test_bad_input_is_named_before_any_work(tmp_path):
    code, out, err = run_inline("task=greenformers", "greenformers.crossover.tokens=0", "logger=none",
                                f"hydra.run.dir={tmp_path}")
    assert code == 2, (out, err)
    assert "greenformers.crossover.tokens=0 must be an integer >= 1" in err
    assert "Traceback" not in err


def test_no_svd_rows_come_from_a_base_model_whose_training_failed(tmp_path, monkeypatch):
    import repro.train

    train = repro.train.train

    def base_runs_out_of_memory(trainee, *args, **kwargs):
        if trainee.name == "base":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return train(trainee, *args, **kwargs)
    monkeypatch.setattr(repro.train, "train", base_runs_out_of_memory)
    code, out, err = run_inline("task=greenformers", "logger=none", "greenformers.parts=quality",
                                f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    rows = [Row(**r) for r in json.loads((tmp_path / "record.json").read_text())["rows"]]
    assert [r.status for r in rows if r.provider == "base"] == ["oom"]
    assert any(r.status == "ok" and r.provider != "base" for r in rows)  # the other variants still trained
    assert not [r for r in rows if r.extra.get("setting") == "quality_svd"]


def test_each_quality_variant_trains_alone_with_base_factorised_before_the_next(tmp_path, monkeypatch):
    """Base's trained model, which the SVD rows factorise, is let go before the next variant trains: alive on the
    device, it would count in that variant's peak memory."""
    import repro.train

    train, earlier = repro.train.train, []

    def one_model_alive(trainee, *args, **kwargs):
        assert all(model() is None for model in earlier), f"a trained model is alive while {trainee.name} trains"
        earlier.append(weakref.ref(trainee.model))
        yield from train(trainee, *args, **kwargs)
    monkeypatch.setattr(repro.train, "train", one_model_alive)
    code, out, err = run_inline("task=greenformers", "logger=none", "greenformers.parts=quality",
                                f"hydra.run.dir={tmp_path}")
    assert code == 0, err[-3000:]
    rows = [Row(**r) for r in json.loads((tmp_path / "record.json").read_text())["rows"]]
    assert len(earlier) == 3
    # the SVD rows come right after base's own, before the next variant's
    providers = [r.provider for r in rows]
    assert providers.index("lrt_svd") > max(i for i, p in enumerate(providers) if p == "base")
    assert providers.index("lrt_svd") < providers.index("lrt_r8")


@pytest.mark.parametrize("parts, given, readers", [
    ("[crossover]", "train.steps=5", "quality"),
    ("[crossover,notebook]", "greenformers.quality.n_train=64", "quality"),
    ("[quality]", "greenformers.dtype=float32", "crossover"),  # the notebook's is greenformers.notebook.dtype
    ("[quality]", "greenformers.model.hidden_size=64", "crossover or notebook"),
    ("[notebook]", "greenformers.crossover.tokens=64", "crossover"),
])
def test_a_setting_of_a_part_not_run_is_refused(job_refusal, parts, given, readers):
    message = job_refusal("task=greenformers", "scale=smoke", f"greenformers.parts={parts}", given)
    assert message.startswith(f"{given.split('=')[0]}=") and f"would have no effect: it is read only for {readers}, " \
        f"and greenformers.parts=" in message, message
