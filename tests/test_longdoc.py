"""Long-document classification (task longdoc): the generated corpus, the label metrics, truncation, the
position table's growth, the rows over seeds, a smoke run and the errors on bad input."""
import json

import numpy as np
import pytest
import torch

from conftest import ATTENTION_TOL, DEVICE, ROOT, rel_err, run_inline
from repro.records import Row
from tasks.flashattention import longdoc_data as data
from tasks.flashattention.longdoc import derived_rows, extend_position_table, f1_scores

SPEC = data.SyntheticSpec(labels=5, late_fraction=0.4, label_rate=0.6, evidence_tokens=3, boundary=20,
                          min_tokens=40, max_tokens=90, words=30)
SMOKE = ["task=longdoc", "logger=none", "longdoc.timed=[eager]"]  # our kernel would run in the slow interpreter


def test_the_generator_puts_each_labels_evidence_where_it_says():
    docs = data.generate(100, seed=3, spec=SPEC, workers=1)
    assert SPEC.late_labels == 2 and [SPEC.is_late(j) for j in range(5)] == [False, False, False, True, True]
    seen_late = 0
    for doc in docs:
        ids = np.asarray(doc["input_ids"])
        assert 40 <= len(ids) <= 90
        for label in range(SPEC.labels):
            word = SPEC.word(label)
            if label not in doc["labels"]:
                assert not (ids == word).any()  # a label's word is its evidence and nothing else
                continue
            start = doc["evidence_start"][doc["labels"].index(label)]
            assert (ids[start:start + 3] == word).all() and (ids == word).sum() == 3
            if SPEC.is_late(label):
                assert SPEC.boundary <= start and start + 3 <= len(ids)
                seen_late += 1
            else:
                assert start + 3 <= SPEC.boundary
    assert seen_late > 0


def test_generation_is_the_same_whatever_the_number_of_workers():
    one = data.generate(2 * data.CHUNK + 5, seed=1, spec=SPEC, workers=1)
    two = data.generate(2 * data.CHUNK + 5, seed=1, spec=SPEC, workers=2)
    assert len(one) == len(two) == 2 * data.CHUNK + 5
    assert all((a["input_ids"] == b["input_ids"]).all() and a["labels"] == b["labels"] for a, b in zip(one, two))
    other = data.generate(5, seed=2, spec=SPEC, workers=1)
    assert any(len(a["input_ids"]) != len(b["input_ids"]) or (a["input_ids"] != b["input_ids"]).any()
               for a, b in zip(one, other))


def test_a_generated_split_is_cached_and_a_reader_at_the_boundary_misses_exactly_the_late_labels(tmp_path, capsys):
    docs = data.load_or_generate("validation", 40, 0, SPEC, tmp_path, workers=1)
    (meta,) = tmp_path.glob("*.json")
    assert json.loads(meta.read_text())["spec"]["boundary"] == 20
    assert "generating" in capsys.readouterr().out
    again = data.load_or_generate("validation", 40, 0, SPEC, tmp_path, workers=1)
    assert "generating" not in capsys.readouterr().out  # read back, not made again (the same seed gives the same)
    assert torch.equal(docs.labels, again.labels) and len(list(tmp_path.glob("*.json"))) == 1
    late = torch.tensor([SPEC.is_late(j) for j in range(SPEC.labels)])
    at_boundary = data.visible_labels(docs, SPEC.boundary + data.SPECIAL_TOKENS)
    assert torch.equal(at_boundary, docs.labels.bool() & ~late)
    assert torch.equal(data.visible_labels(docs, SPEC.max_tokens + data.SPECIAL_TOKENS), docs.labels.bool())
    micro, _ = f1_scores(at_boundary, docs.labels)
    early, all_ = docs.labels[:, ~late].sum(), docs.labels.sum()
    assert micro == pytest.approx(float(2 * early / (2 * early + all_ - early)))


def test_micro_and_macro_f1_match_a_hand_computation():
    predicted = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    truth = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=torch.bool)
    # label 0: tp 1, fp 1, fn 1 -> 1/2; label 1: tp 1 -> 1; label 2: tp 1, fp 1 -> 2/3
    # pooled: tp 3, fp 2, fn 1 -> 6/9
    micro, macro = f1_scores(predicted, truth)
    assert micro == pytest.approx(6 / 9) and macro == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    # a label with nothing to find and nothing found counts 0, as scikit-learn's zero_division=0
    assert f1_scores(torch.zeros(2, 2, dtype=torch.bool), torch.tensor([[1, 0], [0, 0]]).bool()) == (0.0, 0.0)


def test_micro_and_macro_f1_match_scikit_learn_on_random_labels():
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    predicted, truth = torch.rand(37, 5, generator=gen) < 0.4, torch.rand(37, 5, generator=gen) < 0.3
    truth[:, 4] = predicted[:, 4] = False  # a label with nothing to find and nothing found
    micro, macro = f1_scores(predicted, truth)
    assert micro == pytest.approx(metrics.f1_score(truth, predicted, average="micro", zero_division=0))
    assert macro == pytest.approx(metrics.f1_score(truth, predicted, average="macro", zero_division=0))


def test_a_document_longer_than_the_model_is_cut_and_counted():
    docs = data.Documents("toy", [np.arange(10, 13), np.arange(20, 25), np.arange(30, 38)],
                          torch.eye(3), ["a", "b", "c"])
    assert data.truncated(docs, 7) == 1 and data.truncated(docs, 10) == 0 and data.truncated(docs, 6) == 2
    batch = data.encode(docs, [2, 0], 7)
    assert batch["input_ids"].tolist() == [[data.BOS, 30, 31, 32, 33, 34, data.EOS],
                                           [data.BOS, 10, 11, 12, data.EOS, data.PAD, data.PAD]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 5 + [0] * 2]
    assert torch.equal(batch["labels"], torch.eye(3)[[2, 0]])
    assert "attention_mask" not in data.encode(docs, [2, 1], 7)  # none padded: no mask (our kernel's unmasked path)


def test_the_validation_f1_and_loss_cover_every_document_of_the_split(compose, tmp_path):
    """A reader that predicts the labels whose words it reads scores the evidence reader's F1 at its length; the
    loss is the mean over documents, of micro-batches of 4, 4, 4 and 1."""
    from types import SimpleNamespace

    from tasks.flashattention.longdoc import _synthetic, _trainee

    cfg = compose(*SMOKE)
    spec = _synthetic(cfg.longdoc)
    val = data.load_or_generate("validation", 13, 0, spec, tmp_path, workers=1)
    trainee = _trainee(cfg, SimpleNamespace(device=torch.device("cpu")), "synthetic", val, val, 32, "eager", 0, {},
                       False)
    words = torch.tensor([spec.word(label) for label in range(spec.labels)])

    class Reader(torch.nn.Module):
        def forward(self, input_ids, labels, attention_mask=None):
            read = (input_ids[:, :, None] == words).any(1)
            # logits of 1/4 where read, -3/4 elsewhere: a threshold of 0.5, or on probabilities, scores otherwise
            return SimpleNamespace(logits=read.float() - 0.75, loss=torch.tensor(float(len(labels))))
    rows = {r.metric: r.p50 for r in trainee.evaluate(Reader())}
    micro, macro = f1_scores(data.visible_labels(val, 32), val.labels)
    assert 0 < micro < 1  # late labels are out of its sight
    assert rows["val_micro_f1"] == pytest.approx(100 * micro) and rows["val_macro_f1"] == pytest.approx(100 * macro)
    assert rows["val_loss"] == pytest.approx((3 * 4 * 4 + 1) / 13)


def test_the_position_table_grows_by_copying_its_learned_rows():
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=7 + 2, type_vocab_size=1, num_labels=3,
                           problem_type="multi_label_classification")
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    old = model.roberta.embeddings.position_embeddings.weight.detach().clone()
    extend_position_table(model, 17)
    new = model.roberta.embeddings.position_embeddings.weight.detach()
    assert new.shape == (17 + 2, 32) and model.config.max_position_embeddings == 19
    assert torch.equal(new[:2], old[:2])  # rows before padding_idx + 1 are not positions
    for position in range(17):  # learned rows 2..8 (7 positions) repeat
        assert torch.equal(new[2 + position], old[2 + position % 7])
    ids = torch.randint(4, 40, (2, 17))
    out = model(input_ids=ids, labels=torch.ones(2, 3))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.roberta.embeddings.position_embeddings.weight.grad[18].abs().sum() > 0  # the copies train


def _val_row(provider, seq_len, seed, value, step=5):
    return Row(provider, "step", step, "val_micro_f1", "%", value, n=1,
               extra=dict(dataset="synthetic", seq_len=seq_len, seed=seed))


def test_f1_over_seeds_the_lift_and_out_of_memory_lengths_become_rows():
    rows = [_val_row("effrepro", 32, 0, 50.0, step=2), _val_row("effrepro", 32, 0, 60.0),
            _val_row("effrepro", 32, 1, 70.0), _val_row("effrepro", 64, 0, 80.0), _val_row("effrepro", 64, 1, 75.0),
            Row("eager", "step", 5, "step_time", "ms", 4.0, n=3, extra=dict(dataset="synthetic", seq_len=32, seed=0)),
            Row("effrepro", "step", 5, "step_time", "ms", 2.0, n=3,
                extra=dict(dataset="synthetic", seq_len=32, seed=0)),
            Row("effrepro", "step", 5, "step_time", "ms", 6.0, n=3,
                extra=dict(dataset="synthetic", seq_len=32, seed=1)),
            Row("eager", "step", 0, "loss", "nats", status="oom", message="CUDA out of memory",
                extra=dict(dataset="synthetic", seq_len=64, seed=0))]
    out = {(r.provider, r.metric, r.x_value): r for r in derived_rows(rows, first_seed=0)}
    f1 = out[("effrepro", "micro_f1", 32)]  # the last evaluation of each seed, not the one at step 2
    assert (f1.p50, f1.n, f1.extra["values"]) == (65.0, 2, [60.0, 70.0])
    assert f1.p20 == pytest.approx(62.0) and f1.p80 == pytest.approx(68.0)
    lift = out[("effrepro", "f1_lift", 64)]  # seed by seed: 80 - 60 and 75 - 70
    assert lift.p50 == pytest.approx(12.5) and lift.unit == "points" and lift.extra["shortest"] == 32
    assert out[("effrepro", "train_step_time", 32)].p50 == pytest.approx(4.0)  # the median of seeds 0 and 1
    # eager timed at seed 0 alone: the speedup sets seed 0's step times side by side (4 / 2), not the median's
    speedup = out[("effrepro", "speedup", 32)]
    assert speedup.p50 == pytest.approx(2.0) and speedup.extra["seeds"] == [0]
    assert out[("eager", "train_step_time", 64)].status == "oom" and ("eager", "micro_f1", 64) not in out


def test_smoke_run_records_f1_per_length_over_two_seeds_and_the_truncated_documents(tmp_path):
    code, out, err = run_inline(*SMOKE, "longdoc.seq_len=[32,64]", "train.steps=2",
                                "longdoc.timed_steps=3", f"paths.cache={tmp_path}/cache", f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    assert "are truncated" in out
    rows = json.loads((tmp_path / "record.json").read_text())["rows"]
    by = {(r["provider"], r["metric"], r["x_value"], r["extra"].get("split")): r for r in rows}
    for seq_len in (32, 64):
        f1 = by[("sdpa", "micro_f1", seq_len, None)]
        assert f1["n"] == 2 and f1["extra"]["seeds"] == [0, 1] and f1["unit"] == "%"
        assert by[("eager", "train_step_time", seq_len, None)]["status"] == "ok"
        assert ("eager", "micro_f1", seq_len, None) not in by  # timed only
        assert by[("evidence_reader", "micro_f1", seq_len, None)]["p50"] > 0
    assert by[("data", "truncated_documents", 32, "synthetic-train")]["p50"] == 32  # all longer than 30 tokens
    (lift,) = [r for r in rows if r["metric"] == "f1_lift"]
    assert lift["provider"] == "sdpa" and lift["n"] == 2 and lift["extra"]["shortest"] == 32


def test_mimic_reads_local_json_lines_with_the_training_codes_as_labels(tmp_path):
    lines = {"train": [{"text": "a b c", "labels": ["401.9", "428.0"]}, {"text": "d", "labels": ["401.9"]}],
             "validation": [{"text": "a a a a", "labels": ["428.0", "999.9"]}]}
    for split, rows in lines.items():
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    class Words:  # a tokenizer: one id per letter
        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [[ord(w) for w in t.split()] for t in texts]}

    docs = data.load_mimic(tmp_path, "validation", Words())
    assert docs.label_names == ["401.9", "428.0"]  # 999.9 is not a training code
    assert docs.labels.tolist() == [[0.0, 1.0]] and docs.ids[0].tolist() == [97] * 4


@pytest.mark.parametrize("overrides, expected", [
    (["longdoc.model.positions=32", "longdoc.model.extend_positions=false"],
     ["longdoc.seq_len=[64, 128]", "32 positions", "extend_positions"]),
    (["longdoc.datasets=[imdb]"], ["imdb", "ecthr", "mimic-iii"]),
    (["longdoc.datasets=[mimic-iii]"], ["mimic_path", "credentialed"]),
    (["longdoc.datasets=[mimic-iii]", "longdoc.mimic_path=/no/such/folder"], ["/no/such/folder", "train.jsonl"]),
    (["longdoc.datasets=[ecthr]"], ["ecthr", "longdoc.model.pretrained"]),
    (["longdoc.batch=0"], ["longdoc.batch=0"]),
    (["longdoc.seq_len=[2]"], ["longdoc.seq_len=2"]),
    (["longdoc.synthetic.late_fraction=1.5"], ["longdoc.synthetic.late_fraction=1.5"]),
    (["longdoc.synthetic.min_tokens=40"], ["min_tokens=40", "boundary=30"]),
    (["longdoc.batch=6"], ["longdoc.batch=6", "micro_tokens"]),
    (["longdoc.timed=[sdpa]"], ["longdoc.timed=['sdpa']", "already trained"]),
    (["longdoc.timed_steps=1"], ["longdoc.timed_steps=1"]),
    (["longdoc.seeds=[3,3]"], ["longdoc.seeds names 3 more than once"]),
    (["longdoc.attention=[flash9]"], ["flash9", "effrepro"]),
    (["train.grad_accum=4"], ["train.grad_accum=4", "longdoc.batch"]),
    # without our kernel among the implementations too (transformers refused it only when building the model)
    (["longdoc.model.heads=3"], ["longdoc.model.hidden=32", "longdoc.model.heads=3"]),
])
def test_bad_input_is_named(refusal, overrides, expected):
    error = refusal(*SMOKE, *overrides)
    for text in expected:
        assert text in error, error


def test_bad_input_is_named_before_any_work(tmp_path):
    code, out, err = run_inline(*SMOKE, "longdoc.synthetic.min_tokens=40", f"paths.cache={tmp_path}/cache",
                                f"hydra.run.dir={tmp_path}")
    assert code == 2, (out, err)
    assert "min_tokens=40" in err and "Traceback" not in err, err
    assert not (tmp_path / "cache").exists()  # nothing generated


def test_our_kernel_gives_the_classifier_standard_attentions_logits_on_padded_documents():
    from types import SimpleNamespace

    from effrepro_kernels.hf_attention import register
    from tasks.flashattention.longdoc import build_classifier

    register()
    shape = SimpleNamespace(pretrained=None, hidden=32, layers=1, heads=2, intermediate=64, dropout=0.0)
    docs = data.Documents("toy", [np.arange(4, 30), np.arange(5, 12)], torch.eye(2)[[0, 1]], ["a", "b"])
    batch = {k: v.to(DEVICE) for k, v in data.encode(docs, [0, 1], 24).items()}  # one document cut, one padded
    logits = {}
    for attention in ("eager", "effrepro"):
        torch.manual_seed(0)
        model = build_classifier(shape, labels=2, vocab_size=40, positions=16, seq_len=24, attention=attention)
        with torch.no_grad():  # RoBERTa's weights of 0.02 give near-uniform attention, which hides a wrong softmax
            for weight in (p for p in model.roberta.encoder.parameters() if p.dim() > 1):
                weight.mul_(5.0)
        model.to(DEVICE)
        logits[attention] = model(**batch).logits
    # the kernel tests' float32 bound (tf32 products on a GPU). Measured on a CPU: 5e-7; 1e-3 at a softmax scale
    # 1.05x (3e-5 at 1.25x with RoBERTa's own weights), 0.1 where the padding is not masked
    assert rel_err(logits["effrepro"], logits["eager"].double()) < ATTENTION_TOL[torch.float32]


def test_the_table5_claims_read_only_rows_of_their_own_data_set():
    from repro.claims import claims_for_task, load_published
    from repro.records import RunRecord
    from repro.report import claim_value

    def val(dataset, seq_len, value):
        return Row("effrepro", "step", 5, "val_micro_f1", "%", value, n=1,
                   extra=dict(dataset=dataset, seq_len=seq_len, seed=0))
    rows = [val("synthetic", 512, 60.0), val("synthetic", 8192, 99.0), val("synthetic", 16384, 99.0),
            val("ecthr", 512, 70.0), val("ecthr", 8192, 80.0), val("mimic-iii", 512, 50.0),
            val("mimic-iii", 16384, 56.0)]
    record = RunRecord("longdoc", "flashattention", "paper", [], {}, [], {}, "now",
                       rows=list(derived_rows(rows, first_seed=0)))
    claims = {c.id: c for c in claims_for_task(load_published(ROOT / "results" / "published"), "longdoc")}
    assert claim_value(claims["table5_ecthr_micro_f1_8k"], record)[0] == 80.0
    assert claim_value(claims["table5_mimic_micro_f1_16k"], record)[0] == 56.0
    assert claim_value(claims["table5_longdoc_f1_lift"], record)[0] == pytest.approx((10.0 + 6.0) / 2)
    synthetic_only = RunRecord("longdoc", "flashattention", "paper", [], {}, [], {}, "now",
                               rows=list(derived_rows(rows[:3], first_seed=0)))
    assert all(claim_value(c, synthetic_only)[0] is None for c in claims.values())


@pytest.mark.parametrize("overrides, expected", [
    (["longdoc.mimic_path=/data/mimic"],
     "longdoc.mimic_path='/data/mimic' would have no effect: it is read only for mimic-iii, and longdoc.datasets="),
    (["longdoc.datasets=[ecthr]", "longdoc.model.pretrained=roberta-base", "longdoc.synthetic.labels=8"],
     "longdoc.synthetic.labels=8 would have no effect: it is read only for synthetic, and longdoc.datasets="),
    (["longdoc.datasets=[ecthr]", "longdoc.model.pretrained=roberta-base", "longdoc.model.hidden=768"],
     "longdoc.model.hidden=768 would have no effect: it sizes a model from scratch, and longdoc.model.pretrained="),
    (["longdoc.timed=[]", "longdoc.timed_steps=5"],
     "longdoc.timed_steps=5 would have no effect: it is how long the implementations of longdoc.timed train"),
])
def test_a_setting_the_run_would_not_read_is_refused(job_refusal, monkeypatch, overrides, expected):
    from tasks.flashattention import longdoc
    monkeypatch.setattr(longdoc, "_pretrained_positions", lambda name: 512)  # roberta-base's, without the Hub
    message = job_refusal("task=longdoc", "logger=none", *overrides)
    assert message.startswith(expected), message


def test_timed_steps_is_checked_only_where_an_implementation_is_timed(compose):
    """Unread without one, it could not be set right: the command line refuses it."""
    from repro.cli import check_job
    given = ["task=longdoc", "longdoc.timed=[]", "train.timing_skip_steps=3"]  # timed_steps=3 at scale=smoke
    check_job(compose(*given), given)


def test_timed_steps_set_to_null_is_not_read_when_nothing_is_timed(compose):
    """The command line lets a null through for a key the run does not read (it sets nothing), and validate checks
    timed_steps only where an implementation is timed: the run must not read it then either."""
    from repro.cli import check_job
    from tasks.flashattention.longdoc import candidates

    given = ["task=longdoc", "longdoc.timed=[]", "longdoc.timed_steps=null"]
    cfg = compose(*given)
    check_job(cfg, given)
    trained = list(candidates(cfg, None, {}))
    assert trained and all(c.spec is None for c in trained)  # each trained to the end, none timed alone
